"""Training end to end on tiny synthetic data: bundle, reload, resume, refusals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.train import build_learner, train
from tests.conftest import TINY


def test_one_epoch_gives_a_complete_bundle(tiny_data, tmp_path):
    run = train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    names = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "history.csv", "curves.png", "metrics.json"} <= names
    assert "checkpoint" not in names
    assert not [p for p in run.rglob("*") if p.suffix in {".pkl", ".pth", ".pt"}], "no pickle in a bundle"
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["COVID-19", "Normal", "Pneumonia"]
    assert config["n_in"] == 1 and config["size"] == 48 and config["model"]["arch"] == "cxresnet_tiny"
    assert config["temperature"] > 0 and "torch" in config["versions"]
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0]
    assert {"train_loss", "valid_loss", "valid_accuracy", "valid_balanced_accuracy", "train_accuracy"} <= set(history)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["valid_balanced_accuracy"] <= 1.0
    assert metrics["processes"] == 1


def test_reloaded_bundle_reproduces_the_training_pipeline(tiny_data, tmp_path):
    run_dir = train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    run = load_run(run_dir)
    manifest = read_manifest(tiny_data)
    # The fastai pipeline (valid transforms) with the saved weights must give the bundle's logits.
    cfg = resolve_config(epochs=1, **TINY)
    learn, _ = build_learner(manifest, cfg, stats=(run.config["mean"], run.config["std"]))
    learn.model.load_state_dict(run.model.state_dict())
    learn.model.eval()
    xb, _ = learn.dls.valid.one_batch()
    with torch.no_grad():
        fastai_logits = learn.model(xb).numpy()
    valid = manifest[manifest["split"] == "valid"].reset_index(drop=True)
    bundle_logits = predict_logits(run, valid.iloc[: len(xb)], progress=False)
    np.testing.assert_allclose(bundle_logits, fastai_logits, atol=1e-5)
    # and a second load gives identical numbers
    again = predict_logits(load_run(run_dir), valid.iloc[: len(xb)], progress=False)
    np.testing.assert_array_equal(again, bundle_logits)


class SimulatedKill(Exception):
    pass


class KillAfterEpoch(Callback):
    order = 60  # after the checkpoint is written

    def __init__(self, epoch):
        self.kill_epoch = epoch

    def after_epoch(self):
        if self.epoch == self.kill_epoch:
            raise SimulatedKill("simulated kill")


def test_resume_after_a_kill_finishes_with_full_history(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=out, quiet=True, extra_cbs=[KillAfterEpoch(0)])
    killed_state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert killed_state["train_seconds"] > 0  # the first epoch's time is kept with the checkpoint
    assert not (out / "config.json").exists()
    with pytest.raises(CxrFastError, match="--resume"):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=out, quiet=True)
    train(tiny_data, out=out, resume=True, quiet=True)
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert not (out / "checkpoint").exists()
    assert json.loads((out / "metrics.json").read_text())["train_seconds"] > killed_state["train_seconds"]
    load_run(out)


def test_existing_run_is_never_overwritten(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CxrFastError, match="already exists"):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=out, quiet=True)
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_arch_and_missing_manifest_are_one_line_errors(tiny_data, tmp_path):
    with pytest.raises(CxrFastError) as e:
        train(tiny_data, resolve_config(epochs=1, **{**TINY, "arch": "cxresnett"}), out=tmp_path / "a", quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(CxrFastError) as e:
        train(tmp_path / "nowhere", resolve_config(epochs=1, **TINY), out=tmp_path / "b", quiet=True)
    assert "\n" not in str(e.value)


def test_load_run_refuses_non_bundles(tmp_path):
    with pytest.raises(CxrFastError, match="not a cxr_fast run bundle"):
        load_run(tmp_path)
