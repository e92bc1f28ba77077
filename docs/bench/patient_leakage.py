"""How a model does on test films whose patient also has a film in training, against films of unseen patients.

    python docs/bench/patient_leakage.py DATA RUN_EVAL_DIR [RUN_EVAL_DIR ...]

DATA: a folder prepared *without* --patient-pattern (so patients may straddle splits); each RUN_EVAL_DIR holds the
predictions.csv that `cxrfast evaluate RUN` wrote for DATA's test split. Patient ids are read from NIH-style names
(00000061_012.png); images without one (here the COVID-19 class) are left out of both groups.
"""

import sys
from pathlib import Path

import pandas as pd

from cxr_fast.data.manifest import read_manifest
from cxr_fast.data.patients import patient_ids


def main(data: str, eval_dirs: list[str]) -> None:
    table = read_manifest(data)
    table["patient"] = patient_ids(list(table["path"]), "nih")
    train = table[(table["split"] == "train") & (table["patient"] != "")]
    train_labels = train.groupby("patient")["label"].agg(set)
    test = table[(table["split"] == "test") & (table["patient"] != "")].copy()
    test["seen"] = test["patient"].isin(train_labels.index)
    test["seen_same_label"] = [
        seen and label in train_labels.get(patient, set())
        for seen, patient, label in zip(test["seen"], test["patient"], test["label"], strict=True)
    ]
    print(f"{len(test)} NIH test films: {test['seen'].sum()} of patients with a training film "
          f"({test['seen_same_label'].sum()} of them under the same label), {(~test['seen']).sum()} of unseen patients")
    for eval_dir in eval_dirs:
        predictions = pd.read_csv(Path(eval_dir) / "predictions.csv")
        merged = test.merge(predictions[["path", "predicted"]], on="path", how="inner")
        merged["correct"] = merged["label"] == merged["predicted"]
        seen, unseen = merged[merged["seen"]], merged[~merged["seen"]]
        print(f"{eval_dir}: accuracy on seen patients {seen['correct'].mean():.3f} ({len(seen)}), "
              f"unseen {unseen['correct'].mean():.3f} ({len(unseen)})")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
