"""Training end to end on tiny synthetic data: bundle, reload, resume, refusals."""

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from fastai.callback.core import Callback
from PIL import Image
from safetensors.torch import load_file

from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.config import resolve_config
from cxr_fast.data.manifest import read_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.train import TrainingInterrupted, build_learner, channels_last_hazards, train
from tests.conftest import TINY


def test_one_epoch_gives_a_complete_bundle(tiny_data, tmp_path):
    run = train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    names = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "history.csv", "curves.png", "metrics.json",
            "seen_images.safetensors"} <= names
    assert "checkpoint" not in names
    assert not [p for p in run.rglob("*") if p.suffix in {".pkl", ".pth", ".pt"}], "no pickle in a bundle"
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["COVID-19", "Normal", "Pneumonia"]
    assert config["n_in"] == 1 and config["size"] == 48 and config["model"]["arch"] == "cxresnet_tiny"
    assert config["temperature"] > 0 and "torch" in config["versions"]
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0]
    # the curves name the run they show, on the figure and in the PNG's Title for a reader who cannot see it
    assert Image.open(run / "curves.png").info["Title"] == "Training curves of run (cxresnet_tiny); Loss; Accuracy"
    assert {"train_loss", "valid_loss", "valid_accuracy", "valid_balanced_accuracy", "train_accuracy"} <= set(history)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["valid_balanced_accuracy"] <= 1.0
    assert metrics["processes"] == 1


def test_config_json_records_the_threads_and_numpy_that_shaped_the_numbers(tiny_data, tmp_path):
    # the same seed gives other weights with another number of threads (float sums are added in another order), and
    # the split and bootstrap draw from numpy: a run must say both to be reproduced
    import platform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run / "config.json").read_text())
    assert config["versions"]["numpy"] == np.__version__
    assert config["environment"]["threads"] == 1
    assert config["environment"]["machine"] == platform.machine()
    assert config["environment"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


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
        fastai_logits = learn.model(xb.cpu()).numpy()  # the batch is on fastai's default device, a GPU if any
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
    with pytest.raises(CxrFastError, match="this run finished"):
        train(tiny_data, out=out, resume=True, quiet=True)


class SmoothLossSpy(Callback):
    """fastai's running train_loss: as a fit starts (after the Recorder resets it), and after each epoch."""

    order = 52

    def __init__(self):
        self.at_start, self.after_epochs = [], []

    def before_fit(self):
        self.at_start.append((self.recorder.smooth_loss.count, float(self.recorder.smooth_loss.val)))

    def after_epoch(self):
        self.after_epochs.append((self.recorder.smooth_loss.count, float(self.recorder.smooth_loss.val)))


def test_resume_carries_on_the_running_train_loss(tiny_data, tmp_path):
    # every fit restarts fastai's running average of the loss (about 50 batches of memory): restarted by --resume,
    # it forgot the earlier, higher losses and drew the resumed run's train_loss curve well below the uninterrupted
    # one's for epochs
    killed = SmoothLossSpy()
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "run", quiet=True,
              extra_cbs=[KillAfterEpoch(1), killed])
    resumed = SmoothLossSpy()
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True, extra_cbs=[resumed])
    count, value = killed.after_epochs[1]
    assert count > 0 and resumed.at_start == [(count, pytest.approx(value, rel=1e-6))]


class OptimizerAtFirstBatch(Callback):
    """The optimizer's tensors when the first batch after a resume is about to be trained on."""

    def before_batch(self):
        if not hasattr(self, "tensors"):
            self.tensors = {f"{i}.{k}": v.cpu().clone() for i, state in enumerate(self.learn.opt.state_dict()["state"])
                            for k, v in state.items() if isinstance(v, torch.Tensor)}


class KillAfterEpochs(Callback):
    order = 60  # after the checkpoint is written

    def __init__(self, n_epochs):
        self.n_epochs, self.seen = n_epochs, 0  # counted across the phases of fine-tuning, unlike self.epoch

    def after_epoch(self):
        self.seen += 1
        if self.seen == self.n_epochs:
            raise SimulatedKill("simulated kill")


@pytest.mark.parametrize("freeze_epochs", [None, 1, 2])
def test_resume_continues_with_the_optimizer_state_of_the_checkpoint(tiny_data, tmp_path, freeze_epochs):
    # fastai's freeze/unfreeze clear the optimizer's state: Adam's moments must be loaded after them, in the
    # from-scratch phase, the unfrozen phase of fine-tuning and its frozen phase alike (each killed inside it)
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    write_tensors(create_model("cxresnet_tiny").state_dict(), tmp_path / "start.safetensors")
    weights = {} if freeze_epochs is None else dict(weights=str(tmp_path / "start.safetensors"),
                                                    freeze_epochs=freeze_epochs)
    kill_after = 1 if freeze_epochs == 2 else 2
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **weights, **TINY), out=tmp_path / "run", quiet=True,
              extra_cbs=[KillAfterEpochs(kill_after)])
    saved = load_file(str(tmp_path / "run" / "checkpoint" / f"optimizer-epoch{kill_after - 1}.safetensors"))
    assert any("avg" in key for key in saved)  # Adam's moments are in the checkpoint
    probe = OptimizerAtFirstBatch()
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True, extra_cbs=[probe])
    assert probe.tensors.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(probe.tensors[key], value, rtol=0, atol=0, msg=key)


def test_a_resumed_run_trains_at_the_rates_of_an_uninterrupted_one(tiny_data, tmp_path):
    # the one-cycle schedule goes on from the epoch the run stopped at: neither restarted nor an epoch trained twice
    whole = LearningRates()
    train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "whole", quiet=True, extra_cbs=[whole])
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "run", quiet=True,
              extra_cbs=[KillAfterEpoch(0)])
    resumed = LearningRates()
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True, extra_cbs=[resumed])
    (rates,) = whole.fits
    per_epoch = len(rates) // 3
    assert len(rates) == 3 * per_epoch > 0
    assert len(resumed.fits) == 1
    np.testing.assert_allclose(resumed.fits[0], rates[per_epoch:], rtol=1e-12)


class RatesAtFirstBatch(Callback):
    def after_batch(self):  # the rates fastai's ParamScheduler set for this batch, as the step used them
        if self.training and not hasattr(self, "rates"):
            self.rates = [hypers["lr"] for hypers in self.learn.opt.hypers]


def test_pretrained_weights_without_a_frozen_phase_still_fine_tune_at_discriminative_rates(tiny_data, tmp_path):
    # freeze_epochs 0 fell back to the from-scratch cycle: the body at the head's full rate, lr_mult ignored
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    write_tensors(create_model("cxresnet_tiny").state_dict(), tmp_path / "start.safetensors")
    probe = RatesAtFirstBatch()
    cfg = resolve_config(epochs=1, weights=str(tmp_path / "start.safetensors"), freeze_epochs=0, lr_mult=100,
                         **TINY)
    train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[probe])
    body, head = probe.rates
    assert body == pytest.approx(head / 100)
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["phase"]) == ["unfrozen"]


class WeightsAtFirstBatch(Callback):
    def before_batch(self):
        if not hasattr(self, "weights"):
            self.weights = {k: v.cpu().clone() for k, v in self.learn.model.state_dict().items()}  # saved: on the CPU


def test_a_kill_before_state_json_resumes_from_the_epoch_it_names(tiny_data, tmp_path, monkeypatch):
    # the epoch's weights and optimizer state are written before state.json, which names the epoch they hold: a
    # kill in between must leave the previous epoch's files as state.json still names them
    real_replace, calls = Path.replace, []

    def killed_before_the_second_state(self, target):
        calls.append(Path(target).name)
        if calls.count("state.json") == 2 and Path(target).name == "state.json":
            raise SimulatedKill("killed before state.json of epoch 1")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", killed_before_the_second_state)
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "run", quiet=True)
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["epochs_done"] == 1
    # history.csv showed epoch 1 too, which --resume then trained again
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [0]
    epoch0 = load_file(str(tmp_path / "run" / "checkpoint" / "model-epoch0.safetensors"))
    probe = WeightsAtFirstBatch()
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True, extra_cbs=[probe])
    for key, value in epoch0.items():
        torch.testing.assert_close(probe.weights[key], value, rtol=0, atol=0, msg=key)
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [0, 1, 2]


