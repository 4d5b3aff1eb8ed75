"""The training loop's plumbing (raycf.training.loops): throughput, FLOP counting without side effects, precision."""

from __future__ import annotations

import torch

from raycf.config import ModelConfig
from raycf.models.build import build_model
from raycf.models.precision import Precision
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


def _coloured_batch(seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: the class (of 4) sets the image's mean brightness."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (size,), generator=generator)
    return torch.randn(size, 3, 16, 16, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1).float() - 1.5, labels


def test_bf16_autocast_trains_on_the_cpu():
    """Training in bf16 on distinct batches lowers the loss on images it never saw (not one batch memorised)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg_tiny", dropout=0.0), 4)
    batches = [_coloured_batch(seed) for seed in range(8)]
    held_out = _coloured_batch(100, size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    precision = Precision.of("bf16", torch.device("cpu"))

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model.eval()(held_out[0]), held_out[1]))

    dtypes = set()

    def recording(model, inputs):
        logits, activations = logits_and_features(model, inputs)
        dtypes.add(logits.dtype)
        return logits, activations

    before = held_out_loss()
    for _ in range(3):
        model.train()
        train_one_epoch(model, batches, optimizer, cross_entropy_loss, precision=precision, forward=recording)
    assert dtypes == {torch.bfloat16}  # the steps did run under bf16 autocast
    assert held_out_loss() < 0.1 * before  # ~1.39 (chance) to ~0.02
    with torch.no_grad():
        assert float((model.eval()(held_out[0]).argmax(1) == held_out[1]).float().mean()) > 0.95
    assert Precision.of("auto", torch.device("cpu")).name == "fp32"
