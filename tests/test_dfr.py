"""raycf.method.dfr: DFR's halves, balanced subset and head on a synthetic spurious-feature dataset with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from raycf.method.dfr import balanced_subset, fit_dfr, fit_head, group_accuracies, paired_group_bootstrap, split_halves


def _spurious(n: int, majority: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes; feature 0 the (noisy) label, feature 1 a clean spurious bit equal to the label on a ``majority`` share of images."""
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 2, n)
    spurious = np.where(generator.random(n) < majority, labels, 1 - labels)
    features = np.column_stack([2.0 * labels - 1 + generator.normal(0, 1.0, n), 2.0 * spurious - 1 + generator.normal(0, 0.1, n), generator.normal(0, 1, n)])
    groups = np.array([f"{label} | {'agrees' if label == bit else 'disagrees'}" for label, bit in zip(labels, spurious)], dtype=object)
    return features, labels, groups


def test_dfr_beats_the_plain_head_on_the_worst_group_of_a_spurious_dataset():
    features, labels, groups = _spurious(2000, 0.95, seed=0)
    test_features, test_labels, test_groups = _spurious(4000, 0.5, seed=1)
    plain = fit_head(features, labels, 2, c=1.0, seed=0)  # the whole (unbalanced) validation split
    fit = fit_dfr(features, labels, groups, num_classes=2, seed=0)
    ours = group_accuracies(fit.head.predict(test_features) == test_labels, test_groups)
    theirs = group_accuracies(plain.predict(test_features) == test_labels, test_groups)
    # The plain head follows the spurious bit (the minority groups are mostly wrong); DFR reads the label's feature (~84 % on every group).
    assert theirs["worst_group_acc"] < 0.5
    assert ours["worst_group_acc"] > 0.75
    assert ours["worst_group_acc"] > theirs["worst_group_acc"] + 0.3
    assert abs(fit.head.coef[1, 0]) > abs(fit.head.coef[1, 1])  # the label's feature outweighs the spurious one
    assert fit.c in {row["c"] for row in fit.tuning} and len(fit.tuning) == 7
    chosen = next(row for row in fit.tuning if row["c"] == fit.c)
    assert chosen["worst_group_acc"] == max(row["worst_group_acc"] for row in fit.tuning)


def test_halves_are_stratified_by_group_and_the_balanced_subset_has_equal_group_counts():
    groups = np.array(["a"] * 11 + ["b"] * 4 + ["c"] * 7, dtype=object)
    first, second = split_halves(groups, seed=3)
    assert sorted(np.concatenate([first, second]).tolist()) == list(range(22))  # a partition
    assert [int((groups[first] == g).sum()) for g in "abc"] == [6, 2, 4]  # ceil(n / 2) of each group
    assert [int((groups[second] == g).sum()) for g in "abc"] == [5, 2, 3]
    subset = balanced_subset(first, groups, seed=3)
    assert set(subset) <= set(first)
    assert [int((groups[subset] == g).sum()) for g in "abc"] == [2, 2, 2]  # the smallest group's size
    assert len(set(subset)) == len(subset)


def test_dfr_is_deterministic_per_seed_and_differs_across_seeds():
    features, labels, groups = _spurious(600, 0.9, seed=2)
    one, again, other = (fit_dfr(features, labels, groups, 2, seed=seed) for seed in (5, 5, 6))
    np.testing.assert_array_equal(one.head.coef, again.head.coef)
    np.testing.assert_array_equal(one.head.intercept, again.head.intercept)
    assert one.c == again.c and one.tuning == again.tuning
    assert not np.array_equal(split_halves(groups, 5)[0], split_halves(groups, 6)[0])
    assert not np.array_equal(one.head.mean, other.head.mean)  # another half, another standardisation
    assert one.fit_images == 4 * int(min((groups[split_halves(groups, 5)[0]] == g).sum() for g in set(groups)))


