"""The arithmetic a model computes in (``model.precision``) and the device settings that go with it.

``auto`` is bf16 on a CUDA device that supports it and fp32 elsewhere; bf16 and
fp16 run the forward pass (and the loss) under ``torch.autocast``, fp16 with a
GradScaler.  On CUDA, channels_last, ``cudnn.benchmark`` and TF32 matmuls are
turned on: they change no result beyond float rounding and make convolutions
markedly faster.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve(precision: str, device: torch.device) -> str:
    """``auto`` made concrete for ``device``: ``bf16``, ``fp16`` or ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device."""

    name: str  # bf16, fp16 or fp32
    device: torch.device

    @classmethod
    def of(cls, precision: str, device: torch.device) -> "Precision":
        return cls(resolve(precision, device), device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes in."""
        dtype = DTYPES[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 (its gradients underflow without one); None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def prepare_device(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (no effect on the CPU)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on ``device``, channels_last on CUDA (where convolutions are fastest in it)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
