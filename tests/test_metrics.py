"""Metrics against scikit-learn, the bootstrap's behaviour, and McNemar's test against hand-computed values."""

import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_fast.errors import CxrFastError
from cxr_fast.metrics import (
    BOOTSTRAP_METRICS,
    bootstrap_ci,
    bootstrap_replicates,
    classification_metrics,
    mcnemar,
    pr_curves,
    roc_curves,
    wilson_interval,
)

CLASSES = ["COVID-19", "Normal", "Pneumonia"]

# Twelve hand-made cases: some confident, some wrong, some tied scores (0.4 appears often on purpose).
HAND_Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
HAND_PROBS = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.4, 0.4, 0.2],  # tie: arg-max picks the first class
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.3, 0.4, 0.3],
        [0.4, 0.2, 0.4],
        [0.1, 0.3, 0.6],
        [0.1, 0.1, 0.8],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],
        [0.3, 0.3, 0.4],
    ]
)


def noisy_predictions(n: int, seed: int = 0, n_classes: int = 3, rounding: int = 2):
    """Labels and probabilities of a decent classifier; rounding creates ties like real softmax outputs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, np.round(probs, rounding)


@pytest.mark.parametrize("data", ["hand", "random"])
def test_metrics_match_scikit_learn(data):
    y, probs = (HAND_Y, HAND_PROBS) if data == "hand" else noisy_predictions(300)
    pred = probs.argmax(axis=1)
    m = classification_metrics(y, probs, CLASSES)

    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=[0, 1, 2], zero_division=0
    )
    one_vs_rest = skm.multilabel_confusion_matrix(y, pred, labels=[0, 1, 2])  # [[tn, fp], [fn, tp]] per class
    aucs, aps = [], []
    for k, name in enumerate(CLASSES):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(precision[k])
        assert row["recall"] == pytest.approx(recall[k])
        (tn, fp), _ = one_vs_rest[k]
        assert row["specificity"] == pytest.approx(tn / (tn + fp))
        (tn, fp), (fn, tp) = one_vs_rest[k]
        assert row["npv"] == pytest.approx(tn / (tn + fn))
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == support[k]
        aucs.append(skm.roc_auc_score(y == k, probs[:, k]))
        aps.append(skm.average_precision_score(y == k, probs[:, k]))
        assert row["roc_auc"] == pytest.approx(aucs[-1])
        assert row["average_precision"] == pytest.approx(aps[-1])
    assert m["macro_roc_auc"] == pytest.approx(np.mean(aucs))
    if data == "hand":  # rows sum to one exactly, as scikit-learn's multi-class AUC requires
        assert m["macro_roc_auc"] == pytest.approx(
            skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
        )
    assert m["macro_average_precision"] == pytest.approx(np.mean(aps))


def test_hand_made_values():
    m = classification_metrics(HAND_Y, HAND_PROBS, CLASSES)
    # Predictions by arg-max (ties go to the first class): 0,0,0,1 | 1,1,0,2 | 2,2,0,2 → 8 of 12 right.
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 1], [1, 0, 3]]
    assert m["accuracy"] == pytest.approx(8 / 12)
    assert m["per_class"]["Normal"]["recall"] == pytest.approx(2 / 4)
    # Normal is predicted for 3 images, 2 of them Normal: 1 of the 8 others called Normal
    assert m["per_class"]["Normal"]["specificity"] == pytest.approx(7 / 8)
    only_normal = classification_metrics(np.array([1, 1]), HAND_PROBS[[4, 6]], CLASSES)["per_class"]  # one called COVID-19
    assert only_normal["Normal"]["specificity"] is None and only_normal["COVID-19"]["specificity"] == pytest.approx(0.5)
    # negative predictive value: of the images not called the class, the share truly not of it
    # COVID-19 is called for 5 (3 right): of the 7 others, 1 is COVID-19; Normal: 2 of the 9 others; Pneumonia: 1 of 8
    assert [m["per_class"][name]["npv"] for name in CLASSES] == pytest.approx([6 / 7, 7 / 9, 7 / 8])
    all_normal = classification_metrics(np.array([0, 1]), HAND_PROBS[[4, 5]], CLASSES)["per_class"]  # both called Normal
    assert all_normal["Normal"]["npv"] is None and all_normal["COVID-19"]["npv"] == pytest.approx(0.5)
    assert all_normal["Pneumonia"]["npv"] == pytest.approx(1.0)


def _wilson_by_hand(k, n, z=1.959963984540054):
    """The closed formula, written out again: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (1, 2), (0, 5), (5, 5), (19, 20), (3, 7), (0, 79), (60, 79)])