def test_a_class_missing_from_the_fit_is_never_predicted_and_three_classes_map_to_their_rows():
    generator = np.random.default_rng(0)
    labels = np.repeat([0, 2, 3], 30)
    features = np.eye(4)[labels] * 3 + generator.normal(0, 0.3, (90, 4))
    head = fit_head(features, labels, num_classes=5, c=1.0, seed=0)
    assert head.logits(features).shape == (90, 5)
    np.testing.assert_array_equal(head.predict(features), labels)  # separable: every image right, classes 1 and 4 never


def test_group_accuracies_and_the_paired_bootstrap_on_known_answers():
    groups = np.array(["a"] * 4 + ["b"] * 6, dtype=object)
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    baseline = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert group_accuracies(correct, groups) == pytest.approx({"acc": 0.9, "worst_group_acc": 0.75, "mean_group_acc": 0.875})
    assert group_accuracies(baseline, groups) == pytest.approx({"acc": 0.7, "worst_group_acc": 0.5, "mean_group_acc": (0.5 + 5 / 6) / 2})
    same = paired_group_bootstrap(correct, correct, groups, resamples=200, seed=0)
    assert same == {"acc": (0.0, 0.0), "worst_group_acc": (0.0, 0.0), "mean_group_acc": (0.0, 0.0)}  # paired: a model minus itself is 0 in every resample
    intervals = paired_group_bootstrap(correct, baseline, groups, resamples=2000, seed=0)
    low, high = intervals["acc"]
    assert 0 <= low <= 0.2 <= high <= 0.5  # each image gains 0 or 1: the difference is never negative
    assert intervals == paired_group_bootstrap(correct, baseline, groups, resamples=2000, seed=0)


def test_dfr_without_groups_exits_2_with_one_line_before_anything_runs(tmp_path):
    from conftest import run_cli_without_ray

    study = tmp_path / "study.yaml"
    study.write_text(f"name: t\nstorage_path: {tmp_path / 'results'}\ndata:\n  kind: digits\nfinal:\n  dfr: true\n")
    completed = run_cli_without_ray("study", str(study))
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and f"raycf: error: {study}: final.dfr: DFR refits the head on group-balanced validation images and needs groups (expected data.plant or data.groups" in lines[0], completed.stderr
    assert not (tmp_path / "results").exists()  # nothing ran
    from raycf.config import study_from_mapping

    assert study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3}}, "final": {"dfr": True}}).final.dfr


def _feature_set(features: np.ndarray, labels: np.ndarray, pred: np.ndarray, order: np.ndarray):
    from raycf.results.artefacts import FeatureSet

    n = len(labels)
    return FeatureSet(
        image_index=order.astype(np.int64), image_id=np.array([f"i{i}" for i in order]), label=labels[order], view=np.zeros(n, dtype=np.int64),
        pred=pred[order], confidence=np.ones(n, dtype=np.float32), logits=np.zeros((n, 2), dtype=np.float32), a=features[order].astype(np.float32),
    )


