"""Shortcut audit: where does a model's evidence lie — in the lungs, or on borders, corners and markers?

Input is an attribution map per image (e.g. :func:`cxr_fast.attribution.occlusion_maps` for the predicted
class) and a lung mask (ground truth for phantoms, :func:`cxr_fast.lungs.estimate_lung_field` for real
X-rays). Only *positive* attribution counts as evidence for the class; negative attribution (evidence
against) is ignored by the shares.

Why densities and not just shares: the lungs cover only about 25–40 % of a chest X-ray, so even a map
that spreads evidence evenly over the image takes 60–75 % of it "from outside the lungs". A share alone
would call every diffuse map a shortcut. The audit therefore also compares each region's share of the
evidence with its share of the area:

- ``density_inside = share_inside / area_inside`` (1 = as much as an even spread would give);
- ``lung_preference = density_inside / density_outside`` (1 = no preference for the lungs; ∞ = all
  evidence inside; 0 = all outside).

Verdict thresholds (per predicted class, on the class's pooled means):

- ``lung_preference < 0.8`` — evidence is clearly denser outside the lungs than inside, i.e. the lungs get
  *less* than their area's share (with lungs at 25–40 % of the image: less than 21–35 % of the evidence) —
  "likely shortcut".
- ``0.8 ≤ lung_preference < 1`` — a little denser outside: within what a noisy, even map gives, so only
  "possible shortcut: look at their heatmaps".
- ``1 ≤ lung_preference < 2`` — "diffuse": the evidence is spread about as an even map would be; no clear
  shortcut, but not clearly based on the lungs either.
- ``lung_preference ≥ 2`` — "mostly inside the lungs, no sign of a shortcut". With lungs at 25–40 % of
  the image this means at least 40–57 % of the evidence inside them. Occlusion maps are blurred by their
  window, so a model that looks only at the lungs still shows some evidence just outside their edge; 2
  leaves room for that.
- Independently, a text marker (when its box is known) taking ≥ 15 % of the evidence, and at least 4× its
  box's share of the image, is flagged as a likely shortcut. A marker box covers about 1 % of the image;
  `interpret` grows it by half an occlusion window, to the map's resolution, so that it covers about 4 %, and
  15 % is still about 4× an even spread (a large --window grows the box: the 4× keeps the flag about density).
  A marker share of at least 2× its area, below that flag, is a "possible shortcut: look at their heatmaps".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cxr_fast import CLASSES
from cxr_fast.attribution import model_device
from cxr_fast.errors import CxrFastError

__all__ = [
    "parse_box",
    "region_masks",
    "attribution_shares",
    "audit_summary",
    "verdict",
    "deletion_curve",
    "SHORTCUT_PREFERENCE",
    "EVEN_PREFERENCE",
    "MIN_IMAGES",
    "INSIDE_PREFERENCE",
    "MARKER_SHARE",
    "MARKER_DENSITY",
]

SHORTCUT_PREFERENCE = 0.8  # lung_preference below this: evidence clearly denser outside the lungs → likely shortcut
EVEN_PREFERENCE = 1.0  # what an even spread gives; from SHORTCUT_PREFERENCE to here → possible shortcut
INSIDE_PREFERENCE = 2.0  # lung_preference at or above this: evidence concentrates in the lungs
MARKER_SHARE = 0.15  # share of evidence in a text-marker box (grown to ≈ 4 % of the image) at or above this → likely shortcut
MARKER_DENSITY = 4.0  # ... and at least this many times the box's share of the image (a large --window grows the box)
MARKER_WATCH_DENSITY = 2.0  # below the flag, a marker share at least this many times its area → "possible shortcut"
MIN_IMAGES = 10  # a verdict on fewer images with a lung field says that it rests on few
MIN_POSITIVE_FRACTION = 0.1  # below this share of the map's absolute mass, an image has no evidence to locate


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def parse_box(box) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` from a tuple or a ``"x0,y0,x1,y1"`` string (x1/y1 excluded); None/"" → None."""
    if box is None:
        return None
    if isinstance(box, float) and math.isnan(box):  # an empty cell read by pandas
        return None
    if isinstance(box, str):
        if not box.strip():
            return None
        box = box.split(",")
    try:
        x0, y0, x1, y1 = (int(float(v)) for v in box)
    except (TypeError, ValueError) as e:
        raise CxrFastError(f"audit: marker box must be 'x0,y0,x1,y1', got {box!r}") from e
    return x0, y0, x1, y1


