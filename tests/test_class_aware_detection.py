"""Class-centred scores, within-class AUROC, Holm's adjustment, bootstrap p-values and Table 1's controls on hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from raycf.config import AnalysisConfig, DetectionSetting
from raycf.method.bootstrap import bootstrap_p_value, interval_frame, within_class_interval_frame
from raycf.method.class_centred import centre_by_class, class_statistics, within_class_auroc
from raycf.method.detection import analyse, auroc, control_rows, detection_row, error_score_frame, least_confident_flags, skip_gate_flags
from raycf.method.multiple import holm, survives
from test_detection import tiny_study_data


def test_class_centring_on_two_classes():
    # class 0's accepted scores 1 and 3: mean 2, sd 1; class 1's 10 and 10: mean 10, sd 0 (centred, not scaled)
    means, sds = class_statistics(np.array([1.0, 3.0, 10.0, 10.0]), np.array([0, 0, 1, 1]), num_classes=3)
    assert means[:2].tolist() == [2.0, 10.0] and sds[:2].tolist() == [1.0, 0.0]
    assert np.isnan(means[2]) and np.isnan(sds[2])  # no accepted image of class 2
    centred = centre_by_class(np.array([4.0, 0.5, 12.0, 7.0]), np.array([0, 0, 1, 2]), means, sds)
    assert centred.tolist() == [2.0, -1.5, 2.0, 0.0]  # class 2 has no statistics: 0


def test_within_class_auroc_weights_classes_by_their_errors_and_differs_from_pooled():
    # class 0 scores high everywhere, class 1 low; within each class the errors score highest
    errors = np.array([True, False, False, True, True, False, False])
    scores = np.array([10.0, 9.0, 11.5, 2.0, 2.5, 1.0, 0.0])
    classes = np.array([0, 0, 0, 1, 1, 1, 1])
    # class 0: error 10 beats 9, loses to 11.5 -> 1/2 (one error); class 1: errors 2, 2.5 beat 1 and 0 -> 1 (two errors)
    assert within_class_auroc(errors, scores, classes)[0] == pytest.approx((1 * 0.5 + 2 * 1.0) / 3)
    # pooled: error 10 beats 9, 1, 0 (3 of 4); errors 2 and 2.5 beat 1, 0 (2 of 4 each) -> 7/12
    assert auroc(errors, scores) == pytest.approx(7 / 12)
    # a class with errors only (or none) does not count; weights enter as counts
    assert within_class_auroc(errors, scores, np.array([0, 0, 0, 1, 1, 2, 2]))[0] == pytest.approx(0.5)
    weighted = within_class_auroc(errors, scores, classes, np.array([[1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]))
    assert weighted.tolist() == pytest.approx([(1 * 1.0 + 2 * 1.0) / 3, 1.0])


def test_holm_on_three_p_values():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> running maximum 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9, 0.8]).tolist() == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, np.nan, 0.02])  # NaN is not a comparison: m = 2
    assert adjusted[[0, 2]].tolist() == pytest.approx([0.04, 0.04]) and np.isnan(adjusted[1])
    assert survives(0.04) and not survives(0.06) and not survives(float("nan"))


def test_bootstrap_p_value_counts_both_sides_of_zero():
    assert bootstrap_p_value(np.array([0.1, 0.2, -0.1, 0.3])) == pytest.approx(0.5)  # 1 of 4 at or below 0
    assert bootstrap_p_value(np.zeros(5)) == 1.0 and bootstrap_p_value(np.array([0.1, 0.2])) == 0.0
    assert np.isnan(bootstrap_p_value(np.array([np.nan])))


def test_within_class_intervals_share_the_pooled_resamples():
    generator = np.random.default_rng(3)
    classes = generator.integers(0, 3, 400)
    errors = generator.random(400) < 0.2
    scores = {"good": errors + generator.normal(size=400) + 3 * classes, "noise": generator.normal(size=400)}
    within = within_class_interval_frame(errors, scores, classes, "noise", resamples=300, seed=1).set_index("score")
    assert within.loc["good", "auroc_within"] == pytest.approx(within_class_auroc(errors, scores["good"], classes)[0])
    assert within.loc["good", "auroc_within_lo"] <= within.loc["good", "auroc_within"] <= within.loc["good", "auroc_within_hi"]
    assert within.loc["good", "auroc_within_diff_lo"] > 0 and within.loc["good", "auroc_within_diff_p"] < 0.01
    assert (within.loc["noise", "auroc_within_diff_lo"], within.loc["noise", "auroc_within_diff_p"]) == (0.0, 1.0)
    pooled = interval_frame(errors, scores, "noise", resamples=300, seed=1).set_index("score")
    # pooled over classes, the class offsets (3 per class) drown the signal the within-class AUROC finds
    assert pooled.loc["good", "auroc_diff_p"] > 0.05 and pooled.loc["noise", "auroc_diff_p"] == 1.0


def test_error_scores_hold_centred_forms_within_class_auroc_and_holm():
    data = tiny_study_data()
    frame = error_score_frame(data, "test", tau=0.9, freq_threshold=0.0, resamples=100, seed=0).set_index("score")
    # training images agree fully with their class (F1 1, sd 0): centring shifts every image by the same 1
    assert frame.loc["f1_centred", "auroc"] == pytest.approx(frame.loc["f1", "auroc"])
    # predicted class 0 holds the one error (image 4, F1 1/2) and three right images (F1 1, 2/3, 0):
    # it agrees less than two of them; class 1 has no error and does not count
    assert frame.loc["f1", "auroc_within"] == pytest.approx(2 / 3)
    assert frame.loc["f1_centred", "auroc_within"] == pytest.approx(frame.loc["f1", "auroc_within"])
    assert np.isnan(frame.loc["max_softmax", "auroc_diff_p_holm"])
    compared = frame.drop(index="max_softmax")
    assert (compared["auroc_diff_p_holm"] >= compared["auroc_diff_p"]).all() and (compared["auroc_diff_p_holm"] <= 1).all()


def test_table1_controls_flag_the_gate_and_the_least_confident():
    assert skip_gate_flags(np.array([0.99, 0.9, 0.5]), 0.9).tolist() == [False, True, True]
    assert least_confident_flags(np.array([0.5, 0.2, 0.5, 0.9]), 2).tolist() == [True, True, False, False]  # tie: the earlier
    data = tiny_study_data()  # confidences .99 .6 .6 .99 .6 .6; image 4 is the one error
    rule = detection_row(data, "test", DetectionSetting(metric="recall", threshold="avg", skip_threshold=0.9, freq_threshold=0.0), tau=0.9)
    gate, softmax = control_rows(data, "test", [rule], tau=0.9)
    assert (gate["flagged"], gate["errors_detected"], gate["new_errors"], gate["control"]) == (4, 1, 3, "skip gate")
    # the rule flags 3: max softmax flags images 1, 2, 4 (confidence .6, the earliest three), catching the error
    assert (softmax["flagged"], softmax["errors_detected"], softmax["new_errors"]) == (3, 1, 2)
    assert softmax["setting"] == "control: max softmax, as many as Avg. Recall" and softmax["altered_accuracy"] == softmax["accuracy"]


def test_analyse_appends_the_controls_to_every_split():
    data = tiny_study_data()
    data.splits["val"] = data.splits["test"]
    analysis = AnalysisConfig(tau=0.9, skip_threshold=0.9, freq_threshold=0.0, bootstrap=50, settings=[DetectionSetting(metric="f1", threshold=0.5)])
    detection = analyse(data, analysis)["detection"]
    for split in ("test", "val"):
        rows = detection[detection["split"] == split]
        assert rows["control"].tolist() == ["", "", "skip gate", "max softmax", "max softmax"]
        assert rows.iloc[2]["flagged"] == 4
