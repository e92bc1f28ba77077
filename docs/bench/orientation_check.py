"""False alarms and detection of model-free checks for inverted (negative) and turned films, on real chest X-rays.

    .venv/bin/python docs/bench/orientation_check.py [../shared/data]

Reads every film of cxr-dev (886) and lung-masks/images (300) with the toolkit's reader and measures:

- the shipped check, `cxr_fast.data.inversion` (correlation with an upright phantom chest below 0): false alarms on
  the films as they are (each named), detection on their inverted copies, and how often it also fires on copies
  turned by 90°, 180° and 270°;
- two candidate rules for turned films, not shipped: (a) a turned copy of the same phantom chest correlates better
  than the upright one by more than a margin, the smallest margin giving at most 1 % false alarms; (b) vertical
  edges (lung borders, chest wall, spine) outweigh horizontal ones, threshold likewise at 1 % false alarms (a 180°
  turn does not change edge directions, so (b) can only see 90° and 270°);
- the shipped check on synthetic phantoms (every class, 30 each, 256 px and 64 px, with and without text markers),
  which the demo and tests use.
"""

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage as ndi

from cxr_fast import CLASSES
from cxr_fast.data.inversion import _standardised, _upright_chest, upright_correlation
from cxr_fast.data.io import read_image
from cxr_fast.data.synth import make_phantom

TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
MAX_FALSE_ALARMS = 0.01


def turn_gain(image):
    """Rule (a): how much better a turned upright chest matches the image than the upright one."""
    z, chest = _standardised(image), _upright_chest()
    upright = (z * chest).mean()
    return max((z * np.rot90(chest, k)).mean() for k in (1, 2, 3)) - upright


def edge_direction(image):
    """Rule (b): log(horizontal-edge energy / vertical-edge energy) over the central 60 %, at 128 px: below 0 when
    vertical edges dominate, as in an upright film; a 90° turn changes its sign."""
    a = np.asarray(image.resize((128, 128), Image.Resampling.BILINEAR), dtype=np.float64)
    inner = slice(26, 102)
    dy = ndi.gaussian_filter(a, 2, order=(1, 0))[inner, inner]
    dx = ndi.gaussian_filter(a, 2, order=(0, 1))[inner, inner]
    return float(np.log((dy ** 2).sum() / max((dx ** 2).sum(), 1e-12)))


def threshold_at(values, share):
    """The smallest threshold t with at most `share` of `values` above it."""
    return float(np.quantile(values, 1 - share, method="higher"))


def main(data: Path):
    files = sorted((data / "cxr-dev").glob("*/*")) + sorted((data / "lung-masks" / "images").glob("*"))
    films = [read_image(f) for f in files]
    names = [f"{f.parent.parent.name}/{f.parent.name}/{f.name}" for f in files]
    n = len(films)
    print(f"{n} films ({sum('cxr-dev' in s for s in names)} cxr-dev, {sum('lung-masks' in s for s in names)} lung-masks)")

    start = time.perf_counter()
    upright = np.array([upright_correlation(im) for im in films])
    per_image = (time.perf_counter() - start) / n
    inverted = np.array([upright_correlation(ImageOps.invert(im)) for im in films])
    turned = {deg: [im.transpose(t) for im in films] for deg, t in TURNS.items()}
    on_turned = {deg: np.array([upright_correlation(im) for im in ims]) for deg, ims in turned.items()}

    print("\nshipped: inverted when the correlation with an upright phantom chest is below 0"
          f" ({per_image * 1000:.2f} ms per image, after the first)")
    alarms = [names[i] for i in np.flatnonzero(upright < 0)]
    print(f"  false alarms: {len(alarms)}/{n} ({len(alarms) / n:.2%}) {alarms}")
    print(f"  inverted copies flagged: {(inverted < 0).sum()}/{n} ({(inverted < 0).mean():.2%})")
    for deg, c in on_turned.items():
        print(f"  turned {deg}° copies flagged too: {(c < 0).sum()}/{n} ({(c < 0).mean():.2%})")
    print(f"  correlation of the films: 1st percentile {np.percentile(upright, 1):.3f}, median {np.median(upright):.3f}")

    for title, rule, degrees in (("(a) a turned phantom chest matches better by a margin", turn_gain, (90, 180, 270)),
                                 ("(b) horizontal edges outweigh vertical ones", edge_direction, (90, 270))):
        as_is = np.array([rule(im) for im in films])
        t = threshold_at(as_is, MAX_FALSE_ALARMS)
        fired = as_is > t
        print(f"\ncandidate {title}: threshold {t:.3f} (false alarms {fired.sum()}/{n}, {fired.mean():.2%};"
              f" cxr-dev {fired[:886].mean():.2%}, lung-masks {fired[886:].mean():.2%})")
        for deg in degrees:
            hit = np.array([rule(im) for im in turned[deg]]) > t
            print(f"  turned {deg}°: {hit.sum()}/{n} ({hit.mean():.2%})")

    print("\nphantoms (cxr_fast.data.synth), shipped check:")
    for size in (256, 64):
        for rate in (0.0, 1.0):
            c = np.array([upright_correlation(Image.fromarray(make_phantom(label, i, size=size, seed=1,
                                                                           shortcut_rate=rate)[0]))
                          for label in CLASSES for i in range(30)])
            print(f"  {size} px, markers {'on' if rate else 'off'}: {(c < 0).sum()}/{len(c)} flagged, "
                  f"lowest correlation {c.min():.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared" / "data")
