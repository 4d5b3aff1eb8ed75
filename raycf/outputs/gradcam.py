"""Heat maps over an image: Grad-CAM of a class and single filters' feature maps.

Grad-CAM (Selvaraju et al. 2017, as in the paper's Figure 2) is captum's
``LayerGradCam`` on the classifier's last conv layer (the output of
``FilterClassifier.trunk``, after its ReLU): the feature maps weighted by the
spatial mean of the class logit's gradient, summed over filters, ReLU'd.
Maps come back at the input's resolution (bilinear), scaled to [0, 1] per
image (an all-zero map stays zero: nothing in the image supports the class).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raycf.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from raycf.models.contract import FilterClassifier


def _scaled_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map (B×H×W) by its maximum; all-zero maps stay zero."""
    peak = maps.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return maps / peak[:, None, None]


def grad_cam(model: FilterClassifier, images: torch.Tensor, classes: torch.Tensor | list[int] | int) -> torch.Tensor:
    """Grad-CAM maps (B×H×W in [0, 1]) of ``classes`` for model inputs ``images`` (B×3×H×W)."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    target = torch.as_tensor(classes, dtype=torch.long)
    if target.dim() == 0:
        target = target.expand(len(images))
    cam = LayerGradCam(model, model.trunk)
    attributions = cam.attribute(images, target=target.tolist(), relu_attributions=True)  # B×1×h×w
    upsampled = LayerAttribution.interpolate(attributions, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return _scaled_to_unit(upsampled[:, 0].detach().clamp_min(0))


@torch.no_grad()
def filter_heatmaps(model: FilterClassifier, image: torch.Tensor, filters: list[int]) -> torch.Tensor:
    """Feature maps of ``filters`` for one model input (3×H×W), upsampled to H×W, each scaled to [0, 1] (F×H×W)."""
    maps = model.eval().feature_maps(image[None])[0, filters]  # F×h×w, non-negative (after ReLU)
    return unit_heatmaps(maps, tuple(image.shape[-2:])) if len(filters) else maps.new_zeros((0, *image.shape[-2:]))


@torch.no_grad()
def filter_heatmaps_over(model: FilterClassifier, images: torch.Tensor, filter_index: int) -> torch.Tensor:
    """One filter's feature map over each model input (B×3×H×W), upsampled to H×W and scaled to [0, 1] per image (B×H×W)."""
    return unit_heatmaps(model.eval().feature_maps(images)[:, filter_index], tuple(images.shape[-2:]))


def unit_heatmaps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Feature maps (B×h×w) upsampled to ``size`` (bilinear) and scaled to [0, 1] per map."""
    upsampled = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _scaled_to_unit(upsampled.clamp_min(0))


def display_image(image: torch.Tensor) -> np.ndarray:
    """A model input (3×H×W, ImageNet-normalised) as an H×W×3 RGB array in [0, 1] for plotting."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
