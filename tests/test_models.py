"""The classifier contract of METHOD §1 for every architecture."""

from __future__ import annotations

import pytest
import torch

from raycf.config import ModelConfig
from raycf.errors import UserError
from raycf.models import NUM_FILTERS, build_model


@pytest.mark.parametrize("arch", ["vgg_tiny", "vgg16", "resnet18", "resnet50"])
def test_contract(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch), num_classes=7).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        activations = model.features(images)
        logits = model(images)
        assert activations.shape == (2, NUM_FILTERS[arch]) and logits.shape == (2, 7)
        assert (activations >= 0).all()
        assert torch.allclose(model.head(activations), logits, atol=1e-5)
        assert torch.allclose(model.forward_masked(images, torch.ones(NUM_FILTERS[arch])), logits, atol=1e-5)
        zero = model.forward_masked(images, torch.zeros(2, NUM_FILTERS[arch]))
        assert torch.allclose(zero, model.fc.bias.expand(2, 7))
        # Masking a filter in ``a`` equals zeroing its whole feature map before pooling.
        mask = torch.ones(NUM_FILTERS[arch])
        mask[:5] = 0
        maps = model.feature_maps(images)
        maps[:, :5] = 0
        assert torch.allclose(model.head(model.pool_maps(maps)), model.forward_masked(images, mask), atol=1e-5)


def test_vgg16_trunk_ends_with_the_block5_conv3_relu():
    model = build_model(ModelConfig(arch="vgg16"), num_classes=3)
    assert isinstance(model.trunk[-1], torch.nn.ReLU) and model.trunk[-2] is model.last_conv
    assert model.last_conv.in_channels == 512 and model.last_conv.out_channels == 512
    assert isinstance(model.pool[0], torch.nn.MaxPool2d)


@pytest.mark.parametrize(("scope", "expected"), [("head", 2), ("last_conv_and_head", 5), ("all", None)])
def test_trainable_scopes(scope, expected):
    model = build_model(ModelConfig(arch="vgg_tiny"), num_classes=4)
    trainable = model.set_trainable(scope)
    assert len(trainable) == (expected if expected is not None else len(list(model.parameters())))
    assert all(p.requires_grad for p in trainable)
    assert sum(p.requires_grad for p in model.parameters()) == len(trainable)


def test_dropout_only_in_training():
    model = build_model(ModelConfig(arch="vgg_tiny", dropout=0.9), num_classes=3)
    images = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(images), model(images))
    model.train()
    activations = torch.ones(4, 64)
    assert not torch.equal(model.head(activations), model.head(activations))


def test_imagenet_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match="imagenet weights for resnet18 not found at .*resnet18-f37072fd.pth"):
        build_model(ModelConfig(arch="resnet18", weights="imagenet"), num_classes=3)
    with pytest.raises(UserError, match="imagenet weights exist for vgg16, resnet18, resnet50, not vgg_tiny"):
        build_model(ModelConfig(arch="vgg_tiny", weights="imagenet"), num_classes=3)


def test_imagenet_weights_load_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = build_model(ModelConfig(arch="resnet18", weights="imagenet"), num_classes=3)
    assert torch.equal(model.trunk[0].weight, reference.conv1.weight)
