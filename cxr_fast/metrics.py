"""Classification metrics, bootstrap confidence intervals, McNemar's test and ROC/PR curves.

Everything here works on plain arrays: `y_true` holds integer class indices [N] and `probs` the predicted
class probabilities [N, K] (rows sum to one; any scores work for the ranking metrics). Nothing here draws;
`cxr_fast.plots` turns the returned dicts into figures.

Definitions (they matter when a class is rare in the test set):
- balanced accuracy is the mean of the per-class recalls, as the study defined it. A class with no cases in
  `y_true` has no recall and is left out of the mean (scikit-learn's `balanced_accuracy_score` does the same).
- macro F1 averages the per-class F1 over the classes that occur in `y_true` or in the predictions, which is
  scikit-learn's `f1_score(average="macro")`; a class that is predicted but never true counts as F1 = 0.
- ROC AUC and average precision are one-vs-rest per class. A class without positives (or, for AUC, without
  negatives) gets None and is left out of the macro mean.
- per-class recall, specificity, precision and NPV come with a 95 % Wilson score interval (`wilson_interval`), not
  a bootstrap one: each is a count out of a count, and resampling a class of one or two images barely moves it.

The point estimates and the bootstrap share one code path (`_confusion_batch`, `_ranking_batch`) so an
interval is always an interval around the number reported next to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_curve, roc_curve

from cxr_fast.errors import CxrFastError

# Metrics bootstrap_ci knows by name; the values say which batch computation they need.
_CONFUSION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
_RANKING_METRICS = ("macro_roc_auc", "macro_average_precision")
BOOTSTRAP_METRICS = _CONFUSION_METRICS + _RANKING_METRICS

# Upper bound on resample-matrix elements held at once, so large test sets do not exhaust memory.
_MAX_CHUNK_ELEMENTS = 4_000_000


def check_labels_scores(
    y_true, scores, what: str = "probabilities", caller: str = "metrics"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (y as int64 [N], scores as float64 [N, K]) or raise CxrFastError naming the problem.

    `what` names the scores in messages ("probabilities", "logits"); `caller` prefixes them, so an error
    says which step refused the arrays. Calibration validates its inputs with this too.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise CxrFastError(f"{caller}: {what} must be a 2-D array [cases, classes], got shape {scores.shape}")
    if y.ndim != 1 or len(y) != len(scores):
        raise CxrFastError(f"{caller}: {y.shape[0] if y.ndim else 0} labels for {len(scores)} rows of {what}")
    if len(y) == 0:
        raise CxrFastError(f"{caller}: no cases")
    if not np.all(np.isfinite(scores)):
        raise CxrFastError(f"{caller}: {what} contain NaN or infinite values")
    integral = y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0))
    if not integral:
        raise CxrFastError(f"{caller}: labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= scores.shape[1]:
        raise CxrFastError(f"{caller}: labels must lie in 0..{scores.shape[1] - 1}, got {y.min()}..{y.max()}")
    return y, scores


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator, with `empty` where the denominator is zero (no warnings)."""
    out = np.full(np.broadcast(numerator, denominator).shape, empty, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _resample_chunks(y: np.ndarray, n_boot: int, rng: np.random.Generator):
    """Yield index matrices [b, N] of resampled cases, at most _MAX_CHUNK_ELEMENTS at a time.

    Stratified by true class: each class's cases are drawn with replacement from that class alone, so every
    resample has the test set's class counts. Unstratified, a class with one test image is missing from about
    a third of the resamples, which then average recall or AUC over the other classes: a different quantity,
    which pulled the interval of a rarely-found class far upwards. (pROC stratifies its AUC bootstrap too.)
    """
    members = [np.flatnonzero(y == k) for k in np.unique(y)]
    per_chunk = max(1, _MAX_CHUNK_ELEMENTS // len(y))
    done = 0
    while done < n_boot:
        size = min(per_chunk, n_boot - done)
        yield np.concatenate([cases[rng.integers(0, len(cases), size=(size, len(cases)))] for cases in members],
                             axis=1)
        done += size


# ---------------------------------------------------------------- batched computations (one row per resample)


def _confusion_batch(y: np.ndarray, pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices [B, K, K] (rows = true, cols = predicted) of the resamples idx [B, N]."""
    n_boot = idx.shape[0]
    k2 = n_classes * n_classes
    codes = np.arange(n_boot)[:, None] * k2 + y[idx] * n_classes + pred[idx]
    return np.bincount(codes.ravel(), minlength=n_boot * k2).reshape(n_boot, n_classes, n_classes)


def _confusion_summaries(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class and summary metrics from confusion matrices [B, K, K]; per-class arrays are [B, K]."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support = cm.sum(axis=2).astype(np.float64)
    predicted = cm.sum(axis=1).astype(np.float64)
    present = support > 0
    # Precision/recall/F1 are 0 when undefined, matching scikit-learn's zero_division=0.
    precision = _safe_divide(tp, predicted, 0.0)
    recall = _safe_divide(tp, support, 0.0)
    f1 = _safe_divide(2 * tp, support + predicted, 0.0)
    n = cm.sum(axis=(1, 2))[:, None].astype(np.float64)
    tn = n - support - predicted + tp  # one-vs-rest: neither of the class nor called it
    # specificity: of the images not of the class, the share not called it (a clinician reads recall as sensitivity
    # and asks for this beside it); NaN where every image is of the class
    specificity = _safe_divide(tn, n - support, np.nan)
    # negative predictive value: of the images not called the class, the share truly not of it (precision's
    # counterpart: how far a clinician can trust a "not c"); NaN where every image is called the class
    npv = _safe_divide(tn, n - predicted, np.nan)
    occurs = (support + predicted) > 0
    return {
        "tp": tp,
        "tn": tn,
        "support": support,
        "predicted": predicted,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "npv": npv,
        "f1": f1,
        "accuracy": tp.sum(axis=1) / cm.sum(axis=(1, 2)),
        # Mean recall over classes that have cases; a class absent from the sample has no recall.
        "balanced_accuracy": (recall * present).sum(axis=1) / present.sum(axis=1),
        "macro_f1": (f1 * occurs).sum(axis=1) / occurs.sum(axis=1),
    }


def _ranking_batch(
    scores: np.ndarray, positive: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC AUC and average precision [B] of one class for the resamples idx [B, N].

    Cases are grouped by distinct score so ties are handled exactly as scikit-learn does: AUC counts a
    tied positive/negative pair as one half (Mann-Whitney U), and average precision steps at each
    distinct threshold. Counting positives and negatives per score group with one bincount makes a
    thousand resamples cost about as much as a few sorts. NaN where the metric is undefined.
    """
    unique_scores, group = np.unique(scores, return_inverse=True)  # ascending score
    n_groups = len(unique_scores)
    n_boot = idx.shape[0]
    codes = (np.arange(n_boot)[:, None] * n_groups + group[idx]).ravel()
    total = np.bincount(codes, minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(np.float64)
    pos = np.bincount(codes, weights=positive[idx].ravel().astype(np.float64), minlength=n_boot * n_groups)
    pos = pos.reshape(n_boot, n_groups)
    neg = total - pos
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)

    negatives_below = np.cumsum(neg, axis=1) - neg
    auc_numerator = (pos * (negatives_below + 0.5 * neg)).sum(axis=1)
    auc = _safe_divide(auc_numerator, n_pos * n_neg, np.nan)

    # Average precision: walk thresholds from the highest score down; recall rises by pos/n_pos at each.
    tp_cum = np.cumsum(pos[:, ::-1], axis=1)
    fp_cum = np.cumsum(neg[:, ::-1], axis=1)
    precision = _safe_divide(tp_cum, tp_cum + fp_cum, 0.0)
    ap = _safe_divide((pos[:, ::-1] * precision).sum(axis=1), n_pos, np.nan)
    # With no negatives every threshold has precision 1, so AP is 1 whatever the scores: undefined, as AUC is. (A
    # test set of Normal films alone showed AP 1.000 beside a recall of 0.06.)
    ap = np.where(n_neg > 0, ap, np.nan)
    return auc, ap


def _ranking_summaries(y: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class AUC/AP [B, K] and their macro means [B] over the classes where they are defined."""
    per_class = [_ranking_batch(probs[:, k], y == k, idx) for k in range(probs.shape[1])]
    auc = np.stack([a for a, _ in per_class], axis=1)
    ap = np.stack([p for _, p in per_class], axis=1)

    def macro(values):
        defined = ~np.isnan(values)
        return _safe_divide(np.where(defined, values, 0.0).sum(axis=1), defined.sum(axis=1), np.nan)

    return {
        "roc_auc": auc,
        "average_precision": ap,
        "macro_roc_auc": macro(auc),
        "macro_average_precision": macro(ap),
    }


# ---------------------------------------------------------------------------------------------- public API


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval (low, high) of the proportion successes / n, or None when n is 0.

    With z the normal quantile (1.96 for 95 %) and p = successes / n:
    centre = (p + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) × sqrt(p(1 − p)/n + z²/4n²).
    Unlike the Wald interval p ± z sqrt(p(1 − p)/n) it is not empty at 0/n or n/n and stays inside [0, 1]; its
    coverage stays near the nominal level down to a handful of cases (docs/evaluation.md has the simulation).
    """
    if not 0 < confidence < 1:
        raise CxrFastError(f"metrics: confidence must be between 0 and 1, got {confidence}")
    if n < 0 or not 0 <= successes <= n:
        raise CxrFastError(f"metrics: a proportion needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0/n and n/n one end is exactly 0 or 1 in exact arithmetic; clip the rounding
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def _wilson_list(successes: float, n: float) -> list[float] | None:
    interval = wilson_interval(int(successes), int(n))
    return None if interval is None else list(interval)


def classification_metrics(y_true, probs, classes: Sequence[str]) -> dict:
    """Metrics of one model on one test set.

    Returns a dict with keys `n`, `accuracy`, `balanced_accuracy`, `macro_f1`, `macro_roc_auc`,
    `macro_average_precision`, `confusion_matrix` (list of lists, rows = true class, columns = predicted)
    and `per_class` {class name: {precision, recall, specificity, npv, f1, support, roc_auc, average_precision,
    precision_ci, recall_ci, specificity_ci, npv_ci}} (`npv`: negative predictive value; `<figure>_ci`: its 95 %
    Wilson interval [low, high], None where the figure's denominator is 0, including a precision reported as 0
    because the class was never predicted). Predictions are the arg-max of `probs`. See the module docstring for
    how absent classes are handled.
    """
    y, probs = check_labels_scores(y_true, probs)
    classes = list(classes)
    if len(classes) != probs.shape[1]:
        raise CxrFastError(f"metrics: {len(classes)} class names for {probs.shape[1]} probability columns")
    pred = probs.argmax(axis=1)
    identity = np.arange(len(y))[None, :]
    cm = _confusion_batch(y, pred, identity, len(classes))
    conf = _confusion_summaries(cm)
    rank = _ranking_summaries(y, probs, identity)

    n_cases = len(y)
    per_class = {}
    for k, name in enumerate(classes):
        tp, tn, support, predicted = (conf[key][0, k] for key in ("tp", "tn", "support", "predicted"))
        per_class[name] = {
            "precision": float(conf["precision"][0, k]),
            # no cases, no recall: None, as balanced accuracy leaves the class out (not 0, which it would count)
            "recall": float(conf["recall"][0, k]) if conf["support"][0, k] > 0 else None,
            "specificity": _none_if_nan(conf["specificity"][0, k]),  # None: no image of another class
            "npv": _none_if_nan(conf["npv"][0, k]),  # None: every image called this class
            "f1": float(conf["f1"][0, k]),
            "support": int(conf["support"][0, k]),
            "roc_auc": _none_if_nan(rank["roc_auc"][0, k]),
            "average_precision": _none_if_nan(rank["average_precision"][0, k]),
            # 95 % Wilson intervals of the four proportions, from the same counts (None: denominator 0)
            "precision_ci": _wilson_list(tp, predicted),
            "recall_ci": _wilson_list(tp, support),
            "specificity_ci": _wilson_list(tn, n_cases - support),
            "npv_ci": _wilson_list(tn, n_cases - predicted),
        }
    return {
        "n": int(len(y)),
        "accuracy": float(conf["accuracy"][0]),
        "balanced_accuracy": float(conf["balanced_accuracy"][0]),
        "macro_f1": float(conf["macro_f1"][0]),
        "macro_roc_auc": _none_if_nan(rank["macro_roc_auc"][0]),
        "macro_average_precision": _none_if_nan(rank["macro_average_precision"][0]),
        "per_class": per_class,
        "confusion_matrix": cm[0].tolist(),
    }


def bootstrap_replicates(
    y_true, probs, metric: str | Callable[[np.ndarray, np.ndarray], float], n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """Values [n_boot] of `metric` on resamples of the cases (drawn with replacement within each true class, so
    every resample has the same class counts as the sample).

    `metric` is one of BOOTSTRAP_METRICS (vectorised) or a callable metric(y_true, probs) -> float, which
    is called once per resample. Resamples where the metric is undefined (e.g. no positives for any class'
    AUC) come back as NaN.
    """
    y, probs = check_labels_scores(y_true, probs)
    if n_boot < 1:
        raise CxrFastError(f"metrics: n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunks = []
    if callable(metric):
        for idx in _resample_chunks(y, n_boot, rng):
            chunks.append(np.array([metric(y[row], probs[row]) for row in idx], dtype=np.float64))
    elif metric in _CONFUSION_METRICS:
        pred = probs.argmax(axis=1)
        for idx in _resample_chunks(y, n_boot, rng):
            chunks.append(_confusion_summaries(_confusion_batch(y, pred, idx, probs.shape[1]))[metric])
    elif metric in _RANKING_METRICS:
        for idx in _resample_chunks(y, n_boot, rng):
            chunks.append(_ranking_summaries(y, probs, idx)[metric])
    else:
        raise CxrFastError(
            f"metrics: unknown metric {metric!r}; choose one of {', '.join(BOOTSTRAP_METRICS)}"
        )
    return np.concatenate(chunks)


def bootstrap_ci(
    y_true,
    probs,
    metric: str | Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval (low, high) of `metric`, resampling cases.

    Resamples where the metric is undefined are dropped. The same seed gives the same interval, and
    because models are compared on the same test cases, using one seed for every model of a comparison
    draws the same resamples for each.
    """
    if not 0 < alpha < 1:
        raise CxrFastError(f"metrics: alpha must be between 0 and 1, got {alpha}")
    values = bootstrap_replicates(y_true, probs, metric, n_boot=n_boot, seed=seed)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        raise CxrFastError(f"metrics: {metric!r} is undefined on every bootstrap resample (too few cases?)")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """McNemar's test of whether two classifiers have the same error rate on the same cases.

    b = cases A gets right and B gets wrong, c = the reverse. With b + c < 25 the exact two-sided binomial
    test is used (statistic = min(b, c)); otherwise the chi-square test with continuity correction,
    statistic = (|b - c| - 1)^2 / (b + c). Returns {b, c, statistic, p_value, method}.
    """
    y = np.asarray(y_true)
    a = np.asarray(pred_a)
    bb = np.asarray(pred_b)
    if not (y.ndim == a.ndim == bb.ndim == 1) or not (len(y) == len(a) == len(bb)):
        raise CxrFastError(
            f"metrics: McNemar needs three 1-D arrays of equal length, got {y.shape}, {a.shape}, {bb.shape}"
        )
    correct_a = a == y
    correct_b = bb == y
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    discordant = b + c
    if discordant == 0:
        return {"b": b, "c": c, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    if discordant < 25:
        p_value = min(1.0, 2.0 * stats.binom.cdf(min(b, c), discordant, 0.5))
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p_value), "method": "exact"}
    statistic = max(abs(b - c) - 1, 0) ** 2 / discordant  # the correction must not turn b = c into evidence
    p_value = stats.chi2.sf(statistic, df=1)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(p_value), "method": "chi2"}


def _class_names(n_classes: int, classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        return [str(k) for k in range(n_classes)]
    if len(classes) != n_classes:
        raise CxrFastError(f"metrics: {len(classes)} class names for {n_classes} probability columns")
    return list(classes)


def roc_curves(y_true, probs, classes: Sequence[str] | None = None) -> dict[str, dict | None]:
    """One-vs-rest ROC curve per class: {class: {fpr, tpr, thresholds, auc}}, or None when undefined.

    Keys are the class names (or "0", "1", ... without `classes`), in column order.
    """
    y, probs = check_labels_scores(y_true, probs)
    curves: dict[str, dict | None] = {}
    for k, name in enumerate(_class_names(probs.shape[1], classes)):
        positive = y == k
        if positive.all() or not positive.any():
            curves[name] = None
            continue
        fpr, tpr, thresholds = roc_curve(positive, probs[:, k])
        auc, _ = _ranking_batch(probs[:, k], positive, np.arange(len(y))[None, :])
        curves[name] = {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "auc": float(auc[0])}
    return curves


def pr_curves(y_true, probs, classes: Sequence[str] | None = None) -> dict[str, dict | None]:
    """One-vs-rest precision-recall curve per class.

    {class: {precision, recall, thresholds, average_precision, prevalence}}, or None for a class without
    positives. `prevalence` is the precision of a classifier that guesses, the PR plot's baseline. A class present in
    every case has a curve but no average precision (None, as in `classification_metrics`): without negatives every
    threshold has precision 1.
    """
    y, probs = check_labels_scores(y_true, probs)
    curves: dict[str, dict | None] = {}
    for k, name in enumerate(_class_names(probs.shape[1], classes)):
        positive = y == k
        if not positive.any():
            curves[name] = None
            continue
        precision, recall, thresholds = precision_recall_curve(positive, probs[:, k])
        _, ap = _ranking_batch(probs[:, k], positive, np.arange(len(y))[None, :])
        curves[name] = {
            "precision": precision,
            "recall": recall,
            "thresholds": thresholds,
            "average_precision": _none_if_nan(ap[0]),
            "prevalence": float(positive.mean()),
        }
    return curves