def test_wilson_interval_is_the_closed_formula_and_scipy_s(k, n):
    from scipy.stats import binomtest

    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")  # an independent implementation
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1
    assert (low == 0) == (k == 0) and (high == 1) == (k == n)  # 0/n starts at 0, n/n ends at 1, nothing else


def test_wilson_interval_matches_newcombe_s_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
    for (k, n), expected in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                             (1, 29): (0.0061, 0.1718)}.items():
        assert wilson_interval(k, n) == pytest.approx(expected, abs=5e-5)
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=5e-5)  # one image, found: 0.21 to 1
    assert wilson_interval(0, 0) is None
    with pytest.raises(CxrFastError, match="successes"):
        wilson_interval(3, 2)


def test_per_class_intervals_are_wilson_intervals_of_the_counts_and_none_where_undefined():
    m = classification_metrics(HAND_Y, HAND_PROBS, CLASSES)["per_class"]
    # confusion [[3, 1, 0], [1, 2, 1], [1, 0, 3]]: Normal is 2 of 4 found, 7 of 8 others not called Normal,
    # 2 of the 3 called Normal right, 7 of the 9 not called Normal not Normal
    normal = m["Normal"]
    assert normal["recall_ci"] == pytest.approx(_wilson_by_hand(2, 4))
    assert normal["specificity_ci"] == pytest.approx(_wilson_by_hand(7, 8))
    assert normal["precision_ci"] == pytest.approx(_wilson_by_hand(2, 3))
    assert normal["npv_ci"] == pytest.approx(_wilson_by_hand(7, 9))
    assert m["COVID-19"]["precision_ci"] == pytest.approx(_wilson_by_hand(3, 5))
    for row in m.values():  # every interval holds its own figure
        for key in ("precision", "recall", "specificity", "npv"):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high
    # both images Normal, both called Normal: COVID-19 and Pneumonia never called, never true
    both = classification_metrics(np.array([1, 1]), HAND_PROBS[[4, 4]], CLASSES)["per_class"]
    assert both["Pneumonia"]["precision"] == 0.0 and both["Pneumonia"]["precision_ci"] is None  # 0 by convention only
    assert both["Pneumonia"]["recall"] is None and both["Pneumonia"]["recall_ci"] is None
    assert both["Normal"]["specificity"] is None and both["Normal"]["specificity_ci"] is None
    assert both["Normal"]["npv"] is None and both["Normal"]["npv_ci"] is None
    assert both["Normal"]["recall_ci"] == pytest.approx(_wilson_by_hand(2, 2))  # 2 of 2: 0.34 to 1, not 1 to 1
    assert both["Pneumonia"]["specificity_ci"] == pytest.approx(_wilson_by_hand(2, 2))


def test_balanced_accuracy_is_mean_of_per_class_recalls():
    y, probs = noisy_predictions(500, seed=3)
    # Unbalanced on purpose so balanced and plain accuracy differ.
    keep = (y != 2) | (np.arange(len(y)) % 5 == 0)
    y, probs = y[keep], probs[keep]
    pred = probs.argmax(axis=1)
    recalls = [np.mean(pred[y == k] == k) for k in range(3)]
    m = classification_metrics(y, probs, CLASSES)
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["balanced_accuracy"] == pytest.approx(np.mean([m["per_class"][c]["recall"] for c in CLASSES]))
    assert abs(m["balanced_accuracy"] - m["accuracy"]) > 1e-3


