"""Run bundles remember the images they learned from, and external evaluation leaves those (and copies) out."""

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from cxr_fast.data.manifest import prepare, read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluate import evaluate
from cxr_fast.interpret import interpret
from cxr_fast.seen import SEEN_FILE, read_seen


def _fresh_copy(run, tmp_path):
    """The shared run without the evaluations other tests left in it."""
    return shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "interpret"))


def _seen_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[manifest["split"].isin(["train", "valid"])]


def test_bundle_stores_a_fingerprint_of_every_train_and_valid_image(tiny_runs, tiny_data):
    seen = read_seen(tiny_runs[0])
    assert seen is not None
    assert sorted(f.sha256 for f in seen) == sorted(_seen_rows(read_manifest(tiny_data))["sha256"])
    assert all(len(f.phash) == 64 and len(f.thumbnail) == 32 * 32 for f in seen)


def _external_set(tiny_data, tmp_path):
    """Another 'collection': byte copies of the training images, enlarged re-encoded copies of the valid images,
    and the test images (new to the model) as they are. (The tiny images are 64 px, the least `prepare` accepts,
    so the copies are enlarged rather than shrunk.)"""
    src = tmp_path / "other"
    for row in read_manifest(tiny_data).itertuples():
        target = src / row.label / f"{row.split}-{str(row.sha256)[:12]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if row.split == "valid":
            image = Image.open(row.path).convert("L")
            image.resize((round(image.width * 1.25), round(image.height * 1.25))).save(f"{target}.jpg", quality=85)
        else:
            shutil.copy(row.path, f"{target}.png")
    prepare(src, tmp_path / "other-data", cache_size=0, progress=False)
    return tmp_path / "other-data"


def test_external_evaluation_leaves_out_identical_files_and_near_copies(tiny_runs, tiny_data, tmp_path):
    manifest = read_manifest(tiny_data)
    counts = manifest["split"].value_counts()
    run = _fresh_copy(tiny_runs[0], tmp_path)
    result = evaluate(run, data=_external_set(tiny_data, tmp_path), n_boot=100, progress=False)
    summary = result.metrics["seen_images"]
    assert summary == {"checked": True, "listed": len(manifest), "identical": counts["train"],
                       "near_copy": counts["valid"], "left_out": counts["train"] + counts["valid"]}
    assert result.metrics["n"] == counts["test"]
    assert all(path.split("/")[-1].startswith("test-") for path in result.predictions["path"])
    left_out = pd.read_csv(result.out_dir / "seen_images.csv")
    assert sorted(left_out["match"].unique()) == ["identical", "near copy"]
    assert "images this model trained on" in (result.out_dir / "report.html").read_text()


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_moved_training_data_evaluates_only_its_unseen_images(tiny_runs, tiny_data, tmp_path):
    # The same manifest in another folder counts as another source; the check keeps it from scoring the
    # training images, so the figures are the test split's.
    moved = shutil.copytree(tiny_data, tmp_path / "moved")
    run = _fresh_copy(tiny_runs[0], tmp_path)
    test = evaluate(run, n_boot=100, progress=False)
    external = evaluate(run, data=moved, n_boot=100, progress=False)
    assert external.metrics["n"] == test.metrics["n"]
    # shared without its training images: the shift check cannot run, and says why without wrong advice
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone")}))
    from typer.testing import CliRunner

    from cxr_fast.cli import app

    said = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(moved), "--force"])
    assert said.exit_code == 0, said.output
    assert _squeezed(f"distribution-shift check skipped: the training images are not at hand to compare with (their "
                     f"manifest was {tmp_path / 'gone'})") in _squeezed(said.output)
    assert external.metrics["balanced_accuracy"] == test.metrics["balanced_accuracy"]


