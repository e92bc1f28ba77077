"""Training for frozen-feature architectures (`frozen_lite`): read every image once, fit a linear head.

Fine-tuning takes hundreds of gradient steps through a network. Here the networks never change, so each
training and valid image is read once and its features kept. Then a logistic regression is fitted on them,
class-weighted when the recipe asks, with its regularisation strength C chosen on the valid split. The
regression's feature scaling is folded into the linear layer. The result is an ordinary run bundle
(safetensors + JSON) that evaluate, compare, interpret, predict, export and `cxrfast ensemble` use like any other.

Interruption: the features of each (backbone, size) pair are saved in `checkpoint/` as soon as they are done,
and a resumed run reads them back instead of computing them again.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from rich.progress import Progress
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

from cxr_fast.archs import create_model
from cxr_fast.archs.frozen import PACKAGED_BACKBONES, VARIANTS, FrozenFeatures, load_packaged_weights
from cxr_fast.archs.weights import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, Stats, channel_stats
from cxr_fast.config import TrainConfig
from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import image_column, label_indices, manifest_classes
from cxr_fast.errors import CxrFastError, read_tensors
from cxr_fast.outputs import clear_run_folder, csv_text, write_bytes, write_tensors, write_text
from cxr_fast.preprocess import normalize, resize_square
from cxr_fast.progress import LogProgress, progress_bar

# Inverse regularisation strengths tried, strongest first: on a tie the simpler model wins. The 5-fold benchmark
# chose 0.003-0.03 for 11,536 features and ~530 training images (docs/benchmarks.md).
STRENGTHS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
FITTED_SPLITS = ("train", "valid")
# Options that steer gradient descent: a recipe or flag that sets one for a fitted head is told it has no effect.
GRADIENT_OPTIONS = ("epochs", "freeze_epochs", "lr_mult", "lr", "wd", "pct_start", "label_smoothing", "mixup",
                    "augment", "channels_last")


def is_frozen_arch(arch: str) -> bool:
    """True for architectures trained by fitting a head on frozen features rather than by gradient descent."""
    return arch.lower() in VARIANTS


def fit_frozen(manifest: pd.DataFrame, cfg: TrainConfig, state: dict, run_dir: Path | None, out, quiet: bool,
               held=None) -> Path:
    """Features, regression and bundle for `cfg.arch`; `run_dir` is None for a new run (made here, once the model
    is known to build) or the interrupted run's folder."""
    from cxr_fast import distributed
    from cxr_fast.train import CHECKPOINT_DIR, TrainingInterrupted, new_run_dir, writing_bundle

    if distributed.world_size() > 1:
        raise CxrFastError(f"{cfg.arch} fits its head in one process: run it without --distributed")
    if cfg.weights != "none":
        raise CxrFastError(f"{cfg.arch}: its backbones always start from their packaged ImageNet weights; "
                           f"drop --weights {cfg.weights}")
    ignored = [name for name in GRADIENT_OPTIONS if getattr(cfg, name) != getattr(TrainConfig(), name)]
    if ignored:
        warnings.warn(f"{cfg.arch} fits a regression on frozen features, so these options do not apply and are "
                      f"ignored: {', '.join(ignored)}", stacklevel=2)
    classes = manifest_classes(manifest)
    model = create_model(cfg.arch, n_in=cfg.n_in, n_classes=len(classes), **cfg.arch_kwargs)
    load_packaged_weights(model.body)
    model.pretrained_stats = channel_stats(EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, cfg.n_in)
    model.weights_source = "+".join(f"efficientnet-lite{PACKAGED_BACKBONES[n]}" for n in model.body.backbone_names)
    y = {s: label_indices(manifest[manifest["split"] == s]["label"], classes) for s in FITTED_SPLITS}
    lacking = [c for k, c in enumerate(classes) if k not in set(y["train"])]
    if lacking or not len(y["valid"]):
        what = f"no {', '.join(lacking)} image in the train split" if lacking else "an empty valid split"
        raise CxrFastError(f"{state['data']}: {what}; a regression needs every class to learn from and valid "
                           "images to choose its strength")

    resume = run_dir is not None
    had_folder = not resume and out is not None and Path(out).exists()  # an empty --out of the user's: kept
    if not resume:
        run_dir = new_run_dir(out, cfg.arch, held=held)  # locked until `held` (train's) closes
    checkpoint = run_dir / CHECKPOINT_DIR
    checkpoint.mkdir(exist_ok=True)
    state.update(classes=classes, stats={"mean": model.pretrained_stats.mean, "std": model.pretrained_stats.std},
                 lr=None)
    try:  # from here the run folder exists: a failure or Ctrl-C before the first block is saved removes it
        _write_state(state, checkpoint)
        features = split_features(model.body, manifest, cfg, model.pretrained_stats, checkpoint, state, quiet)
        started = time.perf_counter()
        fit, scaler, history = fit_regression(features, y, cfg.class_weights, quiet)
    except BaseException as e:  # an unreadable image as much as Ctrl-C
        blocks = len(list(checkpoint.glob("features-*.safetensors")))
        if blocks == 0 and not resume:
            clear_run_folder(run_dir, keep=had_folder)  # nothing finished: leave nothing to block a fresh start
        if isinstance(e, KeyboardInterrupt):
            raise TrainingInterrupted(run_dir, blocks, len(model.body.members()), "feature blocks",
                                      data=state["data"]) from None
        raise
    fold_into_head(model, fit, scaler)
    state["train_seconds"] += time.perf_counter() - started
    with writing_bundle(run_dir, state["data"], len(model.body.members()), len(model.body.members()),
                        "feature blocks"):
        return _write_bundle(run_dir, model, cfg, state, manifest, history, features, y)


