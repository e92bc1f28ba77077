"""Figures for evaluation, comparison and training reports.

Each function takes arrays or dicts computed elsewhere (`cxr_fast.metrics`, `cxr_fast.calibration`, a
training history) and returns a `matplotlib.figure.Figure`. Figures are built directly, not through pyplot,
so nothing depends on the interactive backend and no figure stays open in a global registry; save them
with `fig.savefig(...)` or hand them to `cxr_fast.report.write_report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from cxr_fast.errors import CxrFastError

DPI = 110
# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies, and in greyscale print.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_GRID = {"color": "#dddddd", "linewidth": 0.6}


def literal(text) -> str:
    """`text` (a name from user data: a class, run or file) as matplotlib should draw it, as written. Between two $
    matplotlib reads TeX: pt$_1$ would be drawn as pt with a subscript 1, and a$\\b$ not drawn at all (an error)."""
    return str(text).replace("$", r"\$")


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _figure(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _style(ax) -> None:
    ax.grid(True, **_GRID)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _luminance(rgb) -> float:
    """WCAG's relative luminance of an RGB colour (0 black to 1 white)."""
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _annotate_heatmap(ax, values: np.ndarray, labels: np.ndarray, image) -> None:
    # White or black text, whichever contrasts more with the cell's own colour: at least 4.6:1 on any colour (WCAG
    # asks 4.5 of small text). Judged by the cell's place in the scale (above the midpoint: white), white landed on
    # mid blues at about 2.5:1.
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            cell = _luminance(image.cmap(image.norm(values[i, j])))
            white = 1.05 / (cell + 0.05) > (cell + 0.05) / 0.05
            ax.text(
                j,
                i,
                labels[i, j],
                ha="center",
                va="center",
                fontsize=10,
                color="white" if white else "black",
            )


