"""`cxrfast demo`, the README's main command: the whole pipeline on phantoms, small enough for the suite."""

import io
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest
from rich.console import Console

from cxr_fast.data.manifest import read_manifest
from cxr_fast.demo import relative_link, run_demo
from cxr_fast.errors import CxrFastError


def test_demo_runs_prepare_train_evaluate_interpret_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    said = io.StringIO()
    report = run_demo(out, n_per_class=19, epochs=1, console=Console(file=said, width=200))
    assert report == out / "report.html" and report.is_file()
    page = report.read_text()
    assert "balanced accuracy" in page and "Shortcut audit" in page
    tested = int((read_manifest(out / "data")["split"] == "test").sum())
    assert f"Test results ({tested} images)" in page  # how many images the figures rest on
    run = out / "models" / "demo"
    assert {"model.safetensors", "config.json", "history.csv", "curves.png", "metrics.json"} <= {
        p.name for p in run.iterdir()}
    assert (run / "eval" / "data-test" / "report.html").is_file()
    assert (run / "interpret" / "data-test" / "gallery.html").is_file()
    # every link in the report leads to a file the demo wrote; the curves travel inside the page
    for target in ("eval/data-test/report.html", "interpret/data-test/gallery.html"):
        assert f"models/demo/{target}" in page
    assert '<img src="data:image/png;base64,' in page and "curves.png" not in page
    printed = said.getvalue()
    assert "report:" in printed and "audit:" in printed
    # the newcomer sees the run and its test results on the console, as train and evaluate print them
    assert "best epoch" in printed and "balanced accuracy" in printed and "95 % CI" in printed

    # docs/make_figures.py turns this demo into the documentation's pictures (it broke once, unnoticed)
    figures = subprocess.run([sys.executable, "docs/make_figures.py", str(out), "--out", str(tmp_path / "img")],
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert figures.returncode == 0, figures.stderr
    assert {"training-curves.png", "confusion-matrix.png", "deletion.png"} <= {p.name for p in (tmp_path / "img").iterdir()}


def test_demo_refuses_too_few_phantoms_before_writing_anything(tmp_path):
    with pytest.raises(CxrFastError, match=r"--n-per-class must be at least 19 \(got 12\)"):
        run_demo(tmp_path / "demo", n_per_class=12, epochs=1, console=Console(file=io.StringIO()))
    assert not (tmp_path / "demo").exists()


def test_force_replaces_an_earlier_demo_but_no_other_folder(tmp_path, monkeypatch):
    import cxr_fast.data.synth

    quiet = Console(file=io.StringIO())
    precious = tmp_path / "home"
    (precious / "phantoms").mkdir(parents=True)  # even with a phantoms/ folder among other things
    (precious / "thesis.docx").write_text("years of work")
    with pytest.raises(CxrFastError, match=r"home: not a demo folder \(it holds thesis.docx\)"):
        run_demo(precious, n_per_class=19, force=True, console=quiet)
    assert (precious / "thesis.docx").read_text() == "years of work"
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
        run_demo(tmp_path / "afile", n_per_class=19, force=True, console=quiet)

    class Replaced(Exception):
        pass

    def stop(*args, **kwargs):
        raise Replaced

    earlier = tmp_path / "demo"
    for name in ("phantoms", "data", "models"):
        (earlier / name).mkdir(parents=True)
    (earlier / "report.html").write_text("old")
    (earlier / ".DS_Store").write_text("")  # a file browser's; not the user's work
    monkeypatch.setattr(cxr_fast.data.synth, "synthesize", stop)  # a failure once the old demo is set aside
    with pytest.raises(Replaced):
        run_demo(earlier, n_per_class=19, force=True, console=quiet)
    assert (earlier / "report.html").read_text() == "old"  # kept until a new demo is complete

    def ctrl_c(out, **kwargs):
        (out / "Normal").mkdir(parents=True)  # half a new demo
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.data.synth, "synthesize", ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="the earlier demo in .* is as it was"):
        run_demo(earlier, n_per_class=19, force=True, console=quiet)
    assert (earlier / "report.html").read_text() == "old" and not (earlier / "phantoms" / "Normal").exists()
    # killed outright halfway: the earlier demo waits beside the half-made one, and the next call puts it back
    earlier.rename(tmp_path / ".demo.old")
    (earlier / "phantoms").mkdir(parents=True)
    with pytest.raises(CxrFastError, match="already exists"):
        run_demo(earlier, n_per_class=19, console=quiet)
    assert (earlier / "report.html").read_text() == "old" and not (tmp_path / ".demo.old").exists()
    (earlier / ".git").mkdir()  # hidden, but the user's: --force would set it aside with the demo and delete it
    with pytest.raises(CxrFastError, match=r"not a demo folder \(it holds .git\)"):
        run_demo(earlier, n_per_class=19, force=True, console=quiet)
    stopped = tmp_path / "stopped"
    (stopped / ".phantoms.partial").mkdir(parents=True)  # a first demo killed while drawing its phantoms
    monkeypatch.setattr(cxr_fast.data.synth, "synthesize", stop)
    with pytest.raises(Replaced):  # run again without --force: there is no demo there yet
        run_demo(stopped, n_per_class=19, console=quiet)


