"""Grad-CAM and filter heat maps on tiny classifiers whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from raycf.data.views import model_inputs
from raycf.outputs.gradcam import display_image, filter_heatmaps, grad_cam
from raycf.models.contract import FilterClassifier


def _tiny_classifier(weights: list[list[float]], vgg_pool: bool) -> FilterClassifier:
    """K = 3 'filters' that are the input's channels (trunk = ReLU), a linear head with the given weights."""
    trunk = nn.Sequential(nn.ReLU())
    model = FilterClassifier("tiny", trunk, trunk, num_filters=3, num_classes=len(weights), dropout=0.0, vgg_pool=vgg_pool)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(weights))
        model.fc.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("vgg_pool", [False, True])
def test_grad_cam_is_the_class_weighted_sum_of_feature_maps(vgg_pool):
    # Logit z_c = Σ_k W_ck · pool(A_k): the mean gradient of z_c over A_k's pixels is W_ck / (H·W)
    # with average pooling and also with VGG's 2×2 max pool before it (each pooled pixel's gradient
    # lands on one of its four inputs), so Grad-CAM = ReLU(Σ_k W_ck A_k), scaled to a maximum of 1.
    weights = [[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]
    model = _tiny_classifier(weights, vgg_pool)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 4, 4, generator=generator)
    maps = grad_cam(model, images, [0, 1])
    assert maps.shape == (2, 4, 4)
    for row, target in enumerate((0, 1)):
        expected = torch.relu((torch.tensor(weights[target])[:, None, None] * images[row]).sum(0))
        torch.testing.assert_close(maps[row], expected / expected.max())


def test_grad_cam_without_support_for_the_class_is_zero():
    model = _tiny_classifier([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], vgg_pool=False)
    maps = grad_cam(model, torch.rand(1, 3, 4, 4), 0)
    assert torch.count_nonzero(maps) == 0 and not torch.isnan(maps).any()


def test_grad_cam_upsamples_to_the_input_and_finds_the_hot_spot():
    # A conv trunk that halves the resolution: the map comes back at 8×8 and peaks where the input is bright.
    trunk = nn.Sequential(nn.Conv2d(3, 2, kernel_size=2, stride=2, bias=False), nn.ReLU())
    with torch.no_grad():
        trunk[0].weight.fill_(0.25)
    model = FilterClassifier("tiny", trunk, trunk[0], num_filters=2, num_classes=1, dropout=0.0, vgg_pool=False).eval()
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    image = torch.zeros(1, 3, 8, 8)
    image[:, :, 0:2, 6:8] = 1.0  # top-right corner
    maps = grad_cam(model, image, 0)
    assert maps.shape == (1, 8, 8)
    row, column = divmod(int(maps[0].argmax()), 8)
    assert row < 2 and column >= 6
    assert float(maps[0, 6:, :2].max()) == 0.0  # the dark bottom-left stays cold


def test_filter_heatmaps_show_each_filter_where_it_fires():
    model = _tiny_classifier([[1.0, 1.0, 1.0]], vgg_pool=False)
    image = torch.zeros(3, 6, 6)
    image[0, 0, 0] = 2.0  # filter 0 fires top-left
    image[2, 5, 5] = 3.0  # filter 2 fires bottom-right
    maps = filter_heatmaps(model, image, [2, 0])
    assert maps.shape == (2, 6, 6)
    assert divmod(int(maps[0].argmax()), 6) == (5, 5)
    assert divmod(int(maps[1].argmax()), 6) == (0, 0)
    assert float(maps.max()) == pytest.approx(1.0)
    assert filter_heatmaps(model, image, [1]).abs().sum() == 0  # a filter that never fires


def test_display_image_undoes_the_evaluation_transform():
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    shown = display_image(model_inputs(torch.from_numpy(pixels).permute(2, 0, 1)[None], 16)[0])
    assert shown.shape == (16, 16, 3)
    np.testing.assert_allclose(shown, pixels / 255.0, atol=1e-5)
