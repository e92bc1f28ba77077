"""Would frozen_lite do better with other summaries of its feature maps, or refitted on train + valid? Two steps:

    .venv/bin/python docs/bench/frozen_pooling.py features D/fold0 --out FEATS.npz
    .venv/bin/python docs/bench/frozen_pooling.py score FEATS.npz --fold D/fold0 RUN0 … --fold D/fold4 RUN4 \
        --variant mean grid2 --split valid

`features` runs the shipped `frozen_lite` body (lite0/1/2 at 224 and 288 px, last three blocks and final map) over
every image of a prepared fold once (the folds of one collection share their images) and keeps several summaries
of each map: the spatial mean (what `frozen_lite` ships), maximum, generalised mean (p = 3), the means of a 2 x 2
grid and of three horizontal bands, and the means inside and outside the lung field that `cxr_fast.lungs` estimates
(each map cell weighted by its share of the field). `score` fits, per fold, the shipped regression (`cxr_fast.probe.fit_regression`)
on a variant's features, temperature-scales it on valid, averages it with the fine-tuned run's calibrated
probabilities (as `cxrfast ensemble` does), and pools the folds. `--refit` also refits the regression on train +
valid at the strength chosen on valid (valid scores then mean nothing). Choose on valid; test checks the choice.

`features --clahe` equalises each film with contrast-limited adaptive histogram equalisation (scikit-image's
`equalize_adapthist` at its defaults, before the resize; `pip install scikit-image`, not a cxr_fast dependency).
`score` given several FEATS files puts their features side by side (e.g. raw and CLAHE films together).
`score --classifier` fits another classifier in the shipped regression's place: shrinkage LDA (`lda`), one regression
per (network, size) pair with their probabilities averaged (`per-member`), or the regression with its strength
chosen by valid log-loss (`logloss`).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from cxr_fast.archs import create_model
from cxr_fast.archs.frozen import load_packaged_weights
from cxr_fast.archs.weights import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, channel_stats
from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.calibration import fit_temperature, softmax
from cxr_fast.data.io import read_image
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.lungs import estimate_lung_field
from cxr_fast.memory import keep_freed_memory
from cxr_fast.metrics import bootstrap_ci
from cxr_fast.preprocess import normalize, resize_square, to_tensor


def weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] map, [B, 1, H, W] weights -> [B, C]; the plain mean where the weights are all zero."""
    total = weights.sum((2, 3))
    return torch.where(total > 0, (x * weights).sum((2, 3)) / total.clamp(min=1e-6), x.mean((2, 3)))


SUMMARIES = {  # ([B, C, H, W] map, [B, 1, H, W] share of each cell inside the lung field) -> [B, C, k]
    "mean": lambda x, lung: x.mean((2, 3))[..., None],
    "max": lambda x, lung: x.amax((2, 3))[..., None],
    "gem3": lambda x, lung: x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)[..., None],
    "grid2": lambda x, lung: F.adaptive_avg_pool2d(x, 2).flatten(2),
    "bands3": lambda x, lung: F.adaptive_avg_pool2d(x, (3, 1)).flatten(2),
    "lung": lambda x, lung: weighted_mean(x, lung)[..., None],
    "outside": lambda x, lung: weighted_mean(x, 1 - lung)[..., None],
}
VARIANTS = {"mean": ["mean"], "mean+max": ["mean", "max"], "mean+gem3": ["mean", "gem3"], "grid2": ["grid2"],
            "mean+bands3": ["mean", "bands3"], "mean+lung": ["mean", "lung"], "lung+outside": ["lung", "outside"]}