def test_a_test_set_of_one_class_has_no_average_precision_to_report():
    # every threshold has precision 1 without negatives: AP came out 1.000 beside a recall of 0.06
    y, probs = noisy_predictions(200, seed=6)
    keep = y == 1
    y, probs = y[keep], probs[keep]
    probs[: len(y) // 2] = np.roll(probs[: len(y) // 2], 1, axis=1)  # half of them badly missed
    m = classification_metrics(y, probs, CLASSES)
    normal = m["per_class"]["Normal"]
    assert normal["support"] == len(y) and normal["recall"] < 0.75
    assert normal["average_precision"] is None and normal["roc_auc"] is None
    assert m["macro_average_precision"] is None and m["macro_roc_auc"] is None


def test_class_without_cases_is_left_out_of_means():
    y, probs = noisy_predictions(200, seed=5)
    keep = y != 2  # no Pneumonia in the test set, though the model still predicts it sometimes
    y, probs = y[keep], probs[keep]
    pred = probs.argmax(axis=1)
    assert (pred == 2).any()
    m = classification_metrics(y, probs, CLASSES)
    pneumonia = m["per_class"]["Pneumonia"]
    assert pneumonia["support"] == 0
    assert pneumonia["roc_auc"] is None and pneumonia["average_precision"] is None
    assert pneumonia["recall"] is None  # undefined, and left out of balanced accuracy: not a 0 shown beside it
    assert m["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == k] == k) for k in (0, 1)]))
    assert m["balanced_accuracy"] == pytest.approx(np.mean([v["recall"] for v in m["per_class"].values()
                                                            if v["recall"] is not None]))
    assert m["macro_roc_auc"] == pytest.approx(
        np.mean([skm.roc_auc_score(y == k, probs[:, k]) for k in (0, 1)])
    )
    # Predicted-but-absent class counts as F1 = 0, as in scikit-learn's default macro F1.
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_bad_inputs_raise_a_readable_error():
    with pytest.raises(CxrFastError, match="2-D"):
        classification_metrics([0, 1], [0.2, 0.8], CLASSES)
    with pytest.raises(CxrFastError, match="labels"):
        classification_metrics([0, 1, 2], HAND_PROBS, CLASSES)
    with pytest.raises(CxrFastError, match="0..2"):
        classification_metrics(np.full(12, 3), HAND_PROBS, CLASSES)
    with pytest.raises(CxrFastError, match="class names"):
        classification_metrics(HAND_Y, HAND_PROBS, CLASSES[:2])
    with pytest.raises(CxrFastError, match="unknown metric"):
        bootstrap_ci(HAND_Y, HAND_PROBS, "sensitivity")


def _sklearn_metric(name):
    """The same metric computed case by case with scikit-learn, for checking the vectorised bootstrap."""

    def metric(y, probs):
        pred = probs.argmax(axis=1)
        if name == "accuracy":
            return skm.accuracy_score(y, pred)
        if name == "balanced_accuracy":
            return skm.balanced_accuracy_score(y, pred)
        if name == "macro_f1":
            return skm.f1_score(y, pred, average="macro")
        scorer = skm.roc_auc_score if name == "macro_roc_auc" else skm.average_precision_score
        return np.mean(
            [scorer(y == k, probs[:, k]) for k in range(probs.shape[1]) if 0 < (y == k).sum() < len(y)]
        )

    return metric


@pytest.mark.parametrize("name", BOOTSTRAP_METRICS)
def test_vectorised_bootstrap_equals_scikit_learn_on_the_same_resamples(name):
    y, probs = noisy_predictions(120, seed=7)
    fast = bootstrap_replicates(y, probs, name, n_boot=40, seed=11)
    slow = bootstrap_replicates(y, probs, _sklearn_metric(name), n_boot=40, seed=11)
    np.testing.assert_allclose(fast, slow, rtol=1e-10)
    assert np.std(fast) > 0  # the resamples really differ


@pytest.mark.parametrize("name", BOOTSTRAP_METRICS)
def test_bootstrap_interval_contains_estimate_and_narrows_with_more_cases(name):
    widths = []
    for n in (100, 2000):
        y, probs = noisy_predictions(n, seed=n)
        estimate = classification_metrics(y, probs, CLASSES)[name]
        low, high = bootstrap_ci(y, probs, name, n_boot=400, seed=0)
        assert low <= estimate <= high
        widths.append(high - low)
    # The width shrinks like 1/sqrt(n): about 4.5 times narrower; demand at least 2.5.
    assert widths[1] < widths[0] / 2.5


def test_bootstrap_is_reproducible_and_seed_dependent():
    y, probs = noisy_predictions(200)
    first = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=200, seed=1)
    assert bootstrap_ci(y, probs, "balanced_accuracy", n_boot=200, seed=1) == first
    assert bootstrap_ci(y, probs, "balanced_accuracy", n_boot=200, seed=2) != first
    narrow = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=200, seed=1, alpha=0.5)
    assert first[0] < narrow[0] <= narrow[1] < first[1]


