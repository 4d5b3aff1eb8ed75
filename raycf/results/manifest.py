"""``config.yaml`` and ``manifest.json``: the resolved study and what produced its results."""

from __future__ import annotations

import functools
import json
import platform
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from raycf.results import storage
from raycf.config import StudyConfig, dump_yaml

PACKAGES = ("raycf", "torch", "torchvision", "ray", "optuna", "pandas", "pyarrow", "numpy", "scikit-learn")


def versions() -> dict[str, str]:
    """Versions of raycf and the libraries its numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


@functools.cache
def raycf_version() -> str:
    """The installed raycf's version, as the manifest records it (read once per process)."""
    return versions()["raycf"]


def git_commit() -> str | None:
    """The commit of the raycf source tree, when it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        completed = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def iso_time(timestamp: float) -> str:
    """A unix time as an ISO 8601 UTC string (seconds)."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def manifest(study: StudyConfig, command: str, started_at: float) -> dict:
    """The ``manifest.json`` content: versions, hashes, commit, times."""
    return {
        "study": study.name,
        "config_hash": study.config_hash(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": command,
        "host": socket.gethostname(),
        "started_at": iso_time(started_at),
        "finished_at": None,
    }


def write_study_files(study: StudyConfig, command: str) -> None:
    """``config.yaml`` (the resolved study) and ``manifest.json`` in the results folder."""
    results = study.results_uri
    storage.write_text(storage.join_uri(results, "config.yaml"), dump_yaml(study))
    storage.write_text(storage.join_uri(results, "manifest.json"), json.dumps(manifest(study, command, time.time()), indent=2))


def finish_manifest(results: str, stage_markers: dict[str, dict]) -> None:
    """Record the end time and the finished stages' hashes in ``manifest.json``."""
    location = storage.join_uri(results, "manifest.json")
    content = json.loads(storage.read_text(location))
    content["finished_at"] = iso_time(time.time())
    content["stages"] = {name: {"hash": marker["hash"], "finished_at": marker["finished_at"]} for name, marker in stage_markers.items()}
    storage.write_text(location, json.dumps(content, indent=2))
