"""Would averaging two recipes help under cross-validation? For each fold, the test probabilities of each run
(calibrated, as `cxrfast evaluate` gives them) and of their mean; the folds' test images pooled, so every image
is scored once by models that never saw it or its patient.

    .venv/bin/python docs/bench/pool_ensemble.py --fold DATA0 RUN_A0 RUN_B0 --fold DATA1 RUN_A1 RUN_B1 ...

Every --fold names one prepared fold (`cxrfast data prepare --folds K --fold F`) and the runs trained on it, in
the same order for every fold. A CSV file in place of a run gives probabilities already computed, one
`NAME|CLASS` column per class, rows keyed by `path` (as `docs/bench/frozen_probe.py` writes them). With
`--no-average` the runs are scored as they are, e.g. a recipe's runs beside the `cxrfast ensemble` bundles made
from them, and the paired gain is of the last model over the first.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.data.manifest import read_manifest
from cxr_fast.memory import keep_freed_memory
from cxr_fast.metrics import bootstrap_ci, classification_metrics


def probabilities_file(path: Path, items: pd.DataFrame, classes: list[str]) -> tuple[str, np.ndarray]:
    table = pd.read_csv(path).set_index("path").loc[items["path"]]
    columns = [next(c for c in table.columns if c.endswith(f"|{cls}")) for cls in classes]
    return columns[0].split("|")[0], table[columns].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", nargs="+", action="append", required=True, metavar="DATA RUN")
    parser.add_argument("--split", default="test", choices=["valid", "test"], help="score this split")
    parser.add_argument("--no-average", action="store_true",
                        help="score the models as given (e.g. an ensemble bundle among them); the paired gain is then "
                             "of the last model over the first")
    parser.add_argument("--tta", action="store_true",
                        help="score each run with test-time augmentation, as `cxrfast evaluate --tta` does")
    args = parser.parse_args()
    keep_freed_memory()
    labels, probs_by_model, names = [], None, None
    for data, *runs in args.fold:
        items = read_manifest(Path(data))
        items = items[items["split"] == args.split].reset_index(drop=True)
        sources = [Path(run) for run in runs]
        loaded = {source: load_run(source) for source in sources if source.suffix != ".csv"}
        classes = next(iter(loaded.values())).classes
        labels.append(items["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
        fold_probs, fold_names = [], []
        for source in sources:
            if source in loaded:
                run = loaded[source]
                name, probs = run.name, softmax(predict_logits(run, items, progress=False, tta=args.tta), run.temperature)
            else:
                name, probs = probabilities_file(source, items, classes)
            fold_names.append(name)
            fold_probs.append(probs)
        names = names or fold_names
        probs_by_model = probs_by_model or [[] for _ in runs]
        for store, probs in zip(probs_by_model, fold_probs, strict=True):
            store.append(probs)
    y = np.concatenate(labels)
    pooled = {name: np.concatenate(store) for name, store in zip(names, probs_by_model, strict=True)}
    if not args.no_average:
        pooled[" + ".join(names)] = np.mean(list(pooled.values()), axis=0)
    sizes = np.cumsum([0] + [len(y_fold) for y_fold in labels])
    print(f"{len(y)} {args.split} images from {len(args.fold)} fold(s); classes {', '.join(classes)}")
    for name, probs in pooled.items():
        metrics = classification_metrics(y, probs, classes)
        low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=1000)
        recalls = " / ".join(f"{metrics['per_class'][c]['recall']:.2f}" for c in classes)
        per_fold = " / ".join(f"{balanced_accuracy_score(y[a:b], probs[a:b].argmax(1)):.3f}"
                              for a, b in zip(sizes, sizes[1:]))
        print(f"{name:40s} balanced acc. {metrics['balanced_accuracy']:.3f} ({low:.3f}–{high:.3f}); "
              f"recall {recalls}; accuracy {metrics['accuracy']:.3f}; per fold {per_fold}")
    # the project's bootstrap resamples whole rows: both models' probabilities side by side keep the pairs
    first, combined = pooled[names[0]], pooled[list(pooled)[-1]]
    k = len(classes)
    low, high = bootstrap_ci(
        y, np.hstack([combined, first]), n_boot=2000,
        metric=lambda y, p: balanced_accuracy_score(y, p[:, :k].argmax(1)) - balanced_accuracy_score(y, p[:, k:].argmax(1)),
    )
    print(f"gain of {list(pooled)[-1]} over {names[0]}: 95 % paired bootstrap interval {low:+.3f} to {high:+.3f}")


if __name__ == "__main__":
    main()