def test_the_final_stage_dfr_frame_compares_dfr_with_every_final_model_on_the_same_test_images():
    import pandas as pd

    from raycf.stages.dfr import dfr_frame, summary_line

    features, labels, groups = _spurious(1200, 0.95, seed=0)
    test_features, test_labels, test_groups = _spurious(800, 0.5, seed=1)
    spurious_head = test_features[:, 1] > 0  # the base model follows the spurious bit
    val = _feature_set(features, labels, (features[:, 1] > 0).astype(np.int64), np.arange(1200))
    order = np.random.default_rng(0).permutation(800)  # the features come in another order than the store's
    test = _feature_set(test_features, test_labels, spurious_head.astype(np.int64), order)
    predictions = pd.DataFrame({"model": "control", "split": "test", "image_index": np.arange(800), "label": test_labels, "pred": spurious_head.astype(np.int64)})
    perfect = predictions.assign(model="debugged", pred=test_labels)
    frame, fit = dfr_frame(val, test, {"val": groups, "test": test_groups}, pd.concat([predictions, perfect]), num_classes=2, seed=0, resamples=300)
    rows = frame.set_index("model")
    assert list(frame["model"]) == ["base", "control", "debugged", "dfr"]
    base_right = spurious_head == test_labels
    assert rows.loc["base", "test_acc"] == pytest.approx(base_right.mean())
    assert rows.loc["base", "worst_group"].endswith("disagrees") and rows.loc["base", "test_worst_group_acc"] == 0.0  # the spurious bit is wrong there
    assert np.isnan(rows.loc["base", "acc_minus_base"])
    assert rows.loc["control", ["acc_minus_base", "acc_minus_base_lo", "acc_minus_base_hi"]].tolist() == [0.0, 0.0, 0.0]  # the same predictions
    assert rows.loc["debugged", "test_worst_group_acc"] == 1.0 and rows.loc["debugged", "acc_minus_base"] == pytest.approx(1 - base_right.mean())
    dfr_right = fit.head.predict(test_features) == test_labels
    assert rows.loc["dfr", "test_acc"] == pytest.approx(dfr_right.mean())
    assert rows.loc["dfr", "test_worst_group_acc"] > 0.75
    for name in ("acc", "worst_group_acc", "mean_group_acc"):
        assert rows.loc["dfr", f"{name}_minus_base_lo"] <= rows.loc["dfr", f"{name}_minus_base"] <= rows.loc["dfr", f"{name}_minus_base_hi"]
    assert rows.loc["dfr", "worst_group_acc_minus_base_lo"] > 0.5  # DFR's gain on the worst group is far from 0
    assert rows.loc["dfr", "c"] == fit.c and rows.loc["dfr", "fit_images"] == fit.fit_images > 0 and np.isnan(rows.loc["base", "c"])
    line = summary_line(frame)
    assert "\n" not in line and line.startswith(f"final: DFR (C = {fit.c:g}, fit on {fit.fit_images} group-balanced validation images)")
    assert f"worst-group {100 * rows.loc['dfr', 'test_worst_group_acc']:.1f} % (base 0.0 %" in line


def test_the_report_section_shows_dfr_against_the_base_model_and_is_absent_without_the_file(tmp_path):
    import pandas as pd

    from raycf.config import study_from_mapping
    from raycf.outputs.report.blocks import ReportContext
    from raycf.outputs.report.dfr_section import dfr_section
    from raycf.outputs.report.page import SECTIONS

    assert dfr_section in SECTIONS
    study = study_from_mapping({"name": "t", "data": {"kind": "digits", "plant": {"class": 3}}, "final": {"dfr": True}})
    context = ReportContext(str(tmp_path), study)
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "_stage.json").write_text("{}")
    assert dfr_section(context) is None  # no final/dfr.parquet
    nan = float("nan")
    frame = pd.DataFrame(
        [
            {"model": "base", "test_acc": 0.8, "test_worst_group_acc": 0.1, "test_mean_group_acc": 0.6, "worst_group": "3 | clean", "c": nan, "fit_images": 0, "tune_images": 0,
             **{f"{m}_minus_base{s}": nan for m in ("acc", "worst_group_acc", "mean_group_acc") for s in ("", "_lo", "_hi")}},
            {"model": "dfr", "test_acc": 0.85, "test_worst_group_acc": 0.7, "test_mean_group_acc": 0.8, "worst_group": "5 | planted", "c": 0.3, "fit_images": 120, "tune_images": 250,
             "acc_minus_base": 0.05, "acc_minus_base_lo": 0.01, "acc_minus_base_hi": 0.09, "worst_group_acc_minus_base": 0.6, "worst_group_acc_minus_base_lo": 0.45,
             "worst_group_acc_minus_base_hi": 0.72, "mean_group_acc_minus_base": 0.2, "mean_group_acc_minus_base_lo": 0.1, "mean_group_acc_minus_base_hi": 0.3},
        ]
    )
    frame.to_parquet(tmp_path / "final" / "dfr.parquet")
    section = dfr_section(context)
    page = "".join(block for block in section.blocks if isinstance(block, str))
    assert section.anchor == "dfr"
    for text in ("on 120 validation images", "C = 0.3", "(250 images)", "+60.0 [+45.0, +72.0]", "70.0 %", "10.0 %", "3 | clean", "5 | planted"):
        assert text in page, text
