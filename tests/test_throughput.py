"""FLOP counting, the peak table, MFU and the per-epoch throughput meter (CPU only, fast)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from raycf import throughput
from raycf.config import ModelConfig
from raycf.models import build_model
from raycf.throughput import (
    PEAK_FLOPS,
    ThroughputMeter,
    inference_flops_per_image,
    mfu,
    peak_flops,
    step_flops,
    step_precision,
    training_flops_per_image,
)

IN, OUT = 10, 20
LINEAR_FORWARD = 2 * IN * OUT  # per sample

C_IN, C_OUT, K, H, W = 3, 8, 3, 8, 8  # padding 1: Hout = H, Wout = W
CONV_FORWARD = 2 * C_IN * C_OUT * K * K * H * W  # per image


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


def test_linear_forward_is_exact():
    layer = nn.Linear(IN, OUT)
    assert inference_flops_per_image(layer, (IN,)) == LINEAR_FORWARD
    assert inference_flops_per_image(layer, (IN,), batch_size=5) == LINEAR_FORWARD


def test_conv_forward_is_exact():
    layer = nn.Conv2d(C_IN, C_OUT, K, padding=1)
    assert inference_flops_per_image(layer, (C_IN, H, W)) == CONV_FORWARD


def test_all_trainable_backward_skips_the_input_gradient():
    # The images do not require grad, so autograd computes only the weight
    # gradient (one more product of the forward's size): backward = 1 × forward,
    # not 2 ×; the bias gradient is a sum, which FlopCounterMode does not count.
    assert training_flops_per_image(nn.Linear(IN, OUT), (IN,)) == 2 * LINEAR_FORWARD
    assert training_flops_per_image(nn.Conv2d(C_IN, C_OUT, K, padding=1), (C_IN, H, W)) == 2 * CONV_FORWARD


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
    assert inference_flops_per_image(model, (IN,)) == forward
    assert training_flops_per_image(model, (IN,)) == 3 * forward - 2 * IN * OUT


@pytest.mark.parametrize(
    ("layer", "shape", "forward"),
    [(nn.Linear(IN, OUT), (IN,), LINEAR_FORWARD), (nn.Conv2d(C_IN, C_OUT, K, padding=1), (C_IN, H, W), CONV_FORWARD)],
)
def test_frozen_weights_have_no_counted_backward(layer, shape, forward):
    layer.weight.requires_grad_(False)  # bias still trains: its gradient is a sum, not counted
    assert training_flops_per_image(layer, shape) == forward
    layer.bias.requires_grad_(False)  # nothing trains: no backward at all
    before = state(layer)
    assert training_flops_per_image(layer, shape) == forward
    assert_same_state(before, state(layer))
    # As if everything trained:
    assert training_flops_per_image(layer, shape, trainable_only_backward=False) == 2 * forward
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_step_flops_counts_a_callable_on_meta():
    layer = nn.Linear(IN, OUT, device="meta")
    x = torch.empty(4, IN, device="meta")
    assert step_flops(layer, x) == 4 * LINEAR_FORWARD
    assert step_flops(lambda: layer(x).sum().backward()) == 4 * 2 * LINEAR_FORWARD


def test_cpu_fallback_when_an_op_has_no_meta_kernel():
    class ReadsAValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(IN, OUT)

        def forward(self, x):
            x.sum().item()  # cannot run on meta tensors
            return self.fc(x)

    model = ReadsAValue()
    assert training_flops_per_image(model, (IN,)) == 2 * LINEAR_FORWARD
    assert all(p.grad is None for p in model.parameters())


# --- the real classifier --------------------------------------------------------------------


def test_vgg_tiny_frozen_trunk_is_cheaper_and_the_model_is_left_alone():
    model = build_model(ModelConfig(arch="vgg_tiny"), 10)
    shape = (3, 32, 32)
    model.eval()
    model.trunk[1].train()  # a mixed mode, to see every module's mode restored
    inference = inference_flops_per_image(model, shape)

    model.set_trainable("all")
    before = state(model)
    every = training_flops_per_image(model, shape)
    assert_same_state(before, state(model))

    model.set_trainable("head")
    before = state(model)
    head = training_flops_per_image(model, shape)
    assert_same_state(before, state(model))
    assert not model.training and model.trunk[1].training
    assert all(p.requires_grad == (name.startswith("fc.")) for name, p in model.named_parameters())

    model.set_trainable("last_conv_and_head")
    last_conv = training_flops_per_image(model, shape)
    assert every > last_conv > head
    # last_conv shares modules with trunk: every tensor is back in the model, on the CPU.
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert model.last_conv[0].weight is model.trunk[-3].weight
    model.set_trainable("head")
    # End to end: a bit under 3 × forward (the first conv needs no input gradient).
    assert 2 * inference < every < 3 * inference
    # Head only: the trunk runs forward only; the head's weight gradient is tiny.
    assert inference < head < 1.01 * inference
    # trainable_only_backward=False counts the frozen model as if it all trained.
    assert training_flops_per_image(model, shape, trainable_only_backward=False) == every
    # Eval-mode dropout/BN do not change counts; the batch size divides out.
    assert training_flops_per_image(model, shape, batch_size=3) == head


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
    assert meter.metrics() == {"images_per_s": pytest.approx(64.0)}
    assert meter.metrics(1e9, None) == {"images_per_s": pytest.approx(64.0)}
    assert meter.metrics(1e9, 1e12) == {"images_per_s": pytest.approx(64.0), "mfu": pytest.approx(0.064)}
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