def test_a_run_killed_while_writing_its_first_checkpoint_is_started_again_by_the_same_command(tiny_data, tmp_path):
    # kill -9 after the first epoch's weights but before its state.json: the folder held checkpoint files that
    # neither the same command ("already exists") nor --resume ("no checkpoint") accepted
    killed = _killed_run(tiny_data, tmp_path / "killed")
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    for name in ("model-epoch0.safetensors", "best-epoch0.safetensors", "optimizer-epoch0.safetensors"):
        if (killed / "checkpoint" / name).exists():
            shutil.copy(killed / "checkpoint" / name, out / "checkpoint" / name)
    (out / "checkpoint" / ".state.json.partial").write_text('{"epochs_')
    with pytest.raises(CxrFastError, match="stopped before its first epoch ended.*start it again without --resume"):
        train(tiny_data, out=out, resume=True, quiet=True)
    train(tiny_data, resolve_config(epochs=1, **TINY), out=out, quiet=True)
    assert (out / "config.json").is_file() and not (out / "checkpoint").exists()
    (tmp_path / "other" / "checkpoint").mkdir(parents=True)  # anything else there is still refused
    (tmp_path / "other" / "checkpoint" / "notes.txt").write_text("mine")
    with pytest.raises(CxrFastError, match="already exists"):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "other", quiet=True)


def test_a_run_killed_in_the_middle_of_a_first_checkpoint_file_is_started_again(tiny_data, tmp_path, monkeypatch):
    # the leftovers are recognised by the names the writer really gives its half files, whatever they are
    import cxr_fast.outputs
    import cxr_fast.train

    real_written = cxr_fast.outputs._written

    def killed_mid_file(tmp, path, write):
        if path.name == "optimizer-epoch0.safetensors":
            write()  # the half file stays: kill -9 runs no cleanup
            raise SimulatedKill("killed")  # an argument: fastai's callback wrapper rewrites args[0]
        real_written(tmp, path, write)

    out = tmp_path / "run"
    monkeypatch.setattr(cxr_fast.outputs, "_written", killed_mid_file)
    monkeypatch.setattr(cxr_fast.train, "clear_run_folder", lambda *a, **k: None)  # no cleanup after a kill -9
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=2, **TINY), out=out, quiet=True)
    monkeypatch.undo()
    assert any(p.name.endswith(".partial") for p in (out / "checkpoint").iterdir())
    train(tiny_data, resolve_config(epochs=1, **TINY), out=out, quiet=True)
    assert (out / "config.json").is_file()


def test_ctrl_c_while_the_bundle_is_written_says_how_to_resume(tiny_data, tmp_path, monkeypatch):
    import cxr_fast.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.train, "finish_bundle", interrupted)
    with pytest.raises(TrainingInterrupted, match=f"after 1 of 1 epochs; .* --out {tmp_path / 'run'} --resume"):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    monkeypatch.undo()
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cxr_fast.train, "finish_bundle", disk_full)
    with pytest.raises(CxrFastError, match=f"No space left on device; the bundle in {tmp_path / 'run'} was not "
                                           f"finished; make room and finish it with: .* --out {tmp_path / 'run'} --resume"):
        train(tiny_data, out=tmp_path / "run", resume=True, quiet=True)
    monkeypatch.undo()
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True)
    assert load_run(tmp_path / "run").config["classes"]


class CtrlC(Callback):
    """Ctrl-C at the given event of the given epoch."""

    order = 60  # after the checkpoint is written

    def __init__(self, epoch, event):
        self.at_epoch, self.event = epoch, event

    def __call__(self, event_name):
        if event_name == self.event and getattr(self.learn, "epoch", None) == self.at_epoch:
            raise KeyboardInterrupt
        return super().__call__(event_name)


def test_ctrl_c_keeps_finished_epochs_for_resume_or_leaves_no_folder_when_none_finished(tiny_data, tmp_path):
    cfg = resolve_config(epochs=3, **TINY)
    with pytest.raises(TrainingInterrupted, match="after 1 of 3 epochs") as stop:
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[CtrlC(0, "after_epoch")])
    assert stop.value.run_dir == tmp_path / "run" and stop.value.epochs_done == 1
    train(tiny_data, out=tmp_path / "run", resume=True, quiet=True)
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [0, 1, 2]

    with pytest.raises(TrainingInterrupted, match="nothing was kept"):
        train(tiny_data, cfg, out=tmp_path / "early", quiet=True, extra_cbs=[CtrlC(0, "before_epoch")])
    assert not (tmp_path / "early").exists()  # so the same --out can simply be run again


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


def test_batch_larger_than_the_training_split_is_a_one_line_error_that_leaves_nothing(tiny_data, tmp_path):
    # fastai drops the last incomplete batch: with fewer training images than --bs an epoch would train on
    # nothing and report NaN losses, so the run is refused before its folder is made
    n_train = int((read_manifest(tiny_data)["split"] == "train").sum())
    with pytest.raises(CxrFastError, match=f"{n_train} training images, fewer than the batch size") as e:
        train(tiny_data, resolve_config(epochs=1, **{**TINY, "bs": n_train + 1}), out=tmp_path / "run", quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_size_too_small_for_the_network_is_a_one_line_error_that_leaves_nothing(tiny_data, tmp_path):
    # seven 2x2 poolings need 128 px; at 48 px the third batch norm met a 0-pixel map, a traceback mid-training
    cfg = resolve_config(epochs=1, **{**TINY, "arch": "convnet"}, arch_kwargs={"widths": [4] * 7})
    with pytest.raises(CxrFastError, match="convnet fails on a 48-pixel, 1-channel image .* give a larger --size") as e:
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


class DiskFull(Callback):
    def after_batch(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_run_failing_before_its_first_epoch_ends_leaves_no_folder_to_block_a_retry(tiny_data, tmp_path,
                                                                                     monkeypatch):
    import errno

    import cxr_fast.train

    with pytest.raises(OSError):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True, extra_cbs=[DiskFull()])
    assert not (tmp_path / "run").exists()  # a retry of the same command is not refused as "already exists"
    (tmp_path / "mine").mkdir()  # an empty --out the user made: emptied, not removed
    with pytest.raises(OSError):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "mine", quiet=True, extra_cbs=[DiskFull()])
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    real_write_text = cxr_fast.train.write_text

    def full_at_state_json(path, text):
        if path.name == "state.json":  # the disk fills up as the first epoch's checkpoint is completed
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write_text(path, text)

    monkeypatch.setattr(cxr_fast.train, "write_text", full_at_state_json)
    with pytest.raises(OSError):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # its weights were written, but no state.json: nothing to resume


def test_a_run_stopped_or_failing_while_lr_find_runs_leaves_no_folder(tiny_data, tmp_path, monkeypatch):
    # lr_find ran after the run folder was made and outside the clean-up: Ctrl-C or a bad image there left it
    import cxr_fast.train

    def interrupted(learn):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxr_fast.train, "find_lr", interrupted)
    with pytest.raises(TrainingInterrupted, match="after 0 of 1 epochs; nothing was kept"):
        train(tiny_data, resolve_config(epochs=1, **{**TINY, "lr": "auto"}), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()

    def failing(learn):
        raise CxrFastError("some.png: image data is truncated")

    monkeypatch.setattr(cxr_fast.train, "find_lr", failing)
    with pytest.raises(CxrFastError, match="truncated"):
        train(tiny_data, resolve_config(epochs=1, **{**TINY, "lr": "auto"}), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


class FinalWeights(Callback):
    """The network's weights as the last fit ends (the bundle keeps the best epoch's, which may be an early one)."""

    def after_fit(self):
        self.weights = {k: v.detach().cpu().clone() for k, v in self.learn.model.state_dict().items()}


@pytest.mark.parametrize("fine_tune", [False, True])
def test_a_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tiny_data, tmp_path, fine_tune):
    # the resumed epochs shuffle and augment with the random draws the uninterrupted run made there (the generators'
    # state is checkpointed), so the two runs' histories and weights are the same; killed inside the one phase of
    # training from scratch, and between the frozen and the unfrozen phase of fine-tuning
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    write_tensors(create_model("cxresnet_tiny").state_dict(), tmp_path / "start.safetensors")
    options = dict(weights=str(tmp_path / "start.safetensors"), freeze_epochs=1) if fine_tune else {}
    cfg = resolve_config(epochs=3, **options, **TINY)
    whole_end, resumed_end = FinalWeights(), FinalWeights()
    whole = train(tiny_data, cfg, out=tmp_path / "whole", quiet=True, extra_cbs=[whole_end])
    with pytest.raises(SimulatedKill):
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[KillAfterEpochs(1)])
    resumed = train(tiny_data, out=tmp_path / "run", resume=True, quiet=True, extra_cbs=[resumed_end])
    assert (resumed / "history.csv").read_bytes() == (whole / "history.csv").read_bytes()
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert resumed_end.weights.keys() == whole_end.weights.keys()
    for key, value in whole_end.weights.items():
        torch.testing.assert_close(resumed_end.weights[key], value, rtol=0, atol=0, msg=key)


def test_a_run_interrupted_under_an_earlier_cxr_fast_resumes(tiny_data, tmp_path):
    out = _killed_run(tiny_data, tmp_path / "run")
    for kind in ("model", "optimizer"):  # the checkpoint's names before each epoch's files had names of their own
        (out / "checkpoint" / f"{kind}-epoch0.safetensors").rename(out / "checkpoint" / f"{kind}.safetensors")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    del state["rng"]  # nor did it keep the random generators' state: the resumed epochs draw afresh
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    train(tiny_data, out=out, resume=True, quiet=True)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2]


