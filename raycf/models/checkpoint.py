"""The classifier checkpoint format.

A raycf classifier checkpoint is one file, ``model.pt``, written with
``torch.save`` and read with ``torch.load(..., weights_only=True)`` so that
loading it can never run code.  It holds a plain dict:

=================  ==========================================================
key                value
=================  ==========================================================
``format``         ``"raycf.classifier/1"``
``arch``           ``model.arch`` (``vgg16``, ``timm:resnet18``, ...)
``num_filters``    K, filters of the last conv layer
``num_classes``    C
``class_names``    list of C strings
``image_size``     input side in pixels
``config_hash``    hash of the study that produced it
``metrics``        dict of floats (epoch, val_acc, ...)
``state_dict``     the model's tensors (never wrapped in DDP's ``module.``)
``base_hash``      only in a *partial* checkpoint: the hash (:func:`model_hash`)
                   of the base model it completes
=================  ==========================================================

A partial checkpoint holds only what retraining changed (the trainable
layers' parameters and their BatchNorm statistics): a debug or control
checkpoint of VGG-16 on CUB is the last conv layer and the head, 9 MB instead
of 59 MB.  :func:`complete` merges it with its base model, and refuses a base
model whose hash differs.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
import dataclasses
from dataclasses import dataclass, field

import torch

from raycf.results import storage
from raycf.errors import UserError

CHECKPOINT_FORMAT = "raycf.classifier/1"
CHECKPOINT_FILE = "model.pt"


@dataclass
class ClassifierCheckpoint:
    """What a ``model.pt`` holds (see the module docstring)."""

    arch: str
    num_filters: int
    num_classes: int
    class_names: list[str]
    image_size: int
    config_hash: str
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    base_hash: str = ""  # set on a partial checkpoint: the base model it completes

    @property
    def partial(self) -> bool:
        return bool(self.base_hash)

    def to_bytes(self) -> bytes:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "num_filters": int(self.num_filters),
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            "image_size": int(self.image_size),
            "config_hash": self.config_hash,
            "metrics": {key: float(value) for key, value in self.metrics.items() if isinstance(value, (int, float))},
            "state_dict": {key: value.detach().cpu() for key, value in self.state_dict.items()},
        }
        if self.base_hash:
            payload["base_hash"] = self.base_hash
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def model_hash(model_bytes: bytes) -> str:
    """The content hash of a ``model.pt`` (what a partial checkpoint names its base by)."""
    return hashlib.sha256(model_bytes).hexdigest()[:16]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of the modules that have trainable parameters: their parameters and buffers (BatchNorm statistics).

    A module reachable under two names (the classifier's ``last_conv`` is also
    in its ``trunk``) appears under both, as in ``state_dict``, sharing one copy.
    """
    copies: dict[int, torch.Tensor] = {}
    keep = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
            for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                copy = copies.setdefault(id(value), value.detach().cpu().clone())
                keep[f"{prefix}.{name}" if prefix else name] = copy
    return keep


def complete(checkpoint: ClassifierCheckpoint, base_bytes: bytes, source: str = "checkpoint") -> ClassifierCheckpoint:
    """A partial checkpoint made whole with its base model (a full one is returned as is)."""
    if not checkpoint.partial:
        return checkpoint
    if model_hash(base_bytes) != checkpoint.base_hash:
        raise UserError(f"{source}: a partial checkpoint of base model {checkpoint.base_hash}, not of {model_hash(base_bytes)} (expected the study's own base/model.pt)")
    base = parse_classifier_checkpoint(base_bytes, "base model", checkpoint.arch, checkpoint.num_classes)
    return dataclasses.replace(checkpoint, state_dict={**base.state_dict, **checkpoint.state_dict}, base_hash="")


def checkpoint_of(
    model: torch.nn.Module,
    class_names: list[str],
    image_size: int,
    config_hash: str,
    metrics: dict[str, float] | None = None,
    base_hash: str = "",
) -> ClassifierCheckpoint:
    """The checkpoint of a :class:`~raycf.models.contract.FilterClassifier` (possibly DDP-wrapped) as it is now.

    With ``base_hash`` it is partial: only the trainable layers (see :func:`trainable_state`).
    """
    inner = getattr(model, "module", model)
    return ClassifierCheckpoint(
        arch=inner.arch,
        num_filters=inner.num_filters,
        num_classes=inner.num_classes,
        class_names=list(class_names),
        image_size=int(image_size),
        config_hash=config_hash,
        state_dict=trainable_state(inner) if base_hash else unwrap_state_dict(model),
        metrics=dict(metrics or {}),
        base_hash=base_hash,
    )


def unwrap_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model, without DDP's ``module.`` wrapper; a tensor under two names is copied once."""
    inner = getattr(model, "module", model)
    copies: dict[int, torch.Tensor] = {}
    return {key: copies.setdefault(id(value), value.detach().cpu().clone()) for key, value in inner.state_dict(keep_vars=True).items()}


def save_classifier_checkpoint(checkpoint: ClassifierCheckpoint, location: str) -> None:
    """Write ``checkpoint`` atomically to a local path or URI."""
    storage.write_bytes(location, checkpoint.to_bytes())


def load_classifier_checkpoint(
    location: str, expected_arch: str | None = None, expected_classes: int | None = None
) -> ClassifierCheckpoint:
    """Read a ``model.pt`` safely; refuse another architecture or class count.

    Raises :class:`UserError` for a missing file, a file that is not a raycf
    checkpoint (including any pickle that would run code), or a mismatch.
    """
    if not storage.exists(location):
        raise UserError(f"{location}: checkpoint not found (expected a raycf model.pt)")
    return parse_classifier_checkpoint(storage.read_bytes(location), location, expected_arch, expected_classes)


