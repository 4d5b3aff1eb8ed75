"""The learned misclassification detector (raycf.method.learned_detector): features, fits on synthetic data, degenerate splits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from raycf.method.bank import CfeBank
from raycf.method.detection import agreement_scores, reference_for
from raycf.method.learned_detector import (
    CFE_FEATURES,
    compare_detectors,
    coefficient_frame,
    confidence_features,
    detector_features,
    detector_summary,
    learned_detector_frame,
    runner_up_mi_sizes,
)
from test_detection import tiny_study_data


def test_confidence_features_by_hand():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])) + 5.0  # a shift changes nothing
    features = confidence_features(logits)
    assert features["max_softmax"].tolist() == pytest.approx([0.7, 1 / 3])
    assert features["margin"].tolist() == pytest.approx([0.5, 0.0])
    expected = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert features["entropy"].tolist() == pytest.approx([expected, math.log(3)])


def test_runner_up_mi_sizes_count_the_filters_the_runner_up_generator_grows():
    num_classes, num_filters = 3, 4
    mi_bias = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, -1.0, 0.5]])
    bank = CfeBank(
        mc_weight=torch.zeros(num_classes, num_filters, num_filters),
        mc_bias=torch.zeros(num_classes, num_filters),
        head_weight=torch.zeros(num_classes, num_filters),
        head_bias=torch.zeros(num_classes),
        mi_weight=torch.zeros(num_classes, num_filters, num_filters),
        mi_bias=mi_bias,
    )
    sizes = runner_up_mi_sizes(bank, np.ones((3, num_filters), dtype=np.float32), np.array([0, 1, 2]))
    assert sizes.tolist() == [4, 2, 1]


def tiny_study_with_validation(data):
    """The tiny study with logits, masked confidence and MI sizes, its test split also serving as validation."""
    test = data.splits["test"]
    confidence = test["confidence"][:, None]
    test["logits"] = np.log(np.where(test["pred"][:, None] == np.arange(2), confidence, 1 - confidence))
    test["masked_confidence"] = np.array([0.9, 0.5, 0.4, 0.9, 0.3, 0.6], dtype=np.float32)
    test["mi_size"] = np.array([3, 1, 0, 3, 1, 2])
    data.splits["val"] = {name: values.copy() for name, values in test.items()}
    return data


def test_detector_features_of_a_tiny_study():
    data = tiny_study_with_validation(tiny_study_data())
    frame = detector_features(data, "test", tau=0.9, freq_threshold=0.0)
    assert list(frame.columns) == ["max_softmax", "margin", "entropy", *CFE_FEATURES, "is_error"]
    images = data.splits["test"]
    assert frame["max_softmax"].tolist() == pytest.approx(images["confidence"].tolist())
    assert frame["margin"].tolist() == pytest.approx([0.98, 0.2, 0.2, 0.98, 0.2, 0.2])
    reference, _ = reference_for(data, 0.9, 0.0)
    recall = agreement_scores(images["mc_mask"], images["a"], images["pred"], reference, ("recall",))["recall"]
    assert frame["recall"].tolist() == recall.tolist() == [1.0, 0.5, 0.0, 0.5, 0.5, 1.0]
    assert frame["mc_size"].tolist() == [2, 1, 1, 1, 2, 2] and frame["mi_size"].tolist() == [3, 1, 0, 3, 1, 2]
    assert frame["is_error"].tolist() == [False, False, False, False, True, False]
    del data.splits["test"]["mi_size"]
    assert "mi_size" not in detector_features(data, "test", 0.9, 0.0)  # a signal the study lacks is left out


def test_learned_detector_frame_runs_on_a_tiny_study():
    frame = learned_detector_frame(tiny_study_with_validation(tiny_study_data()), tau=0.9, freq_threshold=0.0, resamples=50, seed=0)
    assert frame["detector"].tolist() == ["confidence", "confidence+cfe"]
    assert (frame["reason"] == "").all() and (frame["fit_errors"] == 1).all() and (frame["images"] == 6).all()
    assert frame["auroc"].between(0, 1).all()
    assert math.isnan(frame.loc[0, "coef_f1"]) and not math.isnan(frame.loc[1, "coef_f1"])  # the confidence detector has no CFE coefficients
    assert frame["missing_features"].tolist() == ["", ""]


def synthetic(images: int, seed: int, cfe_signal: float) -> pd.DataFrame:
    """Features whose errors follow confidence and, with ``cfe_signal`` > 0, also ``f1`` (independent of confidence)."""
    generator = np.random.default_rng(seed)
    logit_confidence = generator.normal(2.5, 1.5, images)
    agreement = generator.normal(size=images)
    error_logit = -1.5 - 1.2 * (logit_confidence - 2.5) - cfe_signal * agreement
    is_error = generator.random(images) < 1 / (1 + np.exp(-error_logit))
    confidence = 1 / (1 + np.exp(-logit_confidence))
    return pd.DataFrame(
        {
            "max_softmax": confidence,
            "margin": confidence - (1 - confidence) / 2 + generator.normal(0, 0.01, images),
            "entropy": -(confidence * np.log(confidence) + (1 - confidence) * np.log(1 - confidence)),
            "f1": agreement,
            "mc_size": generator.poisson(8, images).astype(float),
            "masked_confidence": generator.random(images),
            "is_error": is_error,
        }
    )


def test_a_cfe_signal_beyond_confidence_shows_in_the_paired_interval():
    frame = compare_detectors(synthetic(3000, 0, cfe_signal=1.5), synthetic(4000, 1, cfe_signal=1.5), resamples=300, seed=0).set_index("detector")
    both = frame.loc["confidence+cfe"]
    assert both["auroc"] > frame.loc["confidence", "auroc"] + 0.05
    assert 0 < both["auroc_diff_lo"] < both["auroc_diff"] < both["auroc_diff_hi"]
    assert both["coef_f1"] < -0.5  # more agreement, fewer errors
    assert abs(both["coef_mc_size"]) < 0.2 and abs(both["coef_masked_confidence"]) < 0.2  # noise features stay near 0
    assert both["missing_features"] == "recall,precision,magnitude,head_weight,mi_size"
    assert "confidence+cfe − confidence" in detector_summary(frame.reset_index())
    assert coefficient_frame(frame.reset_index()).loc["f1", "confidence+cfe"] == both["coef_f1"]


def test_cfe_signals_without_information_add_nothing():
    frame = compare_detectors(synthetic(3000, 2, cfe_signal=0.0), synthetic(4000, 3, cfe_signal=0.0), resamples=300, seed=0).set_index("detector")
    both = frame.loc["confidence+cfe"]
    # Not above 0; the paired interval is so tight that fitting three noise features can even cost a measurable sliver.
    assert both["auroc_diff_lo"] < 0 and both["auroc_diff_hi"] < 0.005
    assert abs(both["auroc_diff"]) < 0.005
    assert max(abs(both["coef_f1"]), abs(both["coef_mc_size"]), abs(both["coef_masked_confidence"])) < 0.1
    assert frame.loc["confidence", "auroc"] > 0.75  # confidence alone does detect the errors


@pytest.mark.parametrize("errors_in_fit", [0, "all"])
def test_a_validation_split_with_one_class_writes_nan_and_a_reason(errors_in_fit):
    fit = synthetic(40, 4, cfe_signal=1.0)
    fit["is_error"] = errors_in_fit == "all"
    frame = compare_detectors(fit, synthetic(400, 5, cfe_signal=1.0), resamples=100, seed=0)
    assert len(frame) == 2 and frame[["auroc", "aupr", "auroc_diff_lo", "intercept", "coef_f1"]].isna().all().all()
    expected = "no error (0 errors in 40 images)" if errors_in_fit == 0 else "no right prediction (40 errors in 40 images)"
    assert (frame["reason"] == f"the val split has {expected}").all()
    assert "undefined" in detector_summary(frame)


def test_a_test_split_without_errors_writes_nan_and_a_reason():
    evaluate = synthetic(300, 6, cfe_signal=1.0)
    evaluate["is_error"] = False
    frame = compare_detectors(synthetic(300, 7, cfe_signal=1.0), evaluate, resamples=100, seed=0)
    assert frame["auroc"].isna().all() and (frame["reason"] == "the test split has no error (0 errors in 300 images)").all()
    # one error is enough to fit
    fit = synthetic(300, 8, cfe_signal=1.0)
    fit["is_error"] = np.arange(300) == 17
    assert (compare_detectors(fit, synthetic(300, 9, cfe_signal=1.0), resamples=50, seed=0)["reason"] == "").all()