@pytest.mark.parametrize("damage", [lambda rng: rng.pop("torch"), lambda rng: rng.update(torch="AAAA"),
                                    lambda rng: rng["python"].update(state=7)])
def test_a_damaged_generators_state_warns_and_the_run_still_resumes(tiny_data, tmp_path, damage):
    # the weights and optimizer state are intact: an edited "rng" entry costs bit-for-bit agreement, not the run
    out = _killed_run(tiny_data, tmp_path / "run")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    damage(state["rng"])
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match=r"state\.json: its random generators' state could not be restored .*afresh"):
        train(tiny_data, out=out, resume=True, quiet=True)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2]


def test_a_bug_while_restoring_the_generators_stops_the_resumed_run(tiny_data, tmp_path, monkeypatch):
    # only a damaged entry is warned about and passed over: a fault of our own code must be seen, not read as damage
    out = _killed_run(tiny_data, tmp_path / "run")

    def broken(dls, saved):
        raise AttributeError("'DataLoader' object has no attribute 'rng'")

    monkeypatch.setattr("cxr_fast.train.set_rng_state", broken)
    with pytest.raises(AttributeError, match="no attribute 'rng'"):
        train(tiny_data, out=out, resume=True, quiet=True)


def test_a_single_class_manifest_is_refused_before_training(tiny_data, tmp_path):
    table = read_manifest(tiny_data)
    one_class = tmp_path / "one" / "manifest.csv"
    one_class.parent.mkdir()
    table[table["label"] == table["label"].iloc[0]].to_csv(one_class, index=False)
    with pytest.raises(CxrFastError, match="only the class .* a classifier needs two or more"):
        train(one_class, resolve_config(epochs=1, **{**TINY, "bs": 2}), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_batch_of_one_is_refused_because_batch_norm_cannot_train_on_it():
    with pytest.raises(CxrFastError, match="bs must be a whole number ≥ 2"):
        resolve_config(bs=1)


def test_load_run_refuses_non_bundles(tmp_path):
    with pytest.raises(CxrFastError, match="not a cxr_fast run bundle"):
        load_run(tmp_path)


def test_damaged_json_in_a_run_folder_is_a_one_line_error(tiny_data, tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0], run)
    (run / "metrics.json").write_text('{"best_epoch": 1,')  # e.g. a disk that filled up mid-write
    with pytest.raises(CxrFastError, match=r"metrics.json: not valid JSON") as e:
        load_run(run)
    assert "\n" not in str(e.value)

    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoint").mkdir(parents=True)
    (interrupted / "checkpoint" / "state.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CxrFastError, match=r"state.json: not valid JSON"):
        train(tiny_data, out=interrupted, resume=True, quiet=True)


class LayoutProbe(Callback):
    """Records the memory layout of the first conv weight with several input channels, and of the input batch
    the model sees."""

    order = 10  # after ChannelsLast (order -1) has converted the batch

    def before_batch(self):
        # with one input channel both layouts have the same strides
        conv = next(m for m in self.learn.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        self.seen = (conv.weight.is_contiguous(memory_format=torch.channels_last),
                     self.xb[0].is_contiguous(memory_format=torch.channels_last), self.xb[0].stride())
        self.trained = self.learn


def test_channels_last_trains_in_that_layout_and_saves_a_plain_bundle(tiny_data, tmp_path):
    probe = LayoutProbe()
    # convnet: no 1×1 strided convolution, so the layout is safe to use (see the next test)
    cfg = resolve_config(epochs=1, channels_last=True, **{**TINY, "arch": "convnet", "n_in": 3})
    run_dir = train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[probe])
    weight_cl, input_cl, stride = probe.seen
    assert weight_cl and input_cl and stride[1] == 1, "channels-last puts the channel stride at 1"
    # The bundle holds ordinary contiguous tensors: reloaded without channels-last, it gives the trained model's
    # logits (the one epoch trained is also the best one kept).
    run = load_run(run_dir)
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["channels_last"] is True
    valid = read_manifest(tiny_data).query("split == 'valid'").reset_index(drop=True)
    bundle_logits = predict_logits(run, valid, progress=False)
    learn = probe.trained
    learn.model.cpu().eval()  # on the CPU, as the bundle's: a GPU's TF32 convolutions differ by more than atol
    with torch.no_grad():  # the valid DataLoader keeps the manifest's order
        trained_logits = torch.cat([learn.model(xb.cpu().contiguous(memory_format=torch.channels_last))
                                    for xb, _ in learn.dls.valid])
    np.testing.assert_allclose(bundle_logits, trained_logits.numpy(), atol=1e-4)


def test_channels_last_is_refused_for_convolutions_onednn_miscomputes(tiny_data, tmp_path, monkeypatch):
    # cxresnet_tiny's projection shortcuts are 1×1, stride 2, from 4 channels: in channels-last layout oneDNN's
    # weight gradient for them overruns a buffer (oneDNN issue 6035) and a test run hung here. Full-width
    # cxresnet (16 channels) and efficientnet-lite (stride-1 pointwise convolutions) are not affected.
    from cxr_fast.archs import create_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # oneDNN is the CPU's: train there, GPU or not
    monkeypatch.setattr("cxr_fast.train.gpu_available", lambda: False)  # train.py's own name for it

    assert channels_last_hazards(create_model("cxresnet_tiny", n_in=1, n_classes=3, weights="none"))
    assert not channels_last_hazards(create_model("cxresnet", n_in=1, n_classes=3, weights="none"))
    assert not channels_last_hazards(create_model("tf_efficientnet_lite0", n_in=1, n_classes=3, weights="none"))
    probe = LayoutProbe()
    cfg = resolve_config(epochs=1, channels_last=True, **{**TINY, "n_in": 3})
    with pytest.warns(UserWarning, match="channels_last ignored.*oneDNN"):
        train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[probe])
    weight_cl, input_cl, _ = probe.seen
    assert not weight_cl and not input_cl


class LearningRates(Callback):
    """The learning rate of every parameter group at every training batch."""

    def before_fit(self):
        self.fits = getattr(self, "fits", []) + [[]]

    def after_batch(self):
        if self.training:
            self.fits[-1].append([h["lr"] for h in self.opt.hypers])


class BodyAndHeadAroundFits(Callback):
    """The body's convolution weights and the head's weights as each fit starts and as it ends."""

    def before_fit(self):
        self.fits = getattr(self, "fits", []) + [[self._weights()]]

    def after_fit(self):
        self.fits[-1].append(self._weights())

    def _weights(self):
        body, *_, head = self.opt.param_lists
        return [p.detach().clone() for p in body if p.ndim == 4], [p.detach().clone() for p in head]


def _changed(before, after) -> list[bool]:
    return [not torch.equal(a, b) for a, b in zip(before, after, strict=True)]


def test_unfrozen_body_learns_lr_mult_times_slower_than_the_head(tiny_data, tmp_path):
    from safetensors.torch import save_file

    from cxr_fast.archs import create_model

    start = tmp_path / "start.safetensors"
    save_file(create_model("cxresnet_tiny", n_in=1, n_classes=3).state_dict(), str(start))
    rates, weights = LearningRates(), BodyAndHeadAroundFits()
    cfg = resolve_config(freeze_epochs=1, epochs=1, lr_mult=10, weights=str(start), **TINY)
    train(tiny_data, cfg, out=tmp_path / "run", quiet=True, extra_cbs=[rates, weights])
    frozen, unfrozen = rates.fits
    assert all(body == head for body, head in frozen)  # one rate while only the head trains
    np.testing.assert_allclose([head / body for body, head in unfrozen], 10.0)
    assert max(head for _, head in unfrozen) <= TINY["lr"] / 2 * (1 + 1e-9)  # fastai's fine_tune: half the rate
    # freeze_epochs epochs with the body's convolutions held, then epochs with everything learning
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history["phase"]) == ["frozen", "unfrozen"] and list(history["epoch"]) == [0, 1]
    (body_start, head_start), (body_end, head_end) = weights.fits[0]
    assert body_start and not any(_changed(body_start, body_end)) and all(_changed(head_start, head_end))
    (body_start, _), (body_end, _) = weights.fits[1]
    assert all(_changed(body_start, body_end))


def test_label_smoothing_keeps_a_confident_correct_prediction_from_zero_loss(tiny_data):
    manifest = read_manifest(tiny_data)
    confident = torch.tensor([[10.0, -10.0, -10.0]])
    target = torch.tensor([0])
    plain, _ = build_learner(manifest, resolve_config(**TINY))
    smoothed, _ = build_learner(manifest, resolve_config(label_smoothing=0.1, **TINY))
    assert plain.loss_func(confident, target).item() < 1e-6
    # 0.1 of the target spread over 3 classes: 2 × 0.1/3 of the mass sits on logits 20 below the top one
    assert smoothed.loss_func(confident, target).item() == pytest.approx(0.1 * 2 / 3 * 20, rel=0.01)


