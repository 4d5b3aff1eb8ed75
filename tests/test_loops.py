"""The training loop's plumbing (raycf.training.loops): throughput, FLOP counting without side effects, precision."""

from __future__ import annotations

import torch

from raycf.config import ModelConfig
from raycf.models import build_model
from raycf.precision import Precision
from raycf.training.loops import FlopCount, cross_entropy_loss, logits_and_features, step_flops_per_image, train_one_epoch, utilisation


def test_an_epoch_reports_images_per_second_and_no_mfu_on_the_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg_tiny"), 10)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    metrics = train_one_epoch(model, batches, optimizer, cross_entropy_loss, precision=Precision.of("auto", torch.device("cpu")), flops=FlopCount())
    assert metrics["images_per_s"] > 0 and "mfu" not in metrics
    assert utilisation(1e9, 100.0, Precision.of("fp32", torch.device("cpu"))) == {}


def test_counting_flops_changes_nothing_in_the_model_or_the_random_draws():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg_tiny", dropout=0.5), 10).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.manual_seed(7)
    flops = step_flops_per_image(model, inputs, labels, cross_entropy_loss, logits_and_features, Precision.of("fp32", torch.device("cpu")))
    draw = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(draw, torch.rand(3))  # the dropout draws were not consumed
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # BatchNorm statistics untouched
    assert all(parameter.grad is None for parameter in model.parameters())
    assert flops > 3e6  # forward + backward of a vgg_tiny at 16 px: millions of FLOPs per image


def test_bf16_autocast_trains_on_the_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg_tiny"), 10)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))] * 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    precision = Precision.of("bf16", torch.device("cpu"))
    first = train_one_epoch(model, batches[:1], optimizer, cross_entropy_loss, precision=precision)
    later = train_one_epoch(model, batches, optimizer, cross_entropy_loss, precision=precision)
    assert later["train_loss"] < first["train_loss"]
    assert Precision.of("auto", torch.device("cpu")).name == "fp32"
