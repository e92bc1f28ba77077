"""Training: manifest + config → fastai Learner → a self-contained run bundle.

A run bundle (`models/<run>/`) holds everything later steps need and nothing that must be unpickled:
`model.safetensors` (the best epoch by valid balanced accuracy), `config.json` (architecture and its arguments,
classes, channels, size, normalisation, weights source, temperature, seed, library versions), `recipe.yaml`
(the resolved training config), `history.csv`, `curves.png`, `metrics.json` and `seen_images.safetensors` (fingerprints
of the images it learned from, so that external validation can leave them out).

While training, `checkpoint/` holds the last epoch's weights and optimizer state, the best epoch's weights and the
state of the random generators (safetensors + JSON) so that `resume=True` continues a killed run with the same
one-cycle schedule, an unbroken history and, in one process, the random draws of an uninterrupted run. The checkpoint
is removed last, once the bundle is whole: a folder that still has one is not a bundle (`remove_checkpoint` renames
it away in one step before deleting it).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle and lr_find onto Learner)
import numpy as np
import pandas as pd
import torch
import yaml
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import LRFinder
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import AccumMetric
from fastai.torch_core import set_seed
from rich.console import Console
from rich.markup import escape
from sklearn.metrics import balanced_accuracy_score
from torch.cuda import is_available as gpu_available

from cxr_fast import distributed
from cxr_fast.archs import create_model, model_config, splitter
from cxr_fast.archs.weights import parse_weights
from cxr_fast.bundle import RUN_FORMAT
from cxr_fast.config import RECIPE_KEYS, TrainConfig, resolve_config
from cxr_fast.data.block import build_dataloaders, check_classes
from cxr_fast.data.manifest import (
    label_indices,
    manifest_classes,
    manifest_digest,
    manifest_dir,
    manifest_key,
    manifest_matches,
    read_manifest,
)
from cxr_fast.errors import CxrFastError, first_line, read_json, read_tensors, storage_problem
from cxr_fast.outputs import (
    busy,
    check_folder_path,
    clear_run_folder,
    csv_text,
    partial_path,
    reading,
    settle_move,
    write_bytes,
    write_tensors,
    write_text,
    writing,
)
from cxr_fast.probe import is_frozen_arch
from cxr_fast.versions import library_versions

CHECKPOINT_DIR = "checkpoint"


def balanced_accuracy(preds, targs):
    """Mean of per-class recalls, the study's metric: robust to the class imbalance of X-ray collections."""
    return balanced_accuracy_score(targs, preds)


def balanced_accuracy_metric() -> AccumMetric:
    return AccumMetric(balanced_accuracy, dim_argmax=-1, flatten=True)


def _accuracy(preds, targs):
    return (preds == targs).float().mean()


def accuracy_metric() -> AccumMetric:
    """Accuracy over all of an epoch's predictions. fastai's `accuracy` averages per-batch values, which in a
    data-parallel run would also count the items repeated to pad the processes' shards."""
    return AccumMetric(_accuracy, dim_argmax=-1, flatten=True, name="accuracy")


# ---------------------------------------------------------------------------------------------- run folders


def check_new_out(out: str | Path | None) -> None:
    """Refuse an --out that cannot become a new run folder, before any slow work: a file, a folder under a file,
    a folder that already holds something."""
    if out is None:
        return
    out = Path(out)
    check_folder_path(out, "--out")
    if (holder := busy(out)) is not None:  # another run training there: its first epoch's files are no leftovers
        raise CxrFastError(holder)
    settle_move(out)  # an ensemble killed while moving into an empty --out of the user's
    if stopped_in_first_epoch(out):  # a kill -9 as the first checkpoint was written: nothing finished, so start over
        shutil.rmtree(out / CHECKPOINT_DIR)
    if out.exists() and any(out.iterdir()):
        if (out / CHECKPOINT_DIR / "state.json").exists():
            raise CxrFastError(f"{out}: an interrupted run is here; add --resume to continue it")
        if (out / "model.safetensors").exists() and not (out / "config.json").exists():
            raise CxrFastError(f"{out}: holds an unfinished bundle (weights without config.json: a build that was "
                               "killed?); delete the folder or choose another --out")
        raise CxrFastError(f"{out}: already exists; a new run never overwrites an old one (choose another --out)")


def stopped_in_first_epoch(out: Path) -> bool:
    """Whether `out` holds nothing but the first epoch's checkpoint files without the state.json that completes
    them: a run killed (kill -9, power cut) while writing them, with no epoch finished."""
    checkpoint = out / CHECKPOINT_DIR
    if not checkpoint.is_dir() or (checkpoint / "state.json").exists() or [p.name for p in out.iterdir()] != [
            CHECKPOINT_DIR]:
        return False
    first_files = [checkpoint / f"{kind}-epoch0.safetensors" for kind in ("model", "best", "optimizer")]
    expected = {p.name for p in first_files} | {partial_path(p).name for p in [*first_files, checkpoint / "state.json"]}
    return all(p.name in expected for p in checkpoint.iterdir())  # done or, as write_tensors/write_text leave them, half


