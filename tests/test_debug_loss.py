"""The debugging loss L_d (METHOD §5) on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raycf.method.bank import thresholded_relu
from raycf.method.debug_loss import DebugLoss, FilterStats, centred_indicator, global_filters_tensor, paper_indicator


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two classes, four filters: class 0's MC filters are {0, 1}, class 1's are {2}.
G = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
LOGITS = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
LABELS = torch.tensor([0, 1])


def test_thresholded_relu_keeps_only_values_above_theta():
    values = torch.tensor([0.2, 0.5, 0.5001, 0.9])
    assert thresholded_relu(values).tolist() == pytest.approx([0.0, 0.0, 0.5001, 0.9])


def test_paper_indicator_counts_every_nonzero_filter_as_active():
    # a >= 0 after ReLU and pooling, so sigmoid(a) >= 0.5: only exact zeros are inactive.
    activations = torch.tensor([[0.0, 1e-4, 0.3, 7.0]])
    s = paper_indicator(activations)
    assert s[0, 0] == 0
    assert (s[0, 1:] > 0).all()
    assert s[0, 1:].tolist() == pytest.approx([sigmoid(1e-4), sigmoid(0.3), sigmoid(7.0)])


def test_centred_indicator_is_active_above_the_filter_mean_only():
    activations = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    mean, std = torch.tensor([2.0, 2.0]), torch.tensor([0.5, 2.0])
    s = centred_indicator(activations, mean, std)
    assert s[0, 0] == 0 and s[1, 1] == 0
    assert s[0, 1].item() == pytest.approx(sigmoid(0.5))
    assert s[1, 0].item() == pytest.approx(sigmoid(2.0))


def test_filter_stats_from_sums_matches_torch():
    activations = torch.rand(50, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.0], dtype=torch.float64)
    stats = FilterStats.from_sums(activations.sum(0), activations.square().sum(0), 50)
    assert torch.allclose(stats.mean, activations.mean(0).float())
    assert torch.allclose(stats.std, activations.std(0, unbiased=False).float(), atol=1e-6)
    # A constant filter has std 0; the indicator does not divide by it.
    s = centred_indicator(torch.tensor([[0.0, 0.0, 0.0]]), stats.mean, stats.std)
    assert torch.isfinite(s).all()


def test_loss_value_on_a_hand_made_batch():
    activations = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 3.0, 1.0, 0.0]])
    loss, parts = DebugLoss(G, lambda1=0.5, lambda2=0.25)(LOGITS, activations, LABELS)
    # Image 0 (label 0): MC {0, 1} -> sigmoid(1) + 0 ; non-MC {2, 3} -> sigmoid(2) + sigmoid(0.5).
    # Image 1 (label 1): MC {2} -> sigmoid(1) ; non-MC {0, 1, 3} -> 0 + sigmoid(3) + 0.
    mc = (sigmoid(1.0) + sigmoid(1.0)) / 2
    nonmc = (sigmoid(2.0) + sigmoid(0.5) + sigmoid(3.0)) / 2
    ce = F.cross_entropy(LOGITS, LABELS).item()
    assert parts["ce"] == pytest.approx(ce)
    assert parts["mc"] == pytest.approx(mc)
    assert parts["nonmc"] == pytest.approx(nonmc)
    assert loss.item() == pytest.approx(ce - 0.5 * mc + 0.25 * nonmc)
    assert parts["loss"] == pytest.approx(loss.item())
    assert parts["active_mc"] == pytest.approx((1 + 1) / 2)
    assert parts["active_nonmc"] == pytest.approx((2 + 1) / 2)


def test_more_mc_activity_lowers_the_loss_and_more_non_mc_activity_raises_it():
    loss_fn = DebugLoss(G, lambda1=0.1, lambda2=0.1)
    activations = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    reference = loss_fn(LOGITS, activations, LABELS)[0].item()
    more_mc = activations.clone()
    more_mc[0, 1] += 1.0  # filter 1 is in G_0 (image 0's label)
    more_nonmc = activations.clone()
    more_nonmc[1, 1] += 1.0  # filter 1 is not in G_1 (image 1's label)
    assert loss_fn(LOGITS, more_mc, LABELS)[0].item() < reference
    assert loss_fn(LOGITS, more_nonmc, LABELS)[0].item() > reference
    # and the gradient points the same way: descent raises MC and lowers non-MC activity
    activations.requires_grad_(True)
    loss_fn(LOGITS, activations, LABELS)[0].backward()
    assert activations.grad[0, 1] < 0 and activations.grad[1, 1] > 0


def test_global_filters_are_indexed_by_the_ground_truth_label():
    activations = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logits = torch.tensor([[-5.0, 5.0]])  # predicts class 1, labelled 0
    _, as_label_0 = DebugLoss(G, 1.0, 1.0)(logits, activations, torch.tensor([0]))
    _, as_label_1 = DebugLoss(G, 1.0, 1.0)(logits, activations, torch.tensor([1]))
    assert as_label_0["active_mc"] == 2 and as_label_0["active_nonmc"] == 0
    assert as_label_1["active_mc"] == 0 and as_label_1["active_nonmc"] == 2


def test_zero_lambdas_give_plain_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 2, requires_grad=True)
    activations = torch.rand(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0, 1])
    loss, parts = DebugLoss(G, 0.0, 0.0)(logits, activations, labels)
    plain = F.cross_entropy(logits, labels)
    assert torch.equal(loss, plain)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    plain.backward()
    assert torch.equal(grad, logits.grad)
    assert activations.grad is None or torch.count_nonzero(activations.grad) == 0
    assert parts["mc"] > 0 and parts["active_mc"] > 0  # the control still reports filter activity


def test_centred_loss_needs_statistics_and_a_known_indicator():
    with pytest.raises(ValueError, match="statistics"):
        DebugLoss(G, 0.1, 0.1, indicator="centred")
    with pytest.raises(ValueError, match="unknown indicator"):
        DebugLoss(G, 0.1, 0.1, indicator="learned")
    stats = FilterStats(mean=torch.full((4,), 0.5), std=torch.ones(4))
    _, parts = DebugLoss(G, 0.1, 0.1, indicator="centred", stats=stats)(LOGITS, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]]), LABELS)
    assert parts["active_mc"] == pytest.approx(0.5)  # only image 0's filter 0 is above its mean
    assert parts["active_nonmc"] == 0


def test_global_filters_tensor_checks_the_shape():
    import numpy as np

    tensor = global_filters_tensor(np.array([[True, False], [False, True], [True, True]]), 3, 2)
    assert tensor.dtype == torch.float32 and tensor.sum().item() == 4
    with pytest.raises(ValueError, match=r"shape \(3, 2\), expected .* \(2, 3\)"):
        global_filters_tensor(np.zeros((3, 2), dtype=bool), 2, 3)


def test_an_epoch_reports_the_image_weighted_mean_of_its_steps_parts():
    """train_one_epoch sums the activity parts over blocks of steps (EpochDebugLoss); they equal the per-step parts' mean."""
    from raycf.method.debug_loss import ACTIVITY_BLOCK
    from raycf.training.loops import train_one_epoch

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    sizes = [5, 3] * ACTIVITY_BLOCK + [2]  # more steps than one block, uneven batches, a ragged last one
    batches = [(torch.randn(size, 4), torch.randint(0, 2, (size,))) for size in sizes]
    loss_fn = DebugLoss(G, lambda1=0.3, lambda2=0.2)

    def forward(module, inputs):
        activations = inputs.relu()
        return module(activations), activations

    expected: dict[str, float] = {}
    for inputs, labels in batches:
        _, parts = loss_fn(*forward(head, inputs), labels)
        for name, value in parts.items():
            expected[name] = expected.get(name, 0.0) + value.item() * len(labels)
    metrics = train_one_epoch(head, batches, torch.optim.SGD(head.parameters(), lr=0.0), loss_fn, forward=forward)
    for name, total in expected.items():
        assert metrics[f"train_{name}"] == pytest.approx(total / sum(sizes), rel=1e-5), name
    assert 0 < metrics["train_active_mc"] < metrics["train_active_nonmc"] + metrics["train_active_mc"] <= 4
