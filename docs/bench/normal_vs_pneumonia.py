"""How well do evaluated models separate Normal from Pneumonia, and what is the most any decision threshold could
give them? Reads `predictions.csv` from `cxrfast evaluate` folders.

    .venv/bin/python docs/bench/normal_vs_pneumonia.py EVAL_DIR [EVAL_DIR ...]

For each: the Normal-versus-Pneumonia AUC on the images labelled Normal or Pneumonia (score p_Pneumonia /
(p_Pneumonia + p_Normal)), and the three-class balanced accuracy as evaluated and with the Normal/Pneumonia
threshold chosen on these very images (images predicted COVID-19 keep that prediction). The second figure is an
oracle: an upper bound on what re-thresholding or recalibrating that model could reach, not a result.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+", type=Path)
    args = parser.parse_args()
    for folder in args.evals:
        d = pd.read_csv(folder / "predictions.csv")
        ratio = (d["p_Pneumonia"] / (d["p_Pneumonia"] + d["p_Normal"])).to_numpy()
        nih = d["label"].isin(["Normal", "Pneumonia"]).to_numpy()
        auc = roc_auc_score(d["label"][nih] == "Pneumonia", ratio[nih])
        as_evaluated = balanced_accuracy_score(d["label"], d["predicted"])
        best = 0.0
        for threshold in np.unique(ratio):
            predicted = np.where(ratio >= threshold, "Pneumonia", "Normal")
            predicted = np.where(d["predicted"] == "COVID-19", "COVID-19", predicted)
            best = max(best, balanced_accuracy_score(d["label"], predicted))
        print(f"{folder}: Normal-vs-Pneumonia AUC {auc:.3f}; balanced accuracy {as_evaluated:.3f}, "
              f"with the best threshold {best:.3f}")


if __name__ == "__main__":
    main()
