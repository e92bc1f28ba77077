"""Does predicting at a larger input size than the model trained at help (the "FixRes" effect)? Predicts each
run's test split at several sizes and pools the runs, which suits the folds of one cross-validation.

    .venv/bin/python docs/bench/test_resolution.py RUN [RUN ...] [--sizes 224 256 288 320]

Each run's test split is read from the manifest its config.json names; probabilities use the run's fitted
temperature. Prints balanced accuracy per run and size, then pooled balanced accuracy, recalls and macro AUC.
"""

import argparse

import numpy as np

from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.data.manifest import read_manifest
from cxr_fast.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 256, 288, 320])
    args = parser.parse_args()
    labels, probs = [], {size: [] for size in args.sizes}
    for path in args.runs:
        run = load_run(path)
        manifest = read_manifest(run.config["data"])
        test = manifest[manifest["split"] == "test"].reset_index(drop=True)
        y = test["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy()
        labels.append(y)
        scores = []
        for size in args.sizes:
            run.config["size"] = size  # Run.load_input resizes to config["size"]
            p = softmax(predict_logits(run, test, progress=False), run.temperature)
            probs[size].append(p)
            scores.append(f"{size} px {classification_metrics(y, p, run.classes)['balanced_accuracy']:.3f}")
        print(f"{path}: {'; '.join(scores)}", flush=True)
    y = np.concatenate(labels)
    for size in args.sizes:
        m = classification_metrics(y, np.concatenate(probs[size]), run.classes)
        recalls = " / ".join(f"{m['per_class'][c]['recall']:.2f}" for c in run.classes)
        print(f"pooled, {size} px: balanced acc. {m['balanced_accuracy']:.3f}; recall {recalls}; "
              f"macro AUC {m['macro_roc_auc']:.3f}")


if __name__ == "__main__":
    main()
