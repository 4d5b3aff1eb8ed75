"""Classifiers that follow the contract of METHOD §1.

    image → trunk (conv layers) → [VGG: MaxPool 2×2] → GAP → [ConvNeXt: LayerNorm] → a (K)
          → Dropout (training only) → Linear(K, C) → logits

Because the head is linear in ``a`` and every channel is pooled alone,
``head(a * mask)`` is the same as masking whole feature maps before pooling
(ConvNeXt's LayerNorm mixes the pooled channels: there a mask acts on ``a``,
after the norm, which is what the CFE model and the debug loss see).

Every torchvision family (:mod:`raycf.models.architectures` names them) is taken
apart by one rule, :class:`TorchvisionFamily`: its trunk, an optional norm
after pooling, and the path of its linear head, so that any member
(``resnet152``, ``regnet_y_32gf``) works without a table per model.  A timm
CNN (``timm:<name>``) is read through timm's own interface:
``forward_features`` gives the maps, ``forward_head(…, pre_logits=True)``
gives ``a`` and ``get_classifier()`` is the head.

The *last conv* (what ``debug.trainable: last_conv_and_head`` retrains with
the head) is found by one rule for every family: the last ``Conv2d`` (or a
``Linear`` acting as a 1×1 conv, as in ConvNeXt's blocks) below the head,
with the normalisation layer that comes next, if the next layer with weights
is one (ResNet: ``conv3``/``bn3``; DenseNet: the last dense layer's ``conv2``
and ``norm5``; ConvNeXt: the last block's second pointwise layer and the
LayerNorm after pooling).

``a`` is non-negative when the trunk ends in a ReLU (``nonnegative``).
EfficientNet's SiLU trunk and ConvNeXt's LayerNorm give signed ``a``: the
``paper`` indicator ``thresholded_relu_0.5(sigmoid(a))`` then counts a
filter as active only where ``a > 0`` (METHOD §5; see
:mod:`raycf.method.debug_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

VGG_TINY_FILTERS = 64
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class FilterClassifier(nn.Module):
    """A CNN whose logits are a linear function of its pooled last-conv filters.

    ``last_conv`` names the module(s) holding the last conv layer's weights
    (the reference retrains it together with the head).  ``pool`` maps the
    feature maps to ``a`` (default: [VGG: 2×2 max pool], GAP, flatten) and
    ``fc`` is the linear head (default: a new ``Linear(K, C)``).
    """

    def __init__(
        self,
        arch: str,
        trunk: nn.Module,
        last_conv: nn.Module,
        num_filters: int,
        num_classes: int,
        dropout: float,
        vgg_pool: bool = False,
        *,
        pool: nn.Module | None = None,
        fc: nn.Linear | None = None,
        family: str = "vgg",
        nonnegative: bool = True,
    ):
        super().__init__()
        self.arch = arch
        self.family = family
        self.nonnegative = nonnegative
        self.num_filters = num_filters
        self.num_classes = num_classes
        self.trunk = trunk
        self.last_conv = last_conv
        self.pool = pool if pool is not None else gap(vgg_pool)
        self.dropout = nn.Dropout(dropout)
        self.fc = fc if fc is not None else nn.Linear(num_filters, num_classes)

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The last conv layer's feature maps, the trunk's output (B×K×H×W)."""
        return self.trunk(images)

    def pool_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps → pooled vector ``a`` (B×K)."""
        return self.pool(maps)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled vector ``a`` (B×K; non-negative when ``nonnegative``)."""
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


def gap(vgg_pool: bool = False, norm: nn.Module | None = None) -> nn.Sequential:
    """[VGG: 2×2 max pool], global average pooling, [a norm over the pooled channels], flatten."""
    layers = [nn.MaxPool2d(2, 2) if vgg_pool else nn.Identity(), nn.AdaptiveAvgPool2d(1)]
    return nn.Sequential(*layers, *([norm] if norm is not None else []), nn.Flatten())