def _write_state(state: dict, checkpoint: Path) -> None:
    # write_text's partial name is one `train` knows as a first checkpoint killed mid-write, not as a run's work
    write_text(checkpoint / "state.json", json.dumps(state, indent=1))


def split_features(body: FrozenFeatures, manifest: pd.DataFrame, cfg: TrainConfig, stats: Stats, checkpoint: Path,
                   state: dict, quiet: bool = False) -> dict[str, np.ndarray]:
    """{split: [N, D]} for the train and valid images, one (backbone, size) pair at a time, each pair's block saved
    in `checkpoint` and reused if already there; the seconds spent are added to `state`, saved with them."""
    files = {s: image_column(manifest[manifest["split"] == s]).tolist() for s in FITTED_SPLITS}
    images: dict[str, torch.Tensor] | None = None  # read only when a block must be computed
    blocks: dict[str, list[torch.Tensor]] = {s: [] for s in FITTED_SPLITS}
    with progress_bar(not quiet) as bar:
        for backbone, size in body.members():
            path = checkpoint / f"features-{backbone}-{size}.safetensors"
            if path.is_file():
                block = read_tensors(path, "feature block (delete it to compute it again)")
            else:
                started = time.perf_counter()
                if images is None:
                    task = bar.add_task("reading images", total=sum(map(len, files.values())))
                    images = {s: _read_images(fs, cfg.size, bar, task) for s, fs in files.items()}
                name = f"{body.backbone_names[backbone]} at {size} px"
                task = bar.add_task(f"features: {name}", total=sum(map(len, files.values())))
                block = {s: _member_features(body, backbone, size, images[s], cfg, stats, bar, task) for s in images}
                write_tensors(block, path)
                seconds = time.perf_counter() - started
                state["train_seconds"] += seconds
                state["feature_seconds"] = state.get("feature_seconds", 0.0) + seconds
                _write_state(state, checkpoint)  # after the block: it must never count work not yet saved
            for s in FITTED_SPLITS:
                blocks[s].append(block[s])
    return {s: torch.cat(blocks[s], dim=1).numpy().astype(np.float64) for s in FITTED_SPLITS}


def _read_images(files: list[str], size: int, bar: Progress | LogProgress, task) -> torch.Tensor:
    """Every image at the model's size as uint8 [N, size, size], read once for all the feature blocks; `_inputs`
    makes the model's inputs a batch at a time. Held as float32 inputs (a list of them, then a stacked copy), 4,000
    films at 288 px grew the process by 2.5-3.7 GiB, and the train and valid images of 20,000 films would have needed
    10 GiB or more; as uint8 they take 0.3 and 1.3 GiB (docs/benchmarks.md)."""
    pixels = torch.empty((len(files), size, size), dtype=torch.uint8)
    for k, f in enumerate(files):
        pixels[k] = torch.from_numpy(np.asarray(resize_square(read_image(f), size), dtype=np.uint8))
        bar.advance(task)
    return pixels


def _inputs(pixels: torch.Tensor, n_in: int, stats: Stats) -> torch.Tensor:
    """uint8 images [B, H, W] → normalised inputs [B, n_in, H, W], exactly as `load_input` makes them one by one."""
    return normalize(pixels.float().div_(255.0).unsqueeze(1).expand(-1, n_in, -1, -1), stats.mean, stats.std)


@torch.no_grad()
def _member_features(body: FrozenFeatures, backbone: int, size: int, images: torch.Tensor, cfg: TrainConfig,
                     stats: Stats, bar: Progress | LogProgress, task) -> torch.Tensor:
    out = []
    for start in range(0, len(images), cfg.bs):
        out.append(body.member_features(_inputs(images[start:start + cfg.bs], cfg.n_in, stats), backbone, size))
        bar.advance(task, len(out[-1]))
    return torch.cat(out).contiguous()


