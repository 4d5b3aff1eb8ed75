"""Tune's driver state, saved as one file, so a killed driver resumes from a consistent set.

Tune writes its experiment state (the trial list), the searcher's state and
the callbacks' state to a local staging folder at the end of a controller
step, then copies them to the storage path in the background, file by file.
A driver killed during that copy leaves a mixed or truncated set in the
storage: a trial list from one step and a searcher from the next, or empty
files.  ``Tuner.restore`` then reruns finished trials, loses proposals or
stops short of ``num_samples``.

The staging folder itself is consistent once a step has ended (Tune writes
it synchronously).  :class:`DriverStateSnapshot` bundles it into one zip file
written atomically, and :func:`restore_driver_state` puts the bundle back in
the experiment folder before ``Tuner.restore`` reads it.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pyarrow.fs as pafs
from ray.tune import Callback

from raycf.runtime import kill_points

from raycf.results import storage

TUNER_FILE = "tuner.pkl"  # written once when the Tuner is created; not part of a step's state


def is_state_file(name: str) -> bool:
    """The files ``Tuner.restore`` reads from an experiment folder, except the Tuner itself."""
    return name.endswith((".json", ".pkl")) and name != TUNER_FILE and not name.startswith("tmp-")


def state_paths(folder: Path) -> list[Path]:
    """The state files at the top of ``folder``, by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and is_state_file(path.name))


def bundle(paths: list[Path]) -> bytes:
    """``paths`` as one zip archive of their names and contents."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in paths:
            archive.writestr(path.name, path.read_bytes())
    return buffer.getvalue()


class DriverStateSnapshot(Callback):
    """Writes the staging folder's state files to ``location`` after every step that changed them."""

    def __init__(self, location: str):
        self.location = location
        self._saved: tuple | None = None

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if not trials:  # nothing worth resuming before the first trial exists
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        if not staging.is_dir():
            return
        paths = state_paths(staging)
        fingerprint = tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in paths)
        if fingerprint and fingerprint != self._saved:
            data = bundle(paths)
            kill_points.reached("bundle")
            storage.write_bytes(self.location, data)
            self._saved = fingerprint


def read_snapshot(location: str) -> dict[str, bytes]:
    """The snapshot's files by name; empty when there is none."""
    if not storage.exists(location):
        return {}
    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(location))) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def restore_driver_state(files: dict[str, bytes], experiment_path: str) -> None:
    """Replace the experiment folder's state files with a snapshot's ``files``."""
    filesystem, folder = storage.resolve(experiment_path)
    if filesystem.get_file_info(folder).type == pafs.FileType.Directory:
        for entry in filesystem.get_file_info(pafs.FileSelector(folder)):
            if entry.type == pafs.FileType.File and is_state_file(entry.base_name):
                filesystem.delete_file(entry.path)
    for name, data in files.items():
        storage.write_bytes(storage.join_uri(experiment_path, name), data)


def finished_trials(files: dict[str, bytes]) -> list[str]:
    """Ids of the trials that a snapshot's ``files`` record as terminated (finished)."""
    states = sorted(name for name in files if name.startswith("experiment_state-"))
    if not states:
        return []
    experiment = json.loads(files[states[-1]])
    trials = (json.loads(trial_json) for trial_json, _runtime in experiment["trial_data"])
    return [trial["trial_id"] for trial in trials if trial.get("status") == "TERMINATED"]