def plot_confusion_matrix(confusion, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts (left) and row-normalised rates (right; each row is a true class and sums to 100 %)."""
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(classes):
        raise CxrFastError(
            f"plots: confusion matrix of shape {cm.shape} does not match {len(classes)} classes"
        )
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(support > 0, cm / support, np.nan)

    k = len(classes)
    side = max(3.6, 1.0 + 0.9 * k)
    fig, (ax_counts, ax_rates) = _figure(2 * side + 1.2, side, ncols=2)
    count_labels = np.array([[f"{int(v)}" for v in row] for row in cm])
    rate_labels = np.array([["n/a" if np.isnan(v) else f"{100 * v:.0f}%" for v in row] for row in rates])
    panels = (
        (ax_counts, cm, count_labels, "Counts", max(cm.max(), 1.0)),
        (
            ax_rates,
            np.nan_to_num(rates, nan=0.0),
            rate_labels,
            "Row-normalised (recall on the diagonal)",
            1.0,
        ),
    )
    for ax, values, labels, subtitle, vmax in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        _annotate_heatmap(ax, values, labels, image)
        ax.set_xticks(range(k), labels=[literal(c) for c in classes], rotation=30, ha="right")
        ax.set_yticks(range(k), labels=[literal(c) for c in classes])
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(subtitle, fontsize=10)
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if ax is ax_counts:
            colorbar.locator = MaxNLocator(integer=True)  # counts: no 0.25-case ticks on small test sets
            colorbar.set_label("images")
        else:  # in % as the cells are: a 0-1 scale beside "81%" made the reader convert
            colorbar.formatter = PercentFormatter(1.0, decimals=0)
            colorbar.set_label("share of the true class")
    fig.suptitle(literal(title))
    return fig


def plot_roc_curves(curves: Mapping[str, dict | None], title: str = "ROC curves (one-vs-rest)") -> Figure:
    """ROC curve per class from `metrics.roc_curves`, AUC in the legend, chance diagonal dashed."""
    fig, (ax,) = _figure(5.6, 5.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", linewidth=1, label="Chance")
    for i, (name, curve) in enumerate(curves.items()):
        if curve is None:
            ax.plot([], [], color=_color(i), label=f"{literal(name)} (undefined: one class only)")
            continue
        ax.plot(
            curve["fpr"], curve["tpr"], color=_color(i), linewidth=2, label=f"{literal(name)} (AUC {curve['auc']:.3f})"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(literal(title))
    ax.legend(loc="lower right", fontsize=9)
    _style(ax)
    return fig


def plot_pr_curves(
    curves: Mapping[str, dict | None], title: str = "Precision-recall curves (one-vs-rest)"
) -> Figure:
    """Precision-recall curve per class from `metrics.pr_curves`, AP in the legend, prevalence dotted."""
    fig, (ax,) = _figure(5.6, 5.0)
    for i, (name, curve) in enumerate(curves.items()):
        if curve is None:
            ax.plot([], [], color=_color(i), label=f"{literal(name)} (no positives)")
            continue
        ax.step(
            curve["recall"],
            curve["precision"],
            where="post",
            color=_color(i),
            linewidth=2,
            label=f"{literal(name)} (AP {curve['average_precision']:.3f})" if curve["average_precision"] is not None
            else f"{literal(name)} (AP undefined: no negatives)",
        )
        # A classifier that guesses has precision equal to the class's prevalence.
        ax.axhline(curve["prevalence"], color=_color(i), linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (positive predictive value)")
    ax.set_title(literal(title))
    ax.legend(loc="lower left", fontsize=9)
    _style(ax)
    return fig


def _reliability_panel(ax, bins: Mapping, title: str) -> None:
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    filled = np.asarray(bins["count"]) > 0
    left = edges[:-1][filled]
    accuracy = np.asarray(bins["accuracy"])[filled]
    confidence = np.asarray(bins["confidence"])[filled]
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", linewidth=1, label="Perfect calibration")
    ax.bar(
        left,
        accuracy,
        width=width[filled],
        align="edge",
        color=PALETTE[0],
        edgecolor="white",
        label="Accuracy",
    )
    # The gap between a bin's mean confidence and its accuracy is what ECE sums up.
    ax.bar(
        left,
        confidence - accuracy,
        bottom=accuracy,
        width=width[filled],
        align="edge",
        facecolor="none",
        hatch="///",
        edgecolor=PALETTE[5],
        linewidth=1,
        label="Gap to mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence (top-label probability)")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"{literal(title)}\nECE {bins['ece']:.3f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    _style(ax)


def plot_reliability(
    raw: Mapping, calibrated: Mapping | None = None, temperature: float | None = None,
    title: str = "Before temperature scaling", suptitle: str | None = None,
) -> Figure:
    """Reliability diagram(s) from `calibration.reliability_bins`: before and, if given, after scaling. `title` is
    the first panel's, `suptitle` the figure's (what was evaluated)."""
    fig, axes = _figure(5.0 if calibrated is None else 10.0, 5.0, ncols=1 if calibrated is None else 2)
    _reliability_panel(axes[0], raw, title)
    if calibrated is not None:
        after = "After temperature scaling" + (f" (T = {temperature:.2f})" if temperature is not None else "")
        _reliability_panel(axes[1], calibrated, after)
    if suptitle:
        fig.suptitle(literal(suptitle))
    return fig


_HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "balanced_accuracy")


def plot_training_curves(history, title: str = "Training curves") -> Figure:
    """Loss (left) and accuracy (right) by epoch from a history DataFrame.

    Needs columns epoch, train_loss, valid_loss, accuracy, balanced_accuracy (valid split; a run's history.csv
    calls the last two valid_accuracy and valid_balanced_accuracy, which are taken as well) and uses
    train_accuracy when present. The epoch with the best valid balanced accuracy is marked.
    """
    history = history.rename(columns={"valid_accuracy": "accuracy", "valid_balanced_accuracy": "balanced_accuracy"})
    missing = [c for c in _HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise CxrFastError(f"plots: training history lacks column(s) {', '.join(missing)}")
    epoch = np.asarray(history["epoch"], dtype=np.float64)
    fig, (ax_loss, ax_acc) = _figure(10.0, 4.2, ncols=2)

    ax_loss.plot(epoch, history["train_loss"], marker="o", color=PALETTE[0], label="train")
    ax_loss.plot(epoch, history["valid_loss"], marker="o", color=PALETTE[1], label="valid")
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("Cross-entropy")

    if "train_accuracy" in history.columns:
        ax_acc.plot(epoch, history["train_accuracy"], marker="o", color=PALETTE[0], label="train accuracy")
    ax_acc.plot(epoch, history["accuracy"], marker="o", color=PALETTE[1], label="valid accuracy")
    ax_acc.plot(
        epoch, history["balanced_accuracy"], marker="s", color=PALETTE[2], label="valid balanced accuracy"
    )
    ax_acc.set_title("Accuracy")
    ax_acc.set_ylim(0, 1.02)

    balanced = np.asarray(history["balanced_accuracy"], dtype=np.float64)
    if np.isfinite(balanced).any():
        best = epoch[np.nanargmax(balanced)]
        for ax in (ax_loss, ax_acc):
            ax.axvline(best, color="#888888", linestyle=":", linewidth=1)
        ax_acc.annotate(f"best epoch {best:g}", xy=(best, 0.03), fontsize=8, color="#555555", ha="center")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("Epoch")
        if len(epoch) and np.all(np.mod(epoch, 1) == 0):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        _style(ax)
    fig.suptitle(literal(title))
    return fig


def plot_strength_search(history, title: str = "Regularisation search") -> Figure:
    """A fitted head's answer to the training curves: train and valid balanced accuracy (and valid loss) against
    the inverse regularisation strength C, the chosen C marked. Needs columns C, train_balanced_accuracy,
    valid_balanced_accuracy, valid_loss."""
    missing = [c for c in ("C", "train_balanced_accuracy", "valid_balanced_accuracy", "valid_loss")
               if c not in history.columns]
    if missing:
        raise CxrFastError(f"plots: regularisation history lacks column(s) {', '.join(missing)}")
    c = np.asarray(history["C"], dtype=np.float64)
    fig, (ax_loss, ax_acc) = _figure(10.0, 4.2, ncols=2)
    ax_loss.plot(c, history["valid_loss"], marker="o", color=PALETTE[1], label="valid")
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("Cross-entropy")
    ax_acc.plot(c, history["train_balanced_accuracy"], marker="o", color=PALETTE[0], label="train balanced accuracy")
    ax_acc.plot(c, history["valid_balanced_accuracy"], marker="s", color=PALETTE[2], label="valid balanced accuracy")
    ax_acc.set_title("Balanced accuracy")
    ax_acc.set_ylim(0, 1.02)
    best = c[int(np.argmax(np.asarray(history["valid_balanced_accuracy"], dtype=np.float64)))]
    for ax in (ax_loss, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("C (inverse regularisation strength)")
        ax.axvline(best, color="#888888", linestyle=":", linewidth=1)
        ax.legend(fontsize=8)
        _style(ax)
    ax_acc.annotate(f"chosen C = {best:g}", xy=(best, 0.03), fontsize=8, color="#555555", ha="center")
    fig.suptitle(literal(title))
    return fig


def _records(results) -> list[dict]:
    if hasattr(results, "to_dict"):
        return results.to_dict("records")
    return [dict(r) for r in results]


def plot_comparison(
    results,
    metric: str = "balanced_accuracy",
    title: str = "Architecture comparison",
    ci_label: str = "95 % bootstrap CI",
) -> Figure:
    """Bar chart of `metric` per model with CI error bars, plus parameters vs `metric` when known.

    `results` is a DataFrame or a list of dicts with keys name, <metric>, ci_low, ci_high and optionally
    params (number of parameters). Models are sorted best first.
    """
    rows = _records(results)
    if not rows:
        raise CxrFastError("plots: nothing to compare")
    missing = {key for key in ("name", metric, "ci_low", "ci_high") for row in rows if key not in row}
    if missing:
        raise CxrFastError(f"plots: comparison results lack {', '.join(sorted(missing))}")
    rows = sorted(rows, key=lambda r: r[metric], reverse=True)
    params = [r.get("params") for r in rows]
    has_params = any(p is not None and np.isfinite(p) for p in params)

    label = metric.replace("_", " ")
    height = max(3.0, 1.2 + 0.45 * len(rows))
    fig, axes = _figure(11.0 if has_params else 6.0, height, ncols=2 if has_params else 1)
    ax = axes[0]
    values = np.array([r[metric] for r in rows], dtype=np.float64)
    lower = values - np.array([r["ci_low"] for r in rows], dtype=np.float64)
    upper = np.array([r["ci_high"] for r in rows], dtype=np.float64) - values
    positions = np.arange(len(rows))[::-1]  # best at the top
    colors = [_color(i) for i in range(len(rows))]
    ax.barh(
        positions,
        values,
        xerr=np.vstack([lower, upper]),
        color=colors,
        capsize=4,
        height=0.6,
        error_kw={"elinewidth": 1.2, "ecolor": "#333333"},
    )
    for y, v in zip(positions, values, strict=True):
        # dark on a pale box: white text was unreadable on the palette's yellow and sky blue, and on a short bar
        ax.text(0.01, y, f"{v:.3f}", va="center", ha="left", fontsize=9, color="#222222",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
    ax.set_yticks(positions, labels=[literal(r["name"]) for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{label} (error bars: {ci_label})")
    ax.set_title(f"{label.capitalize()} by model", fontsize=10)
    _style(ax)

    if has_params:
        ax = axes[1]
        for i, r in enumerate(rows):
            if r.get("params") is None or not np.isfinite(r["params"]):
                continue
            x = r["params"] / 1e6
            ax.errorbar(
                x,
                r[metric],
                yerr=[[r[metric] - r["ci_low"]], [r["ci_high"] - r[metric]]],
                fmt="o",
                color=colors[i],
                capsize=3,
                markersize=7,
            )
            ax.annotate(literal(r["name"]), (x, r[metric]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        # Plain numbers (0.5, 2, 10) read better than powers of ten over the one or two decades models span.
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(
            FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
        )
        ax.set_xlabel("Parameters (millions, log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"Size vs {label}", fontsize=10)
        _style(ax)
    fig.suptitle(literal(title))
    return fig
