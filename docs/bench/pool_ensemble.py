"""Would averaging two recipes help under cross-validation? For each fold, the test probabilities of each run
(calibrated, as `cxrfast evaluate` gives them) and of their mean; the folds' test images pooled, so every image
is scored once by models that never saw it or its patient.

    .venv/bin/python docs/bench/pool_ensemble.py --fold DATA0 RUN_A0 RUN_B0 --fold DATA1 RUN_A1 RUN_B1 ...

Every --fold names one prepared fold (`cxrfast data prepare --folds K --fold F`) and the runs trained on it, in
the same order for every fold.
"""

import argparse
from pathlib import Path

import numpy as np

from cxr_fast.bundle import load_run, predict_logits, softmax
from cxr_fast.data.manifest import read_manifest
from cxr_fast.memory import keep_freed_memory
from cxr_fast.metrics import bootstrap_ci, classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", nargs="+", action="append", required=True, metavar="DATA RUN")
    args = parser.parse_args()
    keep_freed_memory()
    labels, probs_by_model, names = [], None, None
    for data, *runs in args.fold:
        items = read_manifest(Path(data))
        items = items[items["split"] == "test"].reset_index(drop=True)
        loaded = [load_run(Path(run)) for run in runs]
        classes = loaded[0].classes
        labels.append(items["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
        fold_probs = [softmax(predict_logits(run, items, progress=False), run.temperature) for run in loaded]
        names = names or [run.name for run in loaded]
        probs_by_model = probs_by_model or [[] for _ in loaded]
        for store, probs in zip(probs_by_model, fold_probs, strict=True):
            store.append(probs)
    y = np.concatenate(labels)
    pooled = {name: np.concatenate(store) for name, store in zip(names, probs_by_model, strict=True)}
    pooled[" + ".join(names)] = np.mean(list(pooled.values()), axis=0)
    print(f"{len(y)} test images from {len(args.fold)} fold(s); classes {', '.join(classes)}")
    for name, probs in pooled.items():
        metrics = classification_metrics(y, probs, classes)
        low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=1000)
        recalls = " / ".join(f"{metrics['per_class'][c]['recall']:.2f}" for c in classes)
        print(f"{name:40s} balanced acc. {metrics['balanced_accuracy']:.3f} ({low:.3f}–{high:.3f}); "
              f"recall {recalls}; accuracy {metrics['accuracy']:.3f}")


if __name__ == "__main__":
    main()