@torch.no_grad()
def features(fold: Path, out: Path, clahe: bool = False) -> None:
    """Every summary of every (backbone, size) pair's tapped maps, in the order `FrozenFeatures` concatenates them."""
    manifest = read_manifest(fold)
    body = create_model("frozen_lite", n_in=1, n_classes=3).body
    load_packaged_weights(body)
    stats = channel_stats(EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, 1)
    films = [resize_square(read_image(f), 288) for f in image_column(manifest)]  # as `load_input` reads them
    # the lung field is always estimated on the unequalised film, as the shortcut audit does
    lungs = torch.stack([torch.from_numpy(estimate_lung_field(np.asarray(f))) for f in films]).float()[:, None]
    if clahe:  # equalised at the file's own size, then resized
        from skimage.exposure import equalize_adapthist

        films = []
        for path in image_column(manifest):
            equalised = equalize_adapthist(np.asarray(read_image(path), dtype=np.uint8))  # floats in [0, 1]
            films.append(resize_square(Image.fromarray((equalised * 255).round().astype(np.uint8)), 288))
    images = torch.stack([normalize(to_tensor(f, 1), stats.mean, stats.std) for f in films])
    kept: dict[str, list[np.ndarray]] = {name: [] for name in SUMMARIES}
    for b, size in body.members():
        parts = []
        for start in range(0, len(images), 32):
            maps = body.member_maps(images[start:start + 32], b, size)
            lung = lungs[start:start + 32]
            parts.append({name: torch.cat([summary(m, F.adaptive_avg_pool2d(lung, m.shape[-2:])) for m in maps], 1)
                          for name, summary in SUMMARIES.items()})
        for name in SUMMARIES:
            kept[name].append(torch.cat([p[name] for p in parts]).numpy())
        print(f"{body.backbone_names[b]} at {size} px done", flush=True)
    np.savez(out, paths=np.array(manifest["path"].tolist(), dtype=str), **{k: np.concatenate(v, 1) for k, v in kept.items()})


def score(feats: list[Path], folds: list[list[str]], variants: list[str], split: str, refit: bool,
          classifier: str = "logistic") -> None:
    from cxr_fast.probe import fit_regression

    stored = [np.load(f) for f in feats]
    row_of = {p: i for i, p in enumerate(stored[0]["paths"])}
    for other, path in zip(stored[1:], feats[1:]):
        if not np.array_equal(other["paths"], stored[0]["paths"]):
            raise SystemExit(f"{path}: not the films of {feats[0]}, in the same order")
    # per fold: its splits, their labels, and the fine-tuned run's calibrated probabilities on `split`
    selections, labels, fine_tuned = [], [], []
    for data, run_dir in folds:
        manifest, run = read_manifest(Path(data)), load_run(Path(run_dir))
        sel = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in ("train", "valid", split)}
        selections.append(sel)
        labels.append({s: d["label"].map(run.classes.index).to_numpy() for s, d in sel.items()})
        fine_tuned.append(softmax(predict_logits(run, sel[split], progress=False), run.temperature))
    y = np.concatenate([fold_labels[split] for fold_labels in labels])
    sizes = np.cumsum([0] + [len(fold_labels[split]) for fold_labels in labels])
    fine_tuned = np.concatenate(fine_tuned)
    for name in variants:
        x_all = np.hstack([file[s].reshape(len(row_of), -1) for file in stored for s in VARIANTS[name]]).astype(np.float64)
        probe, refitted, strengths = [], [], []
        for sel, y_fold in zip(selections, labels, strict=True):
            x = {s: x_all[[row_of[p] for p in d["path"]]] for s, d in sel.items()}
            if classifier == "per-member":  # columns of each (network, size) pair, in `FrozenFeatures` order
                if VARIANTS[name] != ["mean"]:
                    raise SystemExit("--classifier per-member takes the mean variant only")
                bounds = np.cumsum([0] + member_widths(x_all.shape[1]))
                members = [{s: v[:, a:b] for s, v in x.items()} for a, b in zip(bounds, bounds[1:])]
                fitted = [fit_classifier("logistic", m, y_fold, split) for m in members]
                strengths.append([c for c, _ in fitted])
                probe.append(np.mean([probs for _, probs in fitted], axis=0))
            else:
                c, probs = fit_classifier(classifier, x, y_fold, split)
                strengths.append(c)
                probe.append(probs)
            if refit:  # the same strength and temperature, fitted on a third more images
                fit, scaler, _ = fit_regression({s: x[s] for s in ("train", "valid")},
                                                {s: y_fold[s] for s in ("train", "valid")}, class_weights=True, quiet=True)
                temperature = fit_temperature(fit.decision_function(scaler.transform(x["valid"])), y_fold["valid"])
                both = np.vstack([x["train"], x["valid"]])
                scaler2 = StandardScaler().fit(both)
                fit2 = LogisticRegression(C=fit.C, class_weight="balanced", tol=1e-6, max_iter=3000)
                fit2.fit(scaler2.transform(both), np.r_[y_fold["train"], y_fold["valid"]])
                refitted.append(softmax(fit2.decision_function(scaler2.transform(x[split])), temperature))
        rows = {"fine-tuned run": fine_tuned, name: np.concatenate(probe)}
        rows[f"{name} + fine-tuned"] = (rows[name] + fine_tuned) / 2
        if refit:
            rows[f"{name} refitted"] = np.concatenate(refitted)
            rows[f"{name} refitted + fine-tuned"] = (rows[f"{name} refitted"] + fine_tuned) / 2
        print(f"{name}: strengths chosen per fold {strengths}")
        for label, probs in rows.items():
            low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=1000)
            per_fold = " / ".join(f"{balanced_accuracy_score(y[a:b], probs[a:b].argmax(1)):.3f}"
                                  for a, b in zip(sizes, sizes[1:]))
            print(f"  {split} {label:32s} {balanced_accuracy_score(y, probs.argmax(1)):.3f} ({low:.3f}–{high:.3f}); "
                  f"per fold {per_fold}")


