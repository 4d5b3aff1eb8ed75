"""Classifiers that follow the contract of METHOD §1.

    image → trunk (conv layers, ends with ReLU) → [VGG: MaxPool 2×2] → GAP → a (K, ≥ 0)
          → Dropout (training only) → Linear(K, C) → logits

Because the head is linear in ``a`` and every channel is pooled alone,
``head(a * mask)`` is the same as masking whole feature maps before pooling.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision import models as tv_models

from raycf.config import ModelConfig
from raycf.errors import UserError

if TYPE_CHECKING:
    from raycf.checkpoint import ClassifierCheckpoint

# Filters K of the last conv layer, per architecture.
NUM_FILTERS = {"vgg16": 512, "resnet18": 512, "resnet50": 2048, "vgg_tiny": 64}

IMAGENET_WEIGHTS = {
    "vgg16": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "resnet18": tv_models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": tv_models.ResNet50_Weights.IMAGENET1K_V1,
}


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


class FilterClassifier(nn.Module):
    """A CNN whose logits are a linear function of its pooled last-conv filters.

    ``last_conv`` names the module holding the last conv layer's weights (the
    reference retrains it together with the head).
    """

    def __init__(self, arch: str, trunk: nn.Module, last_conv: nn.Module, num_filters: int, num_classes: int, dropout: float, vgg_pool: bool):
        super().__init__()
        self.arch = arch
        self.num_filters = num_filters
        self.num_classes = num_classes
        self.trunk = trunk
        self.last_conv = last_conv
        self.pool = nn.Sequential(nn.MaxPool2d(2, 2) if vgg_pool else nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_filters, num_classes)

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The last conv layer's feature maps after its ReLU (B×K×H×W)."""
        return self.trunk(images)

    def pool_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps → pooled vector ``a`` (B×K)."""
        return self.pool(maps)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled vector ``a`` (B×K, non-negative)."""
        return self.pool_maps(self.feature_maps(images))

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        """Logits from pooled vectors (dropout only in training mode)."""
        return self.fc(self.dropout(activations))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits with filters masked: ``head(features(x) * mask)``; mask is K or B×K."""
        return self.head(self.features(images) * mask)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled vector) in one pass."""
        activations = self.features(images)
        return self.head(activations), activations

    def trainable_parameters(self, scope: str) -> list[nn.Parameter]:
        """Parameters of ``head``, ``last_conv_and_head`` or ``all``."""
        if scope == "all":
            return list(self.parameters())
        head = list(self.fc.parameters())
        if scope == "head":
            return head
        if scope == "last_conv_and_head":
            return list(self.last_conv.parameters()) + head
        raise ValueError(f"unknown trainable scope {scope!r}")

    def set_trainable(self, scope: str) -> list[nn.Parameter]:
        """Freeze everything outside ``scope``; return the trainable parameters."""
        chosen = {id(p) for p in self.trainable_parameters(scope)}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in chosen)
        return [p for p in self.parameters() if p.requires_grad]


# ------------------------------------------------------------ the frozen prefix

# Retraining scopes whose frozen layers can be computed once and cached (``all`` trains everything).
CACHEABLE_SCOPES = ("last_conv_and_head", "head")


class FrozenPrefix(nn.Module):
    """What a retraining scope's frozen layers compute from an image: the inputs of its first trainable layer.

    * VGG (and vgg_tiny), ``last_conv_and_head``: the input of the last conv layer;
    * ResNet, ``last_conv_and_head``: the last block's input (its identity
      branch) and the input of its last conv (after the block's frozen convs);
    * ``head``: the pooled vector ``a``.

    Frozen BatchNorm layers run in eval mode, as they do in retraining.
    """

    def __init__(self, model: "FilterClassifier", scope: str):
        super().__init__()
        if scope not in CACHEABLE_SCOPES:
            raise ValueError(f"scope {scope!r} trains every layer: nothing to cache")
        self.model, self.scope = model, scope

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        if self.scope == "head":
            return (model.features(images),)
        if model.arch.startswith("resnet"):
            layer4 = model.trunk[-1]
            x = model.trunk[:-1](images)
            for block in layer4[:-1]:
                x = block(x)
            return x, _resnet_mid(layer4[-1], x)
        return (model.trunk[: _last_conv_index(model)](images),)


