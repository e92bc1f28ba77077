import pytest

from cxr_fast.errors import CxrFastError
from cxr_fast.outputs import replacing_folder


def test_old_results_survive_a_failed_redo(tmp_path):
    out = tmp_path / "eval"
    with replacing_folder(out, force=False, what="an evaluation") as work:
        (work / "metrics.json").write_text("old")
    assert (out / "metrics.json").read_text() == "old"
    with pytest.raises(CxrFastError, match="--force"):
        with replacing_folder(out, force=False, what="an evaluation"):
            pass
    with pytest.raises(RuntimeError):
        with replacing_folder(out, force=True, what="an evaluation") as work:
            (work / "metrics.json").write_text("half")
            raise RuntimeError("crash halfway")
    assert (out / "metrics.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    with replacing_folder(out, force=True, what="an evaluation") as work:
        (work / "metrics.json").write_text("new")
    assert (out / "metrics.json").read_text() == "new"
