"""Progress in a log: rich draws nothing when its output is not a terminal, so long work printed nothing until done."""

import io
import shutil

from rich.console import Console
from rich.progress import Progress

from cxr_fast.evaluate import evaluate
from cxr_fast.progress import LogProgress, progress_bar


def test_a_log_gets_a_line_when_a_task_starts_and_when_it_ends():
    stream = io.StringIO()
    with LogProgress(stream, interval=3600) as bar:
        task = bar.add_task("predicting 5 images", total=5)
        for _ in range(5):
            bar.advance(task)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "predicting 5 images: 0/5 (0 %), started"
    assert len(lines) == 2 and lines[1].startswith("predicting 5 images: 5/5 (100 %), ") and lines[1].endswith(" s, done")


def test_a_long_task_prints_a_line_each_interval():
    stream = io.StringIO()
    with LogProgress(stream, interval=0) as bar:
        task = bar.add_task("occlusion maps", total=4)
        bar.advance(task, 2)
        other = bar.add_task("reading images")  # no total: a count
        bar.advance(other, 3)
    assert stream.getvalue().splitlines()[1:] == ["occlusion maps: 2/4 (50 %), 0 s", "reading images: 0, started",
                                                  "reading images: 3, 0 s"]


def test_a_terminal_gets_rich_bars_a_file_gets_lines_and_disabled_gets_nothing():
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_bar(console=terminal), Progress)
    log = io.StringIO()
    bar = progress_bar(console=Console(file=log))
    assert isinstance(bar, LogProgress) and bar.stream is log
    quiet = progress_bar(False, console=Console(file=log))
    with quiet:
        quiet.advance(quiet.add_task("nothing", total=1))
    assert log.getvalue() == ""


def test_evaluate_in_a_log_says_how_far_prediction_got(tiny_runs, tmp_path, capsys):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")  # the shared run stays as other tests expect
    evaluate(run, n_boot=20, force=True, progress=True)  # earlier tests may have evaluated it
    err = capsys.readouterr().err
    assert "predicting " in err and "(100 %)" in err and ", done" in err


def test_interpret_in_a_log_counts_the_gallery_figures_and_deletion_curves(tiny_runs, tmp_path, capsys):
    # after the occlusion maps' bar ended, these took ~10 s on 24 maps with nothing on the screen
    from cxr_fast.interpret import interpret

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    interpret(run, n=1, audit_n=2, window=12, stride=12, force=True, progress=True)  # earlier tests may have interpreted it
    lines = capsys.readouterr().err.splitlines()
    for step in ("gallery figures", "deletion curves"):
        assert any(line.startswith(f"{step}: 0/") and line.endswith(", started") for line in lines), step
        assert any(line.startswith(f"{step}: ") and "(100 %)" in line and line.endswith(", done") for line in lines), step


def test_compare_in_a_log_counts_the_runs_scored(tiny_runs, tmp_path, capsys):
    # each run's prediction pass is timed and draws no bar: a comparison of real models sat silent for minutes
    from cxr_fast.compare import compare_runs

    compare_runs(tiny_runs, out=tmp_path / "cmp", n_boot=20)
    err = capsys.readouterr().err
    assert "scoring 2 runs on the test split: 0/2 (0 %), started" in err
    assert "scoring 2 runs on the test split: 2/2 (100 %), " in err and ", done" in err


def test_the_regression_bar_is_up_while_the_features_are_standardised(monkeypatch, capsys):
    # standardising and the SVD of ~530 x 11,536 features took ~20 s on 2 cores before the bar appeared
    import numpy as np

    from cxr_fast.probe import STRENGTHS, fit_regression

    real_svd, seen = np.linalg.svd, []

    def svd(*args, **kwargs):
        seen.append(capsys.readouterr().err)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", svd)
    rng = np.random.default_rng(0)
    x = {"train": rng.normal(size=(9, 40)), "valid": rng.normal(size=(6, 40))}  # fewer images than features
    y = {"train": np.arange(9) % 3, "valid": np.arange(6) % 3}
    fit_regression(x, y, class_weights=False)
    n = len(STRENGTHS) + 1
    assert seen == [f"fitting the regression: 0/{n} (0 %), started\n"]
    assert f"fitting the regression: {n}/{n} (100 %), " in capsys.readouterr().err


def test_training_shows_the_calibration_pass_after_the_last_epoch(tiny_data, tmp_path, capsys):
    # the valid split is predicted again with the best weights to fit the temperature: 25 s without a word for
    # efficientnet_lite0 at 288 px on 177 images
    from cxr_fast.config import resolve_config
    from cxr_fast.data.manifest import read_manifest
    from cxr_fast.train import train
    from tests.conftest import TINY

    train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run")
    n = int((read_manifest(tiny_data)["split"] == "valid").sum())
    err = capsys.readouterr().err
    assert f"calibrating on {n} valid images: 0/{n} (0 %), started" in err
    assert f"calibrating on {n} valid images: {n}/{n} (100 %), " in err
