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

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torchvision import models as tv_models

from raycf.models.architectures import TIMM_PREFIX, VGG_TINY, family_of
from raycf.config import ModelConfig
from raycf.errors import UserError

if TYPE_CHECKING:
    from raycf.models.checkpoint import ClassifierCheckpoint
    from raycf.config import StudyConfig

VGG_TINY_FILTERS = 64
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
PROBE_SIDE = 64  # pixels of the input that checks a timm model's structure


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


# ------------------------------------------------------------ the frozen prefix

# Retraining scopes whose frozen layers can be computed once and cached (``all`` trains everything).
CACHEABLE_SCOPES = ("last_conv_and_head", "head")


class FrozenPrefix(nn.Module):
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

    def __init__(self, model: "FilterClassifier", scope: str):
        super().__init__()
        if scope not in CACHEABLE_SCOPES:
            raise ValueError(f"scope {scope!r} trains every layer: nothing to cache")
        self.model, self.scope = model, scope
        self._units = None if scope == "head" or model.family == "resnet" else prefix_split(model)

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
        return (_run(self._units[0], images),)


class TrainableTail(nn.Module):
    """The layers a retraining scope trains, from the frozen prefix's outputs to ``(logits, a)``.

    It shares its parameters with the classifier, so training it trains the
    classifier; wrap it (not the classifier) in DDP when training on cached
    inputs.  A unit that holds the last conv also runs its frozen parts
    (their BatchNorm layers in eval mode: :func:`raycf.training.loops.set_train_mode`).
    """

    def __init__(self, model: "FilterClassifier", scope: str):
        super().__init__()
        if scope not in CACHEABLE_SCOPES:
            raise ValueError(f"scope {scope!r} trains every layer: nothing to cache")
        self.model, self.scope = model, scope
        self._units = None if scope == "head" or model.family == "resnet" else prefix_split(model)

    def forward(self, *cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        if self.scope == "head":
            (activations,) = cached
        elif self._units is None:
            identity, mid = cached
            activations = model.pool(_resnet_tail(model.trunk[-1][-1], identity, mid))
        else:
            activations = model.pool(_run(self._units[1], cached[0]))
        return model.head(activations), activations


def prefix_split(model: "FilterClassifier") -> tuple[list[nn.Module], list[nn.Module]]:
    """The trunk as a chain of units, cut before the first unit that holds the last conv: (frozen units, tail units)."""
    chain = model.trunk.chain() if isinstance(model.trunk, TimmTrunk) else chain_of(model.trunk)
    first = model.last_conv[0] if isinstance(model.last_conv, nn.ModuleList) else model.last_conv
    index = next(index for index, unit in enumerate(chain) if any(module is first for module in unit.modules()))
    return chain[:index], chain[index:]


def chain_of(module: nn.Module) -> list[nn.Module]:
    """``module`` as the units it applies one after the other: plain ``nn.Sequential`` containers are opened."""
    if type(module).forward is nn.Sequential.forward:
        return [unit for child in module for unit in chain_of(child)]
    return [module]


def _run(units: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
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


# ------------------------------------------------------------ torchvision families


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


def _torchvision_native(arch: str, family: str, num_classes: int, meta: bool = False) -> Native:
    rule = TORCHVISION_FAMILIES[family]
    check_torchvision_name(arch, family)
    options = dict(rule.build) if rule.linear_head else {}
    if rule.linear_head:
        options["num_classes"] = num_classes
    with _on_meta(family) if meta or not rule.linear_head else contextlib.nullcontext():
        net = tv_models.get_model(arch, weights=None, **options)
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


def check_torchvision_name(arch: str, family: str) -> None:
    """Refuse a name of a supported family that this torchvision does not have (``resnet7``)."""
    names = tv_models.list_models(module=tv_models)
    if arch not in names:
        members = [name for name in names if family_of_or_none(name) == family]
        raise UserError(f"model.arch: torchvision has no model {arch!r} (its {family} family: {', '.join(members)})")


def family_of_or_none(arch: str) -> str | None:
    try:
        return family_of(arch)
    except ValueError:
        return None


def _torchvision_classifier(arch: str, family: str, native: Native, num_classes: int, dropout: float) -> FilterClassifier:
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


def _vgg_tiny(num_classes: int, dropout: float) -> FilterClassifier:
    """Five 3×3 conv layers (32, 32, 64, 64, K=64) with BatchNorm, two 2×2 pools: raycf's VGG for CPUs."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    trunk = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, VGG_TINY_FILTERS))
    return FilterClassifier(VGG_TINY, trunk, last_conv_of(trunk.modules()), VGG_TINY_FILTERS, num_classes, dropout, vgg_pool=True, family=VGG_TINY)


# ------------------------------------------------------------ timm


def timm_module():
    """The timm package, or a UserError naming the optional extra."""
    try:
        import timm
    except ImportError:
        raise UserError("model.arch: timm:<name> needs timm, raycf's optional extra (pip install 'raycf[timm]')") from None
    return timm


def _timm_native(arch: str, num_classes: int, pretrained_file: Path | None = None, meta: bool = False) -> Native:
    timm, name = timm_module(), arch[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        raise UserError(f"model.arch: timm has no model {name!r} (timm.list_models() lists its names)")
    options: dict[str, Any] = {"num_classes": num_classes}
    if pretrained_file is not None:  # from timm's cache, found by timm_cached_weights: never downloads
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    with torch.device("meta") if meta else contextlib.nullcontext():
        net = timm.create_model(name, **options)
        if pretrained_file is not None:
            net.reset_classifier(num_classes)  # a new head, as with torchvision's weights (even for 1000 classes)
    classifier = net.get_classifier()
    head = next((path for path, module in net.named_modules() if module is classifier), "")
    return Native(net, head)


class TimmTrunk(nn.Module):
    """A timm model's ``forward_features``: image → maps.  It holds the whole timm model (state under ``trunk.net``)."""

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.net = net
        self.arch = arch
        self._chain: list[nn.Module] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images)

    def chain(self) -> list[nn.Module]:
        """``forward_features`` as a chain of units, for the frozen-prefix cache (traced once, checked against it)."""
        if self._chain is None:
            self._chain = _traced_chain(self.net, self.arch)
        return self._chain


class TimmPool(nn.Module):
    """``forward_head(maps, pre_logits=True)``: timm's pooling (and ConvNeXt's norm) → ``a``.

    The timm model is held outside the module tree (its state is under ``trunk.net``).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self._net = [net]

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self._net[0].forward_head(maps, pre_logits=True)


def _timm_classifier(arch: str, native: Native, num_classes: int, dropout: float) -> FilterClassifier:
    net, fc = native.net, native.head_module()
    check_timm_contract(arch, net)
    below_head = [module for module in net.modules() if module is not fc]
    return FilterClassifier(
        arch, TimmTrunk(net, arch), last_conv_of(below_head), fc.in_features, num_classes, dropout,
        pool=TimmPool(net), fc=fc, family="timm", nonnegative=False,
    )


def check_timm_contract(arch: str, net: nn.Module) -> None:
    """Refuse a timm model whose logits are not one linear layer over its pooled feature maps."""
    fc = net.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise UserError(f"model.arch: {arch} is refused: its classifier is {type(fc).__name__}, not one linear layer over pooled filters")
    if fc.in_features != net.num_features:
        raise UserError(
            f"model.arch: {arch} is refused: its head maps the {net.num_features} pooled filters through more layers "
            f"({fc.in_features} features reach the classifier), not one linear layer"
        )
    probe = _probe(net)
    try:
        with torch.no_grad(), evaluating(net):
            maps = net.forward_features(probe)
    except Exception as error:  # noqa: BLE001 - any failure means timm's model does not fit
        raise UserError(f"model.arch: {arch}: forward_features failed on a {tuple(probe.shape)} input ({str(error).splitlines()[0][:120]})") from None
    if maps.dim() != 4 or maps.shape[1] != net.num_features:
        raise UserError(f"model.arch: {arch} is refused: forward_features gives {tuple(maps.shape)}, not feature maps B×{net.num_features}×H×W (not a CNN)")


def _probe(net: nn.Module) -> torch.Tensor:
    """A small input for ``net`` on its device (its fixed size when it has one)."""
    config = getattr(net, "pretrained_cfg", None) or {}
    side = config["input_size"][-1] if config.get("fixed_input_size") else max(PROBE_SIDE, (config.get("min_input_size") or (0, 0, 0))[-1])
    device = next(net.parameters()).device
    if device.type == "meta":
        return torch.empty(1, 3, side, side, device=device)
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for a while; every submodule's mode restored after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def _traced_chain(net: nn.Module, arch: str) -> list[nn.Module]:
    """The top-level modules ``forward_features`` calls, in order, opened into units; checked to compute the same maps."""
    calls: list[nn.Module] = []
    handles = [child.register_forward_pre_hook(lambda module, _inputs: calls.append(module)) for child in net.children()]
    probe = _probe(net)
    try:
        with torch.no_grad(), evaluating(net):
            expected = net.forward_features(probe)
    finally:
        for handle in handles:
            handle.remove()
    chain = [unit for module in calls for unit in chain_of(module)]
    same = len({id(module) for module in calls}) == len(calls)
    if same and probe.device.type != "meta":
        with torch.no_grad(), evaluating(net):
            maps = _run(chain, probe)
        same = maps.shape == expected.shape and torch.allclose(maps, expected, atol=1e-5)
    if not same:
        raise UserError(
            f"model.arch: {arch}: forward_features is not a chain of its modules, so the frozen-prefix cache cannot cut it "
            "(expected prefix.enabled: false, or debug.trainable: head or all)"
        )
    return chain


def timm_cached_weights(arch: str) -> Path:
    """timm's pretrained weights for ``arch`` from its caches (Hugging Face hub, torch hub); never downloads."""
    timm, name = timm_module(), arch[len(TIMM_PREFIX) :]
    config = timm.models.get_pretrained_cfg(name)
    if config is None:
        raise UserError(f"model.weights: imagenet: timm has no pretrained weights for {name} (expected weights: none or a state_dict)")
    looked: list[str] = []
    found = [Path(config.file)] if config.file else []
    if config.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for file_name in [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            cached = try_to_load_from_cache(config.hf_hub_id, file_name)
            found += [Path(cached)] if isinstance(cached, str) else []
        looked.append(f"{config.hf_hub_id} in {constants.HF_HUB_CACHE}")
    if config.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(config.url).name
        found.append(path)
        looked.append(str(path))
    for path in found:
        if path.is_file():
            return path
    raise UserError(
        f"model.weights: imagenet weights for {arch} not in timm's cache (looked for {' and '.join(looked) or 'a file'}); "
        f"raycf never downloads: fetch them once with timm.create_model({name!r}, pretrained=True), or use weights: none"
    )


# ------------------------------------------------------------ weights


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision caches ``arch``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints``).

    torchvision's registry names the file (``get_model_weights(arch).DEFAULT``);
    when that one is not cached but another ImageNet weight set of ``arch`` is,
    that one is used.
    """
    family = family_of(arch)
    if family in (VGG_TINY, "timm"):
        raise UserError(f"model.weights: imagenet weights from torchvision exist for its architectures, not {arch}")
    check_torchvision_name(arch, family)
    registry = tv_models.get_model_weights(arch)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [registry.DEFAULT, *(weights for weights in registry if weights is not registry.DEFAULT)]
    return next((folder / Path(w.url).name for w in candidates if (folder / Path(w.url).name).is_file()), folder / Path(registry.DEFAULT.url).name)


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from the local cache; never downloads."""
    cache = imagenet_weights_file(arch)
    if not cache.is_file():
        raise UserError(
            f"model.weights: imagenet weights for {arch} not found at {cache} "
            f"(expected torchvision's {cache.name}; download it there or set TORCH_HOME, or use weights: none)"
        )
    return torch.load(cache, map_location="cpu", weights_only=True)


Weights = Any  # "none" | "imagenet" | ClassifierCheckpoint | dict[str, Tensor] (a state_dict)


def _resolve_weights(config: ModelConfig, num_classes: int, load_weights: bool) -> Weights:
    """What ``model.weights`` names, read (a raycf checkpoint checked against the arch and class count)."""
    if not load_weights or config.weights in ("none", "imagenet"):
        return config.weights if load_weights else "none"
    from raycf.models.checkpoint import ClassifierCheckpoint, check_checkpoint, read_weights_file

    loaded = read_weights_file(config.weights)
    if isinstance(loaded, ClassifierCheckpoint):
        return check_checkpoint(loaded, config.weights, config.arch, num_classes)
    return loaded


def _check_options(config: ModelConfig, weights: Weights) -> None:
    """``weights_trunk_only`` and ``class_names`` are about a state_dict; refuse them elsewhere."""
    state_dict = isinstance(weights, dict)
    if config.class_names is not None and not state_dict:
        raise UserError("model.class_names: states the class order of a state_dict's head (expected a torchvision or timm state_dict in model.weights; a raycf checkpoint records its own)")
    if config.class_names is not None and config.weights_trunk_only:
        raise UserError("model.class_names: with model.weights_trunk_only the head is new, so it has no class order to state (expected one of the two)")
    if config.weights_prefix is not None and not state_dict:
        raise UserError("model.weights_prefix: names where a state_dict's weights sit in model.weights (expected a state_dict or Lightning checkpoint there)")
    if config.weights_trunk_only and not (state_dict or weights == "imagenet"):
        raise UserError("model.weights_trunk_only: adopts the trunk of a torchvision or timm state_dict (expected one in model.weights)")


def _adopt_state_dict(
    native: Native, state: dict[str, torch.Tensor], config: ModelConfig, num_classes: int, dataset_classes: list[str] | None, load: bool = True
) -> None:
    """Load a user's torchvision/timm ``state_dict`` into ``native`` after checking it is one of ``config.arch`` for this dataset."""
    source, head = f"model.weights: {config.weights}", f"{native.head}."
    expected = native.net.state_dict()
    if config.weights_trunk_only:
        expected = {key: value for key, value in expected.items() if not key.startswith(head)}
    state = strip_prefix(state, expected, config.weights_prefix, source)
    if config.weights_trunk_only:
        state = {key: value for key, value in state.items() if not key.startswith(head)}
    elif not native.linear_head:
        raise UserError(
            f"{source}: a torchvision {config.arch} state_dict has three FC layers over 7×7 maps, but raycf's {config.arch} is its trunk, "
            "a 2×2 max pool, GAP and one linear layer (METHOD §1); set model.weights_trunk_only: true to adopt its trunk under a new head"
        )
    else:
        rows = state.get(f"{head}weight")
        if rows is not None and rows.dim() == 2 and rows.shape[0] != num_classes:
            raise UserError(
                f"{source}: its head has {rows.shape[0]} classes, but the dataset has {num_classes} "
                "(expected a state_dict trained on this dataset, or model.weights_trunk_only: true to adopt its trunk under a new head)"
            )
    _check_keys(expected, state, source, config.arch)
    order = class_order(config.class_names, dataset_classes) if config.class_names is not None else None
    if not load:
        return
    native.net.load_state_dict(state, strict=not config.weights_trunk_only)
    if order is not None:
        with torch.no_grad():
            for parameter in native.head_module().parameters():
                parameter.copy_(parameter[order])


def strip_prefix(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str | None, source: str) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` with the prefix stripped (keys outside it ignored: a Lightning module's other parts).

    Without a ``prefix`` (``model.weights_prefix``), ``state`` as is when its
    keys are the architecture's; otherwise the one prefix under which every
    expected key is found (e.g. ``model.``).  Several such prefixes are
    refused: ``model.weights_prefix`` must say which.
    """
    if prefix is not None:
        inside = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not inside:
            raise UserError(f"model.weights_prefix: no key of {source.removeprefix('model.weights: ')} starts with {prefix!r} (its first keys: {_first(list(state))})")
        return inside
    if not expected or all(key in state for key in expected):
        return state
    reference = next(iter(expected))
    candidates = {key[: len(key) - len(reference)] for key in state if key.endswith("." + reference)}
    fitting = sorted(p for p in candidates if all(p + key in state for key in expected))
    if len(fitting) > 1:
        raise UserError(f"{source}: the weights of the arch are found under several prefixes ({', '.join(fitting)}); set model.weights_prefix to one of them")
    if not fitting:
        return state
    return {key[len(fitting[0]) :]: value for key, value in state.items() if key.startswith(fitting[0])}


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str, arch: str) -> None:
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [key for key in expected if key in given and tuple(given[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {_first(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape:", shapes)) if keys]
        raise UserError(f"{source}: not a state_dict of {arch} ({'; '.join(parts)})")


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")


def class_order(head_classes: Iterable[str], dataset_classes: list[str] | None) -> list[int]:
    """For each dataset class (sorted folder order), the head's row that scores it; refuses a list that is not the dataset's classes."""
    if dataset_classes is None:
        raise ValueError("model.class_names needs the dataset's class names (dataset_classes)")
    head_classes = list(head_classes)
    if len(head_classes) != len(dataset_classes):
        raise UserError(f"model.class_names: {len(head_classes)} names, but the dataset has {len(dataset_classes)} classes")
    for head_name, dataset_name in zip(sorted(head_classes), sorted(dataset_classes)):
        if head_name != dataset_name:
            raise UserError(
                f"model.class_names: {head_name!r} where the dataset has {dataset_name!r} (sorted; expected the dataset's classes, each once, in the head's order)"
            )
    return [head_classes.index(name) for name in dataset_classes]


# ------------------------------------------------------------ building


def build_model(config: ModelConfig, num_classes: int, load_weights: bool = True, dataset_classes: list[str] | None = None) -> FilterClassifier:
    """A classifier for ``num_classes`` classes.

    ``weights: imagenet`` loads torchvision's (or timm's) ImageNet trunk from
    the local cache; ``weights: PATH`` loads a raycf checkpoint (refused if its
    architecture or class count differ) or a torchvision/timm ``state_dict``
    of the arch (its head's class count checked, its rows put in the dataset's
    order by ``model.class_names``, which needs ``dataset_classes``).
    ``load_weights=False`` builds the bare architecture (used before loading a state dict).
    """
    weights = _resolve_weights(config, num_classes, load_weights)
    if load_weights:
        _check_options(config, weights)
    return _build(config, num_classes, weights, dataset_classes)


def _build(config: ModelConfig, num_classes: int, weights: Weights, dataset_classes: list[str] | None) -> FilterClassifier:
    family = _family(config.arch)
    if family == VGG_TINY:
        _check_vgg_tiny_weights(weights)
        model = _vgg_tiny(num_classes, config.dropout)
    elif family == "timm":
        native = _timm_native(config.arch, num_classes, timm_cached_weights(config.arch) if weights == "imagenet" else None)
        if isinstance(weights, dict):
            _adopt_state_dict(native, weights, config, num_classes, dataset_classes)
        model = _timm_classifier(config.arch, native, num_classes, config.dropout)
    else:
        native = _torchvision_native(config.arch, family, num_classes)
        if weights == "imagenet":
            _load_trunk(native, _imagenet_state_dict(config.arch))
        if isinstance(weights, dict):
            _adopt_state_dict(native, weights, config, num_classes, dataset_classes)
        model = _torchvision_classifier(config.arch, family, native, num_classes, config.dropout)
    if not isinstance(weights, (str, dict)):  # a raycf checkpoint
        model.load_state_dict(weights.state_dict)
    return model


def _family(arch: str) -> str:
    try:
        return family_of(arch)
    except ValueError as error:
        raise UserError(f"model.arch: {error}") from None


def _load_trunk(native: Native, state: dict[str, torch.Tensor]) -> None:
    """Load pretrained weights except the head (its class count is the pretraining's)."""
    head = f"{native.head}."
    result = native.net.load_state_dict({key: value for key, value in state.items() if not key.startswith(head)}, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(head)]
    if missing or result.unexpected_keys:
        raise UserError(f"model.weights: imagenet weights do not fit {type(native.net).__name__} (missing {_first(missing)}; unexpected {_first(result.unexpected_keys)})")


def classifier_from_checkpoint(config: ModelConfig, checkpoint: "ClassifierCheckpoint") -> FilterClassifier:
    """A classifier holding a checkpoint's weights, in eval mode on the CPU (no Ray needed)."""
    if checkpoint.partial:
        raise ValueError("a partial checkpoint (the retrained layers only): complete it with its base model first (raycf.models.checkpoint.complete)")
    model = build_model(config, checkpoint.num_classes, load_weights=False)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


def native_from_checkpoint(config: ModelConfig, checkpoint: "ClassifierCheckpoint", head_order: list[str] | None = None) -> nn.Module:
    """The torchvision or timm module of ``config.arch`` holding a complete checkpoint's weights, in eval mode on the CPU.

    Its ``state_dict`` has the library's own key names; ``head_order`` (class
    names) puts the head's rows in that order (default: the checkpoint's).
    Refused (ValueError) for raycf's VGG, whose head no library builds.
    """
    family = _family(config.arch)
    if family == VGG_TINY or (family != "timm" and not TORCHVISION_FAMILIES[family].linear_head):
        raise ValueError(f"{config.arch}: raycf's VGG head (GAP and one linear layer) has no torchvision or timm module")
    num_classes = checkpoint.num_classes
    if family == "timm":
        native = _timm_native(config.arch, num_classes)
        model = _timm_classifier(config.arch, native, num_classes, config.dropout)
    else:
        native = _torchvision_native(config.arch, family, num_classes)
        model = _torchvision_classifier(config.arch, family, native, num_classes, config.dropout)
    model.load_state_dict(checkpoint.state_dict)  # the classifier shares its modules with the library's module
    if head_order is not None:
        rows = [list(checkpoint.class_names).index(name) for name in head_order]
        with torch.no_grad():
            for parameter in native.head_module().parameters():
                parameter.copy_(parameter[rows])
    return native.net.eval()


def check_model_weights(config: ModelConfig, num_classes: int, class_names: list[str] | None = None) -> None:
    """Fail early (UserError) if ``model.arch`` cannot be built or ``model.weights`` cannot be loaded for this dataset.

    Nothing is loaded into a model: a state_dict is checked against the
    architecture built on the meta device.
    """
    family = _family(config.arch)
    native = _native_on_meta(config.arch, family, num_classes)
    weights = _resolve_weights(config, num_classes, load_weights=True)
    _check_options(config, weights)
    if family == VGG_TINY:
        _check_vgg_tiny_weights(weights)
    elif weights == "imagenet" and family == "timm":
        timm_cached_weights(config.arch)
    elif weights == "imagenet" and not imagenet_weights_file(config.arch).is_file():
        _imagenet_state_dict(config.arch)  # raises the explanatory UserError
    elif isinstance(weights, dict):
        _adopt_state_dict(native, weights, config, num_classes, class_names, load=False)


def _native_on_meta(arch: str, family: str, num_classes: int) -> Native | None:
    """The torchvision or timm module of ``arch`` on the meta device (no memory, no initialisation); None for vgg_tiny."""
    if family == "timm":
        native = _timm_native(arch, num_classes, meta=True)
        check_timm_contract(arch, native.net)
        return native
    return None if family == VGG_TINY else _torchvision_native(arch, family, num_classes, meta=True)


def _check_vgg_tiny_weights(weights: Weights) -> None:
    if weights == "imagenet" or isinstance(weights, dict):
        raise UserError("model.weights: vgg_tiny is raycf's own network: no imagenet weights or state_dict (expected none or a raycf checkpoint)")


def adopted_model_bytes(study: "StudyConfig", class_names: list[str]) -> bytes:
    """``base.train: false``: ``model.weights`` as the base model's ``model.pt``.

    A raycf checkpoint is taken as is; a torchvision/timm ``state_dict`` is
    built into the study's classifier and saved as a raycf checkpoint
    recording the arch and the dataset's class names.
    """
    from raycf.models.checkpoint import ClassifierCheckpoint, checkpoint_of

    weights = _resolve_weights(study.model, len(class_names), load_weights=True)
    if isinstance(weights, ClassifierCheckpoint):
        return weights.to_bytes()
    if not isinstance(weights, dict):
        raise UserError(f"base.train: false adopts model.weights as the base model (expected a raycf checkpoint or a state_dict, got {weights})")
    _check_options(study.model, weights)
    model = _build(study.model, len(class_names), weights, class_names)
    return checkpoint_of(model, class_names, study.data.image_size, study.config_hash(), {}).to_bytes()
