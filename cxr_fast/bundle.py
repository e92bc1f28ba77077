"""Loading a run bundle and running its model, with no fastai and no pickle.

`load_run` rebuilds the architecture from `config.json` and loads `model.safetensors` strictly: a bundle that
lacks either, or whose weights do not fit the architecture, is refused with a one-line error.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxr_fast.archs import model_from_config
from cxr_fast.archs.registry import plugin_archs
from cxr_fast.config import contract_problem
from cxr_fast.data.manifest import (
    absolute_anywhere,
    image_column,
    manifest_csv,
    manifest_matches,
    read_manifest,
)
from cxr_fast.errors import CxrFastError, read_json, read_tensors
from cxr_fast.preprocess import load_input
from cxr_fast.progress import progress_bar
from cxr_fast.reprs import short_repr


@dataclass
class Run:
    """A loaded run bundle (from `load_run`): its folder, its network (in eval mode), `config.json` as a
    dict and `metrics.json` (empty when absent)."""

    path: Path
    model: torch.nn.Module
    config: dict
    metrics: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where `model` runs

    def __repr__(self) -> str:  # a notebook shows it: see cxr_fast.reprs
        return short_repr(self, arch=self.config["model"]["arch"], classes=self.classes,
                          size=self.size, temperature=self.temperature)

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the model's outputs (the manifest's labels sorted)."""
        return list(self.config["classes"])

    @property
    def size(self) -> int:
        """The side in pixels the model takes its images at."""
        return int(self.config["size"])

    @property
    def n_in(self) -> int:
        """The model's input channels, 1 or 3."""
        return int(self.config["n_in"])

    @property
    def temperature(self) -> float:
        """The temperature fitted on the validation split: `softmax(logits, run.temperature)` gives the calibrated
        probabilities; exactly 1 when nothing was rescaled."""
        return float(self.config.get("temperature", 1.0))

    @property
    def name(self) -> str:
        """The run folder's name."""
        return self.path.name

    def load_input(self, path: str | Path) -> torch.Tensor:
        """One image file (PNG/JPEG/DICOM) as the model's input [n_in, size, size], preprocessed as in training."""
        return load_input(path, self.size, self.n_in, self.config["mean"], self.config["std"])


def state_dict_problem(e: BaseException) -> str:
    """The informative line of torch's load_state_dict error (its first line is only "Error(s) in loading …")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [type(e).__name__])[0]
    return detail if len(detail) <= 200 else detail[:197] + "…"


RUN_FORMAT = "cxr_fast-run/1"


def config_problem(config) -> str | None:
    """What makes a run's config.json unusable, or None. Checked on loading, so an edited or damaged file is one
    line naming it, not a traceback (or wrong figures) after every image has been predicted."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return "not a cxr_fast run config (no 'model')"
    # Every cxr_fast since the first writes format and temperature: a config.json without them was edited or made
    # by hand, and reading it with temperature 1 would give uncalibrated probabilities labelled as calibrated.
    missing = [key for key in ("format", "classes", "n_in", "size", "mean", "std", "temperature", "data")
               if key not in config]
    if missing:
        return (f"lacks {', '.join(missing)} (every cxr_fast run bundle has them: an edited or incomplete copy; "
                "restore it from the original bundle or train again)")
    if config["format"] != RUN_FORMAT:
        return (f"format {config['format']!r} is not {RUN_FORMAT!r}, the one this cxr_fast reads (written by a "
                "newer cxr_fast? upgrade it)")
    model = config["model"]
    if model.get("n_in", config["n_in"]) != config["n_in"]:
        return f"n_in {config['n_in']!r} does not match the model's ({model['n_in']!r})"
    problem = contract_problem(config)
    if problem:
        return problem
    if model.get("n_classes", len(config["classes"])) != len(config["classes"]):
        return f"{len(config['classes'])} classes, but the model has {model['n_classes']} outputs"
    return None


# Where a finished run's checkpoint goes to be deleted (train.remove_checkpoint).
REMOVED_CHECKPOINT_DIR = ".checkpoint-removed"


def sweep_removed_checkpoint(run_dir: Path) -> None:
    """Delete a checkpoint that a killed trainer had renamed away but not yet deleted (from a read-only copy of a
    bundle it cannot be, and stays, harmlessly)."""
    shutil.rmtree(run_dir / REMOVED_CHECKPOINT_DIR, ignore_errors=True)


