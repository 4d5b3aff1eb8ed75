"""timm CNNs (``timm:<name>``) read through timm's own interface, and their contract checks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from raycf.errors import UserError
from raycf.models.architectures import TIMM_PREFIX
from raycf.models.contract import FilterClassifier
from raycf.models.prefix import chain_of, last_conv_of, run_units
from raycf.models.torchvision_families import Native

PROBE_SIDE = 64  # pixels of the input that checks a timm model's structure


def timm_module():
    """The timm package, or a UserError naming the optional extra."""
    try:
        import timm
    except ImportError:
        raise UserError("model.arch: timm:<name> needs timm, raycf's optional extra (pip install 'raycf[timm]')") from None
    return timm


def timm_native(arch: str, num_classes: int, pretrained_file: Path | None = None, meta: bool = False) -> Native:
    """timm's own network for ``timm:<name>`` with a ``num_classes`` head (on the meta device if asked), with optional weights."""
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


def timm_classifier(arch: str, native: Native, num_classes: int, dropout: float) -> FilterClassifier:
    """The :class:`FilterClassifier` view of a timm network: its features, its pre-logits pool and its classifier."""
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
            maps = run_units(chain, probe)
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
