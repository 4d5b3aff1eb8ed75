"""The filter atlas's rankings (raycf.method.atlas) and the suppression treatment's pieces (raycf.method.suppress, the debug loss's penalty): known answers on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raycf.errors import UserError
from raycf.method.atlas import (
    class_atlas,
    error_specific,
    error_specific_filters,
    mean_contributions,
    planted_response,
    planted_share,
    ranked,
    top_activating,
    top_by_contribution,
    top_by_frequency,
)
from raycf.method.debug_loss import DebugLoss, suppression_penalty
from raycf.method.groups import group_accuracy, group_metrics
from raycf.method.suppress import auto_suppress, check_suppress, suppression_matrix


def test_ranked_breaks_ties_by_the_lower_index_and_keeps_only_the_allowed():
    assert ranked(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]
    assert ranked(np.array([1.0, 3.0, 3.0, 2.0]), 10, keep=np.array([True, False, True, False])).tolist() == [2, 0]
    assert ranked(np.array([1.0, 2.0]), 0).tolist() == []


def test_frequency_ranks_by_count_and_leaves_out_filters_never_seen():
    counts = np.array([[0, 5, 2, 5, 0], [1, 0, 0, 0, 9]])
    assert top_by_frequency(counts, 0, 4).tolist() == [1, 3, 2]
    assert top_by_frequency(counts, 1, 1).tolist() == [4]


def test_contribution_is_the_head_weight_times_the_mean_activation_over_correct_images_of_the_class():
    weight = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]])
    a = np.array([[2.0, 1.0, 4.0], [4.0, 3.0, 0.0], [100.0, 100.0, 100.0], [9.0, 9.0, 9.0]])
    labels = np.array([0, 0, 0, 1])
    preds = np.array([0, 0, 1, 1])  # image 2 is an error: left out
    # class 0, images 0 and 1: mean a = (3, 2, 2); W[0] * mean = (3, -4, 1)
    assert mean_contributions(weight, a, labels, preds, 0).tolist() == [3.0, -4.0, 1.0]
    assert top_by_contribution(weight, a, labels, preds, 0, 5).tolist() == [0, 2]  # a negative contribution is not shown
    assert mean_contributions(weight, a, labels, np.array([1, 1, 1, 1]), 0).tolist() == [0.0, 0.0, 0.0]  # no correct image


def test_error_specific_filters_are_frequent_in_errors_towards_the_class_and_rare_in_its_correct_predictions():
    masks = np.array(
        [
            [1, 0, 1, 0],  # correct 0
            [1, 0, 0, 0],  # correct 0
            [1, 1, 1, 0],  # true 1, predicted 0: an error towards 0
            [0, 1, 0, 1],  # true 2, predicted 0: an error towards 0
            [0, 0, 0, 1],  # correct 1 (not about class 0)
        ],
        dtype=bool,
    )
    labels = np.array([0, 0, 1, 2, 1])
    preds = np.array([0, 0, 0, 0, 1])
    found = error_specific(masks, labels, preds, 0)
    assert (found.errors, found.correct) == (2, 2)
    assert found.error_share.tolist() == [0.5, 1.0, 0.5, 0.5]
    assert found.correct_share.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert found.score.tolist() == [-0.5, 1.0, 0.0, 0.5]
    assert found.top(4).tolist() == [1, 3]
    # class 1 has no error predicted as it; class 2 is never predicted
    assert error_specific_filters(masks, labels, preds, 3, 1) == {0: [1]}


def test_top_activating_images_are_the_largest_activations_of_the_filter():
    a = np.array([[0.0, 5.0], [3.0, 1.0], [3.0, 2.0], [1.0, 0.0]])
    assert top_activating(a, 0, 2).tolist() == [1, 2]
    assert top_activating(a, 1, 3).tolist() == [0, 2, 1]
    assert top_activating(a, 0, 5, among=np.array([True, False, False, True])).tolist() == [3, 0]


def test_planted_numbers_are_none_without_a_planted_mask_and_known_shares_with_one():
    assert planted_share(np.array([0, 1]), None) is None
    assert planted_share(np.array([0, 1, 3]), np.array([True, False, False, True])) == pytest.approx(2 / 3)
    assert planted_response(None, np.ones(3)) is None
    assert planted_response(np.array([2.0, 4.0]), np.array([1.0, 1.0])) == pytest.approx(2.0)


def test_a_class_atlas_holds_one_card_per_ranked_filter_with_its_numbers():
    counts = np.array([[3, 0, 1], [0, 2, 0]])
    head = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    train = {
        "a": np.array([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0], [0.0, 5.0, 1.0]]),
        "label": np.array([0, 0, 1]),
        "pred": np.array([0, 0, 1]),
    }
    val = {"mc_mask": np.array([[1, 0, 0], [0, 1, 1]], dtype=bool), "label": np.array([0, 1]), "pred": np.array([0, 0])}
    atlas = class_atlas(0, "zero", counts=counts, accepted=np.array([3, 2]), head_weight=head, train=train, val=val, top_filters=2, top_images=2, planted=np.array([True, False, True]))
    assert [card.filter for card in atlas.of("frequency")] == [0, 2]
    assert [card.filter for card in atlas.of("contribution")] == [0, 2]  # mean a over images 0, 1 = (2, 0.5, 1): W·a = (2, 0, 2)
    assert [card.filter for card in atlas.of("error")] == [1, 2]
    first = atlas.of("frequency")[0]
    assert (first.count, first.contribution, first.image_rows, first.activations) == (3, 2.0, [1, 0], [3.0, 1.0])
    assert first.planted_share == 0.5
    assert (atlas.accepted, atlas.errors, atlas.correct) == (3, 1, 1)


# ------------------------------------------------------------------ suppression


def test_the_suppression_penalty_is_the_mean_positive_activity_of_each_images_suppressed_filters():
    a = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    labels = torch.tensor([0, 1])
    suppress = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # image 0 (class 0): max(1,0) + max(-2,0) = 1; image 1 (class 1): max(-1, 0) = 0; mean = 0.5
    assert suppression_penalty(a, labels, suppress).item() == pytest.approx(0.5)
    logits = torch.zeros(2, 2)
    loss = DebugLoss(torch.zeros(2, 3), 0.0, 0.0, suppress=suppress, suppress_weight=0.3)
    value, parts = loss(logits, a, labels)
    assert value.item() == pytest.approx(math.log(2) + 0.3 * 0.5)
    assert parts["suppressed"].item() == pytest.approx(0.5)
    plain, plain_parts = DebugLoss(torch.zeros(2, 3), 0.0, 0.0)(logits, a, labels)
    assert plain.item() == pytest.approx(math.log(2)) and "suppressed" not in plain_parts
    # the gradient reaches exactly the suppressed, positive activations: weight / batch
    a.requires_grad_(True)
    loss(logits, a, labels)[0].backward()
    assert a.grad.flatten().tolist() == pytest.approx([0.15, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_suppression_matrix_from_a_list_or_per_class_and_its_one_line_errors():
    names = ["T-shirt", "Coat"]
    assert suppression_matrix([2, 0], names, 3).tolist() == [[True, False, True], [True, False, True]]
    assert suppression_matrix({"Coat": [1]}, names, 3).tolist() == [[False, False, False], [False, True, False]]
    with pytest.raises(UserError) as error:
        check_suppress({"Coat": [1, 3]}, names, 3)
    assert str(error.value) == "debug.suppress.Coat: filter 3 does not exist (the model has K = 3 filters: expected indices 0 to 2)"
    with pytest.raises(UserError, match=r"^debug.suppress: unknown class 'Shirt' \(the dataset's classes: T-shirt, Coat\)$"):
        check_suppress({"Shirt": [1]}, names, 3)
    assert auto_suppress({1: [4, 2]}, names) == {"Coat": [4, 2]}


def test_worst_group_accuracy_is_the_lowest_group_accuracy_and_nan_without_images():
    labels = np.array([0, 0, 1, 1, 1])
    preds = np.array([0, 1, 1, 1, 0])
    groups = np.array([0, 0, 1, 1, 2])
    assert dict(zip(group_accuracy(groups, labels, preds)["group"], group_accuracy(groups, labels, preds)["acc"])) == {"0": 0.5, "1": 1.0, "2": 0.0}
    assert group_metrics(groups, labels, preds)["worst_group_acc"] == 0.0
    assert math.isnan(group_metrics(np.array([]), np.array([]), np.array([]))["worst_group_acc"])


def test_seed_summary_compares_every_treatment_with_the_control_and_on_worst_group_accuracy_when_groups_exist():
    import pandas as pd

    from raycf.method.groups import predictions_group_table, wide_group_metrics
    from raycf.method.replication import seed_summary

    rows = []
    for seed in range(3):
        for model, shift in (("control", 0.0), ("reference", 0.01), ("best", 0.02), ("suppress", -0.01 * seed)):
            rows.append({"model": model, "seed": seed, "test_acc": 0.9 + shift, "val_acc": 0.8 + shift})
    seeds = pd.DataFrame(rows)
    # test predictions: 4 images in groups 0, 0, 1, 1; the control misses image 3 (group 1), "suppress" misses image 0 on seed 0
    predictions = []
    for seed in range(3):
        for model in ("control", "reference", "best", "suppress"):
            preds = [1, 0, 1, 0] if model != "control" else [1, 0, 1, 1]
            if model == "suppress" and seed == 0:
                preds = [0, 0, 1, 0]
            predictions += [{"split": "test", "model": model, "seed": seed, "image_index": i, "label": label, "pred": pred} for i, (label, pred) in enumerate(zip([1, 0, 1, 0], preds))]
    # as the final stage adds them: one row per (model, seed), no column twice
    with_groups = seeds.merge(wide_group_metrics(predictions_group_table(pd.DataFrame(predictions), {"test": np.array([0, 0, 1, 1])})), on=["model", "seed"], how="left")
    assert list(with_groups.columns) == [*seeds.columns, "test_mean_group_acc", "test_worst_group_acc"] and len(with_groups) == len(seeds)
    worst = with_groups.set_index(["model", "seed"])["test_worst_group_acc"]
    assert worst.loc[("control", 0)] == 0.5 and worst.loc[("suppress", 0)] == 0.5 and worst.loc[("suppress", 1)] == 1.0
    summary = seed_summary(with_groups).set_index("model")
    assert list(summary.index) == ["reference", "best", "suppress"]
    assert summary.loc["suppress", "test_diff_mean"] == pytest.approx(-0.01)  # (0 - 0.01 - 0.02) / 3
    assert summary.loc["suppress", "worst_group_diff_mean"] == pytest.approx(1 / 3)  # (0 + 0.5 + 0.5) / 3
    assert summary.loc["reference", "worst_group_diff_mean"] == pytest.approx(0.5)
    assert "worst_group_diff_mean" not in seed_summary(seeds)


def test_groups_may_be_named():
    groups = np.array(["Coat/planted", "Coat/clean", "Coat/clean"])
    table = group_accuracy(groups, np.array([1, 1, 1]), np.array([1, 0, 1]))
    assert dict(zip(table["group"], table["acc"])) == {"Coat/clean": 0.5, "Coat/planted": 1.0}