def parse_classifier_checkpoint(
    data: bytes, source: str = "checkpoint", expected_arch: str | None = None, expected_classes: int | None = None
) -> ClassifierCheckpoint:
    """Decode ``model.pt`` bytes with ``weights_only=True`` and check what they are for."""
    payload = _safe_load(data, source, "raycf checkpoint")
    if not _is_raycf(payload):
        raise UserError(f"{source}: not a raycf classifier checkpoint (expected format {CHECKPOINT_FORMAT})")
    return check_checkpoint(_checkpoint_from(payload), source, expected_arch, expected_classes)


def read_weights_file(location: str) -> ClassifierCheckpoint | dict[str, torch.Tensor]:
    """``model.weights: PATH``: a raycf checkpoint (not yet checked) or a torchvision/timm ``state_dict``.

    Accepted: a plain ``state_dict`` (``torch.save(model.state_dict(), PATH)``),
    a Lightning-style checkpoint (its ``"state_dict"``; a key prefix such as
    ``model.`` is stripped later, see :func:`raycf.models.build.strip_prefix`) and a
    safetensors file.  Read with ``weights_only=True``, so loading can never
    run code; a pickled module or a TorchScript file is refused with the
    recipe that saves its ``state_dict``.  A ``state_dict`` saved from a
    DDP-wrapped model loses its ``module.`` prefix.
    """
    if not storage.exists(location):
        raise UserError(f"{location}: checkpoint not found (expected a raycf model.pt, or a torchvision or timm state_dict)")
    data = storage.read_bytes(location)
    if _is_safetensors(data):
        return _tensor_mapping(_safetensors_load(data, location), location)
    if _is_torchscript(data):
        raise UserError(
            f"{location}: a TorchScript module, not weights (expected a state_dict: "
            f"torch.save(torch.jit.load({location!r}).state_dict(), 'weights.pt'), then model.weights: weights.pt)"
        )
    payload = _safe_load(data, location, "raycf checkpoint or state_dict")
    if _is_raycf(payload):
        return _checkpoint_from(payload)
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):  # a Lightning checkpoint
        payload = payload["state_dict"]
    return _tensor_mapping(payload, location)


def _tensor_mapping(payload: object, location: str) -> dict[str, torch.Tensor]:
    if not isinstance(payload, dict) or not payload or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items()):
        raise UserError(f"{location}: neither a raycf checkpoint nor a state_dict (expected a model.pt, or a mapping of parameter names to tensors)")
    if all(key.startswith("module.") for key in payload):
        payload = {key.removeprefix("module."): value for key, value in payload.items()}
    return payload


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 0 < header <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_load(data: bytes, location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:  # noqa: BLE001 - any failure means a damaged file
        raise UserError(f"{location}: not a loadable safetensors file ({str(error).strip()[:160]})") from None


def _is_torchscript(data: bytes) -> bool:
    """A TorchScript archive: a zip whose members include ``code/`` (what ``torch.jit.save`` writes)."""
    if not data.startswith(b"PK"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def check_checkpoint(
    checkpoint: ClassifierCheckpoint, source: str, expected_arch: str | None = None, expected_classes: int | None = None
) -> ClassifierCheckpoint:
    """Refuse a checkpoint of another architecture or class count (one line naming both)."""
    if expected_arch is not None and checkpoint.arch != expected_arch:
        raise UserError(f"{source}: checkpoint is for arch {checkpoint.arch}, but the study's model.arch is {expected_arch}")
    if expected_classes is not None and checkpoint.num_classes != expected_classes:
        raise UserError(
            f"{source}: checkpoint has {checkpoint.num_classes} classes, but the dataset has {expected_classes} (expected a checkpoint for this dataset)"
        )
    return checkpoint


def _safe_load(data: bytes, source: str, expected: str) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Unsupported global" in str(error):
            raise UserError(_pickled_objects(data, source)) from None
        raise UserError(f"{source}: not a loadable {expected} ({first_line[:160]})") from None


def _pickled_objects(data: bytes, source: str) -> str:
    """Why a file that pickles Python objects is refused, and the recipe that saves its weights."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    if any(name.startswith("torch.nn.modules.") for name in names):
        return (
            f"{source}: a pickled module, not weights (raycf never unpickles code; expected its state_dict: in a trusted session run "
            f"torch.save(torch.load({source!r}, weights_only=False).state_dict(), 'weights.pt'), then set model.weights: weights.pt)"
        )
    return (
        f"{source}: holds pickled Python objects ({', '.join(names[:2])}) that raycf will not unpickle (expected a state_dict: in a trusted "
        f"session save the model's weights with torch.save(model.state_dict(), 'weights.pt'), then set model.weights: weights.pt)"
    )


def _is_raycf(payload: object) -> bool:
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def _checkpoint_from(payload: dict) -> ClassifierCheckpoint:
    return ClassifierCheckpoint(
        arch=payload["arch"],
        num_filters=payload["num_filters"],
        num_classes=payload["num_classes"],
        class_names=list(payload["class_names"]),
        image_size=payload["image_size"],
        config_hash=payload["config_hash"],
        state_dict=payload["state_dict"],
        metrics=dict(payload.get("metrics", {})),
        base_hash=str(payload.get("base_hash", "")),
    )
