"""How a source image becomes the uint8 image a model's evaluation input is made from (``data.preprocess``).

* ``squash``: the whole image resized to a square (raycf's default, for its
  own models and square datasets);
* ``resize_crop``: torchvision's classification evaluation transform: the
  shorter side resized to ``data.preprocess.resize``, then a centre crop of
  ``data.image_size``;
* ``weights``: ``resize_crop`` with the resize ratio, interpolation, mean and
  std of the architecture's pretrained weights (torchvision's
  ``weights.transforms()``, timm's ``resolve_data_config``), resolved when
  the study is validated so that the images stage's cache key holds the
  numbers.

The images stage stores the result (``resize_crop``: at ``data.image_size``,
so the evaluation input is exactly ``normalise(image / 255)``); training
augmentation is applied on the device, after that.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raycf.models.architectures import TIMM_PREFIX, VGG_TINY, family_of
from raycf.config import DataConfig
from raycf.errors import UserError

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


def weights_preprocessing(arch: str, image_size: int) -> dict[str, Any]:
    """``resize``, ``interpolation``, ``mean`` and ``std`` of ``arch``'s pretrained weights, for a crop of ``image_size``.

    The resize keeps the weights' ratio of resize to crop (torchvision's 256/224
    for most weights; timm's ``1 / crop_pct``).  Reads the libraries' metadata
    only: nothing is downloaded.
    """
    family = family_of(arch)
    if family == VGG_TINY:
        raise UserError("data.preprocess.mode: weights: vgg_tiny is raycf's own network and has no pretrained weights (expected squash or resize_crop)")
    if family == "timm":
        from raycf.models.timm_family import timm_module

        timm = timm_module()
        name = arch[len(TIMM_PREFIX) :]
        config = timm.models.get_pretrained_cfg(name)
        if config is None:
            raise UserError(f"data.preprocess.mode: weights: timm has no pretrained configuration for {name} (expected resize_crop with your own settings)")
        resolved = timm.data.resolve_data_config({}, pretrained_cfg=config.to_dict())
        return {
            "resize": math.floor(image_size / resolved["crop_pct"]),
            "interpolation": _known_interpolation(resolved["interpolation"], arch),
            "mean": tuple(float(v) for v in resolved["mean"]),
            "std": tuple(float(v) for v in resolved["std"]),
        }
    from torchvision import models as tv_models

    transform = tv_models.get_model_weights(arch).DEFAULT.transforms()
    return {
        "resize": round(image_size * transform.resize_size[0] / transform.crop_size[0]),
        "interpolation": _known_interpolation(transform.interpolation.value, arch),
        "mean": tuple(float(v) for v in transform.mean),
        "std": tuple(float(v) for v in transform.std),
    }


def _known_interpolation(name: str, arch: str) -> str:
    if name not in INTERPOLATIONS:
        raise UserError(f"data.preprocess.mode: weights: {arch}'s weights use {name} interpolation (expected one of {', '.join(INTERPOLATIONS)})")
    return name


def preprocess_image(image: object, data: DataConfig, side: int) -> np.ndarray:
    """An image (PIL, or a 3×H×W float tensor in [0, 1]) as the RGB uint8 array the images stage stores (side×side×3)."""
    if data.preprocess.mode == "squash":
        return squash(image, side, data.preprocess.interpolation)
    return resize_crop(image, data.preprocess.resize, data.image_size, data.preprocess.interpolation)


def squash(image: object, side: int, interpolation: str = "bilinear") -> np.ndarray:
    """The whole image resized to side×side (antialiased), RGB uint8."""
    if isinstance(image, torch.Tensor):
        smooth = {"antialias": True, "align_corners": False} if interpolation != "nearest" else {}
        resized = F.interpolate(image[None].float(), size=(side, side), mode=interpolation, **smooth)[0]
        return _to_uint8(resized)
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), INTERPOLATIONS[interpolation], reducing_gap=None)
    return np.asarray(rgb, dtype=np.uint8)


def resize_crop(image: object, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """torchvision's evaluation transform before ``ToTensor``: shorter side to ``resize``, centre crop of ``crop``; RGB uint8."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mode = InterpolationMode(interpolation)
    if isinstance(image, torch.Tensor):
        return _to_uint8(TF.center_crop(TF.resize(image.float(), [resize], interpolation=mode, antialias=True), [crop]))
    cropped = TF.center_crop(TF.resize(image.convert("RGB"), [resize], interpolation=mode, antialias=True), [crop])
    return np.asarray(cropped, dtype=np.uint8)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
