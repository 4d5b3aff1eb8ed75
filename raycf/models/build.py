"""Building a classifier for a study: resolving, adopting and checking its weights (``model.weights``).

:func:`build_model` is the one entry point; checkpoints come back through :func:`classifier_from_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from raycf.config import ModelConfig
from raycf.errors import UserError
from raycf.models.architectures import VGG_TINY, family_of
from raycf.models.contract import FilterClassifier
from raycf.models.timm_family import (
    check_timm_contract,
    timm_cached_weights,
    timm_classifier,
    timm_native,
)
from raycf.models.torchvision_families import (
    TORCHVISION_FAMILIES,
    Native,
    check_torchvision_name,
    torchvision_classifier,
    torchvision_native,
    tv_models,
    vgg_tiny,
)

if TYPE_CHECKING:
    from raycf.config import StudyConfig
    from raycf.models.checkpoint import ClassifierCheckpoint

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
    registry = tv_models().get_model_weights(arch)
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
    from raycf.models.checkpoint import (
        ClassifierCheckpoint,
        check_checkpoint,
        read_weights_file,
    )

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
        model = vgg_tiny(num_classes, config.dropout)
    elif family == "timm":
        native = timm_native(config.arch, num_classes, timm_cached_weights(config.arch) if weights == "imagenet" else None)
        if isinstance(weights, dict):
            _adopt_state_dict(native, weights, config, num_classes, dataset_classes)
        model = timm_classifier(config.arch, native, num_classes, config.dropout)
    else:
        native = torchvision_native(config.arch, family, num_classes)
        if weights == "imagenet":
            _load_trunk(native, _imagenet_state_dict(config.arch))
        if isinstance(weights, dict):
            _adopt_state_dict(native, weights, config, num_classes, dataset_classes)
        model = torchvision_classifier(config.arch, family, native, num_classes, config.dropout)
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
        native = timm_native(config.arch, num_classes)
        model = timm_classifier(config.arch, native, num_classes, config.dropout)
    else:
        native = torchvision_native(config.arch, family, num_classes)
        model = torchvision_classifier(config.arch, family, native, num_classes, config.dropout)
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
        native = timm_native(arch, num_classes, meta=True)
        check_timm_contract(arch, native.net)
        return native
    return None if family == VGG_TINY else torchvision_native(arch, family, num_classes, meta=True)


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