def test_bootstrap_of_1000_cases_is_fast():
    y, probs = noisy_predictions(1000)
    start = time.perf_counter()
    for name in ("balanced_accuracy", "macro_roc_auc"):
        bootstrap_ci(y, probs, name, n_boot=1000)
    # Typically well under a second; the bound only catches a fall back to per-resample Python loops.
    assert time.perf_counter() - start < 10


def test_mcnemar_exact_against_hand_computation():
    # 7 cases only A gets right, 2 only B, 11 both, 4 neither.
    y = np.zeros(24, dtype=int)
    pred_a = np.array([0] * 7 + [1] * 2 + [0] * 11 + [1] * 4)
    pred_b = np.array([1] * 7 + [0] * 2 + [0] * 11 + [1] * 4)
    result = mcnemar(y, pred_a, pred_b)
    assert (result["b"], result["c"], result["method"]) == (7, 2, "exact")
    # Two-sided exact binomial: 2 * P(X <= 2 | n = 9, p = 1/2) = 2 * (1 + 9 + 36) / 512.
    assert result["p_value"] == pytest.approx(2 * 46 / 512)
    assert result["statistic"] == 2
    # Symmetric in the two models.
    assert mcnemar(y, pred_b, pred_a)["p_value"] == pytest.approx(result["p_value"])


def test_mcnemar_chi_square_against_known_values():
    # Agresti's presidential approval table [[794, 86], [150, 570]]: with continuity correction the
    # statistic is (|86 - 150| - 1)^2 / 236 = 16.82, p = 4.1e-5 (statsmodels' mcnemar(exact=False) gives the same).
    counts = {"both": 794, "only_a": 150, "only_b": 86, "neither": 570}
    y = np.zeros(sum(counts.values()), dtype=int)
    pred_a = np.concatenate([np.zeros(794), np.zeros(150), np.ones(86), np.ones(570)]).astype(int)
    pred_b = np.concatenate([np.zeros(794), np.ones(150), np.zeros(86), np.ones(570)]).astype(int)
    result = mcnemar(y, pred_a, pred_b)
    assert (result["b"], result["c"], result["method"]) == (150, 86, "chi2")
    assert result["statistic"] == pytest.approx(63**2 / 236)
    # Chi-square with one degree of freedom: P(X > s) = erfc(sqrt(s / 2)).
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(result["statistic"] / 2)))
    assert result["p_value"] == pytest.approx(4.115e-5, rel=1e-3)


def test_mcnemar_identical_models_and_bad_input():
    y, probs = noisy_predictions(50)
    pred = probs.argmax(axis=1)
    assert mcnemar(y, pred, pred) == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    with pytest.raises(CxrFastError, match="equal length"):
        mcnemar(y, pred, pred[:-1])


def test_roc_and_pr_curves_match_scikit_learn():
    y, probs = noisy_predictions(150, seed=9)
    roc = roc_curves(y, probs, CLASSES)
    pr = pr_curves(y, probs, CLASSES)
    assert list(roc) == CLASSES and list(pr) == CLASSES
    for k, name in enumerate(CLASSES):
        assert roc[name]["auc"] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]))
        assert roc[name]["auc"] == pytest.approx(skm.auc(roc[name]["fpr"], roc[name]["tpr"]))
        assert pr[name]["average_precision"] == pytest.approx(
            skm.average_precision_score(y == k, probs[:, k])
        )
        assert pr[name]["prevalence"] == pytest.approx(np.mean(y == k))
        assert len(pr[name]["precision"]) == len(pr[name]["recall"])


def test_curves_of_a_class_without_positives_are_none():
    y, probs = noisy_predictions(100)
    keep = y != 1
    roc = roc_curves(y[keep], probs[keep])
    pr = pr_curves(y[keep], probs[keep])
    assert list(roc) == ["0", "1", "2"]
    assert roc["1"] is None and pr["1"] is None
    assert roc["0"] is not None and pr["2"] is not None


