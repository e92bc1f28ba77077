"""Calibration: ECE against hand-computed and loop-computed values; temperature scaling fixes over-confidence."""

import numpy as np
import pytest

from cxr_fast.calibration import (
    expected_calibration_error,
    fit_temperature,
    flattens_everything,
    nll,
    reliability_bins,
    softmax,
)
from cxr_fast.errors import CxrFastError


def calibrated_logits(n: int, seed: int = 0, n_classes: int = 3):
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n, n_classes))
    probs = softmax(logits)
    # Inverse-CDF sampling of one label per row.
    y = (rng.random((n, 1)) > np.cumsum(probs, axis=1)).sum(axis=1)
    return logits, np.minimum(y, n_classes - 1)


def ece_by_loop(probs, y, n_bins):
    """Guo et al.'s reference ECE: bins (lower, upper], gap weighted by the bin's share of cases."""
    confidence, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - confidence[inside].mean())
    return total


def test_temperature_scaling_repairs_an_over_confident_model():
    logits, y = calibrated_logits(6000, seed=1)
    over_confident = 5 * logits
    valid, test = slice(0, 3000), slice(3000, None)

    temperature = fit_temperature(over_confident[valid], y[valid])
    assert 4.0 < temperature < 6.0  # it should undo the factor of five

    raw = softmax(over_confident[test])
    scaled = softmax(over_confident[test], temperature)
    assert nll(scaled, y[test]) < 0.8 * nll(raw, y[test])
    assert expected_calibration_error(scaled, y[test]) < 0.5 * expected_calibration_error(raw, y[test])
    assert expected_calibration_error(scaled, y[test]) < 0.04
    # Dividing by T never changes which class is predicted.
    np.testing.assert_array_equal(scaled.argmax(axis=1), raw.argmax(axis=1))


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, y = calibrated_logits(4000, seed=2)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)


def test_fitted_temperature_minimises_nll():
    logits, y = calibrated_logits(500, seed=3)
    temperature = fit_temperature(2 * logits, y)
    best = nll(softmax(2 * logits, temperature), y)
    for other in (0.8 * temperature, 0.95 * temperature, 1.05 * temperature, 1.25 * temperature):
        assert best <= nll(softmax(2 * logits, other), y)


def test_softmax_with_a_temperature_is_softmax_of_scaled_logits():
    logits = np.array(
        [[2.0, 0.0, -1.0], [1000.0, 999.0, 0.0]]
    )  # the second row would overflow a naive softmax
    probs = softmax(logits, 2.0)
    expected_first = np.exp([1.0, 0.0, -0.5]) / np.exp([1.0, 0.0, -0.5]).sum()
    np.testing.assert_allclose(probs[0], expected_first)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert np.all(np.isfinite(probs))
    with pytest.raises(CxrFastError, match="positive"):
        softmax(logits, 0.0)


def test_nll_by_hand():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    y = np.array([0, 0, 1])
    assert nll(probs, y) == pytest.approx(-(np.log(0.5) + np.log(0.9) + np.log(0.8)) / 3)
    # A zero probability on the true class gives a large but finite loss.
    assert np.isfinite(nll(np.array([[1.0, 0.0]]), np.array([1])))


def test_ece_by_hand():
    # Four cases at 0.9 confidence, half right: one bin, gap 0.4.
    probs = np.array([[0.9, 0.1]] * 4)
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    # Add four cases at 0.6 confidence, all right: gap 0.4 there too, each bin holds half the cases.
    probs = np.vstack([probs, [[0.6, 0.4]] * 4])
    y = np.concatenate([y, [0, 0, 0, 0]])
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_ece_matches_reference_loop():
    logits, y = calibrated_logits(1000, seed=4)
    probs = softmax(3 * logits)
    for n_bins in (5, 10, 15):
        assert expected_calibration_error(probs, y, n_bins) == pytest.approx(ece_by_loop(probs, y, n_bins))


def test_reliability_bins():
    probs = np.array([[0.5, 0.5], [0.75, 0.25], [0.2, 0.8], [1.0, 0.0]])
    y = np.array([0, 1, 1, 0])
    bins = reliability_bins(probs, y, n_bins=2)
    np.testing.assert_allclose(bins["edges"], [0, 0.5, 1])
    np.testing.assert_allclose(bins["centers"], [0.25, 0.75])
    # 0.5 sits on an edge and belongs to the lower bin, (0, 0.5].
    np.testing.assert_array_equal(bins["count"], [1, 3])
    np.testing.assert_allclose(bins["accuracy"], [1.0, 2 / 3])
    np.testing.assert_allclose(bins["confidence"], [0.5, (0.75 + 0.8 + 1.0) / 3])
    assert bins["ece"] == pytest.approx(expected_calibration_error(probs, y, n_bins=2))

    empty = reliability_bins(probs, y, n_bins=10)
    assert empty["count"].sum() == 4
    assert np.isnan(empty["accuracy"][0]) and np.isnan(empty["confidence"][0])


def test_bad_inputs_raise():
    with pytest.raises(CxrFastError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(CxrFastError, match="0..1"):
        nll(np.full((2, 2), 0.5), np.array([0, 2]))
    with pytest.raises(CxrFastError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))


def test_a_valid_split_with_almost_no_mistakes_keeps_the_probabilities_as_they_are():
    # the NLL of a perfect split falls without end as T shrinks: the fit ran to T = 0.01, and then every test
    # prediction, the wrong ones too, read p = 1.00
    logits, y = calibrated_logits(200, seed=4)
    right = logits.argmax(axis=1) == y
    assert fit_temperature(logits[right], y[right]) == 1.0
    # with two mistakes the fit still sharpens without ground: T stays 1 below five
    two_wrong = np.flatnonzero(right).tolist() + np.flatnonzero(~right)[:2].tolist()
    assert fit_temperature(logits[two_wrong], y[two_wrong]) == 1.0
    assert (~right).sum() >= 5 and fit_temperature(logits, y) != 1.0  # enough mistakes: fitted as before


def test_five_mistakes_are_the_fewest_that_fit_a_temperature():
    logits, y = calibrated_logits(400, seed=5)
    right = np.flatnonzero(logits.argmax(axis=1) == y).tolist()
    wrong = np.flatnonzero(logits.argmax(axis=1) != y).tolist()
    assert fit_temperature(logits[right + wrong[:4]], y[right + wrong[:4]]) == 1.0
    assert fit_temperature(logits[right + wrong[:5]], y[right + wrong[:5]]) != 1.0


def test_logits_without_information_run_the_temperature_to_its_upper_bound():
    # labels drawn independently of the logits: the NLL keeps falling as T grows, so the fit stops at 100
    rng = np.random.default_rng(6)
    logits, y = rng.normal(scale=3.0, size=(600, 3)), rng.integers(0, 3, 600)
    temperature = fit_temperature(logits, y)
    assert temperature == pytest.approx(100.0, rel=1e-3)
    assert flattens_everything(temperature)
    assert not flattens_everything(50.0) and not flattens_everything(1.0)


def test_softmax_shifts_each_row_by_its_own_maximum():
    # a row of small logits beside a row of huge ones: shifted by the largest logit overall, the first row underflowed
    probs = softmax(np.array([[0.0, -1.0], [1000.0, 999.0]]))
    first = np.array([1.0, np.exp(-1.0)]) / (1.0 + np.exp(-1.0))
    np.testing.assert_allclose(probs, [first, first])


def test_fewer_than_one_bin_is_refused():
    with pytest.raises(CxrFastError, match="n_bins"):
        reliability_bins(np.array([[0.9, 0.1]]), np.array([0]), n_bins=0)
