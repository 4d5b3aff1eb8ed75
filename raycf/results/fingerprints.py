"""Content fingerprints of the files a study names: ``model.weights``, ``data.root`` and ``data.groups``.

A stage that reads either field is identified by what the file or folder
holds, not by its name: overwriting the weights file, or adding an image to
the dataset folder, changes the stage's hash (:func:`raycf.pipeline.stage_hash`).
The full fingerprint (with the modification time) is recorded in the stage's
marker; the hash uses only what the content decides (sizes and sha256).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from raycf.results import storage
from raycf.config import StudyConfig, field_value_at

# The study fields that name files, and the fingerprint of each.
FILE_FIELDS = ("model.weights", "data.root", "data.groups")
NOT_FILES = ("none", "imagenet")  # model.weights values that name no file
CONTENT_KEYS = ("size", "sha256", "files")  # what enters the hash; path and mtime are recorded only
_CHUNK = 1 << 20


def weights_fingerprint(location: str) -> dict[str, Any]:
    """Size, modification time and sha256 of a weights file (local or URI)."""
    if storage.is_uri(location):
        data = storage.read_bytes(location)
        return {"path": location, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path = Path(location)
    if not path.is_file():
        return {"path": location, "missing": True}
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    status = path.stat()
    return {"path": location, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": digest.hexdigest()}


def folder_fingerprint(root: str) -> dict[str, Any]:
    """A manifest of a dataset folder: every file's relative path and size, hashed; the count and total size."""
    lines, total = [], 0
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            size = os.stat(path).st_size
            total += size
            lines.append(f"{os.path.relpath(path, root)}\t{size}")
    if not lines and not os.path.isdir(root):
        return {"path": root, "missing": True}
    manifest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"path": root, "files": len(lines), "size": total, "sha256": manifest}


def reads_field(reads: tuple[str, ...], field: str) -> bool:
    """Whether a stage's ``reads`` (sections or dotted fields) cover ``field``."""
    return any(field == read or field.startswith(f"{read}.") for read in reads)


def file_fingerprints(study: StudyConfig, reads: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The fingerprints of the file fields in ``reads`` that name a file or folder."""
    fingerprints = {}
    if reads_field(reads, "model.weights"):
        weights = field_value_at(study, "model.weights")
        if weights not in NOT_FILES:
            fingerprints["model.weights"] = weights_fingerprint(weights)
    if reads_field(reads, "data.root"):
        root = field_value_at(study, "data.root")
        if root:
            fingerprints["data.root"] = folder_fingerprint(root)
    if reads_field(reads, "data.groups"):
        groups = field_value_at(study, "data.groups")
        if groups:
            fingerprints["data.groups"] = weights_fingerprint(groups)  # the table by content
    return fingerprints


def content_of(fingerprints: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The parts of fingerprints that a stage hash covers (not paths or times)."""
    return {field: {key: value for key, value in print_.items() if key in CONTENT_KEYS or key == "missing"} for field, print_ in fingerprints.items()}
