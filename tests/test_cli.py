"""The CLI is thin: check that commands reach the library, exit codes, and one-line errors."""

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxr_fast.cli import app
from cxr_fast.data.manifest import read_manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_only_working_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("data", "models", "train", "evaluate", "compare", "interpret", "demo"):
        assert command in result.output


def test_synth_prepare_and_refusal_to_overwrite(tmp_path):
    result = invoke("data", "synth", tmp_path / "src", "--n-per-class", 4, "--size", 64)
    assert result.exit_code == 0, result.output
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "data", "--size", 0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "manifest.csv").is_file()
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "data")
    assert result.exit_code == 1
    assert "--force" in result.output and len(result.output.strip().splitlines()) == 1
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "data", "--splits", "0.5,0.5")
    assert result.exit_code == 1 and "split fractions '0.5,0.5': expected three numbers" in result.output
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "pct", "--splits", "50,25,25", "--size", 0)
    assert result.exit_code == 0, result.output  # percentages, as the library reads them
    assert (read_manifest(tmp_path / "pct")["split"] == "train").mean() == pytest.approx(0.5, abs=0.1)
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "other", "--patient-pattern", "(")
    assert result.exit_code == 1 and "regular expression" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "other", "--patient-pattern", "nih")
    assert result.exit_code == 0 and "matched no file name" in result.output  # phantoms carry no patient ids
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "fold", "--fold", 1)
    assert result.exit_code == 1 and "--folds 5 --fold 0" in result.output
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "fold", "--folds", 3, "--fold", 2, "--size", 0)
    assert result.exit_code == 0 and "cross-validation: fold 2 of 0–2 is test, fold 0 is valid" in result.output


def test_models_lists_local_and_timm():
    result = invoke("models", "cxres*")
    assert result.exit_code == 0 and "cxresnet" in result.output and "local" in result.output
    result = invoke("models", "resnet18")
    assert "timm" in result.output