def check_same_data(run_dir: Path, state: dict, data: str | Path) -> None:
    """A resumed run must go on with the manifest it started on: other rows would mix training and test images
    while config.json still named the first manifest. That manifest moved (or copied) to another folder, its split
    unchanged, is the same data: the run goes on with it there, and records its new place."""
    started_on = state.get("data")
    recorded = state.get("manifest_sha256")  # runs interrupted before this check was added have none
    if started_on and manifest_key(data) != manifest_key(started_on):
        if not (recorded and manifest_matches(data, recorded)):
            raise CxrFastError(f"{run_dir}: this run started on {started_on}; resume it with --data {started_on} (or "
                               "the folder that manifest was moved to)")
        state["data"] = str(Path(data).resolve())
    if recorded and not manifest_matches(data, recorded):
        raise CxrFastError(f"{run_dir}: the manifest in {data} changed since this run started; "
                           "start a new run (a different --out) to train on it")


def new_run_dir(out: str | Path | None, arch: str, root: Path = Path("models"), held: ExitStack | None = None) -> Path:
    """A fresh folder: an explicit --out must not exist yet; the default name carries a timestamp. With `held`, the
    folder's lock (`outputs.writing`) is taken first and kept there until that stack closes, at the end of the run:
    a second `train` into the folder meanwhile refuses, where it used to train into it too."""
    out = free_run_dir(out, arch, root)
    if held is not None:
        held.enter_context(writing(out))
        check_new_out(out)  # again, now that it is ours: another run may have taken it since it was chosen
    out.mkdir(parents=True, exist_ok=True)
    return out


def free_run_dir(out: str | Path | None, arch: str, root: Path = Path("models")) -> Path:
    """`new_run_dir`'s folder, checked but not made yet (absent, or an empty folder of the user's)."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = root / f"{arch.replace('/', '_')}-{stamp}"
        n = 1
        while Path(out).exists() or busy(out) is not None:  # a run started in the same second holds it, unmade yet
            n += 1
            out = root / f"{arch.replace('/', '_')}-{stamp}-{n}"
    out = Path(out)
    check_new_out(out)
    return out


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_optimizer(opt, path: Path) -> dict:
    """Optimizer state as safetensors (tensors) + a JSON-able remainder (ints, floats, bools)."""
    tensors, rest = {}, []
    for i, state in enumerate(opt.state_dict()["state"]):
        kept = {}
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu()
            else:
                kept[k] = v
        rest.append(kept)
    write_tensors(tensors, path)
    hypers = [{k: _plain(v) for k, v in h.items()} for h in opt.state_dict()["hypers"]]
    return {"state": [{k: _plain(v) for k, v in r.items()} for r in rest], "hypers": hypers}


def _plain(value):
    """numpy/torch scalars → Python numbers, so optimizer state survives a JSON round trip."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return value.item() if hasattr(value, "item") else float(value)


def _resume_optimizer(learn, path: Path, meta: dict) -> None:
    """The checkpoint's optimizer state into `learn.opt`, on the device training will run on: its batches'.

    fastai moves the model to that device only as fitting starts (TrainEvalCallback.before_fit), so the parameters
    are still on the CPU here: moments put beside them made a resumed run's first step on a GPU mix cuda:0 and cpu."""
    _load_optimizer(learn.opt, path, meta, device=getattr(learn.dls, "device", None))


def _load_optimizer(opt, path: Path, meta: dict, device: torch.device | None = None) -> None:
    """`device` None: each tensor to its parameter's device, as fastai's load_model(device=…) does."""
    tensors = read_tensors(path, "checkpoint file")
    try:
        states = [dict(s) for s in meta["state"]]
        params = opt.all_params().itemgot(0)
        for key, v in tensors.items():
            i, k = key.split(".", 1)
            states[int(i)][k] = v.to(device or params[int(i)].device)
        opt.load_state_dict({"state": states, "hypers": meta["hypers"]})
    except (KeyError, TypeError, ValueError, IndexError, AssertionError) as e:  # fastai asserts the lengths
        raise CxrFastError(f"{path}: does not match the optimizer state in state.json ({type(e).__name__}: "
                           f"{first_line(e)}); start the run again in a new --out") from None


