"""Averaging run bundles into one: a model whose probabilities are the mean of its members' calibrated ones.

Models that err on different images are worth averaging: the fine-tuned efficientnet_lite0 recipe leans towards
Normal, the frozen-feature regression (`frozen_lite`) is more even, and their average scores better than either
under 5-fold cross-validation (docs/benchmarks.md). The ensemble is written as an ordinary run bundle: its
config.json lists each member's architecture, input size, normalisation and temperature, and model.safetensors
holds every member's weights, so evaluate, compare, interpret, predict and export take it as one model.

The ensemble's forward pass returns the logarithm of the mean probability, so a softmax of its output gives the
average back; its own temperature is 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from cxr_fast.archs.registry import ENSEMBLE_ARCH
from cxr_fast.bundle import RUN_FORMAT
from cxr_fast.config import input_problem
from cxr_fast.data.dedup import file_sha256
from cxr_fast.data.manifest import label_indices, manifest_csv, manifest_dir, manifest_key, manifest_matches
from cxr_fast.errors import CxrFastError, read_json, read_tensors
from cxr_fast.outputs import new_folder, reading, write_tensors, write_text

MIN_PROBABILITY = 1e-12  # keeps log(mean probability) finite when every member is certain


class AveragedEnsemble(nn.Module):
    """Image at the ensemble's size and normalisation -> log of the members' mean calibrated probability.

    Each member gets the image in its own normalisation and at its own size (bilinear resize), and its logits
    are divided by its temperature before the softmax.
    """

    def __init__(self, members: Sequence[nn.Module], specs: Sequence[dict[str, Any]], mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sizes = [int(s["size"]) for s in specs]
        self.temperatures = [float(s["temperature"]) for s in specs]
        self.n_in, self.n_classes = len(mean), int(specs[0]["model"]["n_classes"])
        # x_member = (x * std + mean - mean_member) / std_member, per channel
        for i, s in enumerate(specs):
            scale = torch.tensor(std) / torch.tensor(s["std"])
            shift = (torch.tensor(mean) - torch.tensor(s["mean"])) / torch.tensor(s["std"])
            self.register_buffer(f"scale{i}", scale.view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"shift{i}", shift.view(1, -1, 1, 1), persistent=False)

    def member_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        x = x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")
        size = self.sizes[i]
        if tuple(x.shape[-2:]) != (size, size):
            # plain bilinear: ONNX cannot export the antialiased resize, and a shrink by less than 2x barely aliases
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(F.softmax(member(self.member_input(x, i)).float() / t, dim=1)
                    for i, (member, t) in enumerate(zip(self.members, self.temperatures, strict=True)))
        return torch.log((probs / len(self.members)).clamp_min(MIN_PROBABILITY))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' penultimate features side by side [B, sum of C]."""
        return torch.cat([m.features(self.member_input(x, i)) for i, m in enumerate(self.members)], dim=1)

    def extra_repr(self) -> str:
        return f"members={len(self.members)}, sizes={self.sizes}"


