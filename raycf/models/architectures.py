"""Which ``model.arch`` names raycf builds, which it refuses, and why (METHOD §1).

The contract: a conv trunk, global average pooling into ``a`` (K), and one
linear layer (possibly after dropout), so the logits are ``W a + b``.  Names
are torchvision's; ``timm:<name>`` builds a timm model.  This module only
knows names (no torch import): the study file is validated with it, and
:mod:`raycf.models.torchvision_families` and :mod:`raycf.models.timm_family` build each family by its rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TIMM_PREFIX = "timm:"
VGG_TINY = "vgg_tiny"


@dataclass(frozen=True)
class FamilyName:
    """A torchvision family: its name, the names it covers (shown as globs), and the regex that matches them."""

    name: str
    shown: str
    pattern: str


FAMILIES = (
    FamilyName("vgg", "vgg11 … vgg19, vgg*_bn", r"vgg(11|13|16|19)(_bn)?"),
    FamilyName("resnet", "resnet*, resnext*, wide_resnet*", r"(resnet|resnext|wide_resnet)\d.*"),
    FamilyName("densenet", "densenet*", r"densenet\d+"),
    FamilyName("efficientnet", "efficientnet_b*, efficientnet_v2_*", r"efficientnet_(b\d+|v2_\w+)"),
    FamilyName("mobilenet_v2", "mobilenet_v2", r"mobilenet_v2"),
    FamilyName("regnet", "regnet_*", r"regnet_\w+"),
    FamilyName("shufflenet", "shufflenet_v2_*", r"shufflenet_v2_\w+"),
    FamilyName("convnext", "convnext_*", r"convnext_\w+"),
)

# Names whose head is not one linear layer over pooled filters, with the reason.
REFUSED = (
    ("alexnet", r"alexnet", "its head is three fully connected layers over 6×6 maps, not one linear layer over pooled filters"),
    ("mobilenet_v3_*", r"mobilenet_?v3\w*", "its head is an MLP (Linear, Hardswish, Dropout, Linear) over the pooled filters, not one linear layer"),
    ("squeezenet*", r"squeezenet\w*", "its head is a 1×1 conv and a ReLU before pooling, so the logits are not linear in pooled filters"),
    ("vit_*, swin_*, maxvit_*", r"(vit|swin|maxvit)_\w+", "a transformer: attention blocks instead of a conv trunk whose pooled filters feed one linear head"),
)


def accepted_names(markdown: bool = False) -> str:
    """The accepted names, for messages (``markdown``: each family in backticks)."""
    quote = (lambda text: f"`{text}`") if markdown else (lambda text: text)
    return f"{quote(VGG_TINY)}, " + ", ".join(quote(family.shown) for family in FAMILIES) + f", or {quote(TIMM_PREFIX + '<name>')} (a timm CNN)"


def refused_names(markdown: bool = False) -> str:
    """The refused names, for messages (``markdown``: in backticks)."""
    return "; ".join(f"`{shown}`" if markdown else shown for shown, _pattern, _reason in REFUSED)


def refused_reason(name: str) -> str | None:
    """Why ``name`` (a torchvision or timm name) is refused, or None."""
    for _shown, pattern, reason in REFUSED:
        if re.fullmatch(pattern, name):
            return reason
    return None


def family_of(arch: str) -> str:
    """The family of a ``model.arch`` value: ``vgg_tiny``, ``timm`` or a torchvision family name.

    Raises ValueError (one line) for a refused name, with its reason, or an unknown one,
    naming the accepted families and the refused names.
    """
    if arch == VGG_TINY:
        return VGG_TINY
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX) :]
        if not name:
            raise ValueError(f"{TIMM_PREFIX} needs a timm model name, e.g. {TIMM_PREFIX}resnet50d")
        reason = refused_reason(name.split(".")[0])
        if reason:
            raise ValueError(f"{arch} is refused: {reason}")
        return "timm"
    reason = refused_reason(arch)
    if reason:
        raise ValueError(f"{arch} is refused: {reason}")
    for family in FAMILIES:
        if re.fullmatch(family.pattern, arch):
            return family.name
    raise ValueError(f"unknown architecture {arch!r} (expected {accepted_names()}; refused: {refused_names()}, whose heads are not linear in pooled filters)")
