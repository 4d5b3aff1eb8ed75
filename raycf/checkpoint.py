"""The classifier checkpoint format.

A raycf classifier checkpoint is one file, ``model.pt``, written with
``torch.save`` and read with ``torch.load(..., weights_only=True)`` so that
loading it can never run code.  It holds a plain dict:

=================  ==========================================================
key                value
=================  ==========================================================
``format``         ``"raycf.classifier/1"``
``arch``           architecture name (``vgg16``, ``resnet18``, ``resnet50``, ``vgg_tiny``)
``num_filters``    K, filters of the last conv layer
``num_classes``    C
``class_names``    list of C strings
``image_size``     input side in pixels
``config_hash``    hash of the study that produced it
``metrics``        dict of floats (epoch, val_acc, ...)
``state_dict``     the model's tensors (never wrapped in DDP's ``module.``)
=================  ==========================================================
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field

import torch

from raycf import storage
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
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def checkpoint_of(model: torch.nn.Module, class_names: list[str], image_size: int, config_hash: str, metrics: dict[str, float] | None = None) -> ClassifierCheckpoint:
    """The checkpoint of a :class:`~raycf.models.FilterClassifier` (possibly DDP-wrapped) as it is now."""
    inner = getattr(model, "module", model)
    return ClassifierCheckpoint(
        arch=inner.arch,
        num_filters=inner.num_filters,
        num_classes=inner.num_classes,
        class_names=list(class_names),
        image_size=int(image_size),
        config_hash=config_hash,
        state_dict=unwrap_state_dict(inner),
        metrics=dict(metrics or {}),
    )


def unwrap_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a model, without DDP's ``module.`` wrapper."""
    inner = getattr(model, "module", model)
    return {key: value.detach().cpu().clone() for key, value in inner.state_dict().items()}


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
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{source}: not a loadable raycf checkpoint ({first_line[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{source}: not a raycf classifier checkpoint (expected format {CHECKPOINT_FORMAT})")
    checkpoint = ClassifierCheckpoint(
        arch=payload["arch"],
        num_filters=payload["num_filters"],
        num_classes=payload["num_classes"],
        class_names=list(payload["class_names"]),
        image_size=payload["image_size"],
        config_hash=payload["config_hash"],
        state_dict=payload["state_dict"],
        metrics=dict(payload.get("metrics", {})),
    )
    if expected_arch is not None and checkpoint.arch != expected_arch:
        raise UserError(f"{source}: checkpoint is for arch {checkpoint.arch}, but the study's model.arch is {expected_arch}")
    if expected_classes is not None and checkpoint.num_classes != expected_classes:
        raise UserError(
            f"{source}: checkpoint has {checkpoint.num_classes} classes, but the dataset has {expected_classes} (expected a checkpoint for this dataset)"
        )
    return checkpoint
