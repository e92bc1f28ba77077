"""Are the Normal/Pneumonia errors a few confidently mislabelled films, or many uncertain ones? Compares two
recipes' pooled cross-validation test predictions image by image (a rough form of "confident learning": a film
that two unrelated models both confidently give the other label is a candidate label error).

    .venv/bin/python docs/bench/error_agreement.py A-fold{0..4}-epochs/test_probabilities.csv \
        --other B-fold{0..4}-epochs/test_probabilities.csv [--variant "kept epoch"]

Reads the files `docs/bench/weight_averaging.py` writes. For Normal and Pneumonia films: how many both models give
the other label at several confidence levels, how often the models agree, and how often they are right when
they agree.
"""

import argparse
from pathlib import Path

import pandas as pd


def pooled(files: list[Path]) -> pd.DataFrame:
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True).set_index("path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--other", nargs="+", type=Path, required=True)
    parser.add_argument("--variant", default="kept epoch")
    args = parser.parse_args()
    a = pooled(args.files)
    b = pooled(args.other).loc[a.index]
    classes = list(dict.fromkeys(c.split("|")[1] for c in a.columns if "|" in c))
    pa, pb = (d[[f"{args.variant}|{c}" for c in classes]] for d in (a, b))
    pa.columns = pb.columns = classes
    for label, other in ("Normal", "Pneumonia"), ("Pneumonia", "Normal"):
        films = a["label"] == label
        shares = []
        for level in (0.5, 0.7, 0.9):
            both = (pa.loc[films, other] > level) & (pb.loc[films, other] > level)
            shares.append(f"p > {level}: {both.sum()} ({both.mean():.1%})")
        print(f"{label} films ({films.sum()}) that both models call {other}: {'; '.join(shares)}")
    nih = a["label"].isin(["Normal", "Pneumonia"])
    pred_a, pred_b = pa.idxmax(axis=1)[nih], pb.idxmax(axis=1)[nih]
    agree = pred_a == pred_b
    print(f"Normal/Pneumonia films: models agree on {agree.mean():.3f}; right {(pred_a == a['label'][nih]).mean():.3f}"
          f" and {(pred_b == a['label'][nih]).mean():.3f}; right where they agree "
          f"({agree.sum()} films) {(pred_a[agree] == a['label'][nih][agree]).mean():.3f}")


if __name__ == "__main__":
    main()
