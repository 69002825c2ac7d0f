"""Metric, calibration and threshold functions against hand-computed values and scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from training import metrics as m
from training.calibration import (
    ThresholdMethod,
    fit_temperature,
    operating_point,
    parse_rule,
    rule_name,
    select_threshold,
    threshold_interval,
)

LABELS = np.array([0, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.6, 0.35, 0.8, 0.9])


def test_hand_computed_example() -> None:
    # Pairs (pos, neg): 0.35 beats 0.1 but not 0.6; 0.8 and 0.9 beat both -> 5/6.
    assert m.roc_auc(LABELS, SCORES) == pytest.approx(5 / 6)
    # Ranked: 0.9(+) 0.8(+) 0.6(-) 0.35(+) 0.1(-): AP = (1 + 1 + 3/4) / 3.
    assert m.average_precision(LABELS, SCORES) == pytest.approx((1 + 1 + 0.75) / 3)
    assert m.brier_score(LABELS, SCORES) == pytest.approx((0.01 + 0.36 + 0.4225 + 0.04 + 0.01) / 5)
    assert m.confusion(LABELS, SCORES, 0.5) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    report = m.binary_metrics(LABELS, SCORES, 0.5)
    # The report's keys are what metrics.json and the model card carry: all present, under these names.
    assert set(report) == {
        *("n", "n_positive", "threshold", "accuracy", "sensitivity", "specificity", "precision", "f1"),
        *("roc_auc", "pr_auc", "brier", "ece", "tp", "fp", "tn", "fn"),
    }
    assert (report["n"], report["n_positive"], report["threshold"]) == (5, 3, 0.5)
    assert (report["roc_auc"], report["pr_auc"]) == (pytest.approx(5 / 6), pytest.approx((1 + 1 + 0.75) / 3))
    assert (report["tp"], report["fp"], report["tn"], report["fn"]) == (2, 1, 1, 1)
    assert report["brier"] == pytest.approx((0.01 + 0.36 + 0.4225 + 0.04 + 0.01) / 5)
    # Each score alone in its 1/15-wide bin: the ECE is the mean |p - y| = (0.1 + 0.6 + 0.65 + 0.2 + 0.1) / 5.
    assert report["ece"] == pytest.approx(0.33)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["sensitivity"] == pytest.approx(2 / 3)
    assert report["specificity"] == pytest.approx(1 / 2)
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3)
    # Threshold is inclusive: a score equal to it is positive.
    assert m.confusion(LABELS, SCORES, 0.35)["tp"] == 3


def test_ece_hand_computed() -> None:
    labels = np.array([0, 1, 1, 1])
    probs = np.array([0.05, 0.05, 0.95, 0.95])
    # Bin [0, 1/15): mean p 0.05, positive rate 0.5 -> 0.45; top bin: 0.95 vs 1.0 -> 0.05.
    assert m.expected_calibration_error(labels, probs) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)
    assert m.expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0
    # The bin count is honoured: 0.1 (-) and 0.4 (+) share the lower of 2 bins (mean 0.25 vs rate 0.5),
    # but sit in different bins of 15 (|0.1 - 0| and |0.4 - 1|, averaged).
    assert m.expected_calibration_error(np.array([0, 1]), np.array([0.1, 0.4]), n_bins=2) == pytest.approx(0.25)
    assert m.expected_calibration_error(np.array([0, 1]), np.array([0.1, 0.4])) == pytest.approx(0.35)


def test_reliability_bins_put_certainty_in_the_end_bins() -> None:
    # p = 1.0 belongs to the top bin [14/15, 1], not to a 16th one; p = 0.0 to the first; empty bins are NaN,
    # quietly (no 0/0 RuntimeWarning in every training report).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        confidence, observed, counts = m.reliability_bins(np.array([1, 1, 0]), np.array([1.0, 0.95, 0.0]))
    assert counts.shape == confidence.shape == observed.shape == (15,)
    assert (counts[0], counts[14], counts.sum()) == (1.0, 2.0, 3.0)
    assert (confidence[0], observed[0]) == (0.0, 0.0)
    assert (confidence[14], observed[14]) == (pytest.approx(0.975), 1.0)
    assert np.isnan(confidence[1:14]).all() and np.isnan(observed[1:14]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)  # rounding makes ties
    assert m.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert m.average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores))
    assert m.brier_score(labels, scores) == pytest.approx(skm.brier_score_loss(labels, scores))
    fpr, tpr, thresholds = m.roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    precision, recall, _ = m.pr_curve(labels, scores)
    sk_precision, sk_recall, _ = skm.precision_recall_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(precision, sk_precision)
    np.testing.assert_allclose(recall, sk_recall)
    report = m.binary_metrics(labels, scores, 0.5)
    predicted = (scores >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted).ravel()
    assert (report["tn"], report["fp"], report["fn"], report["tp"]) == (tn, fp, fn, tp)
    assert report["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert report["precision"] == pytest.approx(skm.precision_score(labels, predicted))
    assert report["specificity"] == pytest.approx(skm.recall_score(labels, predicted, pos_label=0))


def test_one_class_auc_is_nan_not_an_error() -> None:
    assert math.isnan(m.roc_auc(np.ones(4), np.linspace(0, 1, 4)))


def test_roc_curve_of_one_class_is_nan_on_the_missing_axis_and_warns_nothing() -> None:
    # All negative: the false-positive rate climbs 0, 1/3, 2/3, 1 while the true-positive rate is undefined;
    # all positive: the mirror image. No 0/0 RuntimeWarning either way.
    scores = np.array([0.2, 0.5, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        negatives = m.roc_curve(np.zeros(3), scores)
        positives = m.roc_curve(np.ones(3), scores)
    for fpr_or_tpr, nan_axis in ((negatives[0], negatives[1]), (positives[1], positives[0])):
        np.testing.assert_allclose(fpr_or_tpr, [0.0, 1 / 3, 2 / 3, 1.0])
        assert np.isnan(nan_axis).all() and nan_axis.shape == (4,)
    np.testing.assert_array_equal(negatives[2], [np.inf, 0.9, 0.5, 0.2])


def test_pr_curve_without_positives_has_nan_recall_and_warns_nothing() -> None:
    # A validation fold with no pneumonia case: recall is undefined (NaN), computed without numpy's 0/0
    # RuntimeWarning (a report run must not print warnings for a case it handles on purpose).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision, recall, thresholds = m.pr_curve(np.zeros(3), np.array([0.2, 0.5, 0.9]))
    np.testing.assert_array_equal(precision, [0.0, 0.0, 0.0, 1.0])
    assert np.isnan(recall[:-1]).all() and recall[-1] == 0.0
    np.testing.assert_array_equal(thresholds, [0.2, 0.5, 0.9])


def test_pr_curve_with_the_only_positive_ranked_last() -> None:
    # Scores descending 0.9(-) 0.5(-) 0.2(+): at thresholds 0.9, 0.5 nothing is found (precision 0, recall 0);
    # at 0.2 everything is positive (precision 1/3, recall 1). Thresholds ascending, then the (1, 0) end point.
    precision, recall, thresholds = m.pr_curve(np.array([0, 0, 1]), np.array([0.9, 0.5, 0.2]))
    np.testing.assert_allclose(precision, [1 / 3, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(recall, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(thresholds, [0.2, 0.5, 0.9])


def test_bootstrap_interval_contains_estimate_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    wide = m.bootstrap_ci(labels[:100], scores[:100], 0.5, n_boot=300, seed=1)
    narrow = m.bootstrap_ci(labels, scores, 0.5, n_boot=300, seed=1)
    for key, (lo, hi) in narrow.items():
        estimate = m.roc_auc(labels, scores) if key == "roc_auc" else m.threshold_metrics(labels, scores, 0.5)[key]
        assert lo <= estimate <= hi, key
        assert hi - lo < wide[key][1] - wide[key][0], key


def test_scores_of_any_numeric_type_are_ranked_as_numbers() -> None:
    """uint8 scores (an 8-bit quantised output) must not wrap around when negated for the descending sort."""
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([10, 200, 180, 250, 0, 90], dtype=np.uint8)
    assert m.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores.astype(np.float64)))
    assert m.roc_auc(labels, scores) == pytest.approx(7 / 9)  # 7 of the 9 (positive, negative) pairs ordered
    # descending: 250 (pos), 200 (neg), 180 (pos), 90 (pos), 10 (neg), 0 (neg)
    fpr, tpr, thresholds = m.roc_curve(labels, scores)
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    assert thresholds.tolist() == [np.inf, 250, 200, 180, 90, 10, 0]


def test_labels_and_scores_of_different_lengths_are_refused_with_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"^labels and scores differ in length: \(3,\) vs \(2,\)$"):
        m.roc_auc(np.array([0, 1, 1]), np.array([0.2, 0.9]))


def test_bootstrap_draws_every_case_including_the_first() -> None:
    """The only normal case is case 0 and it is correctly called: resamples that hold it give specificity 1."""
    labels = np.array([0] + [1] * 9)
    scores = np.array([0.1] + [0.9] * 9)
    interval = m.bootstrap_ci(labels, scores, 0.5, n_boot=200, seed=0)
    assert interval["specificity"] == [1.0, 1.0]  # never NaN: case 0 is drawn in about 65% of resamples


def test_bootstrap_of_a_metric_no_resample_can_define_is_nan_without_a_warning() -> None:
    """No positives: AUC and sensitivity are undefined in every resample, so the interval is NaN, quietly."""
    labels = np.zeros(5, dtype=int)
    scores = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nanpercentile of all-NaN warns "All-NaN slice"
        interval = m.bootstrap_ci(labels, scores, 0.6, n_boot=50, seed=0)
    assert all(math.isnan(v) for v in interval["roc_auc"] + interval["sensitivity"])
    assert 0.0 <= interval["specificity"][0] <= interval["specificity"][1] <= 1.0  # 3 of 5 below 0.6


@pytest.mark.parametrize(
    ("labels", "auc"),
    [
        pytest.param([0, 0, 1], 1.0, id="one-positive-ranked-first"),
        pytest.param([0, 1, 0], 0.5, id="one-positive-between"),  # above one of the two negatives
        pytest.param([1, 1, 0], 0.0, id="one-negative-ranked-first"),
    ],
)
def test_auc_with_a_single_case_of_one_class_is_defined(labels: list[int], auc: float) -> None:
    """One positive (or negative) is enough for the Mann-Whitney AUC: the share of pairs it orders right."""
    assert m.roc_auc(np.array(labels), np.array([0.1, 0.2, 0.9])) == auc


def test_bootstrap_is_reproducible_from_its_seed() -> None:
    labels = np.array([0, 1] * 10)
    scores = np.linspace(0.05, 0.95, 20)
    first = m.bootstrap_ci(labels, scores, 0.5, n_boot=40, seed=7)
    assert first == m.bootstrap_ci(labels, scores, 0.5, n_boot=40, seed=7)
    assert first != m.bootstrap_ci(labels, scores, 0.5, n_boot=40, seed=8)


def test_temperature_recovers_the_generating_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    true_temperature = 2.5
    logits = torch.randn(20_000, 2, generator=generator) * 4.0
    probs = torch.softmax(logits / true_temperature, dim=1)[:, 1]
    labels = (torch.rand(20_000, generator=generator) < probs).long()
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_temperature_minimises_nll() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 2, generator=generator) * 3
    labels = (torch.rand(500, generator=generator) < torch.softmax(logits * 0.6, dim=1)[:, 1]).long()
    fitted = fit_temperature(logits, labels)
    nll = [float(torch.nn.functional.cross_entropy(logits / t, labels)) for t in (fitted * 0.9, fitted, fitted * 1.1)]
    assert nll[1] <= min(nll[0], nll[2])


def test_sensitivity_threshold_is_the_highest_meeting_the_target() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.3, 0.7, 0.2, 0.6, 0.8, 0.9])
    assert select_threshold(labels, probs, "sensitivity", 0.75) == pytest.approx(0.6)
    assert select_threshold(labels, probs, "sensitivity", 0.76) == pytest.approx(0.2)
    assert select_threshold(labels, probs, "sensitivity", 0.5) == pytest.approx(0.8)


def test_youden_threshold_maximises_j() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(rng.normal(0.4 + 0.2 * labels, 0.15), 0, 1)
    chosen = select_threshold(labels, probs, "youden")

    def j(t: float) -> float:
        r = m.threshold_metrics(labels, probs, t)
        return r["sensitivity"] + r["specificity"] - 1

    assert j(chosen) == pytest.approx(max(j(t) for t in np.unique(probs)))


def test_sensitivity_threshold_defaults_to_95_percent_and_needs_at_least_one_case() -> None:
    # 20 positives scored 0.05, 0.10, ..., 1.00 and one negative: catching 95% = 19 of them means the
    # threshold is the 19th highest score, 0.10; a 25% target over 4 positives needs just the top one.
    positives = np.arange(1, 21) / 20
    labels = np.r_[np.ones(20, dtype=int), 0]
    probs = np.r_[positives, 0.5]
    assert select_threshold(labels, probs, "sensitivity") == pytest.approx(0.10)
    assert select_threshold(labels[16:], probs[16:], "sensitivity", 0.25) == pytest.approx(1.0)
    assert select_threshold(labels[16:], probs[16:], "sensitivity", 0.01) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["sensitivity", "youden"])
def test_threshold_selection_refuses_one_class(method: str) -> None:
    with pytest.raises(ValueError, match=r"^threshold selection needs both classes in the validation data$"):
        select_threshold(np.ones(5), np.linspace(0, 1, 5), method)  # type: ignore[arg-type]


def test_temperature_stays_inside_its_search_bounds() -> None:
    # Separable logits: the NLL keeps falling as 1/T grows, so the fit stops at the bound 1/T = 50 (T = 0.02).
    # Logits that point the wrong way: the best positive 1/T is the smallest allowed, 0.02 (T = 50).
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 50)
    labels = torch.tensor([1, 0] * 50)
    assert fit_temperature(logits, labels) == pytest.approx(0.02, rel=1e-6)
    assert fit_temperature(logits, 1 - labels) == pytest.approx(50.0, rel=1e-6)


def test_an_unknown_threshold_method_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^unknown threshold method 'f1': sensitivity or youden$"):
        select_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "f1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "target", "name"), [("sensitivity", 0.95, "sensitivity>=0.95"), ("youden", 0.95, "youden")]
)
def test_the_recorded_rule_name_reads_back_as_the_rule(method: ThresholdMethod, target: float, name: str) -> None:
    assert rule_name(method, target) == name
    assert parse_rule(name) == (method, target)


def test_a_rule_name_training_never_writes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^unknown threshold rule 'default'$"):
        parse_rule("default")


def test_operating_point_is_the_fitted_temperature_and_the_threshold_on_its_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    logits = torch.stack([-labels * 2.0, labels * 2.0], dim=1) + torch.randn(200, 2, generator=generator) * 2
    temperature, threshold, probs = operating_point(logits, labels, "sensitivity", 0.9)
    assert temperature == fit_temperature(logits, labels)
    expected = torch.softmax(logits.double() / temperature, dim=1)[:, 1].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert threshold == select_threshold(labels.numpy(), probs, "sensitivity", 0.9)


def test_threshold_interval_brackets_the_threshold_and_narrows_with_data() -> None:
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        return labels, np.clip(rng.normal(0.3 + 0.4 * labels, 0.15), 0, 1)

    widths = []
    for n in (200, 5000):
        labels, probs = sample(n)
        low, high = threshold_interval(labels, probs, "sensitivity", resamples=300)
        assert low < select_threshold(labels, probs, "sensitivity") < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # about 1/sqrt(n)
    assert threshold_interval(labels, probs, "sensitivity", resamples=50, seed=3) == threshold_interval(
        labels, probs, "sensitivity", resamples=50, seed=3
    )


def test_threshold_interval_of_tied_positives_is_that_score_and_one_class_is_refused() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.8, 0.8, 0.8, 0.8])
    assert threshold_interval(labels, probs, "sensitivity", resamples=100) == (0.8, 0.8)
    with pytest.raises(ValueError, match="no bootstrap resample held both classes"):
        threshold_interval(np.ones(4), np.linspace(0, 1, 4), "sensitivity", resamples=10)