def ensemble_from_config(cfg: dict[str, Any]) -> AveragedEnsemble:
    """The exact ensemble a bundle's model config describes, members randomly initialised (load the state dict
    next)."""
    from cxr_fast.archs import model_from_config

    try:
        specs = cfg["arch_kwargs"]["members"]
        if not isinstance(specs, list) or len(specs) < 2:
            raise CxrFastError("an ensemble config must list two or more members")
        # Each member's normalisation and temperature are applied inside the model: a NaN or a zero there made every
        # probability NaN and every prediction the first class, without a word.
        for spec in specs:
            problem = input_problem({**spec, "n_in": cfg["n_in"]})
            if problem:
                raise CxrFastError(f"ensemble member {spec.get('name')!r}: {problem}")
        problem = input_problem({"n_in": cfg["n_in"], "size": max(s["size"] for s in specs),
                                 "mean": cfg["arch_kwargs"]["mean"], "std": cfg["arch_kwargs"]["std"]})
        if problem:
            raise CxrFastError(f"ensemble: {problem}")
        members = [model_from_config(s["model"]) for s in specs]
        return AveragedEnsemble(members, specs, cfg["arch_kwargs"]["mean"], cfg["arch_kwargs"]["std"])
    except (KeyError, TypeError) as e:
        raise CxrFastError(f"ensemble config lacks {e}") from None


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a network's weights (names and bytes): one model whatever folder its bundle is in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_ensemble(runs: Sequence[str | Path], out: str | Path | None = None, progress: bool = True) -> Path:
    """Write the average of the run bundles `runs` as a new bundle; returns its folder.

    Members must share their classes, input channels and training manifest (so the test split is unseen by all
    of them). When that manifest is at hand, the average is scored on its valid split; the members' own valid
    scores are copied from their bundles.
    """
    from cxr_fast.bundle import check_training_manifest, load_run
    from cxr_fast.train import free_run_dir

    if isinstance(runs, str | Path):  # a string would be taken letter by letter
        raise CxrFastError(f"an ensemble takes a list of run folders, got the single path {str(runs)!r}")
    if len(runs) < 2:
        raise CxrFastError("an ensemble needs at least two run folders")
    seen: dict[Path, str | Path] = {}
    for r in runs:  # the same run twice would only weight it double
        if Path(r).resolve() in seen:
            raise CxrFastError(f"{r}: given twice (as {seen[Path(r).resolve()]}); an ensemble averages different runs")
        seen[Path(r).resolve()] = r
    loaded = [load_run(r) for r in runs]
    # A member of an ensemble given beside it, known by its weights: the member paths its config.json lists are where
    # the runs were when it was built, and a moved or copied member run is the same model under another path.
    within: dict[str, Path] = {}
    for run in loaded:
        if isinstance(run.model, AveragedEnsemble):
            within.update({weights_digest(member): run.path for member in run.model.members})
    for run in loaded:
        if not isinstance(run.model, AveragedEnsemble) and weights_digest(run.model) in within:
            raise CxrFastError(f"{run.path}: already a member of {within[weights_digest(run.model)]}; it would be "
                               "weighted twice (give that ensemble's members instead)")
    same_weights: dict[str, Path] = {}  # a copied run folder (or one retrained with the same seed) is the same model
    for run in loaded:
        digest = file_sha256(run.path / "model.safetensors")
        if digest in same_weights:
            raise CxrFastError(f"{run.path}: the same weights as {same_weights[digest]} (a copy?); an ensemble averages "
                               "different models")
        same_weights[digest] = run.path
    first = loaded[0]
    for run in loaded[1:]:
        for key in ("classes", "n_in", "data", "manifest_sha256"):
            if key == "manifest_sha256" and None in (run.config.get(key), first.config.get(key)):
                continue  # a bundle from before the digest was recorded
            if key == "manifest_sha256" and manifest_csv(run.config["data"]).is_file() and all(
                    manifest_matches(r.config["data"], r.config[key]) for r in (run, first)):
                continue  # one digest recorded as cxr_fast did before commit fcfd3ab: both are of this manifest
            if key == "data" and manifest_key(run.config[key]) == manifest_key(first.config[key]):
                continue  # the folder and its manifest.csv are one manifest
            if run.config.get(key) != first.config.get(key):
                why = {"data": " (the test split must be unseen by every member)",
                       "manifest_sha256": " (trained on different versions of that manifest)"}.get(key, "")
                raise CxrFastError(f"{run.path}: its {key} {run.config.get(key)!r} differ from {first.path}'s "
                                   f"{first.config.get(key)!r}{why}")
    for run in loaded:  # before the folder is made: a valid score on a changed manifest would be inflated
        check_training_manifest(run)
    # The ensemble reads images at its largest member's size, in that member's normalisation.
    lead = max(loaded, key=lambda r: r.size)
    specs = [{"name": r.name, "model": r.config["model"], "size": r.size, "mean": r.config["mean"],
              "std": r.config["std"], "temperature": r.temperature} for r in loaded]
    model = AveragedEnsemble([r.model for r in loaded], specs, lead.config["mean"], lead.config["std"]).eval()
    model_cfg = {"arch": ENSEMBLE_ARCH, "arch_kwargs": {"members": specs, "mean": lead.config["mean"],
                                                         "std": lead.config["std"]},
                 "n_in": first.n_in, "n_classes": len(first.classes), "weights": "+".join(r.name for r in loaded),
                 "pretrained_stats": None}
    run_dir = free_run_dir(out, ENSEMBLE_ARCH)
    # Built aside and moved into place whole: a kill part-way leaves no half bundle to block the rerun, and a
    # failure leaves an empty --out of the user's as it was.
    with new_folder(run_dir) as work:
        _write_bundle(work, model, model_cfg, loaded, lead, progress)
    return run_dir


