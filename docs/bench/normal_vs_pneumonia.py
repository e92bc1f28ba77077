"""How well do evaluated models separate Normal from Pneumonia, and what is the most any decision threshold could
give them? Reads `predictions.csv` from `cxrfast evaluate` folders.

    .venv/bin/python docs/bench/normal_vs_pneumonia.py EVAL_DIR [EVAL_DIR ...]
    .venv/bin/python docs/bench/normal_vs_pneumonia.py --pool TEST_EVAL_F0 … --valid VALID_EVAL_F0 …

For each: the Normal-versus-Pneumonia AUC on the images labelled Normal or Pneumonia (score p_Pneumonia /
(p_Pneumonia + p_Normal)), and the three-class balanced accuracy as evaluated and with the Normal/Pneumonia
threshold chosen on these very images (images predicted COVID-19 keep that prediction). The second figure is an
oracle: an upper bound on what re-thresholding or recalibrating that model could reach, not a result.

`--valid` names one evaluation of the valid split per EVAL_DIR, in the same order: each model's threshold is then
also chosen on its valid images and applied to its test images, which is an honest rule rather than a bound.
`--pool` adds the same figures over all EVAL_DIRs together (cross-validation folds, whose test splits partition
the collection).
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


def pneumonia_ratio(d: pd.DataFrame) -> np.ndarray:
    return (d["p_Pneumonia"] / (d["p_Pneumonia"] + d["p_Normal"])).to_numpy()


def with_threshold(d: pd.DataFrame, threshold: float) -> np.ndarray:
    predicted = np.where(pneumonia_ratio(d) >= threshold, "Pneumonia", "Normal")
    return np.where(d["predicted"] == "COVID-19", "COVID-19", predicted)


def best_threshold(d: pd.DataFrame) -> tuple[float, float]:
    """The threshold with the highest balanced accuracy on `d` (the middle of the best run of candidates), and that
    accuracy. Candidates are the observed ratios, plus one above them all (everything Normal)."""
    candidates = np.r_[np.unique(pneumonia_ratio(d)), 1.01]
    scores = np.array([balanced_accuracy_score(d["label"], with_threshold(d, t)) for t in candidates])
    first = int(scores.argmax())
    last = first
    while last + 1 < len(candidates) and scores[last + 1] == scores[first]:
        last += 1
    return (candidates[first] + candidates[last]) / 2, float(scores[first])


def report(name: str, test: pd.DataFrame, valid: pd.DataFrame | None) -> None:
    nih = test["label"].isin(["Normal", "Pneumonia"]).to_numpy()
    auc = roc_auc_score(test["label"][nih] == "Pneumonia", pneumonia_ratio(test)[nih])
    line = (f"{name}: Normal-vs-Pneumonia AUC {auc:.3f}; balanced accuracy "
            f"{balanced_accuracy_score(test['label'], test['predicted']):.3f}, "
            f"with the best threshold {best_threshold(test)[1]:.3f}")
    if valid is not None:
        threshold = best_threshold(valid)[0]
        tuned = balanced_accuracy_score(test["label"], with_threshold(test, threshold))
        line += f", with the threshold best on valid ({threshold:.3f}) {tuned:.3f}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", type=Path)
    parser.add_argument("--valid", nargs="+", type=Path, help="valid-split evaluations, one per EVAL_DIR")
    parser.add_argument("--pool", action="store_true", help="also report all EVAL_DIRs pooled")
    args = parser.parse_args()
    if args.valid and len(args.valid) != len(args.evals):
        parser.error(f"--valid names {len(args.valid)} folders for {len(args.evals)} EVAL_DIRs")
    tests = [pd.read_csv(folder / "predictions.csv") for folder in args.evals]
    valids = [pd.read_csv(folder / "predictions.csv") for folder in args.valid] if args.valid else [None] * len(tests)
    for folder, test, valid in zip(args.evals, tests, valids, strict=True):
        report(str(folder), test, valid)
    if args.pool:
        pooled = pd.concat(tests, ignore_index=True)
        print(f"pooled: balanced accuracy {balanced_accuracy_score(pooled['label'], pooled['predicted']):.3f}")
        if args.valid:  # each fold keeps its own valid-chosen threshold
            tuned = np.concatenate([with_threshold(t, best_threshold(v)[0]) for t, v in zip(tests, valids, strict=True)])
            print(f"pooled, each fold at its valid threshold: {balanced_accuracy_score(pooled['label'], tuned):.3f}")
        report("pooled, one threshold for all", pooled, None)


if __name__ == "__main__":
    main()
