"""Images per second and MFU (model FLOPs utilisation) of a training or inference step.

Pure helpers; nothing here touches Ray or the training loops.

**What is counted.**  FLOPs are counted with
:class:`torch.utils.flop_counter.FlopCounterMode`, which counts the ops that
dominate a CNN's cost: convolutions (forward and ``convolution_backward``),
matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``) and attention kernels,
a multiply-add counted as 2 FLOPs (the convention of NVIDIA's datasheets).
Element-wise ops, BatchNorm, ReLU, pooling, the loss and the optimizer step are
not counted: they are memory-bound and small, and leaving them out is the usual
definition of "model FLOPs".  Counts depend only on shapes, never on dtype or
values, so they are the same for fp32, tf32, fp16 and bf16 steps.

**Why backward is measured, not assumed.**  The rule of thumb "backward = 2 ×
forward" holds only when every layer needs both the gradient of its input and
the gradient of its weights.  Autograd skips what nobody needs:

* the first layer never computes the gradient of its input (the images do not
  require grad), so a network trained end to end costs a bit less than 3 ×
  forward;
* with a frozen trunk (``FilterClassifier.set_trainable("head")``), no conv
  layer needs a weight gradient and no gradient flows past the last trainable
  layer at all: the backward is then almost free, and an assumed 3 × forward
  would overstate MFU by up to 3 ×.

FlopCounterMode records the ops autograd actually runs (it reads
``convolution_backward``'s output mask), so counting a real forward and
backward gets all of this right.

**Where it is counted.**  :func:`step_flops` counts one call of a step: the
training loops count their own step on their first real batch
(:func:`raycf.training.loops.step_flops_per_image`, which leaves the model's
weights, gradients, BatchNorm statistics and random draws as they were);
on ``meta`` tensors it counts shapes only, without arithmetic.

**MFU** = FLOPs per image × images/s ÷ the device's peak FLOP/s *in the
precision the step runs in*: bf16/fp16 under autocast, TF32 for fp32
convolutions when cuDNN may use TF32 (PyTorch's default), else plain fp32 (see
:func:`step_precision`).  Using the bf16 peak for an fp32 step would report a
utilisation 16 × too low on an H100; using the fp32 peak for a TF32 step could
report more than 100 %.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "PEAK_FLOPS",
    "PRECISIONS",
    "ThroughputMeter",
    "mfu",
    "peak_flops",
    "step_flops",
    "step_precision",
]

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")

# ---------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------


def step_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Total FLOPs of calling ``fn(*args, **kwargs)`` once (forward and, if ``fn`` calls it, backward).

    ``fn`` really runs, with all its side effects (gradients accumulate, an
    optimizer inside it steps); pass meta tensors to count without computing.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imports triton (0.1-0.2 s): only where FLOPs are counted (CUDA runs, benchmarks)

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------
# Peak throughput
# ---------------------------------------------------------------------------


class Peak(NamedTuple):
    """Dense peak FLOP/s of one GPU: tensor cores for bf16/fp16/tf32, CUDA cores (non-tensor) for fp32; None: not supported."""

    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float | None


# Dense (no 2:4 sparsity) peak FLOP/s.  Datasheets print the sparse figure for
# tensor-core rows of Hopper/Ada parts (marked "*with sparsity"); those are
# halved here.  fp16/bf16 are tensor-core rates with fp32 accumulation (what
# PyTorch's GEMMs and convolutions use; GeForce and A10G run it at half their
# fp16-accumulate rate).
PEAK_FLOPS: dict[str, Peak] = {
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): same peaks for
    # A100 40GB/80GB, SXM4 and PCIe: FP32 19.5, TF32 156, BF16/FP16 312 (624 sparse).
    "A100": Peak(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12),
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5 (125 sparse), BF16/FP16 125 (250 sparse).
    "A10": Peak(bf16=125e12, fp16=125e12, tf32=62.5e12, fp32=31.2e12),
    # NVIDIA A10G (AWS G5): no public NVIDIA datasheet; NVIDIA's A10G figures as quoted by Baseten,
    # "NVIDIA A10 vs A10G for ML model inference": FP32 35, TF32 35, BF16/FP16 70 (dense).
    # Consistent with 80 SMs × 1.71 GHz at GA102's fp32-accumulate tensor rate.
    "A10G": Peak(bf16=70e12, fp16=70e12, tf32=35e12, fp32=35e12),
    # NVIDIA H100 datasheet, SXM5 (get_device_name "NVIDIA H100 80GB HBM3"): FP32 67,
    # TF32 989*, BF16/FP16 1,979* (*sparse) → dense 494.7 / 989.4.
    "H100": Peak(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=67e12),
    # NVIDIA H100 datasheet, PCIe: FP32 51, TF32 756*, BF16/FP16 1,513* (*sparse) → dense 378 / 756.
    "H100 PCIe": Peak(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12),
    # NVIDIA H100 datasheet, H100 NVL: FP32 60, TF32 835*, BF16/FP16 1,671* (*sparse) → dense 417.5 / 835.5.
    "H100 NVL": Peak(bf16=835.5e12, fp16=835.5e12, tf32=417.5e12, fp32=60e12),
    # NVIDIA H200 datasheet, SXM: FP32 67, TF32 989*, BF16/FP16 1,979* (*sparse) → dense 494.7 / 989.4.
    "H200": Peak(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=67e12),
    # NVIDIA H200 datasheet, H200 NVL: FP32 60, TF32 835*, BF16/FP16 1,671* (*sparse) → dense 417.5 / 835.5.
    "H200 NVL": Peak(bf16=835.5e12, fp16=835.5e12, tf32=417.5e12, fp32=60e12),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242* (*sparse) → dense 60 / 121.
    "L4": Peak(bf16=121e12, fp16=121e12, tf32=60e12, fp32=30.3e12),
    # NVIDIA L40 datasheet: FP32 90.5, TF32 90.5 (181 sparse), BF16/FP16 181.05 (362.1 sparse).
    "L40": Peak(bf16=181.05e12, fp16=181.05e12, tf32=90.5e12, fp32=90.5e12),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 183 (366 sparse), BF16/FP16 362.05 (733 sparse).
    "L40S": Peak(bf16=362.05e12, fp16=362.05e12, tf32=183e12, fp32=91.6e12),
    # NVIDIA T4 datasheet: FP32 8.1, mixed precision (FP16/FP32) 65; Turing has no BF16 or TF32.
    "T4": Peak(bf16=None, fp16=65e12, tf32=None, fp32=8.1e12),
    # NVIDIA V100 datasheet, SXM2 (also the default for other V100 forms): FP32 15.7, tensor 125; no BF16/TF32.
    "V100": Peak(bf16=None, fp16=125e12, tf32=None, fp32=15.7e12),
    # NVIDIA V100 datasheet, PCIe: FP32 14, tensor 112.
    "V100 PCIe": Peak(bf16=None, fp16=112e12, tf32=None, fp32=14e12),
    # NVIDIA V100S datasheet (PCIe): FP32 16.4, tensor 130.
    "V100S": Peak(bf16=None, fp16=130e12, tf32=None, fp32=16.4e12),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6; TF32 82.6 (165.2 sparse);
    # BF16 and FP16 with FP32 accumulate 165.2 (330.4 sparse); FP16-accumulate 330.3 is not what PyTorch uses.
    "RTX 4090": Peak(bf16=165.2e12, fp16=165.2e12, tf32=82.6e12, fp32=82.6e12),
    # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090: FP32 35.6; TF32 35.6 (71 sparse);
    # BF16 and FP16 with FP32 accumulate 71 (142 sparse); FP16-accumulate 142 is not what PyTorch uses.
    "RTX 3090": Peak(bf16=71e12, fp16=71e12, tf32=35.6e12, fp32=35.6e12),
}

# Regular expressions over the lower-cased torch.cuda.get_device_name(), with
# runs of spaces, '-' and '_' folded to one space.  Each must match whole
# words (so "a100" is not found in "rtx a1000", nor "l4" in "l40s"); when
# several match, the longest matched text wins ("h100 pcie" over "h100").
# GeForce names are anchored at the end: "RTX 4090 D", "RTX 4090 Laptop GPU"
# and "RTX 3090 Ti" are different chips and stay unknown.
_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"\ba100\b", "A100"),
    (r"\ba10\b", "A10"),
    (r"\ba10g\b", "A10G"),
    (r"\bh100\b", "H100"),
    (r"\bh100 pcie\b", "H100 PCIe"),
    (r"\bh100 nvl\b", "H100 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh200 nvl\b", "H200 NVL"),
    (r"\bl4\b", "L4"),
    (r"\bl40\b", "L40"),
    (r"\bl40s\b", "L40S"),
    (r"\bt4\b", "T4"),
    (r"\bv100\b", "V100"),
    (r"\bv100 pcie\b", "V100 PCIe"),
    (r"\bv100s\b", "V100S"),
    (r"\brtx 4090$", "RTX 4090"),
    (r"\brtx 3090$", "RTX 3090"),
)

_PRECISION_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
    "tensorfloat32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


def gpu_model(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a ``torch.cuda.get_device_name()`` string, or None when unknown."""
    name = re.sub(r"[\s_\-]+", " ", device_name.lower()).strip()
    best: tuple[int, str] | None = None
    for pattern, key in _NAME_RULES:
        found = re.search(pattern, name)
        if found and (best is None or len(found.group()) > best[0]):
            best = (len(found.group()), key)
    return None if best is None else best[1]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU named ``device_name`` in ``precision`` (bf16, fp16, tf32, fp32).

    ``device_name`` is what ``torch.cuda.get_device_name()`` says ("NVIDIA
    H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4", ...).  None for an
    unknown device, for "cpu", and for a precision the GPU has no tensor-core
    path for (bf16/tf32 on T4 or V100).  Pass the precision the step really
    runs in (:func:`step_precision`).
    """
    key = _PRECISION_ALIASES.get(precision.lower().replace("_", "").replace("-", ""))
    if key is None:
        raise ValueError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    model = gpu_model(device_name)
    return None if model is None else getattr(PEAK_FLOPS[model], key)


def step_precision(autocast_dtype: torch.dtype | None = None) -> str:
    """The precision a CNN training step's convolutions run in, for :func:`peak_flops`.

    ``autocast_dtype``: the dtype of ``torch.autocast`` around the step (None:
    no autocast).  Without autocast, fp32 convolutions run on TF32 tensor
    cores when cuDNN may use TF32 (PyTorch's default on Ampere and later),
    so the tf32 peak applies; else fp32.
    """
    if autocast_dtype is not None and autocast_dtype != torch.float32:
        if autocast_dtype == torch.bfloat16:
            return "bf16"
        if autocast_dtype == torch.float16:
            return "fp16"
        raise ValueError(f"no peak throughput for autocast dtype {autocast_dtype}")
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return "tf32" if precision == "tf32" else "fp32"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def mfu(flops_per_image: float | None, images_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s ÷ peak FLOP/s (None when the peak or the FLOPs are unknown)."""
    if peak is None or peak <= 0 or flops_per_image is None:
        return None
    return flops_per_image * images_per_second / peak


# ---------------------------------------------------------------------------
# Per-epoch meter
# ---------------------------------------------------------------------------


class ThroughputMeter:
    """Images per second over one window (an epoch) of a training loop.

    ``start()`` and ``stop()`` each synchronise CUDA once when ``device`` is a
    CUDA device, so the window holds exactly the kernels queued inside it;
    ``add(images)`` only adds an int (pass ``len(labels)``, never a tensor:
    reading a GPU tensor would stall the loop).  Counts are per process: in a
    data-parallel run each rank measures its own images against its own GPU's
    peak.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images = 0
        self._started: float | None = None
        self._stopped: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> "ThroughputMeter":
        """Begin a window (resets the count)."""
        self._sync()
        self.images = 0
        self._stopped = None
        self._started = time.perf_counter()
        return self

    def add(self, images: int) -> None:
        """Count ``images`` processed (an int; no host sync)."""
        if isinstance(images, torch.Tensor):
            raise TypeError("ThroughputMeter.add takes an int (e.g. len(labels)); reading a tensor would sync the device")
        self.images += int(images)

    def stop(self) -> "ThroughputMeter":
        """End the window, after the device has finished the work queued in it."""
        if self._started is None:
            raise RuntimeError("ThroughputMeter.stop() before start()")
        self._sync()
        self._stopped = time.perf_counter()
        return self

    @property
    def seconds(self) -> float:
        """Length of the window (up to now while it runs)."""
        if self._started is None:
            return 0.0
        end = self._stopped if self._stopped is not None else time.perf_counter()
        return end - self._started

    @property
    def images_per_second(self) -> float:
        """Images counted ÷ seconds (0.0 for an empty or zero-length window)."""
        seconds = self.seconds
        return self.images / seconds if seconds > 0 else 0.0