def region_masks(
    shape: tuple[int, int], border_frac: float = 0.1, corner_frac: float | None = None
) -> dict[str, np.ndarray]:
    """Boolean masks of the image border band and the four corner squares.

    The border band is ``border_frac`` of the height (top/bottom) and width (left/right) deep: where
    collimator edges, rulers and hospital labels sit. The corners are squares of ``corner_frac`` (default
    2 × ``border_frac``) of each side: where side markers ("L", "R", "PA ERECT") usually are.
    """
    h, w = shape
    corner_frac = 2 * border_frac if corner_frac is None else corner_frac
    bh, bw = int(round(border_frac * h)), int(round(border_frac * w))
    border = np.zeros(shape, dtype=bool)
    border[:bh], border[h - bh :], border[:, :bw], border[:, w - bw :] = True, True, True, True
    ch, cw = int(round(corner_frac * h)), int(round(corner_frac * w))
    corners = np.zeros(shape, dtype=bool)
    for ys in (slice(0, ch), slice(h - ch, h)):
        for xs in (slice(0, cw), slice(w - cw, w)):
            corners[ys, xs] = True
    return {"border": border, "corners": corners}


def attribution_shares(
    attr,
    lung_mask,
    marker_box=None,
    border_frac: float = 0.1,
    corner_frac: float | None = None,
) -> dict:
    """Where one image's positive evidence lies.

    Args:
        attr: ``[H, W]`` attribution map (``[C, H, W]`` is summed over channels).
        lung_mask: ``[H, W]`` bool, True inside the lungs.
        marker_box: optional ``(x0, y0, x1, y1)`` or ``"x0,y0,x1,y1"`` of a text marker.
        border_frac, corner_frac: see :func:`region_masks`.

    Returns:
        dict of floats: ``share_*`` (fraction of the positive attribution in the region: ``inside`` +
        ``outside`` = 1; ``border``, ``corners``, ``marker`` overlap them), ``area_*`` (fraction of the
        image), ``density_*`` (share / area: 1 = even spread), ``lung_preference`` (density inside /
        density outside), ``positive_total``, ``negative_total``, ``positive_fraction`` (positive / absolute
        mass) and ``has_marker``. Shares are NaN when the map has no positive value; ``*_marker`` are NaN
        without a marker box.
    """
    a = _to_numpy(attr).astype(np.float64)
    if a.ndim == 3:
        a = a.sum(axis=0)
    lungs = _to_numpy(lung_mask).astype(bool)
    if a.shape != lungs.shape:
        raise CxrFastError(f"audit: attribution map {a.shape} and lung mask {lungs.shape} differ in size")
    positive = np.clip(np.nan_to_num(a), 0, None)
    total = float(positive.sum())
    negative_total = float(-np.clip(np.nan_to_num(a), None, 0).sum())
    regions = {"inside": lungs, "outside": ~lungs, **region_masks(a.shape, border_frac, corner_frac)}
    box = parse_box(marker_box)
    if box is not None:
        x0, y0, x1, y1 = box
        marker = np.zeros(a.shape, dtype=bool)
        marker[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
        regions["marker"] = marker

    out: dict = {
        "positive_total": total,
        "negative_total": negative_total,
        "positive_fraction": total / (total + negative_total) if total + negative_total > 0 else math.nan,
        "has_marker": box is not None,
    }
    for name, mask in regions.items():
        area = float(mask.mean())
        share = float(positive[mask].sum() / total) if total > 0 else math.nan
        out[f"share_{name}"] = share
        out[f"area_{name}"] = area
        out[f"density_{name}"] = share / area if area > 0 else math.nan
    if box is None:
        out.update(share_marker=math.nan, area_marker=math.nan, density_marker=math.nan)
    out["lung_preference"] = _preference(out["share_inside"], out["area_inside"])
    return out


def _preference(share_inside: float, area_inside: float) -> float:
    """(share_in / area_in) / (share_out / area_out); inf when all evidence is inside, NaN if undefined."""
    if math.isnan(share_inside) or not 0 < area_inside < 1:
        return math.nan
    share_outside = 1 - share_inside
    if share_outside <= 0:
        return math.inf
    return (share_inside / area_inside) / (share_outside / (1 - area_inside))


def _class_name(v, class_names: Sequence[str]) -> str:
    if isinstance(v, str):
        return v
    return class_names[int(v)]


def _group_stats(rows: list[dict], correct: list[bool] | None) -> dict:
    """Pooled statistics of a group of images (NaN-aware: images without positive evidence are skipped)."""

    def col(key):
        return np.array([r.get(key, math.nan) for r in rows], dtype=np.float64)

    share_in, area_in = col("share_inside"), col("area_inside")
    # An image whose map is (almost) all negative has no evidence to locate: occluding anything makes the model
    # *more* sure of the class (e.g. "Normal", predicted from the absence of findings). Its few positive pixels
    # would decide the shares by noise, so such images are counted but left out of the shares.
    fraction = col("positive_fraction")
    usable = ~np.isnan(share_in) & ~(fraction < MIN_POSITIVE_FRACTION)
    # An image without a lung field (the estimate failed: an empty mask) has no inside to measure: it is left out of
    # the lung figures, not counted as evidence "outside the lungs", but its border and marker shares still count.
    with_lungs = usable & (area_in > 0) & (area_in < 1)

    def mean(v, rows_=usable):
        v = v[rows_ & ~np.isnan(v)]
        return float(v.mean()) if v.size else math.nan

    def median(v, rows_=usable):
        v = v[rows_ & ~np.isnan(v)]
        return float(np.median(v)) if v.size else math.nan

    pref = col("lung_preference")
    stats = {
        "n": len(rows),
        "n_with_evidence": int(usable.sum()),
        "n_with_lungs": int(with_lungs.sum()),
        "mean_share_inside": mean(share_in, with_lungs),
        "mean_share_outside": mean(col("share_outside"), with_lungs),
        "median_share_outside": median(col("share_outside"), with_lungs),
        "mean_share_border": mean(col("share_border")),
        "mean_share_corners": mean(col("share_corners")),
        "mean_area_inside": mean(area_in, with_lungs),
        "mean_area_border": mean(col("area_border")),
        "n_with_marker": int(sum(bool(r.get("has_marker")) for r in rows)),
        "mean_share_marker": mean(col("share_marker")),
        "mean_area_marker": mean(col("area_marker")),
        # Share of images whose own evidence is denser outside the lungs than inside.
        "frac_images_outside_dense": (
            float(np.mean(pref[with_lungs] < EVEN_PREFERENCE)) if with_lungs.any() else math.nan
        ),
    }
    # Pooled over the group (means of shares and areas), so one image with tiny lungs cannot dominate.
    stats["lung_preference"] = _preference(stats["mean_share_inside"], stats["mean_area_inside"])
    stats["accuracy"] = float(np.mean(correct)) if correct else math.nan
    return stats


def audit_summary(
    rows: list[dict],
    labels: Sequence | None = None,
    preds: Sequence | None = None,
    class_names: Sequence[str] = CLASSES,
    sites: Sequence[str] | None = None,
) -> dict:
    """Summaries of :func:`attribution_shares` rows, overall, per class and, given ``sites`` (one per row) naming
    two or more, per site under ``by_site``: a hospital whose films carry a marker or a border can be a shortcut
    of its own, seen at that site only.

    Images are grouped by their *predicted* class (the evidence behind "COVID-19 predictions") when
    ``preds`` is given, else by ``labels``. Labels and predictions may be class indices or names.

    Returns ``{"overall": stats, "by_class": {name: stats}, "grouped_by": "prediction"|"label"|None}``,
    where stats holds counts, mean/median shares, mean areas, ``lung_preference`` (pooled), the fraction
    of images whose evidence is denser outside the lungs, and the accuracy when both labels and preds are
    given.
    """
    n = len(rows)
    for name, seq in (("labels", labels), ("preds", preds)):
        if seq is not None and len(seq) != n:
            raise CxrFastError(f"audit: {len(seq)} {name} for {n} attribution rows")
    names_true = [_class_name(v, class_names) for v in labels] if labels is not None else None
    names_pred = [_class_name(v, class_names) for v in preds] if preds is not None else None
    correct = [t == p for t, p in zip(names_true, names_pred)] if names_true and names_pred else None

    group = names_pred if names_pred is not None else names_true
    summary: dict = {
        "overall": _group_stats(rows, correct),
        "by_class": {},
        "grouped_by": "prediction" if names_pred is not None else ("label" if names_true else None),
    }
    if group is not None:
        order = [c for c in class_names if c in group] + sorted(set(group) - set(class_names))
        summary["by_class"] = _stats_by(rows, group, order, correct)
    if sites is not None and len(set(sites)) >= 2:
        if len(sites) != n:
            raise CxrFastError(f"audit: {len(sites)} sites for {n} attribution rows")
        summary["by_site"] = _stats_by(rows, sites, sorted(set(sites)), correct)
    return summary


def _stats_by(rows: list[dict], keys: Sequence, order: Sequence, correct: list[bool] | None) -> dict:
    """`_group_stats` of the rows sharing each key (one key per row), in ``order``."""
    stats = {}
    for key in order:
        idx = [i for i, k in enumerate(keys) if k == key]
        stats[key] = _group_stats([rows[i] for i in idx], [correct[i] for i in idx] if correct else None)
    return stats


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def _sentence(who: str, s: dict) -> str:
    if s["n"] == 0:
        return f"{who}: nothing to audit."
    missing = s["n"] - s["n_with_evidence"]
    if s["n_with_evidence"] == 0:
        return (f"{who}: no positive evidence to audit in {missing} of {s['n']} — occluding any region makes the "
                f"model more sure of them, so occlusion cannot show where their evidence lies (look at the "
                f"negative areas of their heatmaps, or try --baseline mean).")
    if missing:
        who = f"{who} ({missing} of {s['n']} without positive evidence left out)"
    parts = []
    if s["n_with_marker"] > 0 and not math.isnan(s["mean_share_marker"]):
        share, area = s["mean_share_marker"], s["mean_area_marker"]
        where = (f"{who} with a text marker ({s['n_with_marker']} of {s['n']}) take {_pct(share)} of their evidence "
                 f"from the marker and the half-window around it ({_pct(area)} of the image)")
        # Flagged only when the marker's evidence is dense, not just large: a large --window grows the audited box.
        if share >= max(MARKER_SHARE, MARKER_DENSITY * area):
            parts.append(f"{where} — likely shortcut.")
        elif share >= MARKER_WATCH_DENSITY * area:  # below the flag, but more than an even spread gives: said
            parts.append(f"{where}, more than its share — possible shortcut: look at their heatmaps.")
    outside, inside, area = s["mean_share_outside"], s["mean_share_inside"], s["mean_area_inside"]
    pref = s["lung_preference"]
    if math.isnan(pref):  # no image with a lung field to measure against: say so, never "no sign of a shortcut"
        parts.append(
            f"{who}: no lung field was found, so whether their evidence lies in the lungs is not audited; "
            f"{_pct(s['mean_share_border'])} of it lies in the image border band and {_pct(s['mean_share_corners'])} "
            f"in the corners."
        )
        return " ".join(parts)
    no_lungs = s["n_with_evidence"] - s.get("n_with_lungs", s["n_with_evidence"])
    if no_lungs:
        who = f"{who} ({no_lungs} without a lung field left out)"
    if pref < SHORTCUT_PREFERENCE:
        border = ""
        if not math.isnan(s["mean_share_border"]) and s["mean_share_border"] >= 0.5:
            border = f" ({_pct(s['mean_share_border'])} of all evidence lies in the image border band)"
        parts.append(
            f"{who} take {_pct(outside)} of their evidence from outside the lungs{border}; the lungs cover "
            f"{_pct(area)} of the image but get only {_pct(inside)} — likely shortcut."
        )
    elif pref < EVEN_PREFERENCE:
        # A noisy map that is even on the whole lands either side of 1: below it, but not clearly, is worth a look.
        parts.append(
            f"{who} take {_pct(outside)} of their evidence from outside the lungs, a little more than an even "
            f"spread would give ({_pct(1 - area)}) — possible shortcut: look at their heatmaps."
        )
    elif pref < INSIDE_PREFERENCE:
        parts.append(
            f"{who} take {_pct(outside)} of their evidence from outside the lungs, about what an even "
            f"spread would give ({_pct(1 - area)}) — diffuse evidence: no clear shortcut, but not clearly "
            f"based on the lungs either."
        )
    elif parts:
        parts.append(f"Apart from that, {_pct(inside)} of their evidence lies inside the lungs.")
    else:
        parts.append(
            f"{who} take {_pct(inside)} of their evidence from inside the lungs (which cover {_pct(area)} "
            f"of the image) — mostly inside the lungs, no sign of a shortcut."
        )
    with_lungs = s.get("n_with_lungs", s["n_with_evidence"])
    if with_lungs < MIN_IMAGES:
        parts.append(f"Only {with_lungs} image{'s' if with_lungs != 1 else ''} with a lung field: too few to be sure.")
    return " ".join(parts)


POOLING_HIDES = "Pooled, that hides the shortcut flagged above for"


def flags_shortcut(line: str) -> bool:
    """Whether a line of `verdict` flags a shortcut (by its flags' own words), the pooled line that says pooling hides
    one included: the gallery highlights these lines."""
    return "likely shortcut" in line or "possible shortcut" in line or POOLING_HIDES in line


def verdict(summary: dict) -> str:
    """Plain sentences, one line per class, then per site (with sites), then one for all images, from
    :func:`audit_summary`."""
    noun = "predictions" if summary.get("grouped_by") == "prediction" else "images"
    groups = {f"{cls} {noun}": stats for cls, stats in summary.get("by_class", {}).items()}
    groups |= {f"Images from {site}": stats for site, stats in summary.get("by_site", {}).items()}
    lines = [_sentence(who, stats) for who, stats in groups.items()]
    flagged = [who.replace("Images from", "images from") for who, line in zip(groups, lines, strict=True)
               if flags_shortcut(line)]
    overall = _sentence("All images", summary["overall"])
    if flagged and not flags_shortcut(overall):
        # the last line is the one read as the summary: pooling must not hide a flagged class or site
        names = flagged[0] if len(flagged) == 1 else f"{', '.join(flagged[:-1])} and {flagged[-1]}"
        overall += f" {POOLING_HIDES} {names}."
    return "\n".join([*lines, overall])


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    # np.trapz was renamed np.trapezoid in numpy 2; the formula is one line either way.
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def deletion_curve(
    model: nn.Module,
    x: Tensor,
    attr,
    target: int,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Faithfulness check: delete the most-attributed pixels first and watch the class probability fall.

    Pixels (all channels together) are set to ``baseline`` in ``steps`` equal steps, from 0 % to 100 %,
    in order of decreasing attribution, and — for comparison — in a random order (``seed``). A faithful
    map makes the target's softmax probability drop faster than random deletion: a lower area under the
    curve (``attributed_auc < random_auc``).

    Returns ``dict(fractions, attributed_curve, random_curve, attributed_auc, random_auc)`` (numpy
    arrays of length ``steps + 1`` and floats; AUC by the trapezoid rule over fractions 0..1).
    """
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise CxrFastError(f"audit: expected one image [C,H,W], got shape {tuple(x.shape)}")
    x = x.to(model_device(model))  # the deleted copies are made where the model runs
    if steps < 1:
        raise CxrFastError(f"audit: deletion needs at least 1 step, got {steps}")
    _, h, w = x.shape
    a = torch.as_tensor(_to_numpy(attr), dtype=torch.float64)
    if a.dim() == 3:
        a = a.sum(dim=0)
    if tuple(a.shape) != (h, w):
        raise CxrFastError(f"audit: attribution map {tuple(a.shape)} does not match the image {(h, w)}")

    n_pixels = h * w
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = torch.as_tensor(np.round(fractions * n_pixels).astype(np.int64))
    # rank[p] = position of pixel p in the deletion order; a pixel is deleted when rank < count.
    attributed_order = torch.argsort(
        torch.nan_to_num(a.flatten(), nan=-math.inf), descending=True, stable=True
    )
    random_order = torch.randperm(n_pixels, generator=torch.Generator().manual_seed(seed))
    base = torch.broadcast_to(torch.as_tensor(baseline, dtype=x.dtype, device=x.device), x.shape)

    def curve(order: Tensor) -> np.ndarray:
        rank = torch.empty(n_pixels, dtype=torch.long)
        rank[order] = torch.arange(n_pixels)
        rank = rank.view(1, 1, h, w).to(x.device)
        probs = []
        with torch.no_grad():
            for start in range(0, len(counts), batch_size):
                c = counts[start : start + batch_size].view(-1, 1, 1, 1).to(x.device)
                images = torch.where(rank < c, base[None], x[None])
                probs.append(torch.softmax(model(images).float(), dim=1)[:, target].cpu())
        return torch.cat(probs).numpy().astype(np.float64)

    was_training = model.training
    model.eval()
    try:
        attributed, random = curve(attributed_order), curve(random_order)
    finally:
        model.train(was_training)
    return {
        "fractions": fractions,
        "attributed_curve": attributed,
        "random_curve": random,
        "attributed_auc": _trapezoid(attributed, fractions),
        "random_auc": _trapezoid(random, fractions),
    }
