"""``raycf export``: a study's model written the way its own library loads it, with a JSON sidecar.

* a torchvision or timm architecture: a plain ``state_dict`` with the
  library's key names and the head's rows in the user's class order
  (``model.class_names`` when the study gave one, else the dataset's sorted
  order), as ``pt`` (``torch.save``) or ``safetensors``; it loads with
  ``torchvision.models.<arch>(num_classes=N).load_state_dict(...)`` or
  ``timm.create_model(name, num_classes=N).load_state_dict(...)``;
* any architecture, raycf's own VGG included: ``torchscript``, the whole
  classifier traced (raycf's VGG is the trunk, a 2×2 max pool, GAP and one
  linear layer, which no torchvision constructor builds, so a state_dict
  of it would load nowhere).

The sidecar ``<out>.json`` holds the arch, the class names in the exported
head's order, the preprocessing, the trial's parameters and its validation
and test metrics.  Results are read through :mod:`raycf.results.artefacts` (local
folders and bucket URIs alike); the file itself is written atomically.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from raycf.results import storage
from raycf.models.architectures import VGG_TINY, family_of
from raycf.results.artefacts import base_model_bytes, load_results_study, read_final_frame, trial_model_bytes
from raycf.models.checkpoint import parse_classifier_checkpoint
from raycf.config import StudyConfig
from raycf.errors import UserError
from raycf.models.build import classifier_from_checkpoint, native_from_checkpoint

FORMATS = ("pt", "safetensors", "torchscript")
STATE_DICT_FORMATS = ("pt", "safetensors")


def export_model(results: str, which: str, fmt: str, out: str) -> tuple[Path, Path]:
    """Write ``which`` (``debugged``, ``control``, ``base`` or a trial id) of the study in ``results`` to ``out`` as ``fmt``; returns (file, sidecar)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    results = storage.normalise_root(results)
    study = load_results_study(results)
    _check_format(study, fmt)
    row, model_bytes, parameters = _model_bytes(results, which)
    checkpoint = parse_classifier_checkpoint(model_bytes, f"{which} model", study.model.arch)
    head_order = list(study.model.class_names) if study.model.class_names is not None else list(checkpoint.class_names)
    if fmt == "torchscript":
        payload = _torchscript(study, checkpoint)
    else:
        state = native_from_checkpoint(study.model, checkpoint, head_order).state_dict()
        payload = _state_dict_bytes(state, fmt)
    target = Path(out)
    _write_atomically(target, payload)
    sidecar = target.with_name(target.name + ".json")
    _write_atomically(sidecar, json.dumps(_sidecar(study, results, which, fmt, head_order, row, parameters), indent=2, default=_plain).encode())
    return target, sidecar


def _check_format(study: StudyConfig, fmt: str) -> None:
    """Refuse a state_dict format for an architecture no library constructor builds (one line, with the reason)."""
    if fmt not in STATE_DICT_FORMATS:
        return
    arch = study.model.arch
    if family_of(arch) in (VGG_TINY, "vgg"):
        raise UserError(
            f"--format {fmt}: raycf's {arch} is its conv trunk, a 2×2 max pool, GAP and one linear layer, which no torchvision "
            "constructor builds, so its state_dict would load nowhere (expected --format torchscript)"
        )


def _model_bytes(results: str, which: str) -> tuple[pd.Series | None, bytes, list[str]]:
    """The leaderboard row (None for the base model), the complete ``model.pt`` of ``which`` and the searched parameters' names."""
    base = base_model_bytes(results) if storage.exists(storage.join_uri(results, "base", "model.pt")) else None
    if which == "base":
        if base is None:
            raise UserError(f"{results}: no base/model.pt (expected a study whose base stage ran)")
        return None, base, []
    from raycf.search.leaderboard import read_leaderboard

    board = read_leaderboard(results)
    if which == "debugged":
        final = read_final_frame(results, "final.parquet")
        debugged = final[final["model"] == "debugged"] if final is not None else None
        if debugged is None or debugged.empty:
            raise UserError(f"{results}: no final/final.parquet with a debugged model (expected a study whose final stage ran)")
        rows = board[board["trial_id"] == str(debugged["trial_id"].iloc[0])]
    elif which == "control":
        rows = board[board["is_control"]]
    else:
        rows = board[board["trial_id"] == which]
    if rows.empty:
        raise UserError(f"--model {which}: no such trial in {results}'s leaderboard (expected debugged, control, base or a trial id)")
    row = rows.iloc[0]
    if base is None:
        raise UserError(f"{results}: no base/model.pt, which the trial's partial checkpoint completes (expected the study's base stage)")
    model_bytes = trial_model_bytes(row, base, results)
    if model_bytes is None:
        raise UserError(f"--model {which}: trial {row['trial_id']}'s checkpoint is gone ({row.get('checkpoint_path') or 'none recorded'}); rerun the search")
    return row, model_bytes, list(board.attrs.get("parameters", []))


def _state_dict_bytes(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _torchscript(study: StudyConfig, checkpoint) -> bytes:
    """The classifier traced on one evaluation-sized input (images → logits, the dataset's sorted class order)."""
    model = classifier_from_checkpoint(study.model, checkpoint)
    example = torch.zeros(1, 3, study.data.image_size, study.data.image_size)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _sidecar(study: StudyConfig, results: str, which: str, fmt: str, head_order: list[str], row: pd.Series | None, parameters: list[str]) -> dict[str, Any]:
    arch = study.model.arch
    loads_with = {
        "pt": f"torchvision.models.{arch}(num_classes={len(head_order)}).load_state_dict(torch.load(FILE))",
        "safetensors": f"torchvision.models.{arch}(num_classes={len(head_order)}).load_state_dict(safetensors.torch.load_file(FILE))",
        "torchscript": "torch.jit.load(FILE) (logits in the dataset's sorted class order)",
    }[fmt]
    if arch.startswith("timm:") and fmt != "torchscript":
        loads_with = loads_with.replace(f"torchvision.models.{arch}(", f"timm.create_model({arch.removeprefix('timm:')!r}, ")
    sidecar = {
        "results": results,
        "model": which,
        "format": fmt,
        "arch": arch,
        "num_classes": len(head_order),
        "class_names": head_order if fmt != "torchscript" else sorted(head_order),
        "image_size": study.data.image_size,
        "preprocess": study.data.preprocess.model_dump(mode="json"),
        "loads_with": loads_with,
    }
    if row is not None:
        sidecar["trial_id"] = str(row["trial_id"])
        sidecar["params"] = {name: row[name] for name in parameters if name in row.index}
        sidecar["val_metrics"] = {name: row[name] for name in row.index if str(name).startswith("val_")}
    final = read_final_frame(results, "final.parquet")
    if final is not None:
        label = which if which in ("debugged", "control", "base") else None
        if label is None and row is not None and "trial_id" in final.columns:
            matches = final[final["trial_id"] == str(row["trial_id"])]
            label = str(matches["model"].iloc[0]) if len(matches) else None
        chosen = final[final["model"] == label] if label is not None else final.iloc[0:0]
        if len(chosen):
            sidecar["test_metrics"] = {name: chosen[name].iloc[0] for name in chosen.columns if str(name).startswith("test_")}
    return sidecar


def _plain(value: Any) -> Any:
    """numpy scalars (pandas cells) as JSON numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
