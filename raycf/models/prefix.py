"""The frozen prefix and the trainable tail: a classifier cut where debug retraining starts (METHOD §5).

The *last conv* is found by one rule for every family; see :mod:`raycf.models.contract`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from raycf.models.contract import NORMS, FilterClassifier

# Retraining scopes whose frozen layers can be computed once and cached (``all`` trains everything).
CACHEABLE_SCOPES = ("last_conv_and_head", "head")


class _ScopeSplit(nn.Module):
    """The classifier cut where a retraining scope starts: the units on each side (shared by the prefix and the tail)."""

    def __init__(self, model: "FilterClassifier", scope: str):
        super().__init__()
        if scope not in CACHEABLE_SCOPES:
            raise ValueError(f"scope {scope!r} trains every layer: nothing to cache")
        self.model, self.scope = model, scope
        self._units = None if scope == "head" or model.family == "resnet" else prefix_split(model)


class FrozenPrefix(_ScopeSplit):
    """What a retraining scope's frozen layers compute from an image: the inputs of its first trainable layer.

    * ``head``: the pooled vector ``a``;
    * ResNet family, ``last_conv_and_head``: the last block's input (its
      identity branch) and the input of its last conv (after the block's frozen convs);
    * every other family, ``last_conv_and_head``: the input of the trunk's
      unit that holds the last conv, the trunk read as a chain of units
      (``nn.Sequential`` containers opened; a timm trunk traced, see
      :class:`TimmTrunk`).  VGG: the input of the last conv layer;
      DenseNet: of its last dense block; ConvNeXt: of its last block.

    Frozen BatchNorm layers run in eval mode, as they do in retraining.
    """

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        if self.scope == "head":
            return (model.features(images),)
        if self._units is None:
            layer4 = model.trunk[-1]
            x = model.trunk[:-1](images)
            for block in layer4[:-1]:
                x = block(x)
            return x, _resnet_mid(layer4[-1], x)
        return (run_units(self._units[0], images),)


class TrainableTail(_ScopeSplit):
    """The layers a retraining scope trains, from the frozen prefix's outputs to ``(logits, a)``.

    It shares its parameters with the classifier, so training it trains the
    classifier; wrap it (not the classifier) in DDP when training on cached
    inputs.  A unit that holds the last conv also runs its frozen parts
    (their BatchNorm layers in eval mode: :func:`raycf.training.loops.set_train_mode`).
    """

    def forward(self, *cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if self.scope == "head":
            (activations,) = cached
        elif self._units is None:
            identity, mid = cached
            activations = model.pool(_resnet_tail(model.trunk[-1][-1], identity, mid))
        else:
            activations = model.pool(run_units(self._units[1], cached[0]))
        return model.head(activations), activations


def prefix_split(model: "FilterClassifier") -> tuple[list[nn.Module], list[nn.Module]]:
    """The trunk as a chain of units, cut before the first unit that holds the last conv: (frozen units, tail units)."""
    from raycf.models.timm_family import TimmTrunk  # timm_family builds on this module's chains

    chain = model.trunk.chain() if isinstance(model.trunk, TimmTrunk) else chain_of(model.trunk)
    first = model.last_conv[0] if isinstance(model.last_conv, nn.ModuleList) else model.last_conv
    index = next(index for index, unit in enumerate(chain) if any(module is first for module in unit.modules()))
    return chain[:index], chain[index:]


def chain_of(module: nn.Module) -> list[nn.Module]:
    """``module`` as the units it applies one after the other: plain ``nn.Sequential`` containers are opened."""
    if type(module).forward is nn.Sequential.forward:
        return [unit for child in module for unit in chain_of(child)]
    return [module]


def run_units(units: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Apply ``units`` in order (a chain of modules cut out of one network)."""
    for unit in units:
        x = unit(x)
    return x


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


def last_conv_of(modules: Iterable[nn.Module]) -> nn.Module:
    """The last conv layer among ``modules`` (in order, the head left out), with the norm right after it.

    The last ``Conv2d``, or ``Linear`` (a 1×1 conv on channels-last maps, as
    in ConvNeXt), and the next module with weights when it is a BatchNorm,
    LayerNorm or GroupNorm.  One module, or a ``ModuleList`` of two.
    """
    weighted = [module for module in modules if next(module.parameters(recurse=False), None) is not None]
    index = max(index for index, module in enumerate(weighted) if isinstance(module, (nn.Conv2d, nn.Linear)))
    if index + 1 < len(weighted) and isinstance(weighted[index + 1], NORMS):
        return nn.ModuleList(weighted[index : index + 2])
    return weighted[index]
