"""ONNX export: the files, agreement with PyTorch, staleness, and the torch-free ONNX runtime."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.export import OnnxRunner, export_onnx
from cxr_fast.predict import TorchRunner, model_image, model_input, occlusion_map, predict

if os.environ.get("CI") != "true":  # CI installs the onnx extra and must run these; a user may not have it
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


@pytest.fixture
def run(tiny_runs, tmp_path):
    return shutil.copytree(tiny_runs[0], tmp_path / "run")


@pytest.fixture
def images(tiny_data):
    return read_manifest(tiny_data).sort_values("path")["path"].tolist()[:7]


def test_export_writes_model_and_preprocessing(run):
    onnx_path = export_onnx(run)
    assert onnx_path == run / "model.onnx" and onnx_path.stat().st_size > 1000
    spec = json.loads((run / "preprocessing.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert spec["classes"] == config["classes"] and spec["temperature"] == pytest.approx(config["temperature"])
    assert spec["size"] == config["size"] and spec["n_in"] == config["n_in"]
    assert spec["mean"] == pytest.approx(config["mean"]) and spec["std"] == pytest.approx(config["std"])
    assert spec["resize"] == "squish bilinear"
    assert spec["input"] == {"name": "image", "shape": ["batch", config["n_in"], config["size"], config["size"]],
                             "dtype": "float32"}
    assert spec["max_abs_logit_difference"] <= 1e-4

    import onnx

    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch axis, not a fixed number

    with pytest.raises(CxrFastError, match="--force"):
        export_onnx(run)
    export_onnx(run, force=True)


def test_onnx_runtime_equals_pytorch(run, images):
    export_onnx(run)
    onnx_runner, torch_runner = OnnxRunner(run), TorchRunner(run)
    batch = np.stack([model_input(model_image(read_image(p), 48), 1, torch_runner.mean, torch_runner.std)
                      for p in images])
    for size in (1, len(batch)):  # the export was traced with a batch of 2: other sizes prove the dynamic axis
        np.testing.assert_allclose(onnx_runner.logits(batch[:size]), torch_runner.logits(batch[:size]), atol=1e-4)

    torch_results, _ = predict(run, images, runtime="torch", progress=False)
    onnx_results, _ = predict(run, images, runtime="onnx", progress=False)
    columns = [c for c in torch_results.columns if c.startswith("p_")]
    assert np.abs(onnx_results[columns].to_numpy() - torch_results[columns].to_numpy()).max() <= 1e-4
    assert (onnx_results["predicted"] == torch_results["predicted"]).all()

    # Heatmaps too: occlusion through ONNX Runtime gives the PyTorch map.
    x = batch[0]
    np.testing.assert_allclose(occlusion_map(onnx_runner, x, 1), occlusion_map(torch_runner, x, 1), atol=1e-4)


def test_export_to_another_folder_runs_without_the_bundle(run, tmp_path, images):
    export_onnx(run, tmp_path / "deploy")
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["model.onnx", "preprocessing.json"]
    results, skipped = predict(tmp_path / "deploy", images[:2], runtime="onnx", progress=False)
    assert len(results) == 2 and skipped == []


def test_onnx_runtime_needs_a_fresh_export(run, images):
    with pytest.raises(CxrFastError, match="cxrfast export"):
        predict(run, images[:1], runtime="onnx", progress=False)
    export_onnx(run)
    weights = load_file(str(run / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(CxrFastError, match="re-export"):
        OnnxRunner(run)


def test_onnx_prediction_does_not_import_torch(run, images):
    """The point of the ONNX runtime for a user: a start without torch's (and fastai's) import time."""
    export_onnx(run)
    code = ("import sys; from cxr_fast.predict import predict; "
            f"r, s = predict({str(run)!r}, [{images[0]!r}], runtime='onnx', progress=False); "
            "assert len(r) == 1 and not s; print(sorted({'torch', 'sklearn', 'scipy.optimize'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # nor sklearn and scipy's optimiser, each of which costs a second


def test_an_export_stopped_between_its_two_files_is_made_again_without_force(run, tmp_path):
    export_onnx(run, tmp_path / "deploy")
    (tmp_path / "deploy" / "model.onnx").unlink()  # killed after preprocessing.json, before model.onnx took its name
    with pytest.raises(CxrFastError, match=rf"model.onnx missing\); make it with `cxrfast export RUN --out "
                                           rf"{tmp_path / 'deploy'}`"):
        OnnxRunner(tmp_path / "deploy")
    export_onnx(run, tmp_path / "deploy")  # an unfinished export is no export to protect
    assert OnnxRunner(tmp_path / "deploy").classes
    with pytest.raises(CxrFastError, match="an export is already there; add --force"):
        export_onnx(run, tmp_path / "deploy")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.onnx").write_bytes(b"another tool's model")  # not ours to replace unasked
    with pytest.raises(CxrFastError, match="an export is already there; add --force"):
        export_onnx(run, tmp_path / "other")


def test_an_export_folder_given_to_the_torch_runtime_says_to_add_runtime_onnx(run, images, tmp_path):
    export_onnx(run, tmp_path / "deploy")
    with pytest.raises(CxrFastError, match="deploy: an ONNX export, not a run bundle; .* --runtime onnx"):
        predict(tmp_path / "deploy", images[:1], progress=False)


def test_export_command_takes_format_onnx_and_refuses_others(run, tmp_path):
    from typer.testing import CliRunner

    from cxr_fast.cli import app

    result = CliRunner().invoke(app, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "model.onnx").is_file()
    # the export and its check against PyTorch (10-60 s for a frozen_lite run) said nothing until the end
    lines = result.output.splitlines()
    step = f"exporting {run.name} to ONNX and checking it against PyTorch"
    assert lines[0] == f"{step}: 0/2 (0 %), started"
    assert re.fullmatch(rf"{step}: 2/2 \(100 %\), \d+ s, done", lines[1]) and lines[2].startswith("ONNX model: ")
    result = CliRunner().invoke(app, ["export", str(run), "--format", "tflite", "--out", str(tmp_path / "other")])
    assert result.exit_code == 1
    assert "--format 'tflite' is not supported" in result.output
    assert not (tmp_path / "other").exists()


def test_a_damaged_or_mismatched_export_is_a_one_line_error(run, tmp_path, tiny_runs):
    (tmp_path / "afile").write_text("")
    with pytest.raises(CxrFastError, match="afile: exists and is not a folder"):
        export_onnx(run, tmp_path / "afile")
    export_onnx(run, tmp_path / "a")
    export_onnx(shutil.copytree(tiny_runs[1], tmp_path / "other"), tmp_path / "b")
    spec_path, onnx_path = tmp_path / "a" / "preprocessing.json", tmp_path / "a" / "model.onnx"
    original = onnx_path.read_bytes()

    shutil.copy(tmp_path / "b" / "model.onnx", onnx_path)  # another run's network beside this run's classes
    # an export folder of its own is remade with --out (`export RUN --force` alone wrote into the run, not here)
    with pytest.raises(CxrFastError, match="not the model preprocessing.json was written for .*; re-export with "
                                           f"`cxrfast export RUN --out {tmp_path / 'a'} --force`"):
        OnnxRunner(tmp_path / "a")
    onnx_path.write_bytes(original[:1000])  # cut short
    with pytest.raises(CxrFastError, match="not the model"):
        OnnxRunner(tmp_path / "a")
    spec = json.loads(spec_path.read_text())
    del spec["onnx_sha256"]  # exports made before the digest was checked: the damage is still one line
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CxrFastError, match="ONNX Runtime cannot load it") as e:
        OnnxRunner(tmp_path / "a")
    assert "\n" not in str(e.value)
    del spec["classes"]
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(CxrFastError, match="lacks classes"):
        OnnxRunner(tmp_path / "a")


def test_an_edited_preprocessing_file_is_a_one_line_error(run, tmp_path):
    """preprocessing.json gets config.json's checks, and must agree with the network's own shapes: an edited size,
    channel count or class list would otherwise fail inside ONNX Runtime or put other names on the outputs."""
    export_onnx(run, tmp_path / "a")
    spec_path = tmp_path / "a" / "preprocessing.json"
    original = json.loads(spec_path.read_text())
    edits = [({"temperature": "1.2"}, "temperature must be a positive number"),
             ({"std": [0.0] * original["n_in"]}, "std must be positive"),
             ({"mean": [0.5] * (original["n_in"] + 1)}, "mean must be"),
             ({"size": original["size"] * 2}, r"the model's input is \[.*\] per image, but this file says"),
             ({"classes": original["classes"] + ["Other"]}, "the model's output is"),
             ({"classes": original["classes"][:1] * 2}, "classes must be a list of two or more different names")]
    for edit, message in edits:
        spec_path.write_text(json.dumps({**original, **edit}))
        with pytest.raises(CxrFastError, match=message) as e:
            OnnxRunner(tmp_path / "a")
        assert str(e.value).startswith(str(spec_path)) and "\n" not in str(e.value)
    spec_path.write_text(json.dumps(original))
    assert OnnxRunner(tmp_path / "a").classes == original["classes"]


def test_an_export_torch_cannot_make_is_a_one_line_error_and_leaves_no_file(run, tmp_path, monkeypatch):
    import torch

    def fails_halfway(model, args, f, **kwargs):
        open(f, "wb").write(b"half an onnx file")
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", fails_halfway)
    with pytest.raises(CxrFastError, match=r"torch.onnx cannot export .* \(Exporting the operator 'aten::fancy'") as e:
        export_onnx(run, out=tmp_path / "export")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "export").iterdir()) == []


def test_a_forced_export_that_fails_keeps_the_earlier_one_whole(run, tmp_path, monkeypatch):
    # --force unlinked model.onnx before writing the new preprocessing.json: a full disk there left neither export
    import errno

    import cxr_fast.outputs

    export_onnx(run, tmp_path / "deploy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "deploy").iterdir()}

    def disk_full(path, text):  # export imports write_text when it runs: this is the one it gets
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cxr_fast.outputs, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(run, tmp_path / "deploy", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "deploy").iterdir()} == before  # nothing new left behind
    assert OnnxRunner(tmp_path / "deploy").classes


def test_a_full_disk_during_the_export_itself_is_named_as_such(run, tmp_path, monkeypatch):
    # it read "torch.onnx cannot export convnet at opset 17 ([Errno 28] …)": the exporter was blamed for the disk
    import errno

    import torch

    def disk_full(model, args, f, **kwargs):
        raise RuntimeError("export failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        export_onnx(run, out=tmp_path / "export")
    assert caught.value.filename == str(tmp_path / "export" / "model.onnx")


def test_an_out_folder_holding_other_files_is_refused(run, tmp_path):
    # `export --out` into a compare report's folder mixed the export into it; the folder is meant to travel alone
    report = tmp_path / "cmp"
    report.mkdir()
    (report / "report.html").write_text("<html></html>")
    with pytest.raises(CxrFastError, match=r"cmp: holds other files \(report.html\); --out needs a new or empty folder"):
        export_onnx(run, report)
    assert sorted(p.name for p in report.iterdir()) == ["report.html"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_onnx(run, empty)
    export_onnx(run, empty, force=True)  # an earlier export there is replaced, as before
    assert sorted(p.name for p in empty.iterdir()) == ["model.onnx", "preprocessing.json"]


def test_a_second_export_into_a_folder_another_process_is_exporting_to_refuses_and_leaves_its_files(run, tmp_path):
    # Two exports into one folder at once shared .model.onnx.partial: one failed ("ONNX Runtime cannot load it ...
    # File doesn't exist", seen with real processes) or both "succeeded", the second replacing the first's export
    # without --force; and one between the other's two renames took its preprocessing.json for an unfinished export.
    from tests.conftest import HOLDING_LOCK, another_process

    out = tmp_path / "export"
    out.mkdir()
    (out / ".model.onnx.partial").write_bytes(b"being exported")
    with another_process(HOLDING_LOCK, out) as first:
        with pytest.raises(CxrFastError, match=rf"{out}: is being written by another cxrfast process \(pid {first.pid}\)"):
            export_onnx(run, out)
        assert [p.name for p in out.iterdir()] == [".model.onnx.partial"]
    with pytest.raises(CxrFastError, match=rf"{run}: is being written by another cxrfast process"):
        with another_process(HOLDING_LOCK, run):  # without --out the export goes into the run's folder: its lock
            export_onnx(run)
    assert not (run / "model.onnx").exists()


def test_an_export_of_a_calibrated_run_gives_the_softmax_of_the_logits_over_its_temperature(run, images, tmp_path):
    # the tiny runs' temperature is exactly 1, so a temperature lost on the way to ONNX showed nowhere: set one by hand
    import torch

    from cxr_fast.bundle import load_run

    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "temperature": 2.5}))
    export_onnx(run, tmp_path / "deploy")
    assert json.loads((tmp_path / "deploy" / "preprocessing.json").read_text())["temperature"] == 2.5
    assert OnnxRunner(tmp_path / "deploy").temperature == 2.5
    bundle = load_run(run)
    with torch.no_grad():
        logits = bundle.model(torch.stack([bundle.load_input(f) for f in images[:4]])).numpy().astype(np.float64)
    expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)
    results, _ = predict(tmp_path / "deploy", images[:4], runtime="onnx", progress=False)
    np.testing.assert_allclose(results[[f"p_{c}" for c in bundle.classes]].to_numpy(), expected, atol=1e-4)


def test_an_export_that_does_not_reproduce_pytorch_is_refused_and_not_kept(run, tmp_path, monkeypatch):
    # the exported network's first logit is off by 1e-3 (ten times the tolerance), the others exact
    import torch

    real_export = torch.onnx.export

    class FirstLogitShifted(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            logits = self.model(x)
            return logits + torch.tensor([1e-3] + [0.0] * (logits.shape[1] - 1))

    def shifted_export(model, args, f, **kwargs):
        return real_export(FirstLogitShifted(model).eval(), args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", shifted_export)
    with pytest.raises(CxrFastError, match=r"differs from PyTorch by 1\.0\de-03 in the logits .*not kept"):
        export_onnx(run, tmp_path / "deploy")
    assert list((tmp_path / "deploy").iterdir()) == []


def test_a_killed_export_s_half_files_do_not_block_the_next_one_but_another_tool_s_files_do(run, tmp_path):
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / ".model.onnx.partial").write_bytes(b"half an onnx file")  # a kill -9 mid-export leaves these
    (deploy / ".preprocessing.json.partial").write_text("{")
    export_onnx(run, deploy)
    assert OnnxRunner(deploy).classes
    other = tmp_path / "other"
    other.mkdir()
    (other / "preprocessing.json").write_text(json.dumps({"format": "another tool's"}))  # not an unfinished export
    with pytest.raises(CxrFastError, match="an export is already there; add --force"):
        export_onnx(run, other)
    assert json.loads((other / "preprocessing.json").read_text()) == {"format": "another tool's"}


def test_a_preprocessing_file_of_another_format_is_refused(run, tmp_path):
    export_onnx(run, tmp_path / "a")
    spec_path = tmp_path / "a" / "preprocessing.json"
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "format": "cxr_fast-onnx/2"}))
    with pytest.raises(CxrFastError, match="not a cxr_fast ONNX export .format 'cxr_fast-onnx/2'"):
        OnnxRunner(tmp_path / "a")