def _encoded(values, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def _decoded(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def _python_rng(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "state": _encoded(internal, np.uint32), "gauss": gauss}


def _python_rng_back(saved: dict) -> tuple:
    return saved["version"], tuple(int(v) for v in _decoded(saved["state"], np.uint32)), saved["gauss"]


def rng_state(dls) -> dict:
    """Every random generator training draws from, as JSON (no pickle): Python's and NumPy's global ones, torch's
    (CPU and GPUs) and fastai's per-DataLoader shuffling generators. Saved with each epoch's checkpoint, so that a
    resumed run shuffles and augments as the uninterrupted run did."""
    numpy_state = np.random.get_state(legacy=False)  # a dict (MT19937's key and pos), not the legacy tuple
    state = {
        "python": _python_rng(random.getstate()),
        "numpy": {**numpy_state, "state": {"key": _encoded(numpy_state["state"]["key"], np.uint32),
                                           "pos": int(numpy_state["state"]["pos"])}},
        "torch": _encoded(torch.get_rng_state().numpy(), np.uint8),
        "loaders": [_python_rng(dl.rng.getstate()) for dl in dls.loaders],
    }
    if gpu_available():
        state["cuda"] = [_encoded(s.numpy(), np.uint8) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(dls, saved: dict) -> None:
    """The generators as `rng_state` saved them (a GPU's only when this machine has as many GPUs)."""
    random.setstate(_python_rng_back(saved["python"]))
    numpy_state = saved["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": _decoded(numpy_state["state"]["key"], np.uint32).copy(),
                                                  "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(torch.from_numpy(_decoded(saved["torch"], np.uint8).copy()))
    for dl, loader_state in zip(dls.loaders, saved["loaders"]):
        dl.rng.setstate(_python_rng_back(loader_state))
    if gpu_available() and len(saved.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(_decoded(s, np.uint8).copy()) for s in saved["cuda"]])


def read_checkpoint_state(state_path: Path) -> tuple[dict, TrainConfig]:
    """A checkpoint's state.json and its training options, checked: an edited, damaged or newer-version file is one
    line naming it, not a KeyError or TypeError in the middle of resuming."""
    state = read_json(state_path)

    def damaged(why: str) -> CxrFastError:
        return CxrFastError(f"{state_path}: damaged checkpoint ({why}); start the run again in a new --out")

    if not isinstance(state, dict):
        raise damaged("not a JSON object")
    needed = ["config", "history", "epochs_done", "data"]
    if isinstance(state.get("config"), dict) and not is_frozen_arch(str(state["config"].get("arch", ""))):
        needed += ["stats", "lr"] + (["optimizer"] if state.get("epochs_done") else [])
    missing = [key for key in needed if key not in state]
    if missing:
        raise damaged(f"lacks {', '.join(missing)}")
    if not isinstance(state["config"], dict):
        raise damaged("'config' is not a mapping")
    unknown = sorted(set(state["config"]) - RECIPE_KEYS)
    if unknown:
        raise damaged(f"unknown options {', '.join(unknown)}: written by another version of cxr_fast?")
    if not isinstance(state["epochs_done"], int) or not isinstance(state["history"], list):
        raise damaged("'epochs_done' must be a whole number and 'history' a list")
    try:
        cfg = resolve_config(**{key: value for key, value in state["config"].items() if value is not None})
    except CxrFastError as e:
        raise damaged(str(e)) from None
    return state, cfg


class RunRecorder(Callback):
    """After every epoch: append to history.csv, keep the best model, and write a resumable checkpoint.

    Runs after fastai's Recorder (order 50) so this epoch's values are already recorded.
    """

    order = 51

    def __init__(self, run_dir: Path, state: dict, epoch_offset: int, phase: str, restore_rng: bool = False):
        self.run_dir, self.state, self.epoch_offset, self.phase = run_dir, state, epoch_offset, phase
        self.restore_rng = restore_rng

    def before_fit(self):
        # fastai's train_loss is a running average (beta 0.98, about 50 batches of memory) that every fit starts
        # afresh: restarted by --resume in mid-phase, it forgot the earlier, higher losses and drew a resumed run's
        # curve below an uninterrupted one's for epochs. It goes on from where the checkpoint left it.
        saved = self.state.get("smooth_loss")
        if saved and saved["phase"] == self.phase and self.state["epochs_done"] > self.epoch_offset:
            self.recorder.smooth_loss.val = torch.tensor(saved["val"])
            self.recorder.smooth_loss.count = saved["count"]

    def before_epoch(self):
        self.epoch_started = time.perf_counter()
        if self.restore_rng and self.epoch_offset + self.epoch == self.state["epochs_done"]:
            # the first epoch a resumed run trains: its random draws as the uninterrupted run made them. A checkpoint
            # of an earlier cxr_fast has none; the processes of data-parallel training each have their own.
            self.restore_rng = False
            if "rng" in self.state and not distributed.is_distributed():
                try:
                    set_rng_state(self.learn.dls, self.state["rng"])
                except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # what a damaged entry raises
                    # the weights and optimizer state are intact: an edited or damaged generators' entry costs only
                    # bit-for-bit agreement with an uninterrupted run, not the run
                    warnings.warn(f"{self.run_dir / CHECKPOINT_DIR / 'state.json'}: its random generators' state "
                                  f"could not be restored ({type(e).__name__}: {first_line(e)}); the resumed epochs "
                                  "shuffle and augment afresh", stacklevel=1)

    def after_epoch(self):
        if self.epoch_offset + self.epoch < self.state["epochs_done"]:
            return  # fastai's SkipToEpoch fires after_epoch for the epochs a resumed run skips
        # Counted per epoch and saved with the checkpoint, so a resumed run reports its whole training time.
        self.state["train_seconds"] += time.perf_counter() - self.epoch_started
        names = [n for n in self.recorder.metric_names[1:] if n != "time"]
        values = self.recorder.values[-1]
        row = {"epoch": self.epoch_offset + self.epoch, "phase": self.phase}
        row.update({n: float(v) for n, v in zip(names, values)})
        self.state["history"].append(row)

        ckpt = self.run_dir / CHECKPOINT_DIR
        ckpt.mkdir(exist_ok=True)
        score = row.get("valid_balanced_accuracy", float("nan"))
        if self.state["best"] is None or score > self.state["best"]["valid_balanced_accuracy"]:
            self.state["best"] = row
            # One file per best epoch, named by it: a kill before state.json below leaves the previous best's
            # file, which the previous state.json names, as it was.
            write_tensors(cpu_state(self.learn.model), best_weights_path(self.run_dir, row["epoch"]))

        # This epoch's files under names of their own, never over the last epoch's: a kill before state.json below
        # leaves the files the previous state.json names as they were (written over, they would pair this epoch's
        # weights with the last epoch's schedule, and --resume would train an epoch twice).
        weights, optimizer = epoch_files(self.run_dir, row["epoch"])
        write_tensors(cpu_state(self.learn.model), weights)
        self.state["optimizer"] = _save_optimizer(self.learn.opt, optimizer)
        smooth = self.recorder.smooth_loss
        self.state["smooth_loss"] = {"phase": self.phase, "val": float(smooth.val), "count": int(smooth.count)}
        if not distributed.is_distributed():
            self.state["rng"] = rng_state(self.learn.dls)
        else:  # one process's generators are not the others': none is saved (nor a single-process part's, now stale)
            self.state.pop("rng", None)
        # state.json last: it names the epoch the files above hold, so it must never run ahead of them; and the
        # epoch counts as done (for a Ctrl-C's message, or removing a failed run) only once state.json says so
        write_text(ckpt / "state.json", json.dumps({**self.state, "epochs_done": row["epoch"] + 1}, indent=1))
        self.state["epochs_done"] = row["epoch"] + 1
        # after state.json, so that the folder's history never shows an epoch that --resume will train again
        write_text(self.run_dir / "history.csv", csv_text(pd.DataFrame(self.state["history"])))
        kept = {best_weights_path(self.run_dir, self.state["best"]["epoch"]), weights, optimizer}
        for older in ckpt.glob("*-epoch*.safetensors"):
            if older not in kept:
                older.unlink()


def epoch_files(run_dir: Path, epoch: int) -> tuple[Path, Path]:
    """Where the checkpoint keeps the model's and the optimizer's state after `epoch`."""
    folder = run_dir / CHECKPOINT_DIR
    return folder / f"model-epoch{epoch}.safetensors", folder / f"optimizer-epoch{epoch}.safetensors"


def checkpoint_paths(run_dir: Path, epoch: int) -> tuple[Path, Path]:
    """The files --resume reads for `epoch`: `epoch_files`, or for a run interrupted by an earlier cxr_fast, which
    kept them as model.safetensors and optimizer.safetensors, those."""
    named = epoch_files(run_dir, epoch)
    earlier = run_dir / CHECKPOINT_DIR / "model.safetensors", run_dir / CHECKPOINT_DIR / "optimizer.safetensors"
    return earlier if not named[0].exists() and earlier[0].exists() else named


def best_weights_path(run_dir: Path, epoch: int) -> Path:
    """Where training keeps the best epoch's weights until the bundle is written."""
    return run_dir / CHECKPOINT_DIR / f"best-epoch{epoch}.safetensors"


class EpochNumbering(Callback):
    """The printed table numbers epochs as history.csv does: on from the frozen phase's, not from 0 again, and with
    no empty rows for the epochs a resumed run skips."""

    order = 49  # after_epoch runs before the Recorder's (50), which prints the row

    def __init__(self, epoch_offset: int, epochs_done: int):
        self.epoch_offset, self.epochs_done, self.hidden_logger = epoch_offset, epochs_done, None

    def before_epoch(self):
        if self.hidden_logger is not None:
            self.learn.logger, self.hidden_logger = self.hidden_logger, None

    after_fit = before_epoch

    def after_epoch(self):
        self.learn.recorder.log[0] = self.epoch_offset + self.epoch
        if self.epoch_offset + self.epoch < self.epochs_done:  # skipped: finished before the interruption
            self.hidden_logger, self.learn.logger = self.learn.logger, lambda *args, **kwargs: None


def draws_html_bars() -> bool:
    """Whether fastai's bars are fastprogress's HTML ones, which update in place: fastprogress chose them at import
    because this runs in a Jupyter kernel. Plain epoch lines there showed nothing until each epoch ended."""
    from fastai.callback import progress
    from fastprogress.fastprogress import NBProgressBar

    return progress.progress_bar is NBProgressBar


class EpochLines(Callback):
    """Where stdout is not a terminal (a log file, nohup, CI), the epoch table as plain lines, one per epoch, instead
    of fastprogress's bars: their carriage-return redraws put hundreds of partial bars into a log before each row."""

    order = ProgressCallback.order

    def before_fit(self):
        # lr_find's sweep is a fit too, with logging off: its steps printed as rows would look like epochs
        self.active = not any(isinstance(cb, LRFinder) for cb in self.learn.cbs)
        if not self.active:
            return
        self.old_logger, self.learn.logger = self.learn.logger, self._write
        names = list(self.recorder.metric_names)
        self.widths = [max(len(name), 9) for name in names]  # room for a six-decimal loss under a short name
        self._write(names)

    def after_fit(self):
        if self.active:
            self.learn.logger = self.old_logger

    def _write(self, row):
        cells = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in row]
        print("  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip(), flush=True)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # data-parallel training wraps the model
        model = model.module
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def channels_last_hazards(model: torch.nn.Module) -> list[str]:
    """Convolutions that oneDNN computes wrongly in channels-last layout on x86 CPUs: 1×1 kernels with a stride
    and fewer than 16 input channels. Their weight gradient writes past a workspace, which hangs training, crashes
    it or silently corrupts gradients (oneDNN issue 6035; seen here as a test run hung in backward)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 16]


class ChannelsLast(Callback):
    """Model and every input batch in channels-last memory layout (fastai's own `ChannelsLast` converts only the
    model, and its `to_channelslast` adds mixed precision, which CPUs do not gain from).

    A model with a convolution from `channels_last_hazards` stays in the ordinary layout, with a warning: the
    layout only buys speed, never at the price of wrong gradients or a hung run."""

    order = -1  # before any callback that wraps the model

    def before_fit(self):
        hazards = channels_last_hazards(self.learn.model)
        self.active = torch.cuda.is_available() or not hazards  # the oneDNN bug is on CPUs only
        if not self.active:
            warnings.warn(f"channels_last ignored: 1×1 strided convolutions with < 16 input channels ({hazards[0]}"
                          f"{' and others' if len(hazards) > 1 else ''}) are miscomputed by oneDNN in that layout "
                          "(oneDNN issue 6035); training in the ordinary layout", stacklevel=1)
            return
        self.learn.model.to(memory_format=torch.channels_last)

    def before_batch(self):
        if self.active:
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) for x in self.xb)


# ---------------------------------------------------------------------------------------------- training


def class_weight_tensor(manifest: pd.DataFrame, classes: list[str]) -> torch.Tensor:
    counts = manifest[manifest["split"] == "train"]["label"].value_counts()
    freq = np.array([counts.get(c, 0) for c in classes], dtype=float)
    weights = freq.sum() / (len(classes) * np.maximum(freq, 1))
    return torch.tensor(weights, dtype=torch.float32)


def build_learner(manifest: pd.DataFrame, cfg: TrainConfig, stats=None):
    """Model + DataLoaders + Learner: decides normalisation, body/head split and loss in one place."""
    set_seed(cfg.seed, reproducible=True)
    classes = manifest_classes(manifest)
    model = create_model(cfg.arch, n_in=cfg.n_in, n_classes=len(classes), weights=cfg.weights, **cfg.arch_kwargs)
    # Pretrained networks expect the statistics they were trained with (fastai skips this for timm models
    # with n_in=1, fastai issue 3669); networks trained from scratch use the training split's statistics.
    if stats is None and model.pretrained_stats is not None:
        stats = model.pretrained_stats
    dls, spec = build_dataloaders(
        manifest, size=cfg.size, bs=cfg.bs, n_in=cfg.n_in, stats=stats, augment=cfg.augment,
        seed=cfg.seed, num_workers=cfg.num_workers, stats_sample=cfg.stats_sample,
    )
    weight = class_weight_tensor(manifest, spec.classes) if cfg.class_weights else None
    learn = Learner(
        dls, model, loss_func=CrossEntropyLossFlat(weight=weight, label_smoothing=cfg.label_smoothing),
        metrics=[accuracy_metric(), balanced_accuracy_metric()], splitter=splitter, wd=cfg.wd,
    )
    if cfg.channels_last:
        learn.add_cb(ChannelsLast())
    if cfg.mixup > 0:
        learn.add_cb(MixUp(cfg.mixup))
    learn.recorder.train_metrics = True  # train accuracy too, for the study's accuracy/loss-by-epoch figure
    if gpu_available():  # fastai's fp16 training with loss scaling; CPUs keep fp32, which they compute natively
        learn.to_fp16()
    return learn, spec


def check_input_size(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """One image of the training size through the network before a run folder exists: a network that pools more
    often than the size allows fails here in one line, not with a traceback after the data has loaded."""
    was_training = model.training
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, cfg.n_in, cfg.size, cfg.size, device=parameter.device, dtype=parameter.dtype))
    except (RuntimeError, AssertionError, ValueError) as e:  # timm's fixed-size models assert, or raise ValueError
        problem = first_line(e)
        too_small = any(word in problem.lower() for word in ("size", "small", "kernel"))
        advice = "; give a larger --size or a shallower network" if too_small else ""
        raise CxrFastError(f"{cfg.arch} fails on a {cfg.size}-pixel, {cfg.n_in}-channel image ({problem}){advice}") from None
    finally:
        model.train(was_training)


def _phases(cfg: TrainConfig) -> list[tuple[str, int]]:
    """(phase, epochs): one-cycle from scratch, or from pretrained weights a frozen head phase (none with
    freeze_epochs 0, as fastai's fine_tune) then the unfrozen one with its discriminative rates."""
    if cfg.pretrained:
        return [("frozen", cfg.freeze_epochs)] * (cfg.freeze_epochs > 0) + [("unfrozen", cfg.epochs)]
    return [("train", cfg.epochs)]


def train(
    data: str | Path,
    cfg: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    extra_cbs: list | None = None,
    quiet: bool = False,
) -> Path:
    """Train `cfg.arch` on the manifest in `data` and write a run bundle; returns the run folder.

    Started as several processes (torchrun, or `cxr_fast.distributed.launch_training`), it trains data-parallel:
    each process takes its share of every batch and rank 0 alone writes the run folder (docs/scaling-out.md).
    """
    with distributed.process_group(), ExitStack() as held:  # the run folder's lock, from when it is known to the end
        return _train(data, cfg, out=out, resume=resume, extra_cbs=extra_cbs, quiet=quiet, held=held)


def _train(data, cfg, *, out, resume, extra_cbs, quiet, held: ExitStack) -> Path:
    # Marked as read until the bundle is written: a prepare --force of the data refuses instead of replacing the
    # manifest under the run, which then found it changed at its end and wrote no bundle
    held.enter_context(reading(manifest_dir(data)))
    manifest = read_manifest(data)
    check_classes(manifest, data)
    if resume:
        if out is None:
            raise CxrFastError("--resume needs --out pointing at the interrupted run")
        run_dir = Path(out)
        if distributed.is_main():  # rank 0 writes the folder; a second --resume of the run refuses
            held.enter_context(writing(run_dir))
        state_path = run_dir / CHECKPOINT_DIR / "state.json"
        if not state_path.exists() and (run_dir / "config.json").is_file():
            raise CxrFastError(f"{run_dir}: this run finished (its checkpoint is gone); nothing to resume")
        if run_dir.is_dir() and (not any(run_dir.iterdir()) or stopped_in_first_epoch(run_dir)):  # a kill -9 then
            raise CxrFastError(f"{run_dir}: nothing to resume (the run stopped before its first epoch ended, which "
                               "keeps nothing); start it again without --resume")
        if not state_path.exists():
            raise CxrFastError(f"{run_dir}: no checkpoint to resume (expected {state_path})")
        state, cfg = read_checkpoint_state(state_path)
        check_same_data(run_dir, state, data)
        check_folder_path(state_path.parent, "--out")  # read-only: refused now, not after an epoch of training
    else:
        cfg = cfg or resolve_config()
        # a weights file by its whole path: the run records where it started from, and resumes from any folder
        cfg = dataclasses.replace(cfg, weights=parse_weights(cfg.weights).source)
        check_new_out(out)
        run_dir = None  # made only once the model and data are known to be good, so a typo leaves nothing behind
        state = {"config": cfg.to_dict(), "history": [], "best": None, "epochs_done": 0, "lr": None,
                 "train_seconds": 0.0, "data": str(Path(data).resolve()), "manifest_sha256": manifest_digest(data)}

    if is_frozen_arch(cfg.arch):  # nothing to descend: features once, then a regression (cxr_fast.probe)
        from cxr_fast.probe import fit_frozen

        return fit_frozen(manifest, cfg, state, Path(out) if resume else None, out, quiet, held)

    stats = (state["stats"]["mean"], state["stats"]["std"]) if resume else None
    # A resumed run's checkpoint holds every tensor: it must not need its starting weights again (a weights file
    # since moved, `hub` while offline), so the network is built empty and the checkpoint loaded into it below.
    build_cfg = dataclasses.replace(cfg, weights="none") if resume else cfg
    learn, spec = build_learner(manifest, distributed.per_process_config(build_cfg), stats)
    check_input_size(learn.model, cfg)
    had_folder = out is not None and Path(out).exists()  # an empty --out of the user's: emptied on failure, kept
    if run_dir is None:
        run_dir = Path(distributed.on_main(lambda: str(new_run_dir(out, cfg.arch, held=held))))
    state["stats"] = {"mean": spec.mean, "std": spec.std}
    state["classes"] = spec.classes
    if not resume:  # as first built, with its starting weights: a resumed run's network is built without them
        state["model_config"] = model_config(learn.model)
    report = learn.model.load_report
    if report is not None and not resume:  # how much of a weights file was used: the user must not have to guess
        state["weights_loaded"] = report.summary()
        if not quiet and distributed.is_main():
            Console(stderr=True).print(f"weights: {escape(state['weights_loaded'])}", highlight=False, soft_wrap=True)
            if (caution := report.caution()) is not None:
                Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(caution)}", highlight=False, soft_wrap=True)
    if quiet or not distributed.is_main():  # data-parallel: one table and one bar, rank 0's
        learn.remove_cb(ProgressCallback)
        learn.logger = lambda *args, **kwargs: None
    elif not sys.stdout.isatty() and not draws_html_bars():  # a notebook's stdout is no terminal either
        learn.remove_cb(ProgressCallback)
        learn.add_cb(EpochLines())

    try:  # from here the run folder exists: a failure or Ctrl-C before the first epoch is saved removes it
        if state["lr"] is None:  # lr_find runs on rank 0 alone, and every rank trains with its suggestion
            if cfg.lr == "auto" and not quiet and distributed.is_main():
                Console(stderr=True).print("finding a learning rate (fastai's lr_find) …", highlight=False)
            state["lr"] = distributed.on_main(lambda: find_lr(learn) if cfg.lr == "auto" else float(cfg.lr))
            if cfg.lr == "auto" and not quiet and distributed.is_main():
                Console(stderr=True).print(f"lr_find suggests {state['lr']:.3g} (its 'valley'); training with it",
                                           highlight=False)
        lr = state["lr"]

        if resume:
            checkpoint = checkpoint_paths(run_dir, state["epochs_done"] - 1)[0]
            try:
                learn.model.load_state_dict(read_tensors(checkpoint, "checkpoint file"))
            except RuntimeError as e:
                from cxr_fast.bundle import state_dict_problem

                raise CxrFastError(f"{checkpoint}: does not fit the run's {cfg.arch} ({state_dict_problem(e)})") from None
        distributed.to_data_parallel(learn)

        _fit_phases(learn, cfg, state, run_dir, lr, resume, extra_cbs)
    except BaseException as e:
        if not resume and not (run_dir / CHECKPOINT_DIR / "state.json").exists() and distributed.is_main():
            clear_run_folder(run_dir, keep=had_folder)  # nothing finished: leave nothing to block a fresh start
        if isinstance(e, KeyboardInterrupt):
            raise TrainingInterrupted(run_dir, state["epochs_done"], sum(n for _, n in _phases(cfg)), data=data) from None
        if storage_problem(e) and state["epochs_done"] and distributed.is_main():  # a full disk mid-run
            raise CxrFastError(f"{storage_problem(e)}; training stopped after {state['epochs_done']} epochs, and "
                               f"continues with: {resume_command(run_dir, data)}") from None
        raise
    if not distributed.is_main():
        return run_dir
    with writing_bundle(run_dir, data, state["epochs_done"], sum(n for _, n in _phases(cfg))):
        return finish_bundle(run_dir, learn, cfg, state, quiet=quiet)


@contextmanager
def writing_bundle(run_dir: Path, data, done: int, planned: int, unit: str = "epochs") -> Iterator[None]:
    """The training is over and its checkpoint still there, so a Ctrl-C or a full disk while the bundle is written
    loses nothing: the message says how `--resume` writes it."""
    try:
        yield
    except KeyboardInterrupt:
        raise TrainingInterrupted(run_dir, done, planned, unit, data=data) from None
    except OSError as e:
        if storage_problem(e) is None:
            raise
        raise CxrFastError(f"{storage_problem(e)}; the bundle in {run_dir} was not finished; make room and finish it "
                           f"with: {resume_command(run_dir, data)}") from None


def resume_command(run_dir: Path, data) -> str:
    """The command line that continues the run in `run_dir`, for the messages of a run that stopped."""
    return f"cxrfast train --data {shlex.quote(str(data))} --out {shlex.quote(str(run_dir))} --resume"  # pasteable


def find_lr(learn: Learner) -> float:
    """fastai's lr_find 'valley'. lr_find saves the model to LEARNER.PATH/models to restore it afterwards, which
    would be a ./models folder (and, after a kill, a pickle left in it): a temporary folder is used instead."""
    path, model_dir = learn.path, learn.model_dir
    with tempfile.TemporaryDirectory(prefix="cxrfast-lr_find-") as scratch:
        learn.path, learn.model_dir = Path(scratch), "."
        try:
            return float(learn.lr_find(show_plot=False).valley)
        finally:
            learn.path, learn.model_dir = path, model_dir


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the finished epochs are saved and `--resume` continues from the last of them. A
    KeyboardInterrupt still, so that every command (compare and demo train too) reports it as one."""

    def __init__(self, run_dir: Path, epochs_done: int, epochs_planned: int, unit: str = "epochs", data=None):
        self.run_dir, self.epochs_done, self.epochs_planned = run_dir, epochs_done, epochs_planned
        held = f"{run_dir} holds them" if epochs_done else "nothing was kept"
        resume = (f"; continue with: {resume_command(run_dir, data)}"
                  if epochs_done and data is not None else "")
        super().__init__(f"training interrupted after {epochs_done} of {epochs_planned} {unit}; {held}{resume}")


def _fit_phases(learn, cfg: TrainConfig, state: dict, run_dir: Path, lr: float, resume: bool, extra_cbs) -> None:
    """The frozen, unfrozen or from-scratch phases still to do, each a one-cycle schedule; a resumed run skips
    the finished epochs and keeps their place in the schedule."""
    done = state["epochs_done"]
    offset = 0
    for phase, n_epochs in _phases(cfg):
        if done >= offset + n_epochs:  # this phase finished before the interruption
            offset += n_epochs
            continue
        start_epoch = max(done - offset, 0)
        if phase == "frozen":
            learn.freeze()
        else:
            learn.unfreeze()
        if resume and start_epoch > 0:
            # After freeze/unfreeze, whose freeze_to clears the optimizer's state: loaded before, Adam's moments
            # were wiped and the resumed epochs started from zero momentum.
            _resume_optimizer(learn, checkpoint_paths(run_dir, done - 1)[1], state["optimizer"])
        # the generators are restored in the phase the run resumes in only: epochs_done grows as epochs finish, and
        # a later phase's first epoch would match it and restore them a second time, where the uninterrupted run did not
        recorder = [RunRecorder(run_dir, state, offset, phase, restore_rng=resume and offset <= done)
                    ] if distributed.is_main() else []  # rank 0 writes
        cbs = recorder + [EpochNumbering(offset, done)] + list(extra_cbs or [])
        if phase == "frozen":
            learn.fit_one_cycle(n_epochs, lr, pct_start=0.99, cbs=cbs, start_epoch=start_epoch)
        elif phase == "unfrozen":
            # fastai's fine_tune recipe: half the rate, discriminative rates body/head
            learn.fit_one_cycle(n_epochs, slice(lr / 2 / cfg.lr_mult, lr / 2), pct_start=cfg.pct_start, div=5.0, cbs=cbs,
                                start_epoch=start_epoch, reset_opt=start_epoch == 0)
        else:
            learn.fit_one_cycle(n_epochs, lr, pct_start=cfg.pct_start, cbs=cbs, start_epoch=start_epoch)
        offset += n_epochs


def run_environment() -> dict:
    """What besides the library versions changes a run's float rounding, so the same seed gives other weights: the
    number of torch threads (sums split differently between them), the device and the kind of processor."""
    return {"threads": torch.get_num_threads(), "device": "cuda" if gpu_available() else "cpu",
            **({"gpu": torch.cuda.get_device_name()} if gpu_available() else {}),
            "machine": platform.machine(), "system": platform.system()}


def run_config(model: torch.nn.Module, cfg: TrainConfig, state: dict) -> dict:
    """A bundle's config.json (temperature 1 until calibration): everything `cxr_fast.bundle.load_run` needs."""
    return {
        "format": RUN_FORMAT,
        "model": state.get("model_config") or model_config(model),
        "classes": state["classes"],
        "n_in": cfg.n_in,
        "size": cfg.size,
        "mean": state["stats"]["mean"],
        "std": state["stats"]["std"],
        "weights_source": cfg.weights,
        **({"weights_loaded": state["weights_loaded"]} if "weights_loaded" in state else {}),
        "seed": cfg.seed,
        "lr": state["lr"],
        "data": state["data"],
        "manifest_sha256": state.get("manifest_sha256"),  # evaluate refuses the manifest if it changes later
        "temperature": 1.0,
        "versions": library_versions(),
        "environment": run_environment(),
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def finish_bundle(run_dir: Path, learn: Learner, cfg: TrainConfig, state: dict, quiet: bool = False) -> Path:
    """Best weights, config, calibration, history, curves and metrics; then drop the checkpoint."""
    from cxr_fast.attribution import model_device
    from cxr_fast.bundle import load_run, predict_logits
    from cxr_fast.calibration import fit_temperature
    from cxr_fast.plots import plot_training_curves
    from cxr_fast.report import png_bytes
    from cxr_fast.seen import write_seen

    recorded = state.get("manifest_sha256")  # runs interrupted before this check was added have none
    if recorded and not manifest_matches(state["data"], recorded):
        # Prepared again (--force) while this run trained: calibrating on the new valid split and recording the new
        # train split as the images it learned from would give a bundle whose figures are not its own.
        raise CxrFastError(f"{Path(state['data']) / 'manifest.csv'}: changed while {run_dir} trained (prepared again?); "
                           "no bundle was written, as its valid split and learned images are no longer this run's: "
                           "train a new run on the new manifest")
    model = learn.model
    best = best_weights_path(run_dir, state["best"]["epoch"])
    if best.exists():  # gone only if an earlier, interrupted finish already moved it
        best.replace(run_dir / "model.safetensors")
    config = run_config(model, cfg, state)
    # Every file whole or not at all (written, then renamed): a kill or full disk mid-file must not leave a half
    # metrics.json that the --resume finishing the bundle then cannot read.
    write_text(run_dir / "config.json", json.dumps(config, indent=2))
    write_text(run_dir / "recipe.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # Temperature scaling on the valid split, with the best weights, so predicted probabilities can be trusted.
    # On the GPU it trained on if that is a CUDA one, else on the CPU: fastai also trains on an Apple GPU (MPS), which
    # `inference_device` refuses, and that refusal ended such a training after its last epoch.
    trained_on = model_device(model)
    run = load_run(run_dir, finishing=True, device=trained_on if trained_on.type == "cuda" else "cpu")
    manifest = read_manifest(state["data"])
    valid = manifest[manifest["split"] == "valid"]
    # its own bar: after the last epoch's row, this pass took 25 s with nothing shown (efficientnet_lite0 at 288 px,
    # 177 valid images)
    logits = predict_logits(run, valid, progress=not quiet, description=f"calibrating on {len(valid)} valid images")
    y = label_indices(valid["label"], run.classes)
    config["temperature"] = float(fit_temperature(logits, y))
    write_text(run_dir / "config.json", json.dumps(config, indent=2))
    write_seen(run_dir, manifest)  # so evaluation elsewhere can leave out copies of these images

    history = pd.DataFrame(state["history"])
    # again, whole, from the checkpoint: a kill while the last epoch wrote it left half a row
    write_text(run_dir / "history.csv", csv_text(history))
    fig = plot_training_curves(history, title=f"Training curves of {run_dir.name} ({cfg.arch})")
    write_bytes(run_dir / "curves.png", png_bytes(fig))
    best = state["best"]
    metrics = {
        "best_epoch": best["epoch"],
        "valid_balanced_accuracy": best.get("valid_balanced_accuracy"),
        "valid_accuracy": best.get("valid_accuracy"),
        "valid_loss": best.get("valid_loss"),
        "epochs": len(history),
        "train_seconds": round(state["train_seconds"], 2),
        "processes": distributed.world_size(),  # data-parallel training processes (1: not distributed)
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "temperature": config["temperature"],
    }
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    remove_checkpoint(run_dir)
    return run_dir


def run_summary(run_dir: Path) -> str:
    """One console line on a finished run: what was kept, its valid balanced accuracy and its training time."""
    metrics = read_json(run_dir / "metrics.json")
    kept = f"chosen C {metrics['best_C']:g}" if "best_C" in metrics else f"best epoch {metrics['best_epoch']}"
    n_classes = len(read_json(run_dir / "config.json")["classes"])
    # always guessing one class scores 1/K: a run there has learned nothing usable, however calibrated it looks
    at_chance = metrics["valid_balanced_accuracy"] <= 1 / n_classes + 0.02
    chance = (f"; [bold yellow]no better than chance[/] (1/{n_classes}): train longer, lower the learning rate or "
              "check the data" if at_chance else "")
    return (f"run [bold]{escape(str(run_dir))}[/]: {kept}, valid balanced accuracy "
            f"{metrics['valid_balanced_accuracy']:.3f}, {metrics['train_seconds']:.0f} s{chance}")


def remove_checkpoint(run_dir: Path) -> None:
    """The last step of writing a bundle. The folder is renamed away first, in one step: a kill part-way through
    the removal must neither leave a finished bundle that looks interrupted (`load_run` refuses a folder with a
    state.json) nor ~20 MB of weights in it for good (the next `load_run` finishes the job)."""
    from cxr_fast.bundle import REMOVED_CHECKPOINT_DIR, sweep_removed_checkpoint

    sweep_removed_checkpoint(run_dir)
    if (run_dir / CHECKPOINT_DIR).exists():
        (run_dir / CHECKPOINT_DIR).rename(run_dir / REMOVED_CHECKPOINT_DIR)
    sweep_removed_checkpoint(run_dir)


__all__ = ["TrainConfig", "TrainingInterrupted", "balanced_accuracy", "build_learner", "new_run_dir", "train"]
