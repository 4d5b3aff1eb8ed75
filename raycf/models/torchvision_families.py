"""Torchvision classifiers taken apart by one rule per family (:class:`TorchvisionFamily`), and the tiny VGG."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from raycf.errors import UserError
from raycf.models.architectures import VGG_TINY, family_of
from raycf.models.contract import VGG_TINY_FILTERS, FilterClassifier, gap
from raycf.models.prefix import last_conv_of


@dataclass(frozen=True)
class TorchvisionFamily:
    """How every member of a torchvision family fits the contract: one rule, applied to the built module."""

    trunk: Callable[[nn.Module], nn.Module]  # the conv trunk, image → maps
    head: str  # path of the linear head in the torchvision module
    pool_norm: Callable[[nn.Module], nn.Module] | None = None  # a norm over the pooled channels (ConvNeXt)
    nonnegative: bool = True  # a ≥ 0: the trunk ends in a ReLU
    build: dict[str, Any] = field(default_factory=dict)  # constructor options
    linear_head: bool = True  # False: the torchvision head is not raycf's (VGG's three FC layers)
    vgg_pool: bool = False


def _resnet_trunk(net: nn.Module) -> nn.Module:
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _shufflenet_trunk(net: nn.Module) -> nn.Module:
    return nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5)


# Stochastic depth is off (as in timm's defaults): frozen blocks then compute the same in
# training as in evaluation, so the frozen-prefix cache holds what retraining would compute.
NO_STOCHASTIC_DEPTH = {"stochastic_depth_prob": 0.0}

TORCHVISION_FAMILIES = {
    # raycf's VGG (METHOD §1): the conv trunk up to the last ReLU, 2×2 max pool, GAP, a new linear head.
    "vgg": TorchvisionFamily(lambda net: net.features[:-1], "classifier", linear_head=False, vgg_pool=True),
    "resnet": TorchvisionFamily(_resnet_trunk, "fc"),
    # torchvision's forward applies a functional ReLU after features: it belongs to the trunk.
    "densenet": TorchvisionFamily(lambda net: nn.Sequential(net.features, nn.ReLU()), "classifier"),
    "efficientnet": TorchvisionFamily(lambda net: net.features, "classifier.1", nonnegative=False, build=NO_STOCHASTIC_DEPTH),
    "mobilenet_v2": TorchvisionFamily(lambda net: net.features, "classifier.1"),
    "regnet": TorchvisionFamily(lambda net: nn.Sequential(net.stem, net.trunk_output), "fc"),
    "shufflenet": TorchvisionFamily(_shufflenet_trunk, "fc"),
    # The LayerNorm2d before the head normalises the pooled vector: it is part of the pooling, so a is post-norm.
    "convnext": TorchvisionFamily(
        lambda net: net.features, "classifier.2", pool_norm=lambda net: net.classifier[0], nonnegative=False, build=NO_STOCHASTIC_DEPTH
    ),
}


@dataclass
class Native:
    """A torchvision or timm module as its library builds it, and where its head is."""

    net: nn.Module
    head: str  # module path of the head in ``net``
    linear_head: bool = True

    def head_module(self) -> nn.Module:
        return self.net.get_submodule(self.head)


def torchvision_native(arch: str, family: str, num_classes: int, meta: bool = False) -> Native:
    """torchvision's own network ``arch`` of ``family`` with a ``num_classes`` head (on the meta device if asked)."""
    rule = TORCHVISION_FAMILIES[family]
    check_torchvision_name(arch, family)
    options = dict(rule.build) if rule.linear_head else {}
    if rule.linear_head:
        options["num_classes"] = num_classes
    with _on_meta(family) if meta or not rule.linear_head else contextlib.nullcontext():
        net = tv_models().get_model(arch, weights=None, **options)
    if not rule.linear_head and not meta:
        _materialise_vgg_features(net)
    return Native(net, rule.head, rule.linear_head)


@contextlib.contextmanager
def _on_meta(family: str) -> Iterator[None]:
    """Modules built on the meta device; RegNet's block widths computed on the CPU.

    torchvision's RegNet builders compute their widths with tensor ops and
    ``.tolist()`` (``BlockParams.from_init_params``), which a meta tensor
    cannot answer: that one function runs on real CPU tensors (a few
    numbers), the modules stay on the meta device.
    """
    with torch.device("meta"):
        if family != "regnet":
            yield
            return
        from torchvision.models.regnet import BlockParams

        original = BlockParams.__dict__["from_init_params"]

        def widths_on_cpu(cls, *args, **kwargs):
            with torch.device("cpu"):
                return original.__func__(cls, *args, **kwargs)

        BlockParams.from_init_params = classmethod(widths_on_cpu)
        try:
            yield
        finally:
            BlockParams.from_init_params = original


def _materialise_vgg_features(net: nn.Module) -> None:
    """A meta-built torchvision VGG's ``features`` on the CPU, initialised as torchvision does.

    Its three FC layers stay on the meta device: raycf's VGG never uses them,
    and VGG-16's take 0.5 GB and seconds to initialise.
    """
    net.features.to_empty(device="cpu")
    for module in net.features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()


def tv_models() -> Any:
    """``torchvision.models``, imported on first use: importing it (torch._dynamo with it) costs a second in every
    worker process, which a vgg_tiny study's workers need not pay."""
    from torchvision import models

    return models


def check_torchvision_name(arch: str, family: str) -> None:
    """Refuse a name of a supported family that this torchvision does not have (``resnet7``)."""
    models = tv_models()
    names = models.list_models(module=models)
    if arch not in names:
        members = [name for name in names if family_of_or_none(name) == family]
        raise UserError(f"model.arch: torchvision has no model {arch!r} (its {family} family: {', '.join(members)})")


def family_of_or_none(arch: str) -> str | None:
    try:
        return family_of(arch)
    except ValueError:
        return None


def torchvision_classifier(arch: str, family: str, native: Native, num_classes: int, dropout: float) -> FilterClassifier:
    """The :class:`FilterClassifier` view of a torchvision network, taken apart by its family's rule."""
    rule = TORCHVISION_FAMILIES[family]
    net = native.net
    trunk = rule.trunk(net)
    pool = gap(rule.vgg_pool, rule.pool_norm(net) if rule.pool_norm else None)
    fc = native.head_module() if rule.linear_head else None
    num_filters = fc.in_features if fc is not None else _out_channels(trunk)
    last_conv = last_conv_of([*trunk.modules(), *pool.modules()])
    return FilterClassifier(
        arch, trunk, last_conv, num_filters, num_classes, dropout, rule.vgg_pool, pool=pool, fc=fc, family=family, nonnegative=rule.nonnegative
    )


def _out_channels(trunk: nn.Module) -> int:
    return [module for module in trunk.modules() if isinstance(module, nn.Conv2d)][-1].out_channels


def vgg_tiny(num_classes: int, dropout: float) -> FilterClassifier:
    """Five 3×3 conv layers (32, 32, 64, 64, K=64) with BatchNorm, two 2×2 pools: raycf's VGG for CPUs."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    trunk = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, VGG_TINY_FILTERS))
    return FilterClassifier(VGG_TINY, trunk, last_conv_of(trunk.modules()), VGG_TINY_FILTERS, num_classes, dropout, vgg_pool=True, family=VGG_TINY)