class TrainableTail(nn.Module):
    """The layers a retraining scope trains, from the frozen prefix's outputs to ``(logits, a)``.

    It shares its parameters with the classifier, so training it trains the
    classifier; wrap it (not the classifier) in DDP when training on cached inputs.
    """

    def __init__(self, model: "FilterClassifier", scope: str):
        super().__init__()
        if scope not in CACHEABLE_SCOPES:
            raise ValueError(f"scope {scope!r} trains every layer: nothing to cache")
        self.model, self.scope = model, scope

    def forward(self, *cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if self.scope == "head":
            (activations,) = cached
        elif model.arch.startswith("resnet"):
            identity, mid = cached
            activations = model.pool(_resnet_tail(model.trunk[-1][-1], identity, mid))
        else:
            activations = model.pool(model.trunk[_last_conv_index(model) :](cached[0]))
        return model.head(activations), activations


def _last_conv_index(model: "FilterClassifier") -> int:
    first = model.last_conv[0] if isinstance(model.last_conv, nn.ModuleList) else model.last_conv
    return next(index for index, layer in enumerate(model.trunk) if layer is first)


def _resnet_mid(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a ResNet block's last conv (BasicBlock: conv2; Bottleneck: conv3)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
    return out


def _resnet_tail(block: nn.Module, identity: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """The rest of a ResNet block from its last conv's input: last conv, its BatchNorm, the residual sum, ReLU."""
    conv, norm = (block.conv3, block.bn3) if hasattr(block, "conv3") else (block.conv2, block.bn2)
    shortcut = block.downsample(identity) if block.downsample is not None else identity
    return block.relu(norm(conv(mid)) + shortcut)


def _vgg16_trunk(pretrained: bool) -> tuple[nn.Module, nn.Module]:
    vgg = tv_models.vgg16(weights=None)
    if pretrained:
        vgg.load_state_dict(_imagenet_state_dict("vgg16"))
    # features[:30] ends with the ReLU after block5_conv3 (features[28] is that conv).
    trunk = vgg.features[:30]
    return trunk, trunk[28]


def _resnet_trunk(arch: str, pretrained: bool) -> tuple[nn.Module, nn.Module]:
    resnet = getattr(tv_models, arch)(weights=None)
    if pretrained:
        resnet.load_state_dict(_imagenet_state_dict(arch))
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    # The block's final ReLU follows the residual sum; its last conv (+BN) is retrained.
    last_block = resnet.layer4[-1]
    last_conv = nn.ModuleList([last_block.conv3, last_block.bn3] if arch == "resnet50" else [last_block.conv2, last_block.bn2])
    return trunk, last_conv


def _vgg_tiny_trunk() -> tuple[nn.Module, nn.Module]:
    """Five 3×3 conv layers (32, 32, 64, 64, K=64) with BatchNorm, two 2×2 pools."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, NUM_FILTERS["vgg_tiny"])]
    trunk = nn.Sequential(*layers)
    return trunk, nn.ModuleList([trunk[-3], trunk[-2]])


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision caches ``arch``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS[arch].url).name


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from the local cache; never downloads."""
    cache = imagenet_weights_file(arch)
    file_name = cache.name
    if not cache.is_file():
        raise UserError(
            f"model.weights: imagenet weights for {arch} not found at {cache} "
            f"(expected torchvision's {file_name}; download it there or set TORCH_HOME, or use weights: none)"
        )
    return torch.load(cache, map_location="cpu", weights_only=True)


def build_model(config: ModelConfig, num_classes: int, load_weights: bool = True) -> FilterClassifier:
    """A classifier for ``num_classes`` classes.

    ``weights: imagenet`` loads torchvision's ImageNet trunk from the local
    cache; ``weights: PATH`` loads a raycf checkpoint (refused if its
    architecture or class count differ).  ``load_weights=False`` builds the
    bare architecture (used before loading a state dict).
    """
    if config.arch not in NUM_FILTERS:
        raise UserError(f"model.arch: unknown architecture {config.arch!r} (expected one of {', '.join(NUM_FILTERS)})")
    weights = config.weights
    pretrained = load_weights and weights == "imagenet"
    if pretrained and config.arch not in IMAGENET_WEIGHTS:
        raise UserError(f"model.weights: imagenet weights exist for {', '.join(IMAGENET_WEIGHTS)}, not {config.arch}")
    if config.arch == "vgg16":
        trunk, last_conv = _vgg16_trunk(pretrained)
    elif config.arch in ("resnet18", "resnet50"):
        trunk, last_conv = _resnet_trunk(config.arch, pretrained)
    else:
        trunk, last_conv = _vgg_tiny_trunk()
    model = FilterClassifier(
        config.arch, trunk, last_conv, NUM_FILTERS[config.arch], num_classes, config.dropout, vgg_pool=config.arch.startswith("vgg")
    )
    if load_weights and weights not in ("none", "imagenet"):
        from raycf.checkpoint import load_classifier_checkpoint

        checkpoint = load_classifier_checkpoint(weights, expected_arch=config.arch, expected_classes=num_classes)
        model.load_state_dict(checkpoint.state_dict)
    return model


def classifier_from_checkpoint(config: ModelConfig, checkpoint: "ClassifierCheckpoint") -> FilterClassifier:
    """A classifier holding a checkpoint's weights, in eval mode on the CPU (no Ray needed)."""
    if checkpoint.partial:
        raise ValueError("a partial checkpoint (the retrained layers only): complete it with its base model first (raycf.checkpoint.complete)")
    model = build_model(config, checkpoint.num_classes, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


def check_model_weights(config: ModelConfig, num_classes: int) -> None:
    """Fail early (UserError) if ``model.weights`` cannot be loaded for this dataset."""
    if config.weights == "none":
        return
    if config.weights == "imagenet":
        if config.arch not in IMAGENET_WEIGHTS:
            raise UserError(f"model.weights: imagenet weights exist for {', '.join(IMAGENET_WEIGHTS)}, not {config.arch}")
        if not imagenet_weights_file(config.arch).is_file():
            _imagenet_state_dict(config.arch)  # raises the explanatory UserError
        return
    from raycf.checkpoint import load_classifier_checkpoint

    load_classifier_checkpoint(config.weights, expected_arch=config.arch, expected_classes=num_classes)
