"""How much each tuning constant of `cxr_fast.lungs` matters: Dice on the hand-drawn masks with each one halved and
doubled (fractions of a range are moved halfway to their bound instead, where doubling would leave it).

    python docs/bench/lung_constants.py ../shared/data/lung-masks            # all 300 films, about 20 s a setting
    python docs/bench/lung_constants.py ../shared/data/lung-masks --every 3  # the test's 100

Prints one row per setting: mean, median, 10th percentile and worst Dice, and how many films moved by more than
0.01. A constant whose settings all score alike is robust, not untested: the estimate does not hinge on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr_fast import lungs

# name -> the values tried besides the shipped one
SETTINGS = {
    "SMOOTH_SIGMA": (0.5, 2.0),
    "GRADIENT_SIGMA": (0.5, 2.0),
    "BASIN_DEPTH_FRAC": (0.01, 0.04),
    "AIR_LEVEL": (0.05, 0.2),
    "BACKGROUND_DIST": (0.06, 0.24),
    "BRIGHT_FRAC": (0.4, 0.9),
    "MIRROR_RATIO": (0.15, 0.6),
}


def scores(films: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.array([lungs.dice(lungs.estimate_lung_field(image), truth) for image, truth in films])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="lung-masks folder: pairs.csv, images/, masks/")
    parser.add_argument("--every", type=int, default=1, help="use every Nth film of pairs.csv")
    args = parser.parse_args()
    names = pd.read_csv(args.folder / "pairs.csv")["name"][:: args.every]
    films = [
        (np.array(Image.open(args.folder / "images" / n)), np.array(Image.open(args.folder / "masks" / n)) > 0)
        for n in names
    ]
    shipped = scores(films)

    def row(label: str, s: np.ndarray) -> None:
        moved = int((np.abs(s - shipped) > 0.01).sum())
        print(f"| {label} | {s.mean():.3f} | {np.median(s):.3f} | {np.percentile(s, 10):.3f} | {s.min():.2f} | {moved} |")

    print(f"{len(films)} films\n\n| setting | mean | median | 10th pct | worst | films moved > 0.01 |\n|---|---|---|---|---|---|")
    row("as shipped", shipped)
    for name, values in SETTINGS.items():
        original = getattr(lungs, name)
        for value in values:
            setattr(lungs, name, value)
            try:
                row(f"`{name}` {original} → {value}", scores(films))
            finally:
                setattr(lungs, name, original)


if __name__ == "__main__":
    main()
