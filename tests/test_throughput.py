"""FLOP counting (as the training loops count their step), the peak table, MFU and the per-epoch throughput meter (CPU only, fast)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from raycf.training import throughput
from raycf.config import ModelConfig
from raycf.models.build import build_model
from raycf.models.precision import Precision
from raycf.training.throughput import PEAK_FLOPS, ThroughputMeter, mfu, peak_flops, step_flops, step_precision
from raycf.training.loops import cross_entropy_loss, logits_and_features, step_flops_per_image

IN, OUT = 10, 20
LINEAR_FORWARD = 2 * IN * OUT  # per sample

C_IN, C_OUT, K, H, W = 3, 8, 3, 8, 8  # padding 1: Hout = H, Wout = W
CONV_FORWARD = 2 * C_IN * C_OUT * K * K * H * W  # per image

FP32 = Precision.of("fp32", torch.device("cpu"))


def state(model: nn.Module) -> tuple:
    """Everything a FLOP count must leave alone."""
    return (
        [(name, m.training) for name, m in model.named_modules()],
        [(name, p.requires_grad, p.grad is None, p.detach().clone()) for name, p in model.named_parameters()],
        [(name, b.clone()) for name, b in model.named_buffers()],
    )


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert [x[:3] for x in before[1]] == [x[:3] for x in after[1]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(before[1], after[1]))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(before[2], after[2]))


# --- single layers with known counts ---------------------------------------------------------


def layer_step_flops(layer: nn.Module, shape: tuple[int, ...], batch: int = 2) -> float:
    """FLOPs per image of a training step of ``layer`` as the training loops count it (loss: the output's sum)."""
    inputs, labels = torch.randn(batch, *shape), torch.zeros(batch, dtype=torch.int64)
    return step_flops_per_image(layer, inputs, labels, lambda output, _a, _labels: (output.sum(), {}), lambda module, x: (module(x), None), FP32)


def test_linear_and_conv_forward_are_exact():
    assert step_flops(nn.Linear(IN, OUT), torch.randn(5, IN)) / 5 == LINEAR_FORWARD
    assert step_flops(nn.Conv2d(C_IN, C_OUT, K, padding=1), torch.randn(2, C_IN, H, W)) / 2 == CONV_FORWARD


def test_all_trainable_backward_skips_the_input_gradient():
    # The images do not require grad, so autograd computes only the weight
    # gradient (one more product of the forward's size): backward = 1 × forward,
    # not 2 ×; the bias gradient is a sum, which FlopCounterMode does not count.
    assert layer_step_flops(nn.Linear(IN, OUT), (IN,)) == 2 * LINEAR_FORWARD
    assert layer_step_flops(nn.Conv2d(C_IN, C_OUT, K, padding=1), (C_IN, H, W), batch=3) == 2 * CONV_FORWARD


def test_backward_is_twice_forward_when_the_input_gradient_is_needed():
    layer = nn.Linear(IN, OUT)
    x = torch.randn(2, IN, requires_grad=True)
    assert step_flops(lambda: layer(x).sum().backward()) == 2 * 3 * LINEAR_FORWARD
    conv = nn.Conv2d(C_IN, C_OUT, K, padding=1)
    images = torch.randn(2, C_IN, H, W, requires_grad=True)
    assert step_flops(lambda: conv(images).sum().backward()) == 2 * 3 * CONV_FORWARD


def test_two_layers_cost_three_times_forward_minus_the_first_input_gradient():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 5))
    forward = 2 * IN * OUT + 2 * OUT * 5
    with torch.no_grad():
        assert step_flops(model, torch.randn(2, IN)) / 2 == forward
    assert layer_step_flops(model, (IN,)) == 3 * forward - 2 * IN * OUT


@pytest.mark.parametrize(
    ("layer", "shape", "forward"),
    [(nn.Linear(IN, OUT), (IN,), LINEAR_FORWARD), (nn.Conv2d(C_IN, C_OUT, K, padding=1), (C_IN, H, W), CONV_FORWARD)],
)
def test_frozen_weights_have_no_counted_backward(layer, shape, forward):
    layer.weight.requires_grad_(False)  # bias still trains: its gradient is a sum, not counted
    before = state(layer)
    assert layer_step_flops(layer, shape) == forward
    assert_same_state(before, state(layer))


def test_step_flops_counts_a_callable_on_meta():
    layer = nn.Linear(IN, OUT, device="meta")
    x = torch.empty(4, IN, device="meta")
    assert step_flops(layer, x) == 4 * LINEAR_FORWARD
    assert step_flops(lambda: layer(x).sum().backward()) == 4 * 2 * LINEAR_FORWARD


# --- the real classifier --------------------------------------------------------------------