def test_class_weights_are_the_inverse_of_each_class_s_share_of_the_train_split(tiny_data):
    from cxr_fast.train import class_weight_tensor

    manifest = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 2 + ["c"] * 4 + ["b"] * 9,
                             "split": ["train"] * 12 + ["valid"] * 5 + ["test"] * 4})
    # 12 training images over 3 classes: a class's weight is 12 / (3 × its count); valid and test do not count
    torch.testing.assert_close(class_weight_tensor(manifest, ["a", "b", "c"]), torch.tensor([2 / 3, 2.0, 1.0]))

    # and the loss uses them when the recipe asks: a manifest with fewer Normal training images
    manifest = read_manifest(tiny_data)
    manifest = manifest.drop(manifest.index[(manifest["split"] == "train") & (manifest["label"] == "Normal")][:3])
    counts = manifest.loc[manifest["split"] == "train", "label"].value_counts()
    logits, target = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 1.5], [1.0, 0.0, 0.0]]), \
        torch.tensor([0, 1, 2, 1])
    weighted, spec = build_learner(manifest, resolve_config(class_weights=True, **{**TINY, "bs": 4}))
    weights = torch.tensor([counts.sum() / (3 * counts[c]) for c in spec.classes], dtype=torch.float32)
    assert weights[spec.classes.index("Normal")] > 1  # the rarer class weighs more
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    assert weighted.loss_func(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    plain, _ = build_learner(manifest, resolve_config(**{**TINY, "bs": 4}))
    assert plain.loss_func(logits, target).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-6)


def test_lr_auto_trains_at_the_rate_lr_find_suggests(tiny_data, tmp_path, monkeypatch):
    # the same rates, batch by batch, as a run given lr_find's suggestion by hand
    from types import SimpleNamespace

    from fastai.learner import Learner

    monkeypatch.setattr(Learner, "lr_find", lambda self, **kwargs: SimpleNamespace(valley=0.0123))
    auto, given = LearningRates(), LearningRates()
    run = train(tiny_data, resolve_config(epochs=2, **{**TINY, "lr": "auto"}), out=tmp_path / "auto", quiet=True,
                extra_cbs=[auto])
    train(tiny_data, resolve_config(epochs=2, **{**TINY, "lr": 0.0123}), out=tmp_path / "given", quiet=True,
          extra_cbs=[given])
    assert json.loads((run / "config.json").read_text())["lr"] == 0.0123
    assert auto.fits == given.fits and len(given.fits[0]) > 0


class BatchBeforeAndAfter(Callback):
    """The first training batch as the DataLoader gave it and as the model received it."""

    order = -5  # before MixUp (order 0); the after-copy is taken just before the forward pass

    def before_batch(self):
        if self.training and not hasattr(self, "raw"):
            self.raw = self.xb[0].clone()

    def after_pred(self):
        if self.training and not hasattr(self, "fed"):
            self.fed = self.xb[0].clone()


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mixup_blends_training_images_in_pairs(tiny_data, tmp_path, alpha):
    probe = BatchBeforeAndAfter()
    train(tiny_data, resolve_config(epochs=1, mixup=alpha, **TINY), out=tmp_path / "run", quiet=True,
          extra_cbs=[probe])
    if alpha == 0:
        torch.testing.assert_close(probe.fed, probe.raw)
        return
    assert not torch.allclose(probe.fed, probe.raw)
    # every fed image is a blend of two raw ones, so it stays inside the batch's range pixel by pixel
    assert (probe.fed <= probe.raw.max(0).values + 1e-5).all() and (probe.fed >= probe.raw.min(0).values - 1e-5).all()


def _killed_run(tiny_data, out):
    """A run killed after its first of three epochs: a checkpoint for --resume."""
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=3, **TINY), out=out, quiet=True, extra_cbs=[KillAfterEpoch(0)])
    return out


def _edited_state(state):
    state = dict(state)
    state["optimizer"] = {**state["optimizer"], "state": state["optimizer"]["state"][:1]}
    return state


@pytest.mark.parametrize("edit, problem", [
    (lambda s: {}, r"damaged checkpoint \(lacks config, history, epochs_done, data\)"),
    (lambda s: [], r"damaged checkpoint \(not a JSON object\)"),
    (lambda s: {k: v for k, v in s.items() if k != "stats"}, r"damaged checkpoint \(lacks stats\)"),
    (lambda s: {**s, "config": {**s["config"], "new_option": 1}}, "unknown options new_option: written by another"),
    (lambda s: {**s, "config": {**s["config"], "epochs": "many"}}, "epochs must be a whole number"),
    (_edited_state, r"optimizer-epoch0.safetensors: does not match the optimizer state in state.json"),
])
def test_a_damaged_checkpoint_state_is_a_one_line_error_naming_it(tiny_data, tmp_path, edit, problem):
    out = _killed_run(tiny_data, tmp_path / "run")
    state_path = out / "checkpoint" / "state.json"
    state_path.write_text(json.dumps(edit(json.loads(state_path.read_text()))))
    with pytest.raises(CxrFastError, match=problem) as e:
        train(tiny_data, out=out, resume=True, quiet=True)
    assert "\n" not in str(e.value)


def test_resume_refuses_other_data_or_a_changed_manifest(tiny_data, tmp_path):
    # another manifest would train on images the first one keeps for valid and test, under the first one's name
    out = _killed_run(tiny_data, tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "manifest.csv").write_bytes((other / "manifest.csv").read_bytes().replace(b",train,", b",test,", 1))
    with pytest.raises(CxrFastError, match=f"this run started on {tiny_data}; resume it with --data {tiny_data}") as e:
        train(other, out=out, resume=True, quiet=True)
    assert "\n" not in str(e.value)
    manifest = tiny_data / "manifest.csv"
    original = manifest.read_bytes()
    try:
        manifest.write_bytes(original.replace(b",train,", b",valid,", 1))  # one training image moved to valid
        with pytest.raises(CxrFastError, match="manifest in .* changed since this run started"):
            train(tiny_data, out=out, resume=True, quiet=True)
    finally:
        manifest.write_bytes(original)
    train(tiny_data / "manifest.csv", out=out, resume=True, quiet=True)  # the same data, named by its file, resumes
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2]


def _bytes_digest(data) -> str:
    """manifest_sha256 as cxr_fast recorded it before commit fcfd3ab: the SHA-256 of manifest.csv's bytes."""
    return hashlib.sha256((Path(data) / "manifest.csv").read_bytes()).hexdigest()


def test_a_checkpoint_with_the_earlier_manifest_digest_resumes(tiny_data, tmp_path):
    # A run interrupted under cxr_fast of 2026-11-27 recorded the manifest's bytes digest; resuming it on the very same
    # manifest was refused as "changed since this run started"
    out = _killed_run(tiny_data, tmp_path / "run")
    state_path = out / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "manifest_sha256": _bytes_digest(tiny_data)}))
    train(tiny_data, out=out, resume=True, quiet=True)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2]


def test_a_bundle_with_the_earlier_manifest_digest_reads_its_manifest(tiny_runs, tmp_path):
    from cxr_fast.bundle import read_training_manifest

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    data = shutil.copytree(config["data"], tmp_path / "data")
    (run / "config.json").write_text(json.dumps({**config, "data": str(data), "manifest_sha256": _bytes_digest(data)}))
    assert len(read_training_manifest(load_run(run))) == len(read_manifest(data))
    manifest = data / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b",train,", b",test,", 1))  # a changed split is still refused
    with pytest.raises(CxrFastError, match="the manifest changed since run was trained on it"):
        read_training_manifest(load_run(run))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_file(tiny_data, tmp_path, damage):
    out = _killed_run(tiny_data, tmp_path / "run")
    for name in ("optimizer-epoch0.safetensors", "model-epoch0.safetensors"):
        path = out / "checkpoint" / name
        kept = path.read_bytes()
        path.unlink() if damage == "missing" else path.write_bytes(kept[:300])
        expected = "checkpoint file missing" if damage == "missing" else "not a readable checkpoint file"
        with pytest.raises(CxrFastError, match=f"{path}: {expected}") as e:
            train(tiny_data, out=out, resume=True, quiet=True)
        assert "\n" not in str(e.value)
        path.write_bytes(kept)


def test_a_damaged_bundle_weights_file_is_a_one_line_error(tiny_runs, tmp_path):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # e.g. a copy cut short
    with pytest.raises(CxrFastError, match=f"{weights}: not a readable weights file") as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_a_bundle_whose_weights_lack_a_tensor_is_refused_not_loaded_with_it_at_random(tiny_runs, tmp_path):
    # a weights file without the classifier's bias would leave that bias at its random initial value: every
    # prediction shifted, without a word
    from safetensors.torch import save_file

    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    tensors = load_file(run / "model.safetensors")
    del tensors["head.classifier.bias"]
    save_file(tensors, str(run / "model.safetensors"))
    with pytest.raises(CxrFastError, match=r"model.safetensors: weights do not fit cxresnet_tiny "
                                           r"\(Missing key\(s\) in state_dict: \"head.classifier.bias\"") as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_an_interrupted_run_is_named_as_such_where_a_bundle_is_expected(tiny_data, tmp_path):
    out = _killed_run(tiny_data, tmp_path / "run")
    with pytest.raises(CxrFastError, match="an interrupted training run, not a finished bundle; continue it with") as e:
        load_run(out)
    assert f"--data {tiny_data.resolve()} " in str(e.value)  # the run's own data folder, not a placeholder