def _write_bundle(run_dir: Path, model: AveragedEnsemble, model_cfg: dict, loaded: list, lead, progress: bool) -> None:
    """config.json is written last: a folder without it is not a bundle, so a build killed part-way is never loaded
    as a finished one. `lead`: the member whose size and normalisation the ensemble reads images with, as `model`
    was built with."""
    from cxr_fast.bundle import Run, run_labels
    from cxr_fast.versions import library_versions

    first = loaded[0]
    write_tensors({k: v.detach() for k, v in model.state_dict().items()}, run_dir / "model.safetensors")
    config = {
        "format": RUN_FORMAT,
        "model": json.loads(json.dumps(model_cfg)),
        "classes": first.classes,
        "n_in": first.n_in,
        "size": lead.size,
        "mean": lead.config["mean"],
        "std": lead.config["std"],
        "weights_source": model_cfg["weights"],
        "members": [str(r.path.resolve()) for r in loaded],
        "seed": None,
        "lr": None,
        "data": first.config.get("data"),
        "manifest_sha256": next((r.config["manifest_sha256"] for r in loaded if r.config.get("manifest_sha256")), None),
        "temperature": 1.0,  # the members' temperatures are applied inside the model
        "versions": library_versions(),
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    _merge_seen([r.path for r in loaded], run_dir)
    labels = run_labels(loaded)
    metrics = {"members": {label: r.metrics.get("valid_balanced_accuracy") for label, r in zip(labels, loaded, strict=True)},
               "train_seconds": sum(r.metrics.get("train_seconds") or 0.0 for r in loaded),
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "temperature": 1.0}
    metrics.update(_score_valid(Run(path=run_dir, model=model, config=config), progress))
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_text(run_dir / "config.json", json.dumps(config, indent=2))


def ensemble_summary(run_dir: Path) -> tuple[str, str | None]:
    """The console line on a built ensemble (rich markup) and, when it scores below its best member on valid, a
    plain note on why that is no reason to drop a member."""
    from rich.markup import escape

    metrics = read_json(run_dir / "metrics.json")
    members = metrics["members"]
    if metrics["valid_balanced_accuracy"] is None:
        return (f"ensemble [bold]{escape(str(run_dir))}[/] ({len(members)} members); its training manifest is not at "
                "hand, so the valid split was not scored"), None
    scores = [f"{name} {score:.3f}" for name, score in members.items() if score is not None]
    summary = (f"ensemble [bold]{escape(str(run_dir))}[/]: valid balanced accuracy {metrics['valid_balanced_accuracy']:.3f}"
               + (f" (members: {escape(', '.join(scores))})" if scores else ""))
    best = max((score for score in members.values() if score is not None), default=None)
    if best is None or metrics["valid_balanced_accuracy"] >= best:
        return summary, None
    # Not advice to drop a member: the shipped lite0 + frozen_lite pair scores below frozen_lite on valid and above
    # it on test, on one split and pooled over 5 folds (docs/benchmarks.md).
    return summary, (f"the ensemble scores below its best member on valid ({metrics['valid_balanced_accuracy']:.3f} < "
                     f"{best:.3f}), but each member's valid score is optimistic (it kept the epoch or strength that "
                     "scored best on these images), the ensemble's only through those members; compare them on the test "
                     "split (cxrfast compare ENSEMBLE RUN …) before leaving a member out")


def _merge_seen(member_dirs: list[Path], run_dir: Path) -> None:
    """The ensemble has seen what any member saw. A member without fingerprints leaves the ensemble without
    them too, and evaluate then says so instead of claiming a check it could not make."""
    from cxr_fast.seen import SEEN_FILE

    paths = [d / SEEN_FILE for d in member_dirs]
    if not all(p.is_file() for p in paths):
        return
    parts = [read_tensors(p, "list of seen images") for p in paths]
    write_tensors({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, run_dir / SEEN_FILE)


def _score_valid(ensemble, progress: bool) -> dict[str, Any]:
    """Valid balanced accuracy and accuracy of the average when the training manifest is at hand."""
    from cxr_fast.bundle import predict_logits
    from cxr_fast.data.manifest import read_manifest

    with ExitStack() as held:
        try:  # marked as read while scored: no prepare --force replaces the images under the predictions
            held.enter_context(reading(manifest_dir(ensemble.config["data"])))
            manifest = read_manifest(ensemble.config["data"])
        except (CxrFastError, TypeError):  # not at hand, or being prepared again right now
            return {"valid_balanced_accuracy": None}
        valid = manifest[manifest["split"] == "valid"]
        if valid.empty:
            return {"valid_balanced_accuracy": None}
        y = label_indices(valid["label"], ensemble.classes)
        predicted = predict_logits(ensemble, valid, progress=progress).argmax(1)
    return {"valid_balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
            "valid_accuracy": float((predicted == y).mean())}


__all__ = ["ENSEMBLE_ARCH", "AveragedEnsemble", "build_ensemble", "ensemble_from_config"]
