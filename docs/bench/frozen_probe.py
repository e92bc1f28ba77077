"""Do frozen ImageNet features, with only a logistic regression trained on top, separate the classes as well as
fine-tuning does? A cheap companion for the fine-tuned recipe if they do: the features cost one forward pass
per image and network-size pair (about 0.2 s per image for all six on 2 cores), the regression seconds.

    .venv/bin/python docs/bench/frozen_probe.py D/fold0 D/fold1 ... --backbone efficientnet-lite2 --size 288

For every backbone and size: the global average of the last feature map and of the last three blocks' outputs,
computed once for every image of the folds (they share one image set), then per fold a class-weighted logistic
regression on the training split, its strength chosen on valid, scored on test. The folds' test images are
pooled, as `docs/bench/pool_folds.py` does for fine-tuned runs; each fold's valid and test probabilities are
written to OUT/FEATURES/foldF.csv so they can be averaged with a fine-tuned run's (`docs/bench/pool_ensemble.py`).
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from cxr_fast.archs.registry import create_model
from cxr_fast.data.manifest import image_column, read_manifest
from cxr_fast.memory import keep_freed_memory
from cxr_fast.metrics import bootstrap_ci, classification_metrics
from cxr_fast.preprocess import load_input

CLASSES = ["COVID-19", "Normal", "Pneumonia"]
STRENGTHS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]


@torch.no_grad()
def pooled_features(weights: str, size: int, files: list[str], bs: int = 32, pool: str = "mean") -> np.ndarray:
    """[N, D]: the spatial mean (with `pool="meanstd"` also the standard deviation) of the last three blocks'
    outputs and of the final feature map."""

    def summary(fmap: torch.Tensor) -> torch.Tensor:
        if pool == "mean":
            return fmap.mean((2, 3))
        return torch.cat([fmap.mean((2, 3)), fmap.std((2, 3))], dim=1)

    n = weights.rsplit("lite", 1)[1]
    model = create_model(f"tf_efficientnet_lite{n}", n_in=1, weights=weights).eval()
    body = model.body.to(memory_format=torch.channels_last)  # as the recipe trains: faster on a CPU
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, out: captured.append(summary(out)))
             for block in list(body.blocks)[-3:]]
    stats = model.pretrained_stats
    out = []
    for start in range(0, len(files), bs):
        x = torch.stack([load_input(f, size, 1, stats.mean, stats.std) for f in files[start:start + bs]])
        captured.clear()
        final = summary(body(x.contiguous(memory_format=torch.channels_last)))
        out.append(torch.cat([*captured, final], dim=1).numpy())
    for hook in hooks:
        hook.remove()
    return np.concatenate(out)


def probe(features: pd.DataFrame, items: pd.DataFrame) -> tuple[dict[str, np.ndarray], float, float]:
    """Fit on train, choose the regularisation strength on valid; valid and test probabilities, chosen C, valid
    score."""
    parts = {s: items[items["split"] == s] for s in ("train", "valid", "test")}
    x = {s: features.loc[image_column(p)].to_numpy() for s, p in parts.items()}
    y = {s: p["label"].map(CLASSES.index).to_numpy() for s, p in parts.items()}
    scaler = StandardScaler().fit(x["train"])
    x = {s: scaler.transform(v) for s, v in x.items()}
    best = None
    for c in STRENGTHS:
        fit = LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(x["train"], y["train"])
        score = balanced_accuracy_score(y["valid"], fit.predict(x["valid"]))
        if best is None or score > best[0]:
            best = (score, c, fit)
    score, c, fit = best
    return {s: fit.predict_proba(x[s]) for s in ("valid", "test")}, c, score


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folds", nargs="+", type=Path)
    parser.add_argument("--backbone", nargs="+", default=["efficientnet-lite0"])
    parser.add_argument("--size", nargs="+", type=int, default=[288])
    parser.add_argument("--out", type=Path, default=Path("probe"))
    parser.add_argument("--pool", default="mean", choices=["mean", "meanstd"])
    parser.add_argument("--together-only", action="store_true", help="skip each backbone and size alone")
    args = parser.parse_args()

    manifests = [read_manifest(fold) for fold in args.folds]
    files = sorted(set().union(*(image_column(m) for m in manifests)))
    blocks = []
    for weights in args.backbone:
        for size in args.size:
            suffix = "" if args.pool == "mean" else f"-{args.pool}"
            cache = args.out / f"features-{weights}-{size}{suffix}.npy"
            if cache.exists():
                feats = np.load(cache)
            else:
                feats = pooled_features(weights, size, files, pool=args.pool)
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache, feats)
            blocks.append((f"{weights} {size}px", pd.DataFrame(feats, index=files)))
    if args.together_only:
        blocks = [("all together", pd.concat([b for _, b in blocks], axis=1))]
    elif len(blocks) > 1:
        blocks.append(("all together", pd.concat([b for _, b in blocks], axis=1)))

    for name, features in blocks:
        labels, probs, chosen, valid_scores = [], [], [], []
        for fold, items in zip(args.folds, manifests, strict=True):
            split_probs, c, valid_score = probe(features, items)
            test_probs = split_probs["test"]
            test = items[items["split"] == "test"]
            labels.append(test["label"].map(CLASSES.index).to_numpy())
            valid_scores.append(valid_score)
            probs.append(test_probs)
            chosen.append(f"{fold.name}: C={c} valid {valid_score:.3f} test "
                          f"{balanced_accuracy_score(labels[-1], test_probs.argmax(1)):.3f}")
            table = pd.concat([items[items["split"] == s] for s in ("valid", "test")])[["path", "label", "split"]]
            for k, cls in enumerate(CLASSES):
                table[f"probe|{cls}"] = np.concatenate([split_probs["valid"], test_probs])[:, k]
            folder = args.out / name.replace(" ", "-")
            folder.mkdir(exist_ok=True)
            table.to_csv(folder / f"{fold.name}.csv", index=False)
        y, p = np.concatenate(labels), np.concatenate(probs)
        metrics = classification_metrics(y, p, CLASSES)
        low, high = bootstrap_ci(y, p, "balanced_accuracy", n_boot=1000)
        recalls = " / ".join(f"{metrics['per_class'][c]['recall']:.2f}" for c in CLASSES)
        print(f"{name}: pooled test balanced acc. {metrics['balanced_accuracy']:.3f} ({low:.3f}–{high:.3f}); "
              f"recall {recalls}; accuracy {metrics['accuracy']:.3f}; {features.shape[1]} features; "
              f"valid (mean over folds, at the chosen C) {np.mean(valid_scores):.3f}")
        for line in chosen:
            print("   ", line)


if __name__ == "__main__":
    main()
