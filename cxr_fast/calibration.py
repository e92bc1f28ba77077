"""Calibration: expected calibration error, reliability bins, and temperature scaling.

A classifier is calibrated when, among cases it gives 80 % confidence, about 80 % are right. Networks
trained to low loss are usually over-confident; temperature scaling (Guo et al., 2017) divides the logits by
one number T > 0 fitted on the validation split, which changes confidence without changing any prediction.

Confidence is the top-label probability (the probability of the predicted class); bins are equal-width on
[0, 1] and closed on the right, (lower, upper], as in Guo et al.
"""

from __future__ import annotations

import numpy as np

from cxr_fast.errors import CxrFastError

# scipy and cxr_fast.metrics (sklearn) are imported inside the functions that use them: predict and serve import
# `softmax` from here and would otherwise take over a second longer to start.

# Search range for T. Below 0.01 or above 100 the model is nearly separable on the valid split or its logits carry
# no information; a clipped T is still the best available in that range.
MAX_TEMPERATURE = 100.0
_LOG_T_BOUNDS = (np.log(0.01), np.log(MAX_TEMPERATURE))
# Fewer wrong predictions than this on the valid split: T stays 1 (see fit_temperature).
MIN_ERRORS_TO_FIT = 5


def flattens_everything(temperature: float) -> bool:
    """Whether the fit ran into the upper bound: the valid split found no information in the logits, and the
    calibrated probabilities are all close to 1/K, however well ECE then scores them."""
    return temperature >= 0.99 * MAX_TEMPERATURE


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / temperature) [N, K] in float64, stable for large logits: the calibrated
    probabilities of every command (evaluate, compare, interpret, predict, serve), with the run's temperature."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise CxrFastError(f"calibration: temperature must be a positive number, got {temperature}")
    logits = np.asarray(logits, dtype=np.float64) / temperature
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(probs, y_true) -> float:
    """Mean negative log-likelihood of the true class; probabilities are clipped at 1e-12 to stay finite."""
    from cxr_fast.metrics import check_labels_scores

    y, probs = check_labels_scores(y_true, probs, "probabilities", caller="calibration")
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


def logits_nll(logits, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature), computed from the logits: exact where `nll` of
    the probabilities is not (a wrong prediction with a logit margin of 60 has p = e^-60, which `nll` clips to 1e-12
    and counts as a loss of 27.6)."""
    from cxr_fast.metrics import check_labels_scores

    y, logits = check_labels_scores(y_true, logits, "logits", caller="calibration")
    return _logits_nll(logits, y, temperature)


def _logits_nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import logsumexp

    # log softmax computed directly from logits: exact even where a probability underflows to 0.
    scaled = logits / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))


def fit_temperature(logits, y_true) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on these cases.

    Fit it on the validation split, never the test split. The NLL is unimodal in log T (it is convex in
    1/T), so a bounded scalar search over log T finds the minimum without needing a start value.
    """
    from scipy.optimize import minimize_scalar

    from cxr_fast.metrics import check_labels_scores

    y, logits = check_labels_scores(y_true, logits, "logits", caller="calibration")
    if (logits.argmax(axis=1) != y).sum() < MIN_ERRORS_TO_FIT:
        # The wrong cases are what tell the fit how over-confident the model is. With none, the NLL falls without
        # end as T shrinks; with one or two, the fit still mostly learns "be sharper" (T = 0.17 for a demo model
        # with 2 of 48 wrong, which doubled its test NLL and made its wrong test predictions 98-100 % sure).
        return 1.0
    result = minimize_scalar(
        lambda log_t: _logits_nll(logits, y, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def _top_label(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N], correct [N] as 0/1) for the predicted class."""
    return probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)


def reliability_bins(probs, y_true, n_bins: int = 15) -> dict:
    """Per-bin statistics for a reliability diagram.

    Returns {edges [n_bins + 1], centers [n_bins], confidence [n_bins] (mean top-label probability),
    accuracy [n_bins], count [n_bins] (int), ece (float)}; confidence and accuracy are NaN in empty bins.
    """
    from cxr_fast.metrics import check_labels_scores

    y, probs = check_labels_scores(y_true, probs, "probabilities", caller="calibration")
    if int(n_bins) < 1:
        raise CxrFastError(f"calibration: n_bins must be at least 1, got {n_bins}")
    n_bins = int(n_bins)
    confidence, correct = _top_label(probs, y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin below it: bins are (lower, upper].
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / len(y))
    return {
        "edges": edges,
        "centers": (edges[:-1] + edges[1:]) / 2,
        "confidence": mean_confidence,
        "accuracy": accuracy,
        "count": count,
        "ece": ece,
    }


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width bins of |accuracy - mean confidence| weighted by the bin's share."""
    return reliability_bins(probs, y_true, n_bins)["ece"]
