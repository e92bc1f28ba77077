"""A copy of a prepared data folder whose cached images are changed, to test preprocessing ideas without
touching the product: train on the copy with the same recipe and compare valid balanced accuracy.

    .venv/bin/python docs/bench/variant_manifest.py DATA OUT --variant lung-crop [--margin 0.08]
    .venv/bin/python docs/bench/variant_manifest.py DATA OUT --variant equalize

- `lung-crop`: each image cropped to the bounding box of its automatic lung-field estimate
  (`cxr_fast.lungs.estimate_lung_field`) widened by `--margin` of the image side; images whose estimate is
  empty or narrower than 30 % of the image keep their full frame.
- `equalize`: global histogram equalisation (`PIL.ImageOps.equalize`), a contrast normalisation across
  machines and exposures.

The manifest (splits, labels, groups) is copied unchanged, so the variant trains on exactly the same images.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from cxr_fast.lungs import estimate_lung_field


def lung_crop(img: Image.Image, margin: float) -> tuple[Image.Image, bool]:
    pixels = np.asarray(img)
    h, w = pixels.shape
    ys, xs = np.nonzero(estimate_lung_field(pixels))
    if len(ys) == 0 or np.ptp(ys) < 0.3 * h or np.ptp(xs) < 0.3 * w:
        return img, False
    box = (int(max(xs.min() - margin * w, 0)), int(max(ys.min() - margin * h, 0)),
           int(min(xs.max() + margin * w, w)), int(min(ys.max() + margin * h, h)))
    return img.crop(box), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder made by `cxrfast data prepare --size N`")
    parser.add_argument("out", type=Path, help="new folder for the variant")
    parser.add_argument("--variant", choices=["lung-crop", "equalize"], required=True)
    parser.add_argument("--margin", type=float, default=0.08)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists")
    manifest = pd.read_csv(args.data / "manifest.csv")
    if "cache_path" not in manifest.columns or manifest["cache_path"].isna().any():
        raise SystemExit(f"{args.data}: prepare the data with --size so that every image has a cached copy")
    cropped = 0
    for rel in manifest["cache_path"]:
        img = Image.open(args.data / rel).convert("L")
        if args.variant == "equalize":
            img = ImageOps.equalize(img)
        else:
            img, was_cropped = lung_crop(img, args.margin)
            cropped += was_cropped
        (args.out / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(args.out / rel)
    manifest.to_csv(args.out / "manifest.csv", index=False)
    shutil.copy(args.data / "prepare_report.json", args.out / "prepare_report.json")
    if args.variant == "lung-crop":
        print(f"{cropped} of {len(manifest)} images cropped to their lung field")


if __name__ == "__main__":
    main()