def test_train_then_evaluate_through_the_cli(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--data", tiny_data, "--arch", "cxresnet_tiny", "--size", 48, "--epochs", 1,
                    "--bs", 16, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model"]["arch"] == "cxresnet_tiny"
    # output that is not a terminal (a log) is not wrapped: the closing line is whole, for grep
    closing = [line for line in result.output.splitlines() if line.startswith(f"run {out}: ")]
    assert len(closing) == 1 and "valid balanced accuracy" in closing[0]
    assert re.search(r", \d+ s(; no better than chance \(1/3\): .* check the data)?$", closing[0])
    result = invoke("evaluate", out)
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output and (out / "eval" / "data-test" / "report.html").is_file()


def test_user_errors_are_one_line_with_exit_code_1(tiny_data, tmp_path):
    result = invoke("train", "--data", tiny_data, "--arch", "cxresnett", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert "cxresnett" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    result = invoke("train", "--data", tmp_path / "nothing", "--arch", "cxresnet")
    assert result.exit_code == 1 and "nothing" in result.output
    result = invoke("evaluate", tmp_path)
    assert result.exit_code == 1 and "not a cxr_fast run bundle" in result.output


def test_an_out_path_the_system_refuses_is_one_line_naming_it_in_every_command(tiny_runs, tiny_data, tmp_path):
    # A name over 255 bytes (or a path over Windows' limit) in --out gave a traceback: ENAMETOOLONG was no storage
    # error, and check_folder_path's own look at the path raised it
    image = next((tiny_data.parent / "src").rglob("*.png"))
    for out in (tmp_path / ("x" * 300), tmp_path / ("x" * 300) / "sub"):
        for args in (["data", "synth", out], ["data", "prepare", tiny_data.parent / "src", "--out", out],
                     ["train", "--data", tiny_data, "--out", out, "--arch", "cxresnet_tiny"],
                     ["ensemble", *tiny_runs, "--out", out], ["compare", *tiny_runs, "--out", out],
                     ["export", tiny_runs[0], "--out", out], ["predict", tiny_runs[0], image, "--out", f"{out}.csv"],
                     ["demo", "--out", out]):
            result = invoke(*args)
            assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
            assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(f"error: {tmp_path}/xxx")
            assert "File name too long" in result.output, (args, result.output)
    assert sorted(tmp_path.iterdir()) == []


def test_an_invalid_name_met_while_writing_is_one_line_naming_it(tiny_data, tmp_path, monkeypatch):
    # Windows answers a folder named CON, NUL or "a:b" with EINVAL ("Invalid argument"), as a FAT or exFAT stick
    # does anywhere; Linux takes those names, so the refusal is simulated
    import os

    made = os.mkdir

    def refusing(path, *args, **kwargs):
        if Path(path).name == "CON":
            raise OSError(22, "Invalid argument", str(path))
        return made(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing)
    result = invoke("data", "prepare", tiny_data.parent / "src", "--out", tmp_path / "CON", "--size", "0")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"error: {tmp_path / 'CON'}: Invalid argument (not a name this system or disk accepts)\n"


def test_cxrfast_traceback_keeps_the_traceback_of_one_line_errors(tmp_path, monkeypatch):
    # for a developer: a storage error may be a bug reading a file that should be there
    from cxr_fast.errors import CxrFastError

    monkeypatch.setenv("CXRFAST_TRACEBACK", "1")
    result = invoke("evaluate", tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, CxrFastError)
    assert "not a cxr_fast run bundle" in str(result.exception)
    monkeypatch.setenv("CXRFAST_TRACEBACK", "0")
    result = invoke("evaluate", tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # the one line, as usual


def test_square_brackets_in_names_and_messages_are_printed_as_they_are(tmp_path):
    # rich reads "[left]" as a markup tag and drops it: a path or an install hint like cxr_fast[onnx] lost its text
    result = invoke("evaluate", tmp_path / "film[left]")
    assert result.exit_code == 1 and "film[left]" in result.output
    src = tmp_path / "src[b]"
    assert invoke("data", "synth", src, "--n-per-class", 4, "--size", 64).exit_code == 0
    result = invoke("data", "prepare", src, "--out", tmp_path / "out[x]", "--size", 0)
    assert result.exit_code == 0, result.output
    assert "out[x]/manifest.csv" in result.output.replace("\n", "")


def test_ctrl_c_during_training_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    import cxr_fast.train
    from cxr_fast.train import TrainingInterrupted

    def interrupted(data, cfg, **kwargs):
        raise TrainingInterrupted(tmp_path / "run", 2, 6, data=data)

    monkeypatch.setattr(cxr_fast.train, "train", interrupted)
    result = invoke("train", "--data", tmp_path / "data", "--arch", "cxresnet_tiny")
    assert result.exit_code == 130
    assert "after 2 of 6 epochs" in result.output
    assert f"--data {tmp_path / 'data'} --out {tmp_path / 'run'} --resume" in result.output.replace("\n", "")
    # the same, one line and 130, when compare is training (it printed a traceback and exited 1)
    result = invoke("compare", "--data", tmp_path / "data", "--archs", "cxresnet_tiny,convnet", "--out", tmp_path / "cmp")
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert "compare interrupted while training cxresnet_tiny-seed0 (0 of 2 runs finished); continue it with the same " \
           f"command and --resume --out {tmp_path / 'cmp'}" in result.output.replace("\n", "")


def test_the_resume_line_can_be_pasted_when_paths_have_spaces():
    import shlex

    from cxr_fast.train import resume_command

    line = resume_command(Path("models/odd ü run"), Path("data/odd ü"))
    assert shlex.split(line) == ["cxrfast", "train", "--data", "data/odd ü", "--out", "models/odd ü run", "--resume"]


def test_compare_stopped_while_scoring_or_run_again_without_resume_says_how_to_continue(tmp_path, monkeypatch):
    import cxr_fast.compare
    import cxr_fast.train

    def trained(data, cfg, out, **kwargs):  # a finished run's folder: not empty
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(cxr_fast.train, "train", trained)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.compare, "compare_runs", stopped)
    out = tmp_path / "my cmp"
    args = ("compare", "--data", tmp_path / "data", "--archs", "cxresnet_tiny,convnet", "--out", out)
    result = invoke(*args)
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert "compare interrupted while scoring (2 of 2 runs finished); continue it with the same command and " \
           f"--resume --out '{out}'" in result.output.replace("\n", "")
    assert "compare: training convnet-seed0 (2 of 2)" in result.output  # a log says whose epoch table follows
    result = invoke(*args)  # the same command again, without --resume
    assert result.exit_code == 1 and "an unfinished comparison is here; add --resume" in result.output


def test_resume_names_the_flags_it_ignores(tmp_path, monkeypatch):
    import cxr_fast.train

    monkeypatch.setattr(cxr_fast.train, "train", lambda data, cfg, **kwargs: kwargs["out"])
    monkeypatch.setattr(cxr_fast.train, "run_summary", lambda run_dir: "")
    result = invoke("train", "--data", tmp_path, "--out", tmp_path / "run", "--resume", "--epochs", 9, "--size", 96)
    assert result.exit_code == 0, result.output
    assert "ignored: --epochs, --size" in result.output.replace("\n", "")


def test_set_gives_any_recipe_option_on_the_command_line(tmp_path, monkeypatch):
    import cxr_fast.train

    trained = []
    monkeypatch.setattr(cxr_fast.train, "train", lambda data, cfg, **kwargs: trained.append(cfg) or kwargs["out"])
    monkeypatch.setattr(cxr_fast.train, "run_summary", lambda run_dir: "")
    result = invoke("train", "--data", tmp_path, "--recipe", "demo", "--epochs", 2, "--set", "wd=1e-4",
                    "--set", "freeze-epochs=0", "--set", "arch_kwargs={width: 0.25}", "--set", "augment=false")
    assert result.exit_code == 0, result.output
    cfg = trained[0]
    assert (cfg.wd, cfg.freeze_epochs, cfg.arch_kwargs, cfg.augment, cfg.epochs) == (1e-4, 0, {"width": 0.25}, False, 2)
    for args, message in [(("--set", "wd"), "expected KEY=VALUE"),
                          (("--set", "wdd=0.1"), "no option 'wdd'"),
                          (("--set", "wd=-1"), "wd must be a number ≥ 0"),
                          (("--set", "epochs=3", "--epochs", 4), "epochs given both as a flag and with --set")]:
        result = invoke("train", "--data", tmp_path, *args)
        assert result.exit_code == 1 and message in result.output.replace("\n", ""), result.output
    assert len(trained) == 1


def test_ctrl_c_outside_training_says_interrupted_and_exits_130(tmp_path, monkeypatch):
    import cxr_fast.train

    def interrupted(data, cfg, **kwargs):
        raise KeyboardInterrupt  # e.g. while the model is built, before any epoch

    monkeypatch.setattr(cxr_fast.train, "train", interrupted)
    result = invoke("train", "--data", tmp_path, "--arch", "cxresnet_tiny")
    assert result.exit_code == 130 and "interrupted" in result.output


def test_lr_auto_says_what_it_found(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = invoke("train", "--data", tiny_data, "--arch", "cxresnet_tiny", "--size", 48, "--epochs", 1,
                    "--bs", 16, "--lr", "auto", "--out", out)
    assert result.exit_code == 0, result.output
    found = json.loads((out / "config.json").read_text())["lr"]
    assert f"lr_find suggests {found:.3g}" in result.output
    # the log (not a terminal here) shows the one epoch, not lr_find's steps as rows that look like epochs
    assert re.findall(r"(?m)^(\d+) +\d+\.\d{6} ", result.output) == ["0"]
    assert not list((tmp_path / "cwd").iterdir())  # lr_find's saved model went to a temporary folder, not ./models


def test_compare_refuses_training_options_with_existing_runs_and_repeats_before_training(tiny_runs, tiny_data, tmp_path,
                                                                                        monkeypatch):
    result = invoke("compare", *tiny_runs, "--data", tiny_data, "--epochs", 5, "--out", tmp_path / "c1")
    assert result.exit_code == 1 and "--data, --epochs apply to --archs/--recipes" in result.output.replace("\n", "")
    assert not (tmp_path / "c1").exists()
    import cxr_fast.train

    monkeypatch.setattr(cxr_fast.train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    for repeat in (("--archs", "cxresnet_tiny,cxresnet_tiny"), ("--archs", "cxresnet_tiny", "--seeds", "0,0")):
        result = invoke("compare", "--data", tiny_data, *repeat, "--out", tmp_path / "c2")
        assert result.exit_code == 1 and "given twice" in result.output
    result = invoke("compare", *tiny_runs, "--data", tiny_data, "--archs", "cxresnet_tiny", "--out", tmp_path / "c3")
    assert result.exit_code == 1 and "not both" in result.output


def test_process_and_seed_options_are_refused_where_they_would_be_dropped(tiny_runs, tiny_data, tmp_path, monkeypatch):
    import cxr_fast.train

    monkeypatch.setattr(cxr_fast.train, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    for args, said in (
        (("train", "--data", tiny_data, "--arch", "cxresnet_tiny", "--nproc", 2), "--nproc applies with --distributed"),
        (("compare", "--data", tiny_data, "--archs", "cxresnet_tiny", "--nproc", 2), "--nproc applies with --distributed"),
        (("compare", "--data", tiny_data, "--archs", "cxresnet_tiny", "--distributed", "--nproc", 0),
         "--nproc must be at least 1, got 0"),
        (("compare", *tiny_runs, "--seeds", "0"), "--seeds apply to --archs/--recipes"),
    ):
        result = invoke(*args, "--out", tmp_path / "out")
        assert result.exit_code == 1 and said in result.output.replace("\n", ""), result.output
    assert not (tmp_path / "out").exists()


def test_ensemble_command_builds_a_bundle_and_reports_its_valid_score(tiny_runs, tmp_path):
    result = invoke("ensemble", *tiny_runs, "--out", tmp_path / "ens")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ens" / "config.json").is_file()
    assert re.search(r"valid balanced accuracy \d\.\d{3} \(members: ", result.output.replace("\n", ""))


def _option_help(*command: str, option: str) -> str:
    """The help text of one option, as `--help` and the generated CLI reference print it."""
    import typer

    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    return next(p.help for p in click_command.params if p.name == option)


def test_option_help_promises_only_what_the_command_takes(tiny_data, tmp_path):
    # --arch: timm models that return tokens (vision transformers) are refused, so not "any timm name"
    assert "any convolutional timm name" in _option_help("train", option="arch")
    result = invoke("train", "--data", tiny_data, "--arch", "vit_tiny_patch16_224", "--out", tmp_path / "vit")
    assert result.exit_code == 1 and "not a feature map" in result.output
    # --size of prepare: 0 or at least 64, and the help says so
    assert "at least 64" in _option_help("data", "prepare", option="size")
    (tmp_path / "src").mkdir()
    result = invoke("data", "prepare", tmp_path / "src", "--out", tmp_path / "out", "--size", 32)
    assert result.exit_code == 1 and "at least 64" in result.output
    # --data of evaluate and interpret: a manifest folder, or a manifest CSV (another collection in one folder)
    for command in ("evaluate", "interpret"):
        assert "CSV" in _option_help(command, option="data")


# ---------------------------------------------------------------------------------------------- option wiring
# Each command's library call is replaced by a recorder that stops the command: every option given must reach the call,
# and every option left out must take the library's own default (read from its signature, not from the CLI).


def _record(monkeypatch, module: str, name: str, then=None) -> list:
    import importlib

    from cxr_fast.errors import CxrFastError

    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        if then is not None:
            then(*args, **kwargs)
        raise CxrFastError("recorded")

    monkeypatch.setattr(importlib.import_module(module), name, recorder)
    return calls


def _defaults(module: str, name: str, *names: str) -> dict:
    import importlib
    import inspect

    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    return {n: parameters[n].default for n in names}


def _recorded(calls, *args):
    """The one call recorded, after the command invoked with `args` stopped at it."""
    calls.clear()
    result = invoke(*args)
    assert result.exit_code == 1 and "recorded" in result.output, result.output
    (call,) = calls
    return call


def test_data_commands_pass_every_option_and_leave_the_rest_to_the_library(tmp_path, monkeypatch):
    from cxr_fast.data.labels import parse_label_map

    src, out = tmp_path / "src", tmp_path / "data"
    keys = ("ignore_unmapped", "seed", "splits", "cache_size", "patient_pattern", "folds", "fold", "sites", "force")
    expected = {"label_map": None, **_defaults("cxr_fast.data.manifest", "prepare", *keys)}
    calls = _record(monkeypatch, "cxr_fast.data.manifest", "prepare")
    args, kwargs = _recorded(calls, "data", "prepare", src, "--out", out)
    assert args == (src, out) and {k: kwargs[k] for k in expected} == expected
    _, kwargs = _recorded(calls, "data", "prepare", src, "--out", out, "--label-map", "COVID=COVID-19",
                          "--ignore-unmapped", "--seed", 3, "--splits", "50,25,25", "--size", 128,
                          "--patient-pattern", "nih", "--folds", 5, "--fold", 2, "--sites", "--force")
    assert {k: kwargs[k] for k in expected} == {
        "label_map": parse_label_map("COVID=COVID-19"), "ignore_unmapped": True, "seed": 3, "splits": "50,25,25",
        "cache_size": 128, "patient_pattern": "nih", "folds": 5, "fold": 2, "sites": True, "force": True}
    calls.clear()
    result = invoke("data", "prepare", src, "--out", out, "--folds", 5)  # which fold is the test split? not fold 0 unasked
    assert result.exit_code == 1 and "--folds and --fold go together" in result.output and calls == []

    keys = ("n_per_class", "size", "shortcut_rate", "seed", "lesion_contrast", "force")
    expected = _defaults("cxr_fast.data.synth", "synthesize", *keys)
    calls = _record(monkeypatch, "cxr_fast.data.synth", "synthesize")
    args, kwargs = _recorded(calls, "data", "synth", src)
    assert args == (src,) and {k: kwargs[k] for k in keys} == expected
    _, kwargs = _recorded(calls, "data", "synth", src, "--n-per-class", 7, "--size", 96, "--shortcut-rate", 0.25,
                          "--lesion-contrast", 1.5, "--seed", 4, "--force")
    assert {k: kwargs[k] for k in keys} == {"n_per_class": 7, "size": 96, "shortcut_rate": 0.25, "seed": 4,
                                            "lesion_contrast": 1.5, "force": True}


def test_train_puts_every_option_into_the_config_and_passes_the_run_s_folder(tmp_path, monkeypatch):
    from cxr_fast.config import TrainConfig

    calls = _record(monkeypatch, "cxr_fast.train", "train")
    (data, cfg), kwargs = _recorded(calls, "train", "--data", tmp_path)
    assert data == tmp_path and cfg.to_dict() == TrainConfig().to_dict() and kwargs == {"out": None, "resume": False}
    (_, cfg), kwargs = _recorded(calls, "train", "--data", tmp_path, "--arch", "convnet", "--epochs", 3, "--size", 64,
                                 "--bs", 8, "--lr", "0.01", "--weights", "efficientnet-lite0", "--n-in", 3, "--class-weights",
                                 "--seed", 5, "--out", tmp_path / "run")
    assert (cfg.arch, cfg.epochs, cfg.size, cfg.bs, cfg.lr, cfg.weights, cfg.n_in, cfg.class_weights, cfg.seed) == (
        "convnet", 3, 64, 8, 0.01, "efficientnet-lite0", 3, True, 5)
    assert kwargs == {"out": tmp_path / "run", "resume": False}
    (_, cfg), kwargs = _recorded(calls, "train", "--data", tmp_path, "--out", tmp_path / "run", "--resume")
    assert cfg is None and kwargs == {"out": tmp_path / "run", "resume": True}

    calls = _record(monkeypatch, "cxr_fast.distributed", "launch_training")
    args, kwargs = _recorded(calls, "train", "--data", tmp_path, "--distributed", "--nproc", 3, "--out", tmp_path / "d")
    assert args[:2] == (3, tmp_path) and kwargs == {"out": tmp_path / "d", "resume": False}
    monkeypatch.setattr("cxr_fast.distributed.default_nproc", lambda: 7)
    args, _ = _recorded(calls, "train", "--data", tmp_path, "--distributed")
    assert args[0] == 7


def test_evaluate_and_interpret_pass_every_option_and_leave_the_rest_to_the_library(tmp_path, monkeypatch):
    run, other = tmp_path / "run", tmp_path / "other"
    expected = _defaults("cxr_fast.evaluate", "evaluate", "split", "tta", "device", "force")
    calls = _record(monkeypatch, "cxr_fast.evaluate", "evaluate")
    args, kwargs = _recorded(calls, "evaluate", run)
    assert args == (run, None, expected.pop("split")) and kwargs == expected
    args, kwargs = _recorded(calls, "evaluate", run, "--data", other, "--split", "valid", "--tta", "--device", "auto",
                             "--force")
    assert args == (run, other, "valid") and kwargs == {"tta": True, "device": "auto", "force": True}

    keys = ("n", "audit_n", "methods", "window", "stride", "baseline", "device", "force")
    expected = _defaults("cxr_fast.interpret", "interpret", "split", *keys)
    calls = _record(monkeypatch, "cxr_fast.interpret", "interpret")
    args, kwargs = _recorded(calls, "interpret", run)
    assert args == (run, None, expected.pop("split")) and kwargs == expected
    args, kwargs = _recorded(calls, "interpret", run, "--data", other, "--split", "valid", "--n", 3, "--audit-n", 5,
                             "--methods", "occlusion, gradcam", "--window", 9, "--stride", 4, "--baseline", "mean",
                             "--device", "cuda:1", "--force")
    assert args == (run, other, "valid") and kwargs == {"n": 3, "audit_n": 5, "methods": ("occlusion", "gradcam"),
                                                        "window": 9, "stride": 4, "baseline": "mean",
                                                        "device": "cuda:1", "force": True}


def test_compare_ensemble_and_demo_pass_every_option_and_leave_the_rest_to_the_library(tmp_path, monkeypatch):
    data, out, runs = tmp_path / "data", tmp_path / "out", [tmp_path / "a", tmp_path / "b"]
    defaults = _defaults("cxr_fast.compare", "compare_archs", "recipe", "seeds", "nproc", "resume")
    calls = _record(monkeypatch, "cxr_fast.compare", "compare_archs")
    args, kwargs = _recorded(calls, "compare", "--data", data, "--archs", "convnet")
    assert args == (data, ["convnet"]) and kwargs == {**defaults, "seeds": list(defaults["seeds"]), "recipes": [],
                                                      "out": None, "epochs": None, "size": None}
    args, kwargs = _recorded(calls, "compare", "--data", data, "--archs", "convnet, cxresnet_tiny", "--recipe", "r.yaml",
                             "--recipes", "demo,cxresnet", "--seeds", "1,2", "--epochs", 3, "--size", 64, "--out", out,
                             "--distributed", "--nproc", 2, "--resume")
    assert args == (data, ["convnet", "cxresnet_tiny"]) and kwargs == {
        "recipe": Path("r.yaml"), "recipes": ["demo", "cxresnet"], "seeds": [1, 2], "out": out, "epochs": 3,
        "size": 64, "nproc": 2, "resume": True}
    calls = _record(monkeypatch, "cxr_fast.compare", "compare_runs")
    assert _recorded(calls, "compare", *runs, "--out", out) == ((runs,), {"out": out})

    calls = _record(monkeypatch, "cxr_fast.ensemble", "build_ensemble")
    assert _recorded(calls, "ensemble", *runs, "--out", out) == ((runs, out), {})

    expected = _defaults("cxr_fast.demo", "run_demo", "n_per_class", "epochs", "force")
    calls = _record(monkeypatch, "cxr_fast.demo", "run_demo")
    args, kwargs = _recorded(calls, "demo")
    assert args == (Path("demo"),) and {k: kwargs[k] for k in expected} == expected
    args, kwargs = _recorded(calls, "demo", "--out", out, "--n-per-class", 12, "--epochs", 2, "--force")
    assert args == (out,) and {k: kwargs[k] for k in expected} == {"n_per_class": 12, "epochs": 2, "force": True}


def test_predict_export_and_serve_pass_every_option_and_leave_the_rest_to_the_library(tmp_path, monkeypatch):
    run, image, out = tmp_path / "run", tmp_path / "film.png", tmp_path / "out"
    expected = _defaults("cxr_fast.predict", "predict", "heatmap", "out", "runtime", "device", "force")
    calls = _record(monkeypatch, "cxr_fast.predict", "predict")
    assert _recorded(calls, "predict", run, image) == ((run, [image]), expected)
    assert _recorded(calls, "predict", run, image, tmp_path, "--heatmap", "--out", out / "r.csv", "--runtime", "onnx",
                     "--device", "auto", "--force") == ((run, [image, tmp_path]), {
                         "heatmap": True, "out": out / "r.csv", "runtime": "onnx", "device": "auto", "force": True})

    expected = _defaults("cxr_fast.export", "export_onnx", "out", "force")
    calls = _record(monkeypatch, "cxr_fast.export", "export_onnx")
    assert _recorded(calls, "export", run) == ((run, expected["out"]), {"force": expected["force"]})
    assert _recorded(calls, "export", run, "--out", out, "--force") == ((run, out), {"force": True})

    expected = _defaults("cxr_fast.serve", "serve", "host", "port", "runtime", "device")
    calls = _record(monkeypatch, "cxr_fast.serve", "serve",
                    then=lambda run, on_ready, **kwargs: on_ready("http://HOST/", kwargs["host"] in ("127.0.0.1", "::1")))
    args, kwargs = _recorded(calls, "serve", run)
    assert args == (run,) and {k: kwargs[k] for k in expected} == expected
    assert "serving" in runner.invoke(app, ["serve", str(run)]).output
    result = runner.invoke(app, ["serve", str(run), "--host", "0.0.0.0", "--port", "9000", "--runtime", "onnx",
                                 "--device", "cuda"])
    assert {k: calls[-1][1][k] for k in expected} == {"host": "0.0.0.0", "port": 9000, "runtime": "onnx",
                                                      "device": "cuda"}
    assert "warning: listening on 0.0.0.0: anyone who can reach this computer" in result.output.replace("\n", " ")
    assert "warning" not in runner.invoke(app, ["serve", str(run), "--host", "::1"]).output


def test_predict_shows_each_probability_to_three_decimals(tmp_path, monkeypatch):
    import pandas as pd

    results = pd.DataFrame({"path": [str(tmp_path / "a.png")], "predicted": ["Normal"],
                            "p_COVID-19": [0.12345], "p_Normal": [0.8], "p_Pneumonia": [0.07655], "warning": [""]})
    monkeypatch.setattr("cxr_fast.predict.predict", lambda *args, **kwargs: (results, []))
    result = invoke("predict", tmp_path / "run", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert re.search(r"a\.png .* Normal .* 0\.123 .* 0\.800 .* 0\.077", result.output)


def test_output_in_a_legacy_code_page_escapes_what_it_cannot_hold_instead_of_crashing(tmp_path):
    # Windows writes redirected or piped output in the locale's code page: a class or folder name in Chinese, or an
    # arrow in a table, ended the command with a UnicodeEncodeError traceback after its work was done (stderr escapes
    # by itself; stdout did not)
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", "from cxr_fast.cli import app; app()", "data", "synth",
                           str(tmp_path / "肺炎 é"), "--n-per-class", "1", "--size", "64"],
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode("cp1252")[-2000:]
    assert f"wrote 3 phantoms to {tmp_path}/\\u80ba\\u708e é" in done.stdout.decode("cp1252")


def _commands(command, name="cxrfast"):
    yield name, command
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, f"{name} {sub_name}")


def test_every_command_summary_is_one_line():
    # The command list shows a docstring's first paragraph with its line breaks kept: a summary wrapped in the
    # source showed up broken mid-sentence in `cxrfast --help`.
    import typer.main

    for name, command in _commands(typer.main.get_command(app)):
        summary = (command.help or "").strip().split("\n\n")[0]
        assert summary and "\n" not in summary, f"{name}: {summary!r}"


def _on_a_terminal(*args: str) -> str:
    """What `cxrfast ARGS` shows on a terminal (a pseudo-terminal), escape codes and all."""
    import os
    import pty
    import select
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, as a user at a terminal starts it
        os.execv(sys.executable, [sys.executable, "-m", "cxr_fast.cli", *args])
    shown = b""
    while select.select([fd], [], [], 120)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the command ended and closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.waitpid(pid, 0)
    return shown.decode("utf-8", errors="replace")


@pytest.mark.skipif(os.name == "nt", reason="pseudo-terminals are POSIX; CI runs on Linux")
def test_model_commands_say_they_are_loading_pytorch_at_a_terminal_and_not_in_a_log(tmp_path):
    # evaluate, interpret, predict... printed nothing for 3-9 s while torch, fastai and timm imported: long enough
    # on a clinic's laptop to press Ctrl-C and try again
    missing = tmp_path / "no-run"
    for command in (["evaluate", str(missing)], ["predict", str(missing), str(tmp_path)]):
        shown = _on_a_terminal(*command)
        assert "loading PyTorch" in shown, shown
        # the spinner is gone before the command's own output: the error line is whole, after it
        assert shown.rindex("loading PyTorch") < shown.index("error:"), shown
        assert f"error: {missing}: no such run folder" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
        piped = invoke(*command)  # not a terminal: the same one line, nothing before it
        assert piped.output == f"error: {missing}: no such run folder\n"


def test_the_loading_spinner_covers_timm_and_pytorch_and_the_onnx_runtime_loads_neither():
    # export's spinner wrapped an import of cxr_fast.export alone (0.1 s): PyTorch and timm then loaded, 3-9 s, with
    # nothing on the screen; evaluate's and the others' left timm (1-2 s) to the run's loading, after the spinner
    import subprocess
    import sys

    script = ("import sys; from rich.console import Console; from cxr_fast.progress import loading_libraries\n"
              "with loading_libraries(Console(), torch={torch}): pass\n"
              "print(sorted(m for m in ('timm', 'torch') if m in sys.modules))")
    for torch, loaded in ((True, "['timm', 'torch']"), (False, "[]")):
        done = subprocess.run([sys.executable, "-c", script.format(torch=torch)], capture_output=True, text=True,
                              check=True)
        assert done.stdout.strip() == loaded, done.stderr


def test_compare_s_console_table_names_its_figures_as_the_report_does(tiny_runs, tmp_path):
    # two seeds of one architecture: each figure is their mean, yet the console called the mean of their intervals
    # "95 % CI", and gave the calibrated ECE as plain "ECE"
    result = invoke("compare", *tiny_runs, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    labels = [line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") >= 2]
    assert "mean 95 % CI" in labels and "95 % CI" not in labels and "ECE (calibrated)" in labels, labels
