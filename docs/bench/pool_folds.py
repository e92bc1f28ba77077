"""Pool the test predictions of cross-validation folds (`cxrfast data prepare --folds K --fold F`): every image is
tested once, by the model that did not train on it, so the pooled figure rests on the whole collection instead
of one fifth of it.

    .venv/bin/python docs/bench/pool_folds.py RUN-epochs/test_probabilities.csv [...] [--variant NAME ...]

Reads the files `docs/bench/weight_averaging.py` writes (columns "VARIANT|CLASS"); for each variant prints the
pooled balanced accuracy with its 95 % bootstrap interval, per-class recall, accuracy and macro AUC, and the per-fold mean
and standard deviation.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.metrics import bootstrap_ci, classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--variant", action="append", help="variants to show (default: all)")
    args = parser.parse_args()
    folds = [pd.read_csv(f) for f in args.files]
    columns = [c for c in folds[0].columns if "|" in c]
    classes = list(dict.fromkeys(c.split("|")[1] for c in columns))
    variants = args.variant or list(dict.fromkeys(c.split("|")[0] for c in columns))
    pooled = pd.concat(folds, ignore_index=True)
    assert pooled["path"].is_unique, "a path is tested in two folds: these are not folds of one preparation"
    y = pooled["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    print(f"{len(pooled)} images from {len(folds)} folds; classes {', '.join(classes)}")
    for variant in variants:
        names = [f"{variant}|{c}" for c in classes]
        probs = pooled[names].to_numpy()
        m = classification_metrics(y, probs, classes)
        low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=1000)
        per_fold = [classification_metrics(f["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(),
                                           f[names].to_numpy(), classes)["balanced_accuracy"] for f in folds]
        recalls = " / ".join(f"{m['per_class'][c]['recall']:.2f}" for c in classes)
        print(f"{variant:28s} balanced acc. {m['balanced_accuracy']:.3f} ({low:.3f}–{high:.3f}); recall {recalls}; "
              f"accuracy {m['accuracy']:.3f}; "
              f"macro AUC {m['macro_roc_auc']:.3f}; folds {np.mean(per_fold):.3f} ± {np.std(per_fold, ddof=1):.3f} "
              f"({', '.join(f'{v:.3f}' for v in per_fold)})")


if __name__ == "__main__":
    main()