def inference_device(name: str | torch.device = "cpu") -> torch.device:
    """The device `--device NAME` runs a model on: "cpu", "cuda" (or "cuda:N", one GPU of several), or "auto", the
    GPU when torch sees one and the CPU otherwise. A GPU asked for where torch sees none is a one-line error."""
    text = str(name).strip().lower()  # a torch.device too: "cuda:0"
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = text.partition(":")  # "cuda:" too is refused here: torch.device would raise a RuntimeError
    if kind not in ("cpu", "cuda") or (colon and not (kind == "cuda" and index.isdigit())):
        raise CxrFastError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CxrFastError(f"--device {text}: torch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                               f"{build}); use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise CxrFastError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        full_float32_on_gpus()
    return torch.device(text)


def full_float32_on_gpus() -> None:
    """Compute in full float32 on GPUs, as on a CPU: cuDNN's convolutions default to TF32 (a 10-bit mantissa) on
    Ampere and newer GPUs, and an evaluation on an H200 with them differed from the CPU's in the 4th decimal of its
    AUCs and by 0.006 in ECE (docs/benchmarks.md; how much of that TF32 caused was not measured). It applies to the
    whole process, training in it too (whose mixed precision computes in float16 either way)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def device_name(device: torch.device) -> str:
    """"cpu", or "cuda:0 (NVIDIA H200)": what an evaluation records as where its numbers were computed."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def load_run(path: str | Path, *, finishing: bool = False, device: str | torch.device = "cpu") -> Run:
    """The run bundle in `path`, its model on `device` (see `inference_device`; the CPU by default, as fastai's
    `load_learner`: the same numbers on every machine). A folder still holding a training checkpoint is refused:
    its config.json and weights may be there while its temperature, metrics or seen images are not yet
    (`finishing`: the trainer itself, writing them)."""
    device = inference_device(device)  # a GPU that is not there, before the slow loading
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    if not path.exists():
        raise CxrFastError(f"{path}: no such run folder")
    if not path.is_dir():
        raise CxrFastError(f"{path}: a file, not a run folder (give the folder that holds config.json)")
    state_path = path / "checkpoint" / "state.json"
    if not finishing and state_path.is_file():
        from cxr_fast.train import resume_command  # here: train imports this module

        try:
            data = read_json(state_path)["data"]
        except (CxrFastError, KeyError, TypeError):  # an unreadable state: the user knows their data folder
            data = "DATA"
        raise CxrFastError(f"{path}: an interrupted training run, not a finished bundle; continue it with "
                           f"`{resume_command(path, data)}`")
    if not finishing:
        sweep_removed_checkpoint(path)  # left by a trainer killed in its very last step
    if not config_path.is_file() and (path / "model.onnx").is_file() and (path / "preprocessing.json").is_file():
        raise CxrFastError(f"{path}: an ONNX export, not a run bundle; predict and serve run it with --runtime onnx")
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise CxrFastError(f"{path}: not a cxr_fast run bundle ({needed.name} missing)")
    config = read_json(config_path)
    problem = config_problem(config)
    if problem:
        raise CxrFastError(f"{config_path}: {problem}")
    if isinstance(config["data"], str) and config["data"] and not absolute_anywhere(config["data"]):
        # written relative to the run folder by a user, so that a project folder can move whole (or change drive)
        config["data"] = str(path / config["data"])
    tensors = read_tensors(weights_path, "weights file")
    # A config.json from someone else may describe a network of tens of GB (width: 64, a million classes) or of
    # millions of layers (depths: [1000000]) beside a small weights file. The network is first built on the meta
    # device, which allocates no memory, with a budget of parts that the weights file sets, and must fit the
    # weights there; only then is it built for real.
    import timm  # noqa: F401  (not first imported on meta: torch < 2.8 runs ops while importing torch._dynamo, which
    # timm imports through torchvision, and they failed there with a circular import: serve died at start on 2.7)
    arch = config["model"].get("arch")  # nor the architecture plugins: their modules may make tensors as they import
    plugin_archs(wanted=arch if isinstance(arch, str) else None)  # (and a broken one the run needs is its error)

    with torch.device("meta"), _parts_budget(PARTS_PER_TENSOR * len(tensors) + 1000, weights_path):
        skeleton = _model_from(config, config_path)
    _load_weights(skeleton, tensors, config, weights_path, assign=True)  # assign: copying onto meta warns per tensor
    model = _model_from(config, config_path)
    _load_weights(model, tensors, config, weights_path)
    model.eval().to(device)
    metrics_path = path / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    return Run(path=path, model=model, config=config, metrics=metrics, device=device)


# A network has about one parameter or buffer per tensor of its weights, and a module for every one or two.
PARTS_PER_TENSOR = 4


