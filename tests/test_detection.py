"""Global MC filters (raycf.method.global_mc), agreement metrics, Table 1 counting and error scores (raycf.method.detection) on tiny hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from raycf.method.detection import Reference, StudyData, agreement_scores, auroc, average_precision, class_means, detection_row, error_score_frame, error_score_rows, flag_images, rerank, setting_label, table1_counts
from raycf.method.detection_tables import format_tables
from raycf.config import DetectionSetting
from raycf.method.global_mc import accepted_images, accumulate_global_mc, global_sets


def mask(filters, width=6):
    row = np.zeros(width, dtype=bool)
    row[list(filters)] = True
    return row


# ---------------------------------------------------------------- gates


def test_the_three_gates_and_tau():
    labels = np.array([0, 0, 0, 0, 1])
    preds = np.array([0, 1, 0, 0, 1])  # image 1 is wrong
    confidences = np.array([0.95, 0.99, 0.9, 0.89, 0.99])  # image 2 sits exactly at τ, image 3 below
    masked = np.array([0, 1, 0, 0, 0])  # image 4: its MC mask flips the prediction
    assert accepted_images(labels, preds, confidences, masked, tau=0.9).tolist() == [True, False, True, False, False]
    assert accepted_images(labels, preds, confidences, masked, tau=0.0).tolist() == [True, False, True, True, False]


def test_accumulation_counts_only_accepted_images():
    labels = np.array([0, 0, 0, 1, 1])
    preds = np.array([0, 0, 1, 1, 1])
    confidences = np.array([0.99, 0.95, 0.99, 0.99, 0.5])
    masked = labels.copy()
    masks = np.stack([mask({0, 1}), mask({1, 2}), mask({5}), mask({3}), mask({4})])
    activations = np.arange(30, dtype=np.float64).reshape(5, 6) / 10
    result = accumulate_global_mc(labels, preds, confidences, masked, masks, activations, num_classes=3, tau=0.9)
    assert result.images.tolist() == [2, 1, 0]
    assert result.counts.tolist() == [[1, 2, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0] * 6]
    # magnitude: class 0 sums a over images 0 and 1 on their MC filters
    assert result.magnitude[0].tolist() == pytest.approx([0.0, 0.1 + 0.7, 0.8, 0, 0, 0])
    # normalised by the class's most frequent filter count (2); a class never seen gives 0, not NaN
    assert result.normalised_magnitude()[0].tolist() == pytest.approx([0.0, 0.4, 0.4, 0, 0, 0])
    assert result.normalised_magnitude()[2].tolist() == [0.0] * 6


def test_frequency_threshold_f():
    hist = np.array([[4, 2, 1, 0], [0, 0, 0, 0]])
    assert global_sets(hist, 0.0)[0].tolist() == [True, True, True, False]  # f = 0: seen once
    assert global_sets(hist, 0.25)[0].tolist() == [True, True, False, False]  # > 1
    assert global_sets(hist, 0.5)[0].tolist() == [True, False, False, False]  # > 2: strict
    assert global_sets(hist, 1.0)[0].tolist() == [False] * 4
    assert global_sets(hist, 0.0)[1].tolist() == [False] * 4  # an empty global set, no error


# -------------------------------------------------------------- metrics


def reference_for_tests() -> Reference:
    sets = np.stack([mask({1, 2, 3, 4}), mask(set())])
    magnitude = np.array([[9.0, 1.0, 2.0, 0.5, 1.5, 9.0], [1.0] * 6])
    head = np.array([[1.0, 2.0, 1.0, 0.5, 1.0, 3.0], [1.0] * 6])
    return Reference(sets=sets, magnitude=magnitude, head_weight=head)


def test_agreement_metrics_on_hand_computed_sets():
    local = np.stack([mask({0, 1, 2})])  # L = {0, 1, 2}, G = {1, 2, 3, 4}: |L∩G| = 2
    a = np.array([[3.0, 2.0, 1.0, 7.0, 7.0, 7.0]])
    scores = agreement_scores(local, a, np.array([0]), reference_for_tests())
    assert scores["recall"].tolist() == pytest.approx([2 / 4])
    assert scores["precision"].tolist() == pytest.approx([2 / 3])
    assert scores["f1"].tolist() == pytest.approx([2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2)])
    # Σ |a·L − ḡ·G| = |3 − 0| + |2 − 1| + |1 − 2| + |0 − 0.5| + |0 − 1.5| + 0
    assert scores["magnitude"].tolist() == pytest.approx([3 + 1 + 1 + 0.5 + 1.5])
    # Σ_L W a / Σ_G W ḡ = (1·3 + 2·2 + 1·1) / (2·1 + 1·2 + 0.5·0.5 + 1·1.5)
    assert scores["head_weight"].tolist() == pytest.approx([8 / 5.75])


def test_empty_mask_and_empty_global_set_give_zero_scores_without_dividing_by_zero():
    local = np.stack([mask(set()), mask({0, 1}), mask(set())])
    a = np.ones((3, 6))
    classes = np.array([0, 1, 1])  # class 1 has an empty global set
    with np.errstate(all="raise"):
        scores = agreement_scores(local, a, classes, reference_for_tests())
    for metric in ("recall", "precision", "f1", "head_weight"):
        assert scores[metric].tolist() == [0.0, 0.0, 0.0], metric
    assert scores["magnitude"].tolist() == pytest.approx([1 + 2 + 0.5 + 1.5, 2.0, 0.0])


def test_agreement_of_top_k_candidates_uses_each_candidate_set():
    local = np.stack([np.stack([mask({1, 2, 3, 4}), mask({0})])])  # one image, two candidates
    scores = agreement_scores(local, np.ones((1, 6)), np.array([[0, 1]]), reference_for_tests(), ("recall", "f1"))
    assert scores["recall"].tolist() == [[1.0, 0.0]]
    assert scores["f1"].tolist() == [[1.0, 0.0]]


# ------------------------------------------------------------ detection


def test_skip_threshold_semantics_and_direction():
    scores = np.array([0.1, 0.1, 0.1, 0.9])
    thresholds = np.full(4, 0.5)
    confidences = np.array([0.95, 0.9, 0.5, 0.5])
    # skip 0.9: confidence > 0.9 is accepted (never flagged); 0.9 itself is considered
    assert flag_images("recall", scores, thresholds, confidences, 0.9).tolist() == [False, True, True, False]
    # skip 0: nothing skipped
    assert flag_images("recall", scores, thresholds, confidences, 0.0).tolist() == [True, True, True, False]
    # a distance flags above its threshold
    assert flag_images("magnitude", scores, thresholds, confidences, 0.0).tolist() == [False, False, False, True]
    # a class without an avg threshold (NaN) is never flagged
    assert flag_images("f1", scores, np.full(4, np.nan), confidences, 0.0).tolist() == [False] * 4


def test_table1_counts_errors_detected_and_new_errors():
    flags = np.array([True, True, False, True, False, False])
    errors = np.array([True, False, True, False, False, True])
    assert table1_counts(flags, errors) == {
        "total_errors": 3,
        "flagged": 3,
        "errors_detected": 1,
        "errors_detected_pct": pytest.approx(100 / 3),
        "new_errors": 2,
    }
    assert table1_counts(np.zeros(2, bool), np.zeros(2, bool))["errors_detected_pct"] == 0.0


def test_class_means_leave_unseen_classes_undefined():
    means = class_means(np.array([0.2, 0.4, 1.0]), np.array([0, 0, 2]), num_classes=3)
    assert means[0] == pytest.approx(0.3) and np.isnan(means[1]) and means[2] == 1.0


def test_rerank_picks_the_best_agreeing_candidate_not_always_the_top_one():
    candidates = np.array([[3, 1, 2], [3, 1, 2], [0, 4, 5]])
    scores = np.array([[0.2, 0.8, 0.8], [0.2, 0.8, 0.8], [0.5, 0.1, 0.9]])
    flags = np.array([True, False, True])
    assert rerank(flags, candidates, scores, "f1").tolist() == [1, 3, 5]  # ties: the more probable candidate
    assert rerank(flags, candidates, scores, "magnitude").tolist() == [3, 3, 4]  # distances: the smallest


def test_setting_labels_match_the_paper():
    assert setting_label(DetectionSetting(metric="recall")) == "Avg. Recall"
    assert setting_label(DetectionSetting(metric="recall", threshold=0.3)) == "Recall < 0.3"
    assert setting_label(DetectionSetting(metric="magnitude", threshold=2.0)) == "Magnitude distance > 2"


def tiny_study_data() -> StudyData:
    """Class 0's global set is {0, 1}, class 1's is {2, 3}; six test images with known outcomes."""
    train = {
        "label": np.array([0, 0, 1, 1]),
        "pred": np.array([0, 0, 1, 1]),
        "confidence": np.array([0.99, 0.99, 0.99, 0.99]),
        "masked_pred": np.array([0, 0, 1, 1]),
        "mc_mask": np.stack([mask({0, 1}, 4), mask({0, 1}, 4), mask({2, 3}, 4), mask({2, 3}, 4)]),
        "a": np.ones((4, 4)),
    }
    test_masks = [mask({0, 1}, 4), mask({0}, 4), mask({2}, 4), mask({3}, 4), mask({0, 2}, 4), mask({2, 3}, 4)]
    test = {
        "label": np.array([0, 0, 0, 1, 1, 1]),
        "pred": np.array([0, 0, 0, 1, 0, 1]),  # image 2 is labelled 0, predicted 0 but looks like 1; image 4 is wrong
        "confidence": np.array([0.99, 0.6, 0.6, 0.99, 0.6, 0.6]),
        "mc_mask": np.stack(test_masks),
        "a": np.ones((6, 4)),
        "topk_classes": np.array([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [1, 0]]),
        "topk_mc_masks": np.stack([np.stack([m, mask({2, 3}, 4)]) for m in test_masks]),
    }
    return StudyData(train=train, splits={"test": test}, class_names=["zero", "one"], head_weight=np.ones((2, 4)))


def test_detection_row_counts_a_tiny_table1():
    data = tiny_study_data()
    # recall vs G: [1, .5, 0, .5, .5, 1]; the avg threshold is 1 (training images agree fully)
    row = detection_row(data, "test", DetectionSetting(metric="recall", threshold="avg", skip_threshold=0.9, freq_threshold=0.0), tau=0.9)
    # skipped: images 0 and 3 (confidence .99 > .9); flagged: images 1, 2, 4 (recall < 1)
    assert (row["total_errors"], row["skipped"], row["flagged"], row["errors_detected"], row["new_errors"]) == (1, 2, 3, 1, 2)
    # re-ranking the flagged ones with recall against class 1's set {2, 3} (candidate masks are {2, 3}):
    # 1 -> 0 (0.5 vs 1 for class 1: relabelled to 1, wrong), 2 -> 1 (wrong), 4 -> 1 (fixed)
    assert (row["relabelled"], row["fixed"], row["broken"]) == (3, 1, 2)
    assert row["accuracy"] == pytest.approx(5 / 6) and row["altered_accuracy"] == pytest.approx(4 / 6)
    absolute = detection_row(data, "test", DetectionSetting(metric="recall", threshold=0.3, skip_threshold=0.0, freq_threshold=0.0), tau=0.9)
    assert (absolute["flagged"], absolute["errors_detected"], absolute["new_errors"]) == (1, 0, 1)  # only image 2 (recall 0)
    assert absolute["setting"] == "Recall < 0.3" and absolute["threshold"] == 0.3


# ------------------------------------------------------- threshold-free


def test_auroc_and_aupr_match_scikit_learn_with_ties():
    generator = np.random.default_rng(1)
    errors = generator.random(300) < 0.2
    scores = np.round(generator.normal(size=300) + errors, 1)  # rounded: many ties
    assert auroc(errors, scores) == pytest.approx(roc_auc_score(errors, scores), abs=1e-12)
    assert average_precision(errors, scores) == pytest.approx(average_precision_score(errors, scores), abs=1e-12)
    assert auroc(errors, -scores) == pytest.approx(1 - roc_auc_score(errors, scores), abs=1e-12)


def test_auroc_is_undefined_without_both_classes():
    assert np.isnan(auroc(np.zeros(4, bool), np.arange(4)))
    assert np.isnan(average_precision(np.zeros(4, bool), np.arange(4)))
    assert auroc(np.array([True, False]), np.array([1.0, 1.0])) == 0.5


def test_error_scores_orient_every_score_towards_errors_and_print():
    data = tiny_study_data()
    rows = {row["score"]: row for row in error_score_rows(data, "test", tau=0.9, freq_threshold=0.0)}
    agreement = {"recall", "precision", "f1", "magnitude", "head_weight"}
    assert set(rows) == agreement | {f"{name}_centred" for name in agreement} | {"mc_size", "max_softmax", "max_softmax_x_f1"}
    # MC-set sizes [2, 1, 1, 1, 2, 2]: the error (size 2) beats three right images and ties two
    assert rows["mc_size"]["auroc"] == pytest.approx((3 + 2 * 0.5) / 5)
    # the wrong image (4) has confidence 0.6: less confident than two right images, tied with three
    assert rows["max_softmax"]["auroc"] == pytest.approx((2 + 3 * 0.5) / 5)
    # its F1 against G_0 = {0, 1} is 0.5; the right images have 1, 2/3, 0, 2/3, 1: four agree more
    assert rows["f1"]["auroc"] == pytest.approx(4 / 5)
    assert rows["f1"]["errors"] == 1 and rows["f1"]["error_rate"] == pytest.approx(1 / 6)
    import pandas as pd

    detection = pd.DataFrame([detection_row(data, "test", DetectionSetting(metric="f1"), tau=0.9)])
    text = format_tables(detection, pd.DataFrame(list(rows.values())))
    assert "Avg. F1" in text and "max_softmax" in text and "auroc test" in text


def test_error_score_frame_adds_bootstrap_intervals_and_the_paired_difference_with_max_softmax():
    data = tiny_study_data()
    frame = error_score_frame(data, "test", tau=0.9, freq_threshold=0.0, resamples=200, seed=0).set_index("score")
    rows = {row["score"]: row for row in error_score_rows(data, "test", tau=0.9, freq_threshold=0.0)}
    assert frame["auroc"].to_dict() == pytest.approx({name: row["auroc"] for name, row in rows.items()})
    assert (frame["baseline"] == "max_softmax").all() and (frame["bootstrap"] == 200).all()
    assert frame.loc["f1", "auroc_diff"] == pytest.approx(4 / 5 - 3.5 / 5)
    assert (frame.loc["max_softmax", "auroc_diff_lo"], frame.loc["max_softmax", "auroc_diff_hi"]) == (0.0, 0.0)
    # one error in six images: a resample holds it about two times in three; every interval brackets its estimate
    assert 100 < frame["bootstrap_defined"].iloc[0] < 170
    assert ((frame["auroc_lo"] <= frame["auroc"]) & (frame["auroc"] <= frame["auroc_hi"])).all()
    import pandas as pd

    detection = pd.DataFrame([detection_row(data, "test", DetectionSetting(metric="f1"), tau=0.9)])
    text = format_tables(detection, frame.reset_index())
    assert "test: bootstrap 95 % intervals (200 resamples" in text and "AUROC − max softmax [95 % CI]" in text
    assert f"+0.100 [{frame.loc['f1', 'auroc_diff_lo']:+.3f}, {frame.loc['f1', 'auroc_diff_hi']:+.3f}]" in text