def test_a_first_demo_stopped_halfway_leaves_nothing_to_block_its_rerun(tmp_path, monkeypatch):
    import cxr_fast.train

    quiet = Console(file=io.StringIO())

    def interrupted(data, cfg, out, **kwargs):  # phantoms and data made, a checkpoint written, then Ctrl-C
        out.mkdir(parents=True)
        (out / "checkpoint.pth").write_bytes(b"half")
        raise KeyboardInterrupt(f"training interrupted after 0 of 1 epochs; cxrfast train {data} --out {out} --resume")

    monkeypatch.setattr(cxr_fast.train, "train", interrupted)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt) as e:
        run_demo(out, n_per_class=19, epochs=1, console=quiet)
    assert "--resume" not in str(e.value)  # a resumed run would not finish the demo
    assert str(e.value) == f"demo interrupted; what it had made in {out} was removed, so the same command starts it again"
    assert list(tmp_path.iterdir()) == []
    here = tmp_path / "here"
    here.mkdir()  # a folder made beforehand (or the current one) is emptied, not removed
    with pytest.raises(KeyboardInterrupt):
        run_demo(here, n_per_class=19, epochs=1, console=quiet)
    assert here.is_dir() and list(here.iterdir()) == []

    class Rerun(Exception):
        pass

    def rerun(*args, **kwargs):
        raise Rerun

    monkeypatch.setattr(cxr_fast.train, "train", rerun)
    with pytest.raises(Rerun):  # the same command again goes ahead: no "already exists"
        run_demo(out, n_per_class=19, epochs=1, console=quiet)
    assert not out.exists()  # a failure, not only Ctrl-C, leaves no half-made demo either


def test_a_first_demo_killed_outright_is_started_again_by_the_same_command(tmp_path, monkeypatch):
    # kill -9 runs no cleanup: the phantoms, data and a half-trained run stayed, and the same command was refused
    import cxr_fast.train

    out = tmp_path / "demo"
    (out / "phantoms").mkdir(parents=True)
    (out / "phantoms" / "_meta.csv").write_text("relpath,label\n")
    (out / "data").mkdir()
    (out / "models" / "demo" / "checkpoint").mkdir(parents=True)
    (out / "models" / "demo" / "checkpoint" / "state.json").write_text("{}")

    class Rerun(Exception):
        pass

    def rerun(*args, **kwargs):
        assert not (out / "models").exists()  # the killed run's checkpoint went before the new demo trained
        raise Rerun

    monkeypatch.setattr(cxr_fast.train, "train", rerun)
    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(Rerun):
        run_demo(out, n_per_class=19, epochs=1, console=console)
    assert "an unfinished demo (no report.html); starting it again" in console.file.getvalue()
    # anything that is not plainly a killed demo is still refused without --force
    mine = tmp_path / "mine"
    (mine / "phantoms").mkdir(parents=True)  # no _meta.csv: not phantoms synth wrote
    (mine / "models").mkdir()
    with pytest.raises(CxrFastError, match="already exists"):
        run_demo(mine, n_per_class=19, epochs=1, console=console)
    (mine / "phantoms" / "_meta.csv").write_text("relpath,label\n")
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(CxrFastError, match="already exists"):
        run_demo(mine, n_per_class=19, epochs=1, console=console)
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "models").is_dir()


