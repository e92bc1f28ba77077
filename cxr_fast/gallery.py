"""Figures and the self-contained HTML gallery of `cxrfast interpret` (drawing only; maps come computed)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from cxr_fast.plots import literal  # noqa: E402
from cxr_fast.report import DISCLAIMER, html_table  # noqa: E402


def _signed_limit(maps: Sequence[np.ndarray]) -> float:
    """One symmetric colour scale for all panels of an image, robust to a single hot pixel."""
    values = np.abs(np.concatenate([m.ravel() for m in maps]))
    limit = float(np.quantile(values, 0.995)) if values.size else 0.0
    return limit if limit > 0 else 1.0


METHOD_UNITS = {"occlusion": "occlusion (logit change)", "integrated gradients": "integrated gradients (logit)",
                "Grad-CAM": "Grad-CAM (class activation, relative)"}


def method_of(map_name: str) -> str:
    """'occlusion → Normal (true)' → 'occlusion'; a name without an arrow is an occlusion map (predict's)."""
    return map_name.split(" → ")[0] if " → " in map_name else "occlusion"


def attribution_figure(image: np.ndarray, maps: Mapping[str, np.ndarray], title: str,
                       lung_mask: np.ndarray | None = None, marker_box=None) -> Figure:
    """The X-ray, then each attribution map blended over it with a signed colour bar (red = evidence for the
    class, blue = against), as in the study's occlusion figures. The lung outline and any marker box are drawn."""
    n = 1 + len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.1 * n + 0.6, 3.5), dpi=100)
    axes = np.atleast_1d(axes)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("X-ray", fontsize=9)
    # Each method on its own scale and colour bar: their units differ (Grad-CAM's values can be ten times
    # occlusion's), and one shared scale would wash out every map but the largest.
    by_method: dict[str, list[int]] = {}
    for i, name in enumerate(maps):
        by_method.setdefault(method_of(name), []).append(i)
    attrs = list(maps.values())
    for method, indices in by_method.items():
        limit = _signed_limit([attrs[i] for i in indices])
        im = None
        for i in indices:
            ax, name = axes[1 + i], list(maps)[i]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            im = ax.imshow(attrs[i], cmap="bwr", vmin=-limit, vmax=limit, alpha=0.55)
            ax.set_title(literal(name) if np.any(attrs[i]) else f"{literal(name)}\n(all zero: no signal)", fontsize=9)
        bar = fig.colorbar(im, ax=[axes[1 + i] for i in indices], fraction=0.025, pad=0.02)
        bar.set_label(METHOD_UNITS.get(method, "attribution"), fontsize=8)
    for ax in axes:
        if lung_mask is not None and lung_mask.any():
            ax.contour(lung_mask.astype(float), levels=[0.5], colors="lime", linewidths=0.7)
        if marker_box is not None:
            x0, y0, x1, y1 = marker_box
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(literal(title), fontsize=10)
    return fig


def deletion_figure(curves: Mapping[str, np.ndarray | float]) -> Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot(curves["fractions"], curves["attributed_curve"], marker="o", ms=3,
            label=f"most attributed first (area {curves['attributed_auc']:.3f})")
    ax.plot(curves["fractions"], curves["random_curve"], marker="o", ms=3,
            label=f"random order (area {curves['random_auc']:.3f})")
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("probability of the predicted class")
    # the curves are a mean over a few images: say how few, as a reader weighs two curves 0.02 apart by it
    of = f", mean of {curves['images']} images" if "images" in curves else ""
    ax.set_title(f"Deletion check (faithfulness{of})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 12px; color: #222; }
.verdict { padding: 10px 14px; border-radius: 8px; margin: 8px 0; background: #eef6ee; }
.verdict.warn { background: #fff3cd; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { width: 100%; height: auto; } figcaption { font-size: .85rem; color: #555; }
table { border-collapse: collapse; font-size: .9rem; } td, th { padding: 4px 8px; border-bottom: 1px solid #ddd; }
.disclaimer { font-size: .85rem; color: #555; }
"""


def write_gallery(path: Path, title: str, verdicts: Sequence[tuple[str, bool]], sections: Sequence[tuple[str, str, list]],
                  tables: Sequence[tuple[str, list[dict]]] = ()) -> Path:
    """Self-contained gallery page: verdicts (text, is_warning), tables, then sections of (heading, text,
    [(caption, png bytes)] or [(caption, png bytes, link to a full-size copy)])."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
             f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title><style>{CSS}</style>"
             f"</head><body><h1>{html.escape(title)}</h1><p class='disclaimer'>{html.escape(DISCLAIMER)}</p>"]
    for text, warn in verdicts:
        parts.append(f"<div class='verdict{' warn' if warn else ''}'>{html.escape(text)}</div>")
    for heading, rows in tables:
        if not rows:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><div style='overflow-x:auto'>{html_table(rows)}</div>")
    for heading, text, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p><div class='grid'>")
        for caption, png, *link in images:
            img = f"<img src='{_data_uri(png)}' alt='{html.escape(caption)}'>"
            if link:  # the grid shrinks a figure's text: a click opens it full size
                # the file is named after the image: quoted, its # or ? is part of the name, not a fragment or query
                img = f"<a href='{html.escape(quote(link[0]))}' title='open full size'>{img}</a>"
            parts.append(f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    path.write_text("".join(parts), encoding="utf-8")
    return path


