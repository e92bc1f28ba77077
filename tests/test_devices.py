"""Running a trained model on a chosen device (`--device`): the CPU everywhere, and a GPU where torch sees one.

The tests taking `device` run once for the CPU and, on a machine with a GPU, once more for it (a parameter, not a
skip: CI has no GPU, and there the CPU case still runs). Each compares with the model on the CPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cxr_fast import attribution
from cxr_fast.bundle import inference_device, load_run, predict_logits
from cxr_fast.cli import app
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluate import evaluate
from cxr_fast.interpret import interpret
from cxr_fast.predict import load_runner, predict
from cxr_fast.serve import create_app

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def run(tiny_runs, tmp_path):
    """A private copy of a trained tiny run: these tests write evaluations and interpretations into it."""
    return shutil.copytree(tiny_runs[0], tmp_path / "run")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_device_names(no_gpu, monkeypatch):
    assert inference_device("cpu") == torch.device("cpu")
    assert inference_device(" CPU ") == torch.device("cpu")
    assert inference_device("auto") == torch.device("cpu")  # no GPU here: auto falls back, where cuda refuses
    with pytest.raises(CxrFastError, match=r"^--device cuda: torch sees no CUDA GPU on this machine \(torch .*; use "
                                           r"--device cpu$"):
        inference_device("cuda")
    for bad in ("gpu", "cuda:x", "cuda:", "cpu:1", "mps", ""):
        with pytest.raises(CxrFastError, match="^--device must be cpu, cuda, cuda:N or auto, got"):
            inference_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # TF32, cuDNN's default
        assert inference_device("auto") == torch.device("cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # float32, as a CPU's
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert inference_device("cuda:1") == torch.device("cuda:1") == inference_device(torch.device("cuda:1"))
    with pytest.raises(CxrFastError, match=r"^--device cuda:2: this machine has 2 GPU\(s\), numbered from 0$"):
        inference_device("cuda:2")
    with pytest.raises(CxrFastError, match="^--device must be cpu, cuda, cuda:N or auto, got 'cuda:'$"):
        inference_device("cuda:")  # with a GPU seen, torch.device's own RuntimeError and its traceback


def test_a_gpu_that_is_not_there_is_one_line_from_every_command(run, tiny_data, no_gpu):
    image = str(read_manifest(tiny_data)["path"].iloc[0])
    for args in (["evaluate", str(run), "--device", "cuda"], ["interpret", str(run), "--device", "cuda"],
                 ["predict", str(run), image, "--device", "cuda"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --device cuda: torch sees no CUDA GPU"), (args, lines)
    assert not (run / "eval").exists() and not (run / "interpret").exists()  # refused before any work
    with pytest.raises(CxrFastError, match="^--device cuda: torch sees no CUDA GPU"):
        create_app(run, device="cuda")  # serve's app, which would otherwise load the model on the CPU and serve
    with pytest.raises(CxrFastError, match="^--device cuda applies to --runtime torch"):
        load_runner(run, "onnx", "cuda")
    for cpu in (" CPU ", "Auto"):  # spelt as the torch runtime takes them: past the device check, to the missing export
        with pytest.raises(CxrFastError, match="no ONNX export"):
            load_runner(run, "onnx", cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_on_a_device_gives_the_cpu_figures_and_says_where(run, device):
    on_cpu = predict_logits(load_run(run), read_manifest(load_run(run).config["data"]).query("split == 'test'"),
                            progress=False)
    loaded = load_run(run, device=device)
    assert loaded.device.type == device and all(p.device.type == device for p in loaded.model.parameters())
    result = evaluate(run, n_boot=50, device=device, progress=False)
    predictions = pd.read_csv(result.out_dir / "predictions.csv")
    probs = predictions[[c for c in predictions if c.startswith("p_")]].to_numpy()
    expected = torch.softmax(torch.from_numpy(on_cpu) / loaded.temperature, 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert metrics["device"] == "cpu" if device == "cpu" else metrics["device"].startswith("cuda:0 (")


@pytest.mark.parametrize("device", DEVICES)
def test_attribution_runs_where_the_model_is_and_returns_cpu_maps(run, device):
    cpu_model, model = load_run(run).model, load_run(run, device=device).model
    x = load_run(run).load_input(read_manifest(load_run(run).config["data"])["path"].iloc[0])
    fill = torch.full((x.shape[0], 1, 1), -1.0)  # a CPU tensor, as interpret's baseline is
    for make in (lambda m: attribution.occlusion_maps(m, x, window=12, stride=6, baseline=fill),
                 lambda m: attribution.occlusion_maps_coarse_to_fine(m, x, window=8, baseline=fill),
                 lambda m: attribution.integrated_gradients(m, x, 1, baseline=fill, n_steps=8),
                 lambda m: attribution.gradcam(m, x, 1)):
        expected, got = make(cpu_model), make(model)
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_interpret_on_a_device_records_it_and_finds_the_cpu_losses(run, device):
    on_cpu = interpret(run, n=3, audit_n=3, progress=False)
    here = interpret(run, n=3, audit_n=3, device=device, force=True, progress=False)
    assert here.audit["device"] == "cpu" if device == "cpu" else here.audit["device"].startswith("cuda:0 (")
    assert here.top_losses["path"].tolist() == on_cpu.top_losses["path"].tolist()
    np.testing.assert_allclose(here.top_losses["loss"], on_cpu.top_losses["loss"], atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_predict_on_a_device_gives_the_cpu_probabilities_and_heatmaps(run, tiny_data, tmp_path, device):
    images = read_manifest(tiny_data)["path"].head(3).tolist()
    on_cpu, _ = predict(run, images, heatmap=True, out=tmp_path / "cpu.csv", progress=False)
    here, _ = predict(run, images, heatmap=True, out=tmp_path / "here.csv", device=device, progress=False)
    columns = [c for c in here.columns if c.startswith("p_")]
    np.testing.assert_allclose(here[columns].to_numpy(), on_cpu[columns].to_numpy(), atol=1e-4)
    assert here["heatmap"].str.endswith(".png").all() and here["predicted"].tolist() == on_cpu["predicted"].tolist()


def test_a_run_trained_on_an_apple_gpu_is_calibrated_on_the_cpu(tiny_data, tmp_path, monkeypatch):
    """fastai trains on MPS where torch sees an Apple GPU, and `--device` names no such device: calibrating where the
    model trained ended every such training, after its last epoch, in inference_device's refusal."""
    from cxr_fast.config import resolve_config
    from cxr_fast.train import train
    from tests.conftest import TINY

    monkeypatch.setattr(attribution, "model_device", lambda model: torch.device("mps", 0))  # where fastai trained it
    run = train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    assert json.loads((run / "config.json").read_text())["temperature"] > 0