def test_a_demo_killed_while_writing_its_report_is_not_taken_for_complete(tmp_path, monkeypatch):
    from pathlib import Path
    from types import SimpleNamespace

    import cxr_fast.data.synth
    from cxr_fast.demo import write_demo_report

    out = tmp_path / "demo"
    run_dir = out / "models" / "demo"
    run_dir.mkdir(parents=True)
    (out / "phantoms").mkdir()
    (out / "data").mkdir()
    (run_dir / "metrics.json").write_text('{"epochs": 1, "train_seconds": 3}')
    (run_dir / "curves.png").write_bytes(b"png")
    metrics = dict(balanced_accuracy=0.9, balanced_accuracy_ci=[0.8, 0.95], accuracy=0.9, macro_f1=0.9, ece=0.05,
                   temperature=1.0, n=12)
    evaluation = SimpleNamespace(metrics=metrics, out_dir=run_dir / "eval" / "data-test")
    interpretation = SimpleNamespace(verdicts=["fine"], out_dir=run_dir / "interpret" / "data-test")
    (tmp_path / ".demo.old" / "phantoms").mkdir(parents=True)  # the earlier demo, set aside by --force
    (tmp_path / ".demo.old" / "report.html").write_text("old")
    real_write = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):  # the process dies with half the page on disk
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_demo_report(out, run_dir, evaluation, interpretation, 0.5)
    monkeypatch.undo()
    assert not (out / "report.html").exists()  # half a page must not mark the new demo complete

    class Replaced(Exception):
        pass

    def stop(*args, **kwargs):
        raise Replaced

    monkeypatch.setattr(cxr_fast.data.synth, "synthesize", stop)
    quiet = Console(file=io.StringIO())
    with pytest.raises(CxrFastError, match="already exists"):  # the next call puts the earlier demo back first
        run_demo(out, n_per_class=19, console=quiet)
    assert (out / "report.html").read_text() == "old" and not (tmp_path / ".demo.old").exists()
    (out / ".report.html.partial").write_text("half")  # what a kill outright leaves: the demo's, not the user's
    with pytest.raises(Replaced):  # so --force still takes the folder for a demo's
        run_demo(out, n_per_class=19, force=True, console=quiet)
    assert (out / "report.html").read_text() == "old"
    (tmp_path / ".demo.old").mkdir()  # killed after the new demo was complete: the earlier one is not wanted back
    with pytest.raises(CxrFastError, match="already exists"):
        run_demo(out, n_per_class=19, console=quiet)
    assert (out / "report.html").read_text() == "old" and not (tmp_path / ".demo.old").exists()


def test_a_second_demo_into_a_folder_another_demo_is_writing_refuses_and_leaves_it_alone(tmp_path, monkeypatch):
    # A demo started twice (two terminals, a double click) took the first one's folder, phantoms and no report.html
    # yet, for a killed demo's and cleared it ("file not found" in the first one's training, seen with two real
    # processes); beside a --force demo it also put the earlier demo, set aside as .demo.old, back in place.
    import socket

    import cxr_fast.demo
    from tests.conftest import HOLDING_LOCK, another_process

    monkeypatch.setattr(cxr_fast.demo, "_run_steps", lambda *a, **k: pytest.fail("ran beside the first demo"))
    out = tmp_path / "demo"
    (out / "phantoms").mkdir(parents=True)
    (out / "phantoms" / "_meta.csv").write_text("relpath,label\n")  # the first demo's, being written
    (tmp_path / ".demo.old").mkdir()  # the earlier demo that the first one, with --force, set aside
    (tmp_path / ".demo.old" / "report.html").write_text("earlier")
    console = Console(file=io.StringIO(), width=300)
    with another_process(HOLDING_LOCK, out) as first:
        for force in (False, True):
            with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid "
                                                   rf"{first.pid}\)"):
                run_demo(out, n_per_class=19, epochs=1, force=force, console=console)
        assert (out / "phantoms" / "_meta.csv").is_file()
        assert (tmp_path / ".demo.old" / "report.html").read_text() == "earlier"
    # the locks of a demo killed outright, in its phantoms or prepare step, are its litter, not the user's files
    killed = tmp_path / "killed"
    killed.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name in (".phantoms.lock", ".data.lock"):
        (killed / name).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    monkeypatch.setattr(cxr_fast.demo, "_run_steps", lambda out, *a: out / "report.html")
    assert run_demo(killed, n_per_class=19, epochs=1, console=console) == killed / "report.html"


def test_report_links_use_forward_slashes_and_quote_odd_names():
    # A Windows path gives backslashes through str(); a browser takes them as part of the file's name.
    root = PureWindowsPath("C:/Users/me/demo")
    link = relative_link(root, root / "models" / "demo" / "eval 1#b" / "report.html")
    assert link == "models/demo/eval%201%23b/report.html"
