"""Bootstrap intervals of AUROC and AUPR (raycf.method.bootstrap) on hand-checked cases and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from raycf.method.bootstrap import interval_frame, percentile_interval, resample_counts, weighted_auroc_aupr

# Four images: errors at scores 0.8 and 0.4, right predictions at 0.6 and 0.2.
# AUROC: 0.8 beats both right ones, 0.4 beats one: 3 of 4 pairs.
# AUPR: 0.8 is an error (precision 1, recall 1/2); at 0.4 recall 1, precision 2/3: 1/2 · 1 + 1/2 · 2/3.
HAND_ERRORS = np.array([True, False, True, False])
HAND_SCORES = np.array([0.8, 0.6, 0.4, 0.2])


def test_hand_checked_auroc_and_aupr_with_unit_weights():
    auroc, aupr = weighted_auroc_aupr(HAND_ERRORS, HAND_SCORES, np.ones((1, 4)))
    assert auroc[0] == pytest.approx(3 / 4) and aupr[0] == pytest.approx(1 / 2 + 1 / 3)
    # counts are weights: with the right prediction at 0.6 drawn twice, 0.8 beats 3 of 3 right draws, 0.4 beats 1 of 3
    auroc, _ = weighted_auroc_aupr(HAND_ERRORS, HAND_SCORES, np.array([[1, 2, 1, 1]]))
    assert auroc[0] == pytest.approx(4 / 6)


def test_weighted_statistics_equal_scikit_learn_on_the_resampled_images():
    generator = np.random.default_rng(3)
    errors = generator.random(400) < 0.15
    scores = np.round(generator.normal(size=400) + errors, 1)  # rounded: many ties
    counts = next(resample_counts(400, 5, seed=11))
    auroc, aupr = weighted_auroc_aupr(errors, scores, counts)
    for row, weights in enumerate(counts):
        drawn = np.repeat(np.arange(400), weights)
        assert auroc[row] == pytest.approx(roc_auc_score(errors[drawn], scores[drawn]), abs=1e-12)
        assert aupr[row] == pytest.approx(average_precision_score(errors[drawn], scores[drawn]), abs=1e-12)


def test_a_resample_without_both_classes_has_no_value():
    auroc, aupr = weighted_auroc_aupr(HAND_ERRORS, HAND_SCORES, np.array([[1, 0, 3, 0], [0, 2, 0, 2], [1, 1, 1, 1]]))
    assert np.isnan(auroc[:2]).all() and np.isnan(aupr[:2]).all() and auroc[2] == pytest.approx(0.75)


def test_resamples_draw_every_image_count_once_per_row_and_follow_the_seed():
    blocks = list(resample_counts(7, 1000, seed=0))
    counts = np.concatenate(blocks)
    assert counts.shape == (1000, 7) and (counts.sum(axis=1) == 7).all()
    assert np.array_equal(counts, np.concatenate(list(resample_counts(7, 1000, seed=0))))
    assert not np.array_equal(counts, np.concatenate(list(resample_counts(7, 1000, seed=1))))


def test_perfect_separation_gives_auroc_one_and_the_interval_one_one():
    errors = np.array([True, True, False, False, False, False])
    frame = interval_frame(errors, {"perfect": np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.4])}, "perfect", resamples=200, seed=0).iloc[0]
    assert (frame["auroc_lo"], frame["auroc_hi"], frame["aupr_lo"], frame["aupr_hi"]) == (1.0, 1.0, 1.0, 1.0)
    assert 0 < frame["bootstrap_defined"] < 200  # resamples without an error (or without a right one) are left out
    assert frame["bootstrap"] == 200


def test_intervals_contain_the_estimate_repeat_with_the_seed_and_pair_the_difference():
    generator = np.random.default_rng(0)
    errors = generator.random(2000) < 0.1
    good = generator.normal(size=2000) + 1.5 * errors
    weak = generator.normal(size=2000) + 0.3 * errors
    scores = {"good": good, "weak": weak}
    frame = interval_frame(errors, scores, "good", resamples=500, seed=7).set_index("score")
    for name, values in scores.items():
        row = frame.loc[name]
        assert row["auroc_lo"] < roc_auc_score(errors, values) < row["auroc_hi"]
        assert row["aupr_lo"] < average_precision_score(errors, values) < row["aupr_hi"]
        assert row["auroc_hi"] - row["auroc_lo"] < 0.1
    assert frame.loc["weak", "auroc_diff"] == pytest.approx(roc_auc_score(errors, weak) - roc_auc_score(errors, good))
    assert frame.loc["weak", "auroc_diff_hi"] < 0  # the weak score is worse, and the paired interval says so
    assert (frame.loc["good", "auroc_diff_lo"], frame.loc["good", "auroc_diff_hi"]) == (0.0, 0.0)
    again = interval_frame(errors, scores, "good", resamples=500, seed=7).set_index("score")
    assert again.equals(frame)
    other = interval_frame(errors, scores, "good", resamples=500, seed=8).set_index("score")
    assert other.loc["weak", "auroc_lo"] != frame.loc["weak", "auroc_lo"]


def test_no_resamples_and_an_unknown_baseline():
    frame = interval_frame(HAND_ERRORS, {"s": HAND_SCORES}, "s", resamples=0, seed=0).iloc[0]
    assert np.isnan(frame["auroc_lo"]) and np.isnan(frame["auroc_diff_hi"]) and frame["auroc_diff"] == 0.0
    with pytest.raises(ValueError, match="baseline"):
        interval_frame(HAND_ERRORS, {"s": HAND_SCORES}, "max_softmax", resamples=10, seed=0)
    for labels in (np.zeros(4, bool), np.ones(4, bool)):  # a split without errors, or without right predictions
        frame = interval_frame(labels, {"s": HAND_SCORES}, "s", resamples=20, seed=0).iloc[0]
        assert frame["bootstrap_defined"] == 0 and np.isnan(frame["auroc_lo"]) and np.isnan(frame["aupr_hi"])
    assert np.isnan(percentile_interval(np.array([np.nan, np.nan]))).all()
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
