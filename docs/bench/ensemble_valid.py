"""Would averaging trained models help? Balanced accuracy of each run and of every pair and triple of runs
(mean of their calibrated probabilities) on one split of a manifest.

    .venv/bin/python docs/bench/ensemble_valid.py DATA RUN RUN [RUN ...] [--split valid]

Judge on the valid split: choosing the best combination on test would overstate it.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from cxr_fast.bundle import load_run, predict_logits
from cxr_fast.calibration import softmax
from cxr_fast.data.manifest import read_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="valid")
    args = parser.parse_args()
    manifest = read_manifest(args.data)
    items = manifest[manifest["split"] == args.split].reset_index(drop=True)
    probs, y = {}, None
    for path in args.runs:
        run = load_run(path)
        y = items["label"].map({c: i for i, c in enumerate(run.classes)}).to_numpy()
        probs[run.name] = softmax(predict_logits(run, items, progress=False), run.temperature)
    rows = []
    for k in range(1, min(3, len(probs)) + 1):
        for combo in itertools.combinations(probs, k):
            mean = np.mean([probs[name] for name in combo], axis=0)
            rows.append((balanced_accuracy_score(y, mean.argmax(1)), " + ".join(combo)))
    for score, names in sorted(rows, reverse=True):
        print(f"{score:.3f}  {names}")


if __name__ == "__main__":
    main()
