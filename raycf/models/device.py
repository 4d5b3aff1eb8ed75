"""Which device a process trains and infers on: a GPU when asked for and visible, else the CPU."""

from __future__ import annotations

import torch


def device_for(use_gpu: bool) -> torch.device:
    """CUDA when the study asks for GPUs, else the CPU; never a silent CPU fallback.

    A process that was given a GPU (``use_gpu: true``) but sees none is
    misconfigured: computing on its CPU would be slow and report the wrong
    hardware, so it fails instead.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true but this process sees no CUDA device (CUDA_VISIBLE_DEVICES, driver or a GPU-less node)")
    return torch.device("cuda")