def fit_regression(x: dict[str, np.ndarray], y: dict[str, np.ndarray], class_weights: bool, quiet: bool = False
                   ) -> tuple[LogisticRegression, StandardScaler, pd.DataFrame]:
    """Standardise on train, fit one regression per strength in `STRENGTHS`, keep the best on valid balanced
    accuracy. Returns the kept fit (on standardised features), the scaler and one history row per strength."""
    # Standardising and the SVD took ~20 s for 11,536 features of ~530 images before any bar showed: one step of it
    with progress_bar(not quiet) as bar:
        task = bar.add_task("fitting the regression", total=len(STRENGTHS) + 1)
        scaler = StandardScaler().fit(x["train"])
        xs = {s: scaler.transform(v) for s, v in x.items()}
        n_train, n_features = xs["train"].shape
        basis = None
        if n_train < n_features:
            # An L2-penalised fit's weights lie in the span of the training rows (any other component adds penalty
            # and changes no prediction), so fitting on coordinates in an orthonormal basis of that span gives the
            # same model: ~530 dimensions instead of 11,536, fast enough to solve to a tight tolerance.
            basis = np.linalg.svd(xs["train"], full_matrices=False)[2]
            xs = {s: v @ basis.T for s, v in xs.items()}
        n_classes = int(max(y["train"].max(), y["valid"].max())) + 1
        rows, best = [], None
        bar.advance(task)
        for c in STRENGTHS:
            fit = LogisticRegression(C=c, class_weight="balanced" if class_weights else None, tol=1e-6, max_iter=3000)
            fit.fit(xs["train"], y["train"])
            probs = fit.predict_proba(xs["valid"])
            rows.append({"C": c,
                         "train_balanced_accuracy": balanced_accuracy_score(y["train"], fit.predict(xs["train"])),
                         "valid_balanced_accuracy": balanced_accuracy_score(y["valid"], probs.argmax(1)),
                         "valid_accuracy": float((probs.argmax(1) == y["valid"]).mean()),
                         "valid_loss": log_loss(y["valid"], probs, labels=list(range(n_classes)))})
            if best is None or rows[-1]["valid_balanced_accuracy"] > best[0]:
                best = (rows[-1]["valid_balanced_accuracy"], fit)
            bar.advance(task)
    fit = best[1]
    if basis is not None:  # back to weights on the standardised features themselves
        fit.coef_, fit.n_features_in_ = fit.coef_ @ basis, n_features
    return fit, scaler, pd.DataFrame(rows)


def fold_into_head(model: torch.nn.Module, fit: LogisticRegression, scaler: StandardScaler) -> None:
    """Write `fit` on standardised features into the model's linear layer on raw features:
    w·(f - μ)/σ + b = (w/σ)·f + (b - w·μ/σ)."""
    coef, intercept = fit.coef_, fit.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row; softmax([0, z]) is its sigmoid(z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    weight = coef / scaler.scale_
    bias = intercept - (coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weight))
        model.classifier.bias.copy_(torch.from_numpy(bias))


def _write_bundle(run_dir: Path, model, cfg: TrainConfig, state: dict, manifest: pd.DataFrame, history: pd.DataFrame,
                  features: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> Path:
    from cxr_fast.calibration import fit_temperature
    from cxr_fast.plots import plot_strength_search
    from cxr_fast.report import png_bytes
    from cxr_fast.seen import write_seen
    from cxr_fast.train import cpu_state, remove_checkpoint, run_config

    write_tensors(cpu_state(model), run_dir / "model.safetensors")
    config = run_config(model, cfg, state)
    config["weights_source"] = model.weights_source
    # The valid logits from the kept features, exactly as the bundle's linear layer computes them.
    classifier = model.classifier
    logits = features["valid"] @ classifier.weight.detach().double().numpy().T + classifier.bias.detach().double().numpy()
    config["temperature"] = float(fit_temperature(logits, y["valid"]))
    write_text(run_dir / "config.json", json.dumps(config, indent=2))
    write_text(run_dir / "recipe.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_seen(run_dir, manifest)
    write_text(run_dir / "history.csv", csv_text(history))
    search = plot_strength_search(history, title=f"{cfg.arch}: regularisation search")
    write_bytes(run_dir / "curves.png", png_bytes(search))
    best = history.loc[history["valid_balanced_accuracy"].idxmax()]
    metrics = {
        "best_C": float(best["C"]),
        "valid_balanced_accuracy": float(best["valid_balanced_accuracy"]),
        "valid_accuracy": float(best["valid_accuracy"]),
        "valid_loss": float(best["valid_loss"]),
        "train_seconds": round(state["train_seconds"], 2),
        "feature_seconds": round(state.get("feature_seconds", 0.0), 2),
        "features": int(features["train"].shape[1]),
        "processes": 1,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "trained_parameters": int(sum(p.numel() for p in classifier.parameters())),
        "temperature": config["temperature"],
    }
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    remove_checkpoint(run_dir)
    return run_dir