def member_widths(n_features: int) -> list[int]:
    """Feature count of each (network, size) pair of the shipped body, in the order it concatenates them."""
    body = create_model("frozen_lite", n_in=1, n_classes=3).body
    with torch.no_grad():
        probe_image = torch.zeros(1, 1, 64, 64)
        widths = [sum(m.shape[1] for m in body.member_maps(probe_image, b, 64)) for b, _ in body.members()]
    if sum(widths) != n_features:
        raise SystemExit(f"features have {n_features} columns per summary, the shipped body {sum(widths)}")
    return widths


def fit_classifier(classifier: str, x: dict[str, np.ndarray], y: dict[str, np.ndarray], split: str):
    """(strength chosen or None, calibrated probabilities on `split`) of one classifier fitted on train, its strength
    (if any) and temperature chosen on valid."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import log_loss

    from cxr_fast.probe import STRENGTHS, fit_regression

    train_valid = ("train", "valid")
    if classifier == "logistic":  # as shipped: the strength with the best valid balanced accuracy
        fit, scaler, _ = fit_regression({s: x[s] for s in train_valid}, {s: y[s] for s in train_valid},
                                        class_weights=True, quiet=True)
        logits = {s: fit.decision_function(scaler.transform(x[s])) for s in ("valid", split)}
        strength = fit.C
    else:  # standardised, in the span of the training rows, as `fit_regression` fits
        scaler = StandardScaler().fit(x["train"])
        basis = np.linalg.svd(scaler.transform(x["train"]), full_matrices=False)[2]
        xs = {s: scaler.transform(v) @ basis.T for s, v in x.items()}
        if classifier == "lda":  # Ledoit-Wolf shrinkage: no strength to choose
            n_classes = int(y["train"].max()) + 1
            fit = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=np.full(n_classes, 1 / n_classes))
            fit.fit(xs["train"], y["train"])
            strength = None
        else:  # "logloss": the shipped regression, its strength chosen by valid log-loss
            best = None
            for c in STRENGTHS:
                fit = LogisticRegression(C=c, class_weight="balanced", tol=1e-6, max_iter=3000).fit(xs["train"], y["train"])
                loss = log_loss(y["valid"], fit.predict_proba(xs["valid"]), labels=fit.classes_)
                if best is None or loss < best[0]:
                    best = (loss, fit)
            fit = best[1]
            strength = fit.C
        logits = {s: fit.decision_function(xs[s]) for s in ("valid", split)}
    temperature = fit_temperature(logits["valid"], y["valid"])
    return strength, softmax(logits[split], temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("features")
    extract.add_argument("fold", type=Path)
    extract.add_argument("--out", type=Path, required=True)
    extract.add_argument("--clahe", action="store_true", help="equalise each film first (needs scikit-image)")
    scoring = commands.add_parser("score")
    scoring.add_argument("feats", type=Path, nargs="+")
    scoring.add_argument("--fold", nargs=2, action="append", required=True, metavar=("DATA", "RUN"))
    scoring.add_argument("--variant", nargs="+", default=["mean"], choices=list(VARIANTS))
    scoring.add_argument("--split", default="valid", choices=["valid", "test"])
    scoring.add_argument("--refit", action="store_true", help="also refit on train + valid (score it on test)")
    scoring.add_argument("--classifier", default="logistic", choices=["logistic", "lda", "per-member", "logloss"],
                         help="the shipped regression; shrinkage LDA; one regression per (network, size), averaged; "
                              "the regression with its strength chosen by valid log-loss")
    args = parser.parse_args()
    keep_freed_memory()
    if args.command == "features":
        features(args.fold, args.out, args.clahe)
    else:
        score(args.feats, args.fold, args.variant, args.split, args.refit, args.classifier)


if __name__ == "__main__":
    main()