def test_a_run_that_fails_while_writing_its_bundle_is_not_loaded_and_resume_finishes_it(tiny_data, tmp_path,
                                                                                       monkeypatch):
    # config.json and the weights are written before the temperature, seen images and metrics: a failure between
    # them must not leave a folder that evaluate and predict take for a finished, calibrated run.
    import errno

    import cxr_fast.seen

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(cxr_fast.seen, "write_seen", fail)
        with pytest.raises(CxrFastError, match=f"No space left on device; the bundle in {out} was not finished; .* "
                                               "--resume"):
            train(tiny_data, resolve_config(epochs=2, **TINY), out=out, quiet=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(CxrFastError, match="an interrupted training run, not a finished bundle"):
        load_run(out)
    train(tiny_data, out=out, resume=True, quiet=True)
    run = load_run(out)
    assert run.metrics["epochs"] == 2 and not (out / "checkpoint").exists()


def test_a_bundle_file_cut_short_cannot_block_the_resume_that_finishes_it(tiny_data, tmp_path, monkeypatch):
    # metrics.json half-written by a kill made every --resume fail ("not valid JSON"); a history.csv cut in its last
    # row stayed cut in the finished bundle
    import cxr_fast.train

    real_write, out = cxr_fast.train.write_text, tmp_path / "run"

    def killed_at_metrics(path, text):
        if path.name == "metrics.json":
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(cxr_fast.train, "write_text", killed_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_data, resolve_config(epochs=2, **TINY), out=out, quiet=True)
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()  # whole or not at all
    history = (out / "history.csv").read_text()
    (out / "history.csv").write_text(history[: len(history) - 20])  # as a kill in the last epoch's row leaves it
    train(tiny_data, out=out, resume=True, quiet=True)
    assert load_run(out).metrics["epochs"] == 2 and (out / "history.csv").read_text() == history


def test_a_kill_while_the_checkpoint_is_removed_leaves_a_finished_bundle_that_cleans_up_after_it(
        tiny_data, tmp_path, monkeypatch):
    # a kill -9 part-way through deleting the checkpoint left ~20 MB of weights in the finished bundle for good
    import cxr_fast.bundle

    out = tmp_path / "run"

    def killed_while_deleting(path, ignore_errors=False):
        if path.exists():
            next(p for p in path.iterdir() if p.name != "state.json").unlink()  # some files gone, the rest not
            raise SimulatedKill

    monkeypatch.setattr(cxr_fast.bundle.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=out, quiet=True)
    monkeypatch.undo()
    assert not (out / "checkpoint").exists()  # renamed away whole: not taken for an interrupted run
    assert (out / ".checkpoint-removed" / "state.json").is_file()
    run = load_run(out)
    assert run.metrics["epochs"] == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the leftover was swept


def test_resume_into_a_folder_it_cannot_write_is_refused_before_training(tiny_data, tmp_path, monkeypatch):
    # it trained a whole epoch, then failed writing the checkpoint and suggested the same command
    import os

    from fastai.learner import Learner

    import cxr_fast.outputs

    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=2, **TINY), out=out, quiet=True, extra_cbs=[KillAfterEpoch(0)])
    real_access = os.access
    monkeypatch.setattr(cxr_fast.outputs.os, "access",
                        lambda path, mode: False if str(path).startswith(str(out)) else real_access(path, mode))
    monkeypatch.setattr(Learner, "fit", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(CxrFastError, match=r"checkpoint: cannot be written \(read-only or not yours"):
        train(tiny_data, out=out, resume=True, quiet=True)


def test_the_bundle_keeps_the_best_epoch_whose_state_was_saved(tiny_data, tmp_path):
    # A kill after an improved epoch's weights but before its state.json must not leave the bundle with that
    # epoch's weights under the previous best's metrics: the best weights live in the checkpoint, one file per epoch.
    out = _killed_run(tiny_data, tmp_path / "run")
    assert [p.name for p in (out / "checkpoint").glob("best-epoch*")] == ["best-epoch0.safetensors"]
    assert not (out / "model.safetensors").exists()
    train(tiny_data, out=out, resume=True, quiet=True)
    best = json.loads((out / "metrics.json").read_text())["best_epoch"]
    history = pd.read_csv(out / "history.csv")
    assert best == history.loc[history["valid_balanced_accuracy"].idxmax(), "epoch"]


class ScriptedScores(Callback):
    """Sets each epoch's valid balanced accuracy to a given value, after fastai's Recorder (order 50) has recorded it
    and before RunRecorder (51) chooses the best epoch, and keeps the weights each epoch ended with."""

    order = 50.5

    def __init__(self, scores):
        self.scores, self.weights = list(scores), []

    def after_epoch(self):
        names = [n for n in self.recorder.metric_names[1:] if n != "time"]
        self.recorder.values[-1][names.index("valid_balanced_accuracy")] = self.scores[len(self.weights)]
        self.weights.append({k: v.detach().cpu().clone() for k, v in self.learn.model.state_dict().items()})


def test_the_bundle_keeps_the_epoch_with_the_highest_valid_balanced_accuracy(tiny_data, tmp_path):
    # on tiny data every epoch often scores the same, so a run's own history cannot tell the best epoch from the
    # worst: the scores are set here, the middle epoch best and the first worst
    scores = ScriptedScores([0.5, 0.9, 0.7])
    run = train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "run", quiet=True, extra_cbs=[scores])
    assert list(pd.read_csv(run / "history.csv")["valid_balanced_accuracy"]) == [0.5, 0.9, 0.7]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and metrics["valid_balanced_accuracy"] == 0.9
    kept = load_file(str(run / "model.safetensors"))
    assert kept.keys() == scores.weights[1].keys()
    assert all(torch.equal(kept[k], v) for k, v in scores.weights[1].items())
    assert not all(torch.equal(kept[k], v) for k, v in scores.weights[2].items())  # the last epoch's differ


