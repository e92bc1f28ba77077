"""Automatic lung-field estimate for chest X-rays that come without a lung mask.

The shortcut audit needs to know where the lungs are. Synthetic phantoms ship their masks; real X-rays
usually do not, so this module estimates the lung field with classical image processing — no training
data, no model, about 40–100 ms per image on a CPU (measured on a busy 2-core machine).

How (all at a working size of 128 × 128, then resized back):

1. Contrast: stretch the 1st–99th percentile to 0..1 and smooth lightly (removes film noise and grain).
2. Basins: the lungs are dark regions *enclosed* by brighter tissue (chest wall, mediastinum, diaphragm,
   clavicles), while the air around the body is dark but reaches the image edge. Grey-level hole filling
   (morphological reconstruction by erosion from the image border) raises every enclosed dark region to
   the level at which it would spill over; "fill − image" is then positive exactly in such basins.
3. Cores: of the basins, keep per side of the image the one with the largest size × depth among those at
   a plausible place (centre within 10–85 % of the height and 12–88 % of the width) and not uniformly
   near-black (mean below 0.1 of the stretched range = air between the body and a bright detector frame).
   If one side found nothing or a sliver, its core is the mirror image of the other side's, across the
   spine (the brightest central column), kept where the image is as dark as that lung.
4. Borders: a watershed on the gradient magnitude grows each core out to the strongest edge around it
   (rib cage, heart border, diaphragm). Background seeds are the image border, everything farther than
   12 % of the image side from a core, and anything much brighter than the lungs (bone, abdomen).
5. Clean-up: opening (drops thin spurs), hole filling.

Measured quality (Dice against hand-drawn or generated masks; see tests/test_lungs.py):

- 300 real PA radiographs in ``../shared/data/lung-masks`` (Montgomery + Shenzhen, 320 px): mean 0.896,
  median 0.907, 10th percentile 0.85, worst 0.46 (Montgomery 0.896, Shenzhen 0.895).
- Synthetic phantoms from ``cxr_fast.data.synth`` (90 images, 256 px): mean 0.918, worst 0.87; at 64 px
  mean 0.92, worst 0.82.

Known weaknesses: large pleural effusions or dense consolidations at the lung edge are bright, so they
fall outside the estimate (exactly where a lung-disease model should look — the audit counts that
evidence as "outside"; read its verdict with that in mind). Lungs that touch the image edge can leak into
the air outside the body. Children, AP/supine films and lateral views were not measured.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from cxr_fast.errors import CxrFastError

__all__ = ["estimate_lung_field", "dice", "mask_coverage", "resize_mask"]

WORK_SIDE = 128  # the estimate is computed at this size: fast, and the lungs are large structures
SMOOTH_SIGMA = 1.0  # px at WORK_SIDE: smoothing before finding basins
GRADIENT_SIGMA = 1.0  # px at WORK_SIDE: scale of the edges the watershed stops at
BASIN_DEPTH_FRAC = 0.02  # a pixel is in a basin when fill − image > this × (99.5th pct of the depth)
AIR_LEVEL = 0.1  # basins darker than this on average (stretched 0..1) are air outside the body
BACKGROUND_DIST = 0.12  # fraction of the side: farther than this from a core is background
BRIGHT_FRAC = 0.8  # brighter than lung level + this × (1 − lung level) is background (bone, abdomen)
MIRROR_RATIO = 0.3  # a side with a core smaller than this × the other side's gets the mirror image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks: 2|A∩B| / (|A| + |B|); 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise CxrFastError(f"lungs: masks of different shapes {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def mask_coverage(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true lung field that the estimate covers (recall); 1.0 when the truth is empty."""
    estimate = np.asarray(estimate, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    n = int(truth.sum())
    return 1.0 if n == 0 else float(np.logical_and(estimate, truth).sum() / n)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to ``shape`` (e.g. to the model's input size, to match an attribution map)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask.copy()
    return _resize(mask.astype(np.float64), tuple(shape), order=1) > 0.5


def _resize(arr: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    zoom = (shape[0] / arr.shape[0], shape[1] / arr.shape[1])
    return ndi.zoom(arr, zoom, order=order, grid_mode=True, mode="nearest")


def _fill_basins(img: np.ndarray) -> np.ndarray:
    """Grey-level hole filling: each pixel rises to the lowest level at which it connects to the border.

    Morphological reconstruction by erosion, seeded at the border: repeated 3 × 3 erosion, never below
    the image. At 128 px it converges in a few dozen to a few hundred cheap steps.
    """
    marker = np.full_like(img, img.max())
    marker[0], marker[-1] = img[0], img[-1]
    marker[:, 0], marker[:, -1] = img[:, 0], img[:, -1]
    for _ in range(4 * img.size):  # a hard bound; the loop ends far earlier
        grown = np.maximum(ndi.grey_erosion(marker, size=3), img)
        if np.array_equal(grown, marker):
            break
        marker = grown
    return marker


def _pick_cores(basins: np.ndarray, img: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """The most lung-like basin on each side of the image (see the module docstring, step 3)."""
    labels, n = ndi.label(basins)
    keep = np.zeros(n + 1, dtype=bool)
    if n == 0:
        return keep[labels]
    index = np.arange(1, n + 1)
    size = ndi.sum(basins, labels, index)
    centre = np.array(ndi.center_of_mass(basins, labels, index)).reshape(-1, 2) / np.array(img.shape)
    mean = ndi.mean(img, labels, index)
    deepest = ndi.maximum(depth, labels, index)
    best: dict[int, tuple[float, int]] = {}
    for i in range(n):
        cy, cx = centre[i]
        if not (0.10 < cy < 0.85 and 0.12 < cx < 0.88) or mean[i] < AIR_LEVEL:
            continue
        side = int(cx >= 0.5)
        score = size[i] * deepest[i]
        if side not in best or score > best[side][0]:
            best[side] = (score, i + 1)
    for _, label in best.values():
        keep[label] = True
    return keep[labels]


def _mirror_missing_side(cores: np.ndarray, img: np.ndarray) -> np.ndarray:
    """If one side has no core (or a sliver), mirror the other side's across the spine."""
    h, w = img.shape
    half = w // 2
    left, right = int(cores[:, :half].sum()), int(cores[:, half:].sum())
    if max(left, right) == 0 or min(left, right) >= MIRROR_RATIO * max(left, right):
        return cores
    # The spine is the brightest column in the middle of the chest.
    columns = img[int(0.2 * h) : int(0.8 * h), int(0.35 * w) : int(0.65 * w)].mean(axis=0)
    spine = int(0.35 * w) + int(np.argmax(columns))
    found = cores.copy()
    if left > right:
        found[:, half:] = False
    else:
        found[:, :half] = False
    mirrored = _shifted(found[:, ::-1], 2 * spine - (w - 1))
    lung_level = np.percentile(img[found], 75)
    return cores | (mirrored & (img <= lung_level))


def _shifted(mask: np.ndarray, columns: int) -> np.ndarray:
    """``mask`` moved right by ``columns`` (left when negative), what leaves the image lost. np.roll would bring it
    back in at the other edge, where the dark air beside the chest passes for lung."""
    out = np.zeros_like(mask)
    if abs(columns) >= mask.shape[1]:
        return out
    if columns >= 0:
        out[:, columns:] = mask[:, : mask.shape[1] - columns]
    else:
        out[:, :columns] = mask[:, -columns:]
    return out


def estimate_lung_field(img: np.ndarray) -> np.ndarray:
    """Estimate the lung field of a frontal chest X-ray.

    Args:
        img: ``[H, W]`` grayscale image, uint8 (any numeric type works; only the ordering of the grey levels
            matters), bright = dense, as radiographs are displayed.

    Returns:
        ``[H, W]`` bool mask, True inside either lung (both lungs, as one mask).
    """
    img = np.asarray(img)
    if img.ndim != 2 or min(img.shape) < 16:
        raise CxrFastError(
            f"lungs: expected a 2-D grayscale image of at least 16 × 16 px, got shape {img.shape}"
        )
    height, width = img.shape
    n = WORK_SIDE
    small = _resize(img.astype(np.float64), (n, n), order=1)
    lo, hi = np.percentile(small, [1, 99])
    small = np.clip((small - lo) / max(hi - lo, 1e-6), 0, 1)
    small = ndi.gaussian_filter(small, SMOOTH_SIGMA)

    depth = _fill_basins(small) - small
    basins = depth > BASIN_DEPTH_FRAC * max(np.percentile(depth, 99.5), 1e-6)
    cores = _mirror_missing_side(_pick_cores(basins, small, depth), small)
    if not cores.any():
        return np.zeros((height, width), dtype=bool)

    # Watershed seeds: 1 = background, 2.. = one label per core.
    core_labels, _ = ndi.label(cores)
    seeds = np.zeros((n, n), dtype=np.int16)
    lung_level = np.percentile(small[cores], 90)
    background = ndi.distance_transform_edt(~cores) > BACKGROUND_DIST * n
    background |= small > lung_level + BRIGHT_FRAC * (1 - lung_level)
    background[[0, -1], :] = True
    background[:, [0, -1]] = True
    seeds[background & ~cores] = 1
    seeds[cores] = 1 + core_labels[cores]
    gradient = ndi.gaussian_gradient_magnitude(small, GRADIENT_SIGMA)
    gradient = (gradient / max(gradient.max(), 1e-12) * 65535).astype(np.uint16)
    lungs = ndi.watershed_ift(gradient, seeds) > 1

    lungs = ndi.binary_fill_holes(ndi.binary_opening(lungs, iterations=1))
    return _resize(lungs.astype(np.float64), (height, width), order=1) > 0.5