def test_interpret_on_another_source_leaves_out_seen_images_too(tiny_runs, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from cxr_fast.cli import app

    manifest = read_manifest(tiny_data)
    moved = shutil.copytree(tiny_data, tmp_path / "moved")
    run = _fresh_copy(tiny_runs[0], tmp_path)
    said = CliRunner().invoke(app, ["interpret", str(run), "--data", str(moved), "--n", "2", "--audit-n", "4",
                                    "--window", "8", "--stride", "4"])
    assert said.exit_code == 0, said.output
    result = interpret(run, data=moved, n=2, audit_n=4, window=8, stride=4, progress=False, force=True)
    assert result.audit["seen_images"]["left_out"] == len(_seen_rows(manifest))
    # listed where the console says they are, as evaluate lists them
    assert len(pd.read_csv(result.out_dir / "seen_images.csv")) == len(_seen_rows(manifest))
    # said on the console, as evaluate says it (compared without whitespace: the console wraps long lines)
    assert _squeezed(f"{len(_seen_rows(manifest))} of {len(manifest)} images are images this model trained on") in \
        _squeezed(said.output)
    audited = pd.read_csv(result.out_dir / "audit_images.csv")["path"]
    assert set(audited) <= set(manifest.loc[manifest["split"] == "test", "path"])


def test_older_bundle_is_checked_against_its_training_manifest_or_says_it_could_not_be(tiny_runs, tiny_data,
                                                                                        tmp_path):
    run = _fresh_copy(tiny_runs[0], tmp_path)
    (run / SEEN_FILE).unlink()
    moved = shutil.copytree(tiny_data, tmp_path / "moved")
    with_manifest = evaluate(run, data=moved, n_boot=100, progress=False)
    assert with_manifest.metrics["seen_images"]["left_out"] == _seen_rows(read_manifest(tiny_data)).shape[0]

    config = json.loads((run / "config.json").read_text())
    config["data"] = str(tmp_path / "nowhere")
    (run / "config.json").write_text(json.dumps(config))
    unchecked = evaluate(run, data=moved, n_boot=100, progress=False, force=True)
    assert unchecked.metrics["seen_images"]["checked"] is False
    assert unchecked.metrics["n"] == len(read_manifest(tiny_data))
    assert "Not checked for images the model trained on" in (unchecked.out_dir / "report.html").read_text()


def test_external_set_made_only_of_seen_images_is_a_one_line_error(tiny_runs, tiny_data, tmp_path):
    seen_only = tmp_path / "seen-only"
    seen_only.mkdir()
    manifest = read_manifest(tiny_data)
    _seen_rows(manifest).to_csv(seen_only / "manifest.csv", index=False)
    with pytest.raises(CxrFastError, match="nothing is left to evaluate") as e:
        evaluate(tiny_runs[0], data=seen_only, progress=False)
    assert "\n" not in str(e.value)


def test_only_pairs_across_seen_and_new_images_make_a_near_copy(tmp_path):
    # near_pairs compares every image with every other: a copy within the seen list, or within the new images, must
    # not mark anything
    from cxr_fast.data.dedup import file_sha256
    from cxr_fast.seen import manifest_fingerprints, match_seen
    from tests.test_dedup import reencoded, textured_image

    def table(images: dict) -> pd.DataFrame:
        for name, image in images.items():
            image.save(tmp_path / name)
        paths = [str(tmp_path / name) for name in images]
        return pd.DataFrame({"path": paths, "sha256": [file_sha256(p) for p in paths]})

    x, y, z = (textured_image(seed, 200, 160) for seed in (21, 22, 23))
    seen = manifest_fingerprints(table({"x.png": x, "x-copy.jpg": reencoded(x, 0.5, 80)}))
    items = table({"x-again.png": x, "x-small.jpg": reencoded(x, 0.4, 70), "y.png": y,
                   "y-small.jpg": reencoded(y, 0.4, 70), "z.png": z})
    assert match_seen(items, seen).tolist() == ["identical", "near copy", "", "", ""]