def test_vgg_tiny_frozen_trunk_is_cheaper_and_the_model_is_left_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg_tiny"), 10)
    inputs, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with torch.no_grad():
        inference = step_flops(model.eval(), inputs) / 2
    model.train()
    model.trunk[1].eval()  # a mixed mode, to see every module's mode left alone

    def count(scope: str) -> float:
        model.set_trainable(scope)
        before = state(model)
        flops = step_flops_per_image(model, inputs, labels, cross_entropy_loss, logits_and_features, FP32)
        assert_same_state(before, state(model))
        return flops

    every, last_conv, head = count("all"), count("last_conv_and_head"), count("head")
    assert every > last_conv > head
    assert all(p.requires_grad == (name.startswith("fc.")) for name, p in model.named_parameters())
    # End to end: a bit under 3 × forward (the first conv needs no input gradient).
    assert 2 * inference < every < 3 * inference
    # Head only: the trunk runs forward only; the head's weight gradient is tiny.
    assert inference < head < 1.01 * inference


# --- peaks, MFU ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA A10G", "bf16", 70e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "tf32", 156e12),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "fp16", 835.5e12),
        ("NVIDIA H200", "bf16", 989.4e12),
        ("NVIDIA H200 NVL", "fp32", 60e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("NVIDIA L40", "tf32", 90.5e12),
        ("Tesla T4", "fp16", 65e12),
        ("Tesla T4", "bf16", None),
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-PCIE-32GB", "fp16", 112e12),
        ("Tesla V100S-PCIE-32GB", "fp32", 16.4e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
        ("NVIDIA GeForce RTX 3090", "tf32", 35.6e12),
        ("nvidia h100 80gb hbm3", "BF16", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
        # Unknown devices, and names that only contain a known one.
        ("cpu", "fp32", None),
        ("NVIDIA GeForce RTX 3090 Ti", "bf16", None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", "bf16", None),
        ("NVIDIA RTX A1000", "bf16", None),
        ("NVIDIA B200", "bf16", None),
        ("", "bf16", None),
    ],
)
def test_peak_flops_matches_device_names(name, precision, expected):
    assert peak_flops(name, precision) == expected


def test_peak_flops_rejects_unknown_precisions():
    with pytest.raises(ValueError, match="precision"):
        peak_flops("NVIDIA H100 80GB HBM3", "fp8")


def test_peak_table_is_consistent():
    for name, peak in PEAK_FLOPS.items():
        assert peak.fp32 is not None and peak.fp16 is not None, name
        assert peak.fp16 >= peak.fp32, name
        if peak.bf16 is not None:
            assert peak.bf16 == peak.fp16 and peak.tf32 is not None and peak.fp32 <= peak.tf32 <= peak.bf16, name
        # Every row is reachable from its own name.
        assert throughput.gpu_model(f"NVIDIA {name}") == name


def test_step_precision():
    assert step_precision(torch.bfloat16) == "bf16"
    assert step_precision(torch.float16) == "fp16"
    assert step_precision(None) in ("tf32", "fp32")
    assert step_precision(torch.float32) == step_precision(None)


def test_mfu_arithmetic():
    assert mfu(1e9, 1000.0, 1e13) == pytest.approx(0.1)
    assert mfu(3e9, 500.0, 312e12) == pytest.approx(3e9 * 500 / 312e12)
    assert mfu(1e9, 1000.0, None) is None
    assert mfu(None, 1000.0, 1e13) is None
    assert mfu(1e9, 0.0, 1e13) == 0.0


# --- the meter -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_meter_with_a_fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    meter = ThroughputMeter("cpu").start()
    for _ in range(5):
        meter.add(32)
        clock.now += 0.5
    meter.stop()
    clock.now += 100.0  # time after stop() does not count
    assert meter.images == 160 and meter.seconds == pytest.approx(2.5)
    assert meter.images_per_second == pytest.approx(64.0)
    assert mfu(1e9, meter.images_per_second, None) is None
    assert mfu(1e9, meter.images_per_second, 1e12) == pytest.approx(0.064)
    # start() begins a new window.
    meter.start()
    meter.add(10)
    clock.now += 2.0
    assert meter.stop().images_per_second == pytest.approx(5.0)


def test_meter_edge_cases(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", FakeClock())
    meter = ThroughputMeter()
    with pytest.raises(RuntimeError):
        meter.stop()
    assert meter.start().stop().images_per_second == 0.0  # zero-length window
    with pytest.raises(TypeError):
        meter.add(torch.tensor(3))


def test_meter_synchronises_cuda_only_at_the_window_edges(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(time, "perf_counter", FakeClock())
    meter = ThroughputMeter(torch.device("cuda", 0)).start()
    assert len(calls) == 1
    for _ in range(10):
        meter.add(8)
    assert len(calls) == 1
    meter.stop()
    assert calls == [torch.device("cuda", 0)] * 2
    calls.clear()
    ThroughputMeter("cpu").start().stop()
    assert calls == []