def test_every_resample_keeps_the_class_counts_so_a_rare_class_cannot_widen_the_interval():
    # One Pneumonia image, missed. Drawn from all 30 images at once, a third of the resamples lacked it and scored the
    # mean recall of the other two classes (about 0.93), which pulled the interval up to 1.0 around 0.62.
    y = np.array([2] + [0] * 15 + [1] * 14)
    pred = y.copy()
    pred[[0, 1, 16]] = [0, 1, 0]
    probs = np.where(np.eye(3)[pred] == 1, 0.8, 0.1)
    estimate = classification_metrics(y, probs, CLASSES)["balanced_accuracy"]
    low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=1000, seed=0)
    assert low <= estimate <= high < 0.7
    # the macro AUC over three classes is not mixed with two-class averages either
    assert not np.isnan(bootstrap_replicates(y, probs, "macro_roc_auc", n_boot=200, seed=0)).any()
    # a model calling everything COVID-19 scores 1/3 on every resample that holds every class, so on all of them
    assert bootstrap_ci(y, np.tile([0.8, 0.1, 0.1], (30, 1)), "balanced_accuracy", seed=0) == pytest.approx((1 / 3,) * 2)


def test_mcnemar_gives_p_1_for_equal_discordant_counts_in_the_chi_square_range():
    y = np.zeros(26, int)
    a = np.r_[np.zeros(13, int), np.ones(13, int)]  # b = c = 13: 26 discordant images, the chi-square test
    result = mcnemar(y, a, 1 - a)
    assert result["method"] == "chi2" and result["p_value"] == 1.0


def test_default_interval_is_the_central_95_percent_of_the_replicates():
    # the replicates themselves are checked against scikit-learn above; the interval must cut 2.5 % off each end
    y, probs = noisy_predictions(200, seed=12)
    replicates = bootstrap_replicates(y, probs, "balanced_accuracy", n_boot=400, seed=3)
    expected = np.percentile(replicates, [2.5, 97.5])
    assert bootstrap_ci(y, probs, "balanced_accuracy", n_boot=400, seed=3) == pytest.approx(tuple(expected))
    expected_80 = np.percentile(replicates, [10, 90])
    assert bootstrap_ci(y, probs, "balanced_accuracy", n_boot=400, seed=3, alpha=0.2) == pytest.approx(
        tuple(expected_80))


def test_resamples_where_a_callable_metric_is_undefined_are_dropped_from_the_interval():
    y, probs = noisy_predictions(60, seed=13, rounding=6)
    marker = probs[0, 0]  # case 0's score, unique at six decimals

    def accuracy_if_case_0_drawn(y_sample, probs_sample):
        if not np.any(probs_sample[:, 0] == marker):
            return np.nan
        return float(np.mean(probs_sample.argmax(axis=1) == y_sample))

    values = bootstrap_replicates(y, probs, accuracy_if_case_0_drawn, n_boot=300, seed=4)
    defined = values[~np.isnan(values)]
    assert 0 < len(defined) < len(values)  # some resamples miss case 0, most hold it
    low, high = bootstrap_ci(y, probs, accuracy_if_case_0_drawn, n_boot=300, seed=4)
    assert (low, high) == pytest.approx(tuple(np.percentile(defined, [2.5, 97.5])))


def test_bootstrap_gives_exactly_n_boot_values_when_it_works_in_chunks(monkeypatch):
    from cxr_fast import metrics

    y, probs = noisy_predictions(50, seed=14)
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 50 * 7)  # 7 resamples a chunk: 25 = 7 + 7 + 7 + 4
    for name in ("accuracy", "macro_roc_auc", _sklearn_metric("macro_f1")):
        assert bootstrap_replicates(y, probs, name, n_boot=25, seed=0).shape == (25,)
    # and each chunked replicate is still the metric of its resample
    fast = bootstrap_replicates(y, probs, "macro_f1", n_boot=25, seed=0)
    slow = bootstrap_replicates(y, probs, _sklearn_metric("macro_f1"), n_boot=25, seed=0)
    np.testing.assert_allclose(fast, slow, rtol=1e-10)


def test_negative_labels_are_refused():
    # unchecked, a -1 is counted into the previous resample's matrix by the bootstrap's batched confusion matrices
    # (and calibration's nll, which checks labels the same way, would read the last class's probability)
    y = HAND_Y.copy()
    y[0] = -1
    with pytest.raises(CxrFastError, match=r"0\.\.2, got -1\.\.2"):
        classification_metrics(y, HAND_PROBS, CLASSES)
    with pytest.raises(CxrFastError, match=r"0\.\.2, got -1\.\.2"):
        bootstrap_replicates(y, HAND_PROBS, "accuracy", n_boot=5)


