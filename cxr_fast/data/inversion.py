"""Is this grey image an inverted (negative) chest film? A model-free check that predict and serve run on every image.

A film exported from a PACS with the wrong photometric setting, or scanned as a negative, shows bright lungs and dark
bones. The model has never seen one and still answers, sometimes confidently; the grey reading alone cannot tell it
apart from a film, so predict and serve flag it in the `warning` column, as they flag colour images.

The rule: shrink the image to 24 × 24 and correlate it (Pearson) with an upright frontal chest drawn the same size
(the mean of a few synthetic phantoms from `cxr_fast.data.synth`: dark air around a bright body, two dark lungs either
side of a bright spine and mediastinum). A film correlates positively with it; its negative, whose every grey level is
reversed, correlates exactly as strongly negatively. So a correlation below 0 says "negative film". The threshold is
not fitted: 0 is where a film and its own negative meet.

Measured (docs/bench/orientation_check.py, docs/benchmarks.md): 1 of 1186 real films flagged as they are (a close
crop whose borders are bright: cxr-dev `Covid-19/F63AB6CE-...jpg`), 1185 of their 1186 inverted copies flagged, no
phantom flagged. At 24 px only the large bright and dark masses count, so film grain, text markers and lesions do
not move the result.

Not checked: films turned by 90°, 180° or 270°. The same kind of rule (and a gradient-direction one) could not tell a
turned film from an upright one at under 1 % false alarms on these films (see docs/benchmarks.md); such a film is
flagged only when it also correlates negatively (11-19 % of the turned copies).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

SIDE = 24  # the size both are compared at: large bright/dark masses only (body, lungs, mediastinum, diaphragm)


def _standardised(image: Image.Image) -> np.ndarray:
    small = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    return (small - small.mean()) / max(small.std(), 1e-9)  # a flat image correlates 0 with anything


@cache
def _upright_chest() -> np.ndarray:
    # Drawn, not learned: the phantoms are shapes, so no real patient's film is part of the product. Several phantoms,
    # averaged, so that no one phantom's lesion or tilt matters.
    from cxr_fast import CLASSES
    from cxr_fast.data.synth import make_phantom

    mean = np.mean([make_phantom(label, index, size=128)[0] for label in CLASSES for index in range(4)], axis=0)
    return _standardised(Image.fromarray(mean.round().astype(np.uint8)))


def upright_correlation(image: Image.Image) -> float:
    """Pearson correlation, at 24 × 24, of a grey image with an upright frontal chest film: above 0 for 1185 of 1186
    real films, below 0 for their negatives (see the module docstring)."""
    return float((_standardised(image) * _upright_chest()).mean())


def inverted_warning(upright: float) -> str | None:
    """The warning for an image whose `upright_correlation` says it looks like a negative chest film; None for one
    that does not (a number, as `colour_warning` takes one: prepare keeps it in the manifest for evaluate)."""
    if not upright < 0:  # NaN (not measured) makes no claim
        return None
    return ("looks like an inverted (negative) film, bright where a chest film is dark, or is no upright frontal chest "
            "film; the prediction is not to be trusted")