@contextmanager
def _parts_budget(limit: int, weights_path: Path):
    """Refuse, as it is built, a network of more than `limit` parts (modules, parameters and buffers)."""
    from torch.nn.modules import module

    count = 0

    def tally(*_):
        nonlocal count
        count += 1
        if count > limit:
            raise CxrFastError(f"describes a network of more than {limit} parts, far more than the weights in "
                               f"{weights_path.name} fill")

    hooks = [register(tally) for register in (module.register_module_module_registration_hook,
                                              module.register_module_parameter_registration_hook,
                                              module.register_module_buffer_registration_hook)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _model_from(config: dict, config_path: Path) -> torch.nn.Module:
    try:
        return model_from_config(config["model"])
    except CxrFastError as e:
        raise CxrFastError(f"{config_path}: {e}") from None


def _load_weights(model: torch.nn.Module, tensors: dict, config: dict, weights_path: Path, assign: bool = False) -> None:
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except (RuntimeError, OSError) as e:
        raise CxrFastError(f"{weights_path}: weights do not fit {config['model'].get('arch')} ({state_dict_problem(e)})") from None


def run_labels(runs: list[Run]) -> list[str]:
    """Each run's folder name, or its path as given where two runs share a name (runs/a and other/a)."""
    names = [r.name for r in runs]
    return [r.name if names.count(r.name) == 1 else str(r.path) for r in runs]


def check_training_manifest(run: Run) -> None:
    """Refuse the manifest the run was trained on if its split changed since: prepared again into the same folder
    (another seed, more images), its valid and test splits may hold images the model learned from, and every score
    on them would be inflated without a sign. Nothing to check when the manifest is gone (read_manifest says so)."""
    data = run.config["data"]
    recorded = run.config.get("manifest_sha256")  # bundles written before this check have none
    if recorded and manifest_csv(data).is_file() and not manifest_matches(data, recorded):
        raise CxrFastError(f"{data}: the manifest changed since {run.name} was trained on it (prepared again?); its "
                           "test split may now hold images the model learned from. Train again on it, or evaluate "
                           "on a copy of the new data as another collection (--data)")


def read_training_manifest(run: Run) -> pd.DataFrame:
    """The manifest the run was trained on, after `check_training_manifest`. Gone from where it was trained (a moved
    data folder, or a bundle copied to another machine), it is refused in one line that says how to point to it."""
    check_training_manifest(run)
    data = run.config["data"]
    if not manifest_csv(data).is_file():
        raise CxrFastError(f"{data}: manifest not found (moved or deleted since {run.name} was trained on it?); if it "
                           f"moved, write its new folder as \"data\" in {run.path / 'config.json'}, or give it to "
                           "evaluate or interpret as --data (another collection: the images the model learned from "
                           "are left out)")
    return read_manifest(data)


def iter_batches(run: Run, files: list[str], bs: int):
    for start in range(0, len(files), bs):
        yield torch.stack([run.load_input(f) for f in files[start : start + bs]])


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The image and three 92 % crops (centre, upper-left, lower-right) resized back: small zooms and shifts like
    the training augmentation, never flips (anatomy is not mirror-symmetric)."""
    h, w = x.shape[-2:]
    ch, cw = round(h * 0.92), round(w * 0.92)
    views = [x]
    for top, left in ((h - ch) // 2, (w - cw) // 2), (0, 0), (h - ch, w - cw):
        crop = x[..., top : top + ch, left : left + cw]
        views.append(torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return views


@torch.no_grad()
def predict_logits(run: Run, items: pd.DataFrame | list[str], bs: int = 32, progress: bool = True,
                   tta: bool = False, description: str | None = None) -> np.ndarray:
    """Raw logits [N, K] for manifest rows (the cached copy is read when present) or a list of files.
    With `tta`, the mean logits over `tta_views`. `description` names the bar (default 'predicting N images')."""
    files = image_column(items).tolist() if isinstance(items, pd.DataFrame) else [str(f) for f in items]
    out = []
    with progress_bar(progress) as bar:
        task = bar.add_task(description or f"predicting {len(files)} images", total=len(files))
        for batch in iter_batches(run, files, bs):
            batch = batch.to(run.device)
            views = tta_views(batch) if tta else [batch]
            out.append(torch.stack([run.model(v).float() for v in views]).mean(0).cpu())
            bar.advance(task, len(batch))
    if not out:
        return np.zeros((0, len(run.classes)), dtype=np.float32)
    return torch.cat(out).numpy()