def test_fractional_labels_are_refused():
    with pytest.raises(CxrFastError, match="integer class indices"):
        classification_metrics(np.array([0.0, 1.5, 2.0]), HAND_PROBS[:3], CLASSES)
    # whole numbers stored as floats are fine
    assert classification_metrics(HAND_Y.astype(float), HAND_PROBS, CLASSES)["accuracy"] == pytest.approx(8 / 12)


def _mcnemar_of(b: int, c: int, both: int = 10):
    """Predictions with b cases only A gets right, c only B gets right, and `both` that both get right."""
    y = np.zeros(b + c + both, dtype=int)
    pred_a = np.array([0] * b + [1] * c + [0] * both)
    pred_b = np.array([1] * b + [0] * c + [0] * both)
    return mcnemar(y, pred_a, pred_b)


def test_mcnemar_switches_to_chi_square_at_25_discordant_cases():
    exact = _mcnemar_of(19, 5)  # 24 discordant: exact, 2 * P(X <= 5 | n = 24, p = 1/2)
    assert exact["method"] == "exact"
    assert exact["p_value"] == pytest.approx(2 * sum(math.comb(24, k) for k in range(6)) / 2**24)
    chi2 = _mcnemar_of(20, 5)  # 25 discordant: (|20 - 5| - 1)^2 / 25 = 7.84
    assert chi2["method"] == "chi2"
    assert chi2["statistic"] == pytest.approx(7.84)
    assert chi2["p_value"] == pytest.approx(math.erfc(math.sqrt(7.84 / 2)))


def test_mcnemar_exact_p_value_is_at_most_one():
    # b = c = 3: 2 * P(X <= 3 | n = 6) = 2 * 42 / 64 = 1.31, which is no probability: it is 1
    result = _mcnemar_of(3, 3)
    assert result["method"] == "exact" and result["p_value"] == 1.0


def test_roc_curve_of_a_class_present_in_every_case_is_none():
    # no negatives: no false positive rate, and no AUC (classification_metrics says None too)
    y = np.ones(4, dtype=int)
    probs = np.array([[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.6, 0.2, 0.2]])
    assert roc_curves(y, probs, CLASSES) == {name: None for name in CLASSES}


def test_pr_curve_of_a_class_present_in_every_case_has_no_average_precision():
    # a test set of Normal films alone: precision is 1 at every threshold, so AP would read 1.000 (or nan) beside any
    # recall; classification_metrics reports None, and so must the curve the PR plot labels
    y = np.ones(4, dtype=int)
    probs = np.array([[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.6, 0.2, 0.2]])
    curve = pr_curves(y, probs, CLASSES)["Normal"]
    assert curve["average_precision"] is None
    assert curve["prevalence"] == 1.0
    assert classification_metrics(y, probs, CLASSES)["per_class"]["Normal"]["average_precision"] is None


def coverage(counts, recalls, simulations=200, n_boot=500):
    """Share of simulated test sets whose 95 % balanced-accuracy interval holds the true value, the mean of `recalls`:
    each image of class k is predicted right with probability recalls[k]."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), counts)
    hits = 0
    for seed in range(simulations):
        right = rng.random(len(y)) < np.asarray(recalls)[y]
        probs = np.where(np.eye(3)[np.where(right, y, (y + 1) % 3)] == 1, 0.8, 0.1)
        low, high = bootstrap_ci(y, probs, "balanced_accuracy", n_boot=n_boot, seed=seed)
        hits += low <= np.mean(recalls) <= high
    return hits / simulations


def test_the_interval_holds_a_known_balanced_accuracy_95_times_in_100_but_not_for_a_class_of_one_image():
    # as evaluation.md says: with 19 or more images per class the 95 % interval is one; with a single image of a class,
    # its recall is the same on every resample, so the interval takes it as known and is far too narrow
    assert 0.9 <= coverage([19, 79, 79], [0.7, 0.85, 0.9]) <= 0.99
    assert coverage([1, 40, 40], [0.5, 0.8, 0.8], simulations=50) < 0.1