def test_resume_does_not_need_the_starting_weights_again(tiny_data, tmp_path):
    from safetensors.torch import save_file

    from cxr_fast.archs import create_model

    start = tmp_path / "start.safetensors"
    save_file(create_model("cxresnet_tiny", n_in=1, n_classes=3).state_dict(), str(start))
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        train(tiny_data, resolve_config(epochs=2, weights=str(start), **TINY), out=out, quiet=True,
              extra_cbs=[KillAfterEpoch(0)])
    start.unlink()  # moved or deleted since: the checkpoint holds every tensor
    train(tiny_data, out=out, resume=True, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["weights_source"] == str(start) and "67 of 67 weight tensors loaded" in config["weights_loaded"]
    assert config["model"]["weights"] == str(start)  # as first built: compare counts it as the same setting
    epochs = list(pd.read_csv(out / "history.csv")["epoch"])
    assert len(epochs) >= 2 and epochs == list(range(json.loads((out / "metrics.json").read_text())["epochs"]))


def test_an_out_that_is_a_file_is_refused_before_any_work(tiny_data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "run"):
        with pytest.raises(CxrFastError, match=f"{afile}: exists and is not a folder"):
            train(tiny_data, resolve_config(epochs=1, **TINY), out=out, quiet=True)
    assert afile.read_text() == "keep me"


def test_a_class_missing_from_the_train_split_is_refused_and_rare_classes_warned(tiny_data, tmp_path):
    table = read_manifest(tiny_data)
    no_normal = tmp_path / "no-normal.csv"
    table[~((table["split"] == "train") & (table["label"] == "Normal"))].to_csv(no_normal, index=False)
    with pytest.raises(CxrFastError, match="no Normal image in the train split"):
        train(no_normal, resolve_config(epochs=1, **TINY), out=tmp_path / "a", quiet=True)
    assert not (tmp_path / "a").exists()

    typo = table.copy()
    first_train = typo.index[typo["split"] == "train"][0]
    typo.loc[first_train, "label"] = "Covid"  # a hand-edited label: a fourth class with one image
    typo.loc[typo["split"] == "valid", "label"] = typo.loc[typo["split"] == "valid", "label"].replace("Pneumonia", "Normal")
    typo_path = tmp_path / "typo.csv"
    typo.to_csv(typo_path, index=False)
    from cxr_fast.data.block import check_classes

    with pytest.warns(UserWarning) as caught:
        check_classes(read_manifest(typo_path), typo_path)
    messages = " | ".join(str(w.message) for w in caught)
    assert "only a few training images for Covid (1); a mistyped label?" in messages
    assert "no Covid, Pneumonia image in the valid split" in messages


def test_bundle_files_are_readable_like_the_rest_of_the_folder(tiny_runs):
    # safetensors' own writer makes owner-only files: a colleague could read config.json but not the model
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_runs[0].iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["seen_images.safetensors"]


def test_a_weights_file_load_is_reported_and_recorded(tiny_data, tmp_path, monkeypatch, capsys):
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    state = create_model("cxresnet_tiny").state_dict()
    (tmp_path / "w").mkdir()
    write_tensors({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "w" / "body.safetensors")
    monkeypatch.chdir(tmp_path)  # a relative --weights path, as users type it
    cfg = resolve_config(epochs=1, freeze_epochs=0, weights="w/body.safetensors", **TINY)
    run = train(tiny_data, cfg, out=tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert config["weights_source"] == str(tmp_path / "w" / "body.safetensors")
    n_body = sum(not k.startswith("head.") and not k.endswith("num_batches_tracked") for k in state)
    assert config["weights_loaded"].startswith(
        f"{tmp_path / 'w' / 'body.safetensors'}: {n_body} of {n_body} weight tensors loaded")
    err = capsys.readouterr().err
    assert "weight tensors loaded" in err and "warning" not in err  # the whole body loaded: nothing to caution


def test_a_weights_file_leaving_most_of_the_body_untrained_is_cautioned(tiny_data, tmp_path, capsys):
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    state = create_model("cxresnet_tiny").state_dict()
    write_tensors({k: v for k, v in state.items() if k.startswith("body.stem")}, tmp_path / "stem.safetensors")
    cfg = resolve_config(epochs=1, freeze_epochs=0, weights=str(tmp_path / "stem.safetensors"), **TINY)
    train(tiny_data, cfg, out=tmp_path / "run")
    assert "warning: " + str(tmp_path / "stem.safetensors") + " left" in capsys.readouterr().err.replace("\n", " ")


def _printed_epochs(text: str) -> list[int]:
    """Epoch numbers of the rows fastai's progress table printed (an epoch, then six-decimal losses)."""
    import re

    return [int(n) for n in re.findall(r"(?<![\d./])(\d+) +\d+\.\d{6} ", text)]


def test_the_printed_table_numbers_epochs_as_history_does(tiny_data, tmp_path, capsys):
    from cxr_fast.archs import create_model
    from cxr_fast.outputs import write_tensors

    write_tensors(create_model("cxresnet_tiny").state_dict(), tmp_path / "start.safetensors")
    cfg = resolve_config(epochs=2, freeze_epochs=1, weights=str(tmp_path / "start.safetensors"), **TINY)
    run = train(tiny_data, cfg, out=tmp_path / "tuned")
    assert _printed_epochs(capsys.readouterr().out) == list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1, 2]

    out = _killed_run(tiny_data, tmp_path / "resumed")
    capsys.readouterr()
    train(tiny_data, out=out, resume=True)
    assert _printed_epochs(capsys.readouterr().out) == [1, 2]  # no rows for the epoch finished before the kill


def test_a_log_gets_one_plain_line_per_epoch_not_progress_bars(tiny_data, tmp_path, capsys):
    # under capsys stdout is not a terminal, as in a log file or CI: fastprogress's redraws would fill it with \r
    run = train(tiny_data, resolve_config(epochs=3, **TINY), out=tmp_path / "run")
    out = capsys.readouterr().out
    assert "\r" not in out and "|" not in out  # no bar was drawn
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].split() == ["epoch", "train_loss", "train_accuracy", "train_balanced_accuracy", "valid_loss",
                                "valid_accuracy", "valid_balanced_accuracy", "time"]
    rows = [line.split() for line in lines[1:]]
    history = pd.read_csv(run / "history.csv")
    assert [int(r[0]) for r in rows] == list(history["epoch"]) == [0, 1, 2]
    assert [float(r[4]) for r in rows] == pytest.approx(list(history["valid_loss"]), abs=1e-6)


class _CallbackSpy(Callback):
    def __init__(self, seen: list):
        self.seen = seen

    def before_fit(self):
        self.seen.append({type(cb) for cb in self.learn.cbs})


def test_a_terminal_keeps_fastais_progress_bar(tiny_data, tmp_path, monkeypatch):
    from fastai.callback.progress import ProgressCallback

    from cxr_fast.train import EpochLines

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    seen = []
    train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run",
          extra_cbs=[_CallbackSpy(seen)])
    assert ProgressCallback in seen[0] and EpochLines not in seen[0]


def test_a_notebook_keeps_fastais_html_progress_bar(tiny_data, tmp_path, monkeypatch, capsys):
    # a Jupyter kernel's stdout is no terminal, but fastprogress draws HTML bars there that update in place: plain
    # epoch lines showed nothing during an epoch of minutes. IPython.display is faked: the bars and table land in `shown`
    import types

    from fastai.callback.progress import ProgressCallback
    from fastprogress.fastprogress import NBMasterBar, NBProgressBar

    from cxr_fast.train import EpochLines

    shown = []
    ipython = types.ModuleType("IPython")
    ipython.version_info = (9, 0)  # matplotlib asks, when it draws the run's figures
    ipython.display = types.ModuleType("IPython.display")
    ipython.display.HTML = str
    ipython.display.display = lambda obj, **_: shown.append(str(obj)) or types.SimpleNamespace(
        update=lambda obj: shown.append(str(obj)))
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", ipython.display)
    # what fastprogress picks at import in a kernel
    monkeypatch.setattr("fastai.callback.progress.progress_bar", NBProgressBar)
    monkeypatch.setattr("fastai.callback.progress.master_bar", NBMasterBar)
    assert not sys.stdout.isatty()  # captured, as in a kernel
    seen = []
    train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", extra_cbs=[_CallbackSpy(seen)])
    assert ProgressCallback in seen[0] and EpochLines not in seen[0]
    assert any("<table" in html and "valid_loss" in html for html in shown)  # fastai's epoch table, as HTML
    assert "valid_loss" not in capsys.readouterr().out  # and no plain lines besides


def test_mixed_precision_on_a_gpu_only(tiny_data, monkeypatch):
    # train.py's decision, on any machine: a GPU gets fastai's fp16 training and a CPU does not
    from fastai.callback.fp16 import MixedPrecision

    manifest = read_manifest(tiny_data)
    monkeypatch.setattr("cxr_fast.train.gpu_available", lambda: False)
    learn, _ = build_learner(manifest, resolve_config(**TINY))
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    monkeypatch.setattr("cxr_fast.train.gpu_available", lambda: True)  # train.py's decision alone sees a GPU
    learn, _ = build_learner(manifest, resolve_config(**TINY))
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs)


@pytest.mark.parametrize("edit, problem", [
    (lambda c: c.pop("size"), "lacks size"),
    (lambda c: c.pop("mean"), "lacks mean"),
    (lambda c: c.update(temperature="abc"), "temperature must be a positive number, got 'abc'"),
    (lambda c: c.update(temperature=-1), "temperature must be a positive number, got -1"),
    (lambda c: c.update(size=0), "size must be a whole number of pixels from 16 to 2048, got 0"),
    (lambda c: c.update(n_in=3), "n_in 3 does not match the model's .1."),
    (lambda c: c.update(n_in=True), "n_in must be 1 or 3, got True"),
    (lambda c: c.update(classes=["A", "A", "B"]), "classes must be a list of two or more different names"),
    (lambda c: c.update(std=[0]), r"std must be positive, got \[0\]"),
    (lambda c: c.update(classes=["A", "B", "C", "D"]), "4 classes, but the model has 3 outputs"),
    (lambda c: c.update(format="other/9"), "format 'other/9' is not 'cxr_fast-run/1'"),
    # every version since the first wrote both: without them the file was edited, and temperature 1 would pass
    # uncalibrated probabilities off as calibrated ones
    (lambda c: c.pop("temperature"), r"lacks temperature \(every cxr_fast run bundle has them"),
    (lambda c: c.pop("format"), "lacks format"),
    (lambda c: c["model"].update(arch="convnet"), "convnet: unknown argument"),
    (lambda c: c["model"].update(arch=5), "model arch must be a name, got 5"),
    (lambda c: c["model"].update(arch_kwargs=None), "model arch_kwargs must be a mapping .*, got None"),
    (lambda c: c["model"].update(pretrained_stats={"mean": 1}), "model pretrained_stats must be null or lists"),
])
def test_an_edited_config_is_refused_on_loading_naming_the_file(tiny_runs, tmp_path, edit, problem):
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CxrFastError, match=f"{run / 'config.json'}: {problem}") as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_a_missing_run_folder_or_a_file_is_named_as_such(tiny_runs, tmp_path):
    with pytest.raises(CxrFastError, match="nope: no such run folder"):
        load_run(tmp_path / "nope")
    with pytest.raises(CxrFastError, match="config.json: a file, not a run folder"):
        load_run(tiny_runs[0] / "config.json")


class DiskFullAfterEpoch(Callback):
    order = 60  # after the checkpoint is written

    def after_epoch(self):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_after_an_epoch_is_one_line_saying_how_to_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CxrFastError, match=f"No space left on device; training stopped after 1 epochs, and continues "
                                           f"with: cxrfast train --data {tiny_data} --out {out} --resume"):
        train(tiny_data, resolve_config(epochs=2, **TINY), out=out, quiet=True, extra_cbs=[DiskFullAfterEpoch()])
    train(tiny_data, out=out, resume=True, quiet=True)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1]


def test_an_os_error_that_is_not_storage_keeps_its_traceback(tiny_data, tmp_path, monkeypatch):
    # a truncated image is an OSError too: "make room" would send the user the wrong way
    import cxr_fast.train

    def truncated(*args, **kwargs):
        raise OSError("image file is truncated")

    monkeypatch.setattr(cxr_fast.train, "finish_bundle", truncated)
    with pytest.raises(OSError, match="image file is truncated"):
        train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)


def test_resume_of_a_run_killed_before_its_first_epoch_ended_says_to_start_again(tiny_data, tmp_path):
    # kill -9 cannot be cleaned up after: it leaves the run's empty folder, which a plain rerun accepts
    (tmp_path / "run").mkdir()
    with pytest.raises(CxrFastError, match="nothing to resume .the run stopped before its first epoch ended.*; start it again without --resume"):
        train(tiny_data, out=tmp_path / "run", resume=True, quiet=True)
    train(tiny_data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_closing_line_says_when_a_run_is_no_better_than_chance(tmp_path):
    from cxr_fast.train import run_summary

    (tmp_path / "config.json").write_text(json.dumps({"classes": ["COVID-19", "Normal", "Pneumonia"]}))
    for score, at_chance in ((0.333, True), (0.34, True), (0.6, False)):
        (tmp_path / "metrics.json").write_text(json.dumps({"best_epoch": 0, "valid_balanced_accuracy": score,
                                                          "train_seconds": 3.0}))
        assert ("no better than chance[/] (1/3)" in run_summary(tmp_path)) == at_chance


def test_a_batch_size_that_drops_much_of_every_epoch_is_named(tiny_data):
    # 30 training images at --bs 16 trained on 16 per epoch without a word: fastai drops the incomplete batch
    from cxr_fast.data.block import build_dataloaders

    manifest = read_manifest(tiny_data)
    n_train = int((manifest["split"] == "train").sum())
    bs = n_train // 2 + 1  # one batch per epoch, nearly half the split left out
    with pytest.warns(UserWarning, match=f"batch size {bs} leaves {n_train - bs} of {n_train} training images out"):
        build_dataloaders(manifest, size=32, bs=bs)
    divisor = next(b for b in range(n_train // 2, 1, -1) if n_train % b == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # cxr_fast's own; pandas 2.0 on numpy 1.25 adds a deprecation
        build_dataloaders(manifest, size=32, bs=divisor)


def _saved_adam_state(path: Path) -> dict:
    """A checkpoint's optimizer state of one Adam step on a small CPU model, saved to `path` (the meta it returns)."""
    from fastai.optimizer import Adam

    from cxr_fast.train import _save_optimizer

    model = torch.nn.Linear(3, 2)
    opt = Adam(list(model.parameters()), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return _save_optimizer(opt, path)


def _moment_devices(opt) -> set[str]:
    return {v.device.type for p, *_ in opt.all_params() for v in opt.state[p].values() if torch.is_tensor(v)}


def test_a_loaded_optimizer_state_goes_to_its_parameters_device(tmp_path):
    # as fastai's load_model(device=…) does, when no device is named: "meta" parameters stand in for another device
    from fastai.optimizer import Adam

    from cxr_fast.train import _load_optimizer

    meta = _saved_adam_state(tmp_path / "optimizer.safetensors")
    elsewhere = Adam(list(torch.nn.Linear(3, 2, device="meta").parameters()), lr=1e-3)
    _load_optimizer(elsewhere, tmp_path / "optimizer.safetensors", meta)
    assert _moment_devices(elsewhere) == {"meta"}


def test_a_resumed_optimizer_state_goes_to_the_device_training_runs_on(tmp_path):
    # fastai moves the model to its batches' device only once fitting starts: a run resumed on a GPU loaded Adam's
    # moments beside the still-CPU parameters, and the first step mixed cuda:0 and cpu (seen on an H200). "meta"
    # stands in for the GPU as the DataLoaders' device.
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import Adam

    from cxr_fast.train import _resume_optimizer

    meta = _saved_adam_state(tmp_path / "optimizer.safetensors")
    items = [(torch.randn(3), 0)] * 4
    dls = DataLoaders.from_dsets(items, items, bs=2, device=torch.device("meta"))
    learn = Learner(dls, torch.nn.Linear(3, 2), loss_func=torch.nn.functional.cross_entropy, opt_func=Adam, lr=1e-3)
    learn.create_opt()
    _resume_optimizer(learn, tmp_path / "optimizer.safetensors", meta)
    assert _moment_devices(learn.opt) == {"meta"}


def test_the_temperature_is_fitted_on_the_valid_split(tiny_runs, tiny_data):
    from cxr_fast.calibration import fit_temperature

    run = load_run(tiny_runs[0])
    manifest = read_manifest(tiny_data)
    fitted = {}
    for split in ("train", "valid"):
        rows = manifest[manifest["split"] == split]
        fitted[split] = fit_temperature(predict_logits(run, rows, progress=False),
                                        rows["label"].map(run.classes.index).to_numpy())
    assert fitted["train"] != pytest.approx(fitted["valid"])  # the split it is fitted on matters here
    assert run.temperature == pytest.approx(fitted["valid"])


def test_dataloaders_hold_the_train_and_valid_rows_in_manifest_order_with_train_split_statistics(tiny_data):
    # the test split never trains nor chooses the epoch; valid comes in the manifest's order; the statistics are
    # those of every training image (fewer than the 256 sampled) at the training size
    from PIL import Image

    from cxr_fast.data.block import build_dataloaders

    manifest = read_manifest(tiny_data)
    dls, spec = build_dataloaders(manifest, size=48, bs=8)
    train_rows, valid_rows = (manifest[manifest["split"] == s] for s in ("train", "valid"))
    assert sorted(dls.train_ds.items["path"]) == sorted(train_rows["path"])
    assert list(dls.valid_ds.items["path"]) == list(valid_rows["path"])
    pixels = np.stack([np.asarray(Image.open(p).convert("L").resize((48, 48), Image.Resampling.BILINEAR)) / 255
                       for p in train_rows["path"]])
    assert spec.mean == pytest.approx([pixels.mean()], rel=1e-5)
    assert spec.std == pytest.approx([pixels.std()], rel=1e-5)


def test_training_images_are_augmented_but_never_mirrored_and_valid_images_never_augmented(tiny_data):
    # a flip would put the heart on the right; valid is scored, each epoch, on the images as they are
    from fastai.torch_core import TensorCategory
    from fastai.vision.core import TensorImageBW

    from cxr_fast.data.block import build_dataloaders

    manifest = read_manifest(tiny_data)
    augmented, _ = build_dataloaders(manifest, size=48, bs=8, stats=([0.5], [0.25]))
    plain, _ = build_dataloaders(manifest, size=48, bs=8, stats=([0.5], [0.25]), augment=False)

    device = augmented.device  # fastai's default: a GPU if there is one, where the batch transforms then run

    def left_bright():  # afresh each time: fastai's transforms may work in place
        pixels = torch.zeros(64, 1, 48, 48, device=device)
        pixels[..., :24] = 255.0
        return TensorImageBW(pixels), TensorCategory(torch.zeros(64, dtype=torch.long, device=device))

    as_is = torch.zeros(64, 1, 48, 48, device=device)
    as_is[..., :24] = (1 - 0.5) / 0.25
    as_is[..., 24:] = (0 - 0.5) / 0.25
    def through(dl):  # a DataLoader tells its batch transforms which split they serve as it starts an epoch
        dl.before_iter()
        return torch.Tensor(dl.after_batch(left_bright())[0])

    torch.testing.assert_close(through(augmented.valid), as_is)
    torch.testing.assert_close(through(plain.train), as_is)
    trained_on = through(augmented.train)
    assert not torch.allclose(trained_on, as_is)
    assert (trained_on[..., :24].mean(dim=(1, 2, 3)) > trained_on[..., 24:].mean(dim=(1, 2, 3))).all()


def test_a_config_describing_a_far_larger_network_than_its_weights_is_refused_before_memory_is_taken(
        tiny_runs, tmp_path, monkeypatch):
    # A bundle from someone else: `width: 64` or a million classes beside small weights once allocated tens of GB
    # (a MemoryError, or the machine out of memory) before the weights were found not to fit; `depths: [1000000]`
    # built a million blocks. Now nothing is allocated for a network that does not fit its weights.
    from cxr_fast.archs import model_from_config

    built = []  # for each network built: whether it was on the meta device

    def spy(cfg):
        model = model_from_config(cfg)
        built.append(all(p.is_meta for p in model.parameters()))
        return model

    monkeypatch.setattr("cxr_fast.bundle.model_from_config", spy)
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["arch_kwargs"]["width"] = 2  # 8 times the tiny width: 64 times its weights
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CxrFastError, match=r"model.safetensors: weights do not fit cxresnet_tiny \(size mismatch"):
        load_run(run)
    assert built == [True]  # built on the meta device only
    config["model"]["arch_kwargs"]["width"] = 0.25
    config["model"]["arch_kwargs"]["depths"] = [1000, 1, 1, 1]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CxrFastError, match=f"{run / 'config.json'}: describes a network of more than 1320 parts, "
                                           "far more than the weights in model.safetensors fill") as e:
        load_run(run)
    assert "\n" not in str(e.value)


def test_a_config_asking_for_images_of_100000_px_is_refused_on_loading(tiny_runs, tmp_path):
    # Every command that predicts resizes each image to the bundle's size: 100000 px is 10 GB per image (a
    # MemoryError, or the machine out of memory), from a config.json edited by someone else.
    run = shutil.copytree(tiny_runs[0], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    for size, problem in ((100000, "size must be a whole number of pixels from 16 to 2048, got 100000"), (2048, None)):
        config["size"] = size
        (run / "config.json").write_text(json.dumps(config))
        if problem is None:
            assert load_run(run).size == 2048  # the largest size a model may have: a network of any size reads it
        else:
            with pytest.raises(CxrFastError, match=f"{run / 'config.json'}: {problem}"):
                load_run(run)


def test_a_train_into_a_folder_another_process_is_training_refuses_and_leaves_its_first_epoch_alone(tiny_data,
                                                                                                    tmp_path):
    # Two `train --out X` at once both found X absent or empty and trained into it: both said "run X" and the later
    # one's files silently replaced the earlier one's. One started while the other wrote its first checkpoint took
    # those files for a killed run's and deleted them. Two `--resume` of one run trained it twice, side by side.
    from tests.conftest import HOLDING_LOCK, another_process

    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "model-epoch0.safetensors").write_bytes(b"the first epoch, being written")
    busy = rf"{out}: is being written by another cxrfast process \(pid (\d+)\)"
    with another_process(HOLDING_LOCK, out) as first:
        for resume in (False, True):
            with pytest.raises(CxrFastError, match=busy.replace(r"(\d+)", str(first.pid))):
                train(tiny_data, None if resume else resolve_config(epochs=1, **TINY), out=out, resume=resume,
                      quiet=True)
        assert (out / "checkpoint" / "model-epoch0.safetensors").read_bytes() == b"the first epoch, being written"


def test_a_prepare_force_of_the_data_a_run_trains_on_refuses_instead_of_costing_the_run_its_bundle(tmp_path):
    # `cxrfast data prepare SRC --out D --force` in another terminal while `cxrfast train --data D` ran replaced the
    # manifest under the run: the run found it changed at its end and wrote no bundle (its minutes lost). Now the
    # prepare refuses in one line naming the training process, and the run ends with its bundle.
    import os
    import subprocess
    import sys

    from cxr_fast.data.manifest import prepare
    from cxr_fast.data.synth import synthesize
    from tests.conftest import HOLDING_LOCK, another_process

    synthesize(tmp_path / "src", n_per_class=10, size=64, seed=1, progress=False)
    data = tmp_path / "data"
    prepare(tmp_path / "src", data, cache_size=0, progress=False)
    manifest = (data / "manifest.csv").read_bytes()
    command = [sys.executable, "-c", "from cxr_fast.cli import app; app()", "data", "prepare", str(tmp_path / "src"),
               "--out", str(data), "--size", "0", "--splits", "0.5,0.25,0.25", "--force"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "1000"}
    tried = []

    class PrepareAgain(Callback):  # the other terminal, while the run trains
        def after_epoch(self):
            tried.append(subprocess.run(command, capture_output=True, text=True, env=env))

    run = train(data, resolve_config(epochs=1, **TINY), out=tmp_path / "run", extra_cbs=[PrepareAgain()], quiet=True)
    assert tried and tried[0].returncode == 1, tried[0].stdout + tried[0].stderr
    assert tried[0].stderr.startswith(f"error: {data}: is being read by another cxrfast process (pid {os.getpid()}: "
                                      "a train, evaluate, interpret or ensemble); wait for it to finish")
    assert len(tried[0].stderr.strip().splitlines()) == 1
    assert (run / "config.json").is_file() and (data / "manifest.csv").read_bytes() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run", "src"]  # the run's mark went with it
    assert subprocess.run(command, capture_output=True, text=True, env=env).returncode == 0  # now it goes ahead

    with another_process(HOLDING_LOCK, data) as preparing:  # a run started while a prepare writes the data: at once
        with pytest.raises(CxrFastError, match=rf"{data}: is being written by another cxrfast process \(pid "
                                               rf"{preparing.pid}\)"):
            train(data, resolve_config(epochs=1, **TINY), out=tmp_path / "second", quiet=True)
    assert not (tmp_path / "second").exists()


def test_runs_started_in_the_same_second_without_out_get_folders_of_their_own(tmp_path, monkeypatch):
    # the default name is the architecture and the second: two runs started together used to share one folder
    from contextlib import ExitStack
    from datetime import datetime

    import cxr_fast.train
    from cxr_fast.train import free_run_dir, new_run_dir
    from tests.conftest import HOLDING_LOCK, another_process

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(cxr_fast.train, "datetime", Frozen)
    root = tmp_path / "models"
    with another_process(HOLDING_LOCK, root / "cxresnet-20260102-030405"):  # chosen, not made yet
        assert free_run_dir(None, "cxresnet", root) == root / "cxresnet-20260102-030405-2"
        with ExitStack() as held:
            assert new_run_dir(None, "cxresnet", root, held=held) == root / "cxresnet-20260102-030405-2"
            assert free_run_dir(None, "cxresnet", root) == root / "cxresnet-20260102-030405-3"


class ResplitAfterTraining(Callback):
    """`data prepare --force` with another split, run while this training ran: the manifest changes under it."""

    def __init__(self, data: Path):
        self.data = data

    def after_fit(self):
        manifest = pd.read_csv(self.data / "manifest.csv")
        first_train, first_valid = (manifest.index[manifest["split"] == s][0] for s in ("train", "valid"))
        manifest.loc[[first_train, first_valid], "split"] = ["valid", "train"]
        manifest.to_csv(self.data / "manifest.csv", index=False)


def test_a_manifest_changed_during_training_writes_no_bundle(tiny_data, tmp_path):
    # the bundle calibrated on the new valid split and recorded the new train split as the images it learned from
    data = shutil.copytree(tiny_data, tmp_path / "data")
    out = tmp_path / "run"
    with pytest.raises(CxrFastError, match=r"manifest.csv: changed while .*run trained") as e:
        train(data, resolve_config(epochs=1, **TINY), out=out, quiet=True, extra_cbs=[ResplitAfterTraining(data)])
    assert "\n" not in str(e.value)
    assert not (out / "config.json").exists() and not (out / "seen_images.safetensors").exists()


def test_a_run_resumes_on_its_manifest_moved_to_another_folder_and_records_where(tiny_data, tmp_path):
    # a data folder moved (or the project copied to another disk) after a kill: the same split, so the same data
    out = _killed_run(tiny_data, tmp_path / "run")
    moved = shutil.copytree(tiny_data, tmp_path / "moved data")
    train(moved, out=out, resume=True, quiet=True)
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["data"] == str(moved.resolve())


def test_loading_a_run_in_a_fresh_process_imports_nothing_of_torch_dynamo_on_the_meta_device(tiny_runs):
    # torch 2.3-2.7 run tensor ops while importing torch._dynamo (timm imports it through torchvision); under the meta
    # device context that load_run builds its skeleton in they failed with a circular import, so `cxrfast serve`,
    # which loads a run before anything else imports timm, died at start there. torch 2.14 does not fail, so the
    # test checks the order: nothing of torch._dynamo may be first imported while the meta device is on.
    import subprocess
    import sys

    script = f"""
import sys, torch
from cxr_fast import bundle
entered = []
real_budget = bundle._parts_budget
def budget(*args, **kwargs):
    entered.append(set(sys.modules))
    return real_budget(*args, **kwargs)
bundle._parts_budget = budget
bundle.load_run({str(tiny_runs[0])!r})
after = set(sys.modules)
assert entered, "load_run no longer builds on the meta device under _parts_budget: update this test"
print(sorted(m for m in after - entered[0] if m.startswith(("torch._dynamo", "timm"))))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
