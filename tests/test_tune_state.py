"""Tune's driver state bundled at the end of a step and put back before a resume."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

from raycf.search.tune_state import DriverStateSnapshot, finished_trials, read_snapshot, restore_driver_state


def _experiment_state(*trials: tuple[str, str]) -> str:
    trial_data = [[json.dumps({"trial_id": trial_id, "status": status}), "{}"] for trial_id, status in trials]
    return json.dumps({"trial_data": trial_data, "runner_data": {}})


def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / "driver_artifacts"
    (staging / "trial-a").mkdir(parents=True)
    (staging / "experiment_state-2026-01-01_00-00-00.json").write_text(_experiment_state(("a", "TERMINATED"), ("b", "RUNNING")))
    (staging / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(b"counter=2")
    (staging / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"optuna")
    (staging / "tuner.pkl").write_bytes(b"the tuner")
    (staging / "tmp-searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"half written")
    (staging / "trial-a" / "result.json").write_text("{}")
    return staging


def _step_end(callback: DriverStateSnapshot, staging: Path) -> None:
    trial = SimpleNamespace(storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    callback.on_step_end(iteration=1, trials=[trial])


def test_the_snapshot_holds_the_step_state_files_only(tmp_path):
    staging = _staging(tmp_path)
    location = tmp_path / "search-x-driver" / "state.zip"
    _step_end(DriverStateSnapshot(str(location)), staging)
    with zipfile.ZipFile(location) as archive:
        assert sorted(archive.namelist()) == [
            "experiment_state-2026-01-01_00-00-00.json",
            "search_gen_state-2026-01-01_00-00-00.json",
            "searcher-state-2026-01-01_00-00-00.pkl",
        ]
        assert archive.read("searcher-state-2026-01-01_00-00-00.pkl") == b"optuna"
    assert finished_trials(read_snapshot(str(location))) == ["a"]


def test_the_snapshot_is_rewritten_only_when_the_state_changed(tmp_path):
    staging = _staging(tmp_path)
    location = tmp_path / "state.zip"
    callback = DriverStateSnapshot(str(location))
    _step_end(callback, staging)
    location.unlink()
    _step_end(callback, staging)  # nothing new since the last step
    assert not location.exists()
    (staging / "experiment_state-2026-01-01_00-00-00.json").write_text(_experiment_state(("a", "TERMINATED"), ("b", "TERMINATED")))
    _step_end(callback, staging)
    assert finished_trials(read_snapshot(str(location))) == ["a", "b"]


def test_no_trial_yet_means_no_snapshot(tmp_path):
    location = tmp_path / "state.zip"
    DriverStateSnapshot(str(location)).on_step_end(iteration=1, trials=[])
    assert not location.exists() and finished_trials(read_snapshot(str(location))) == []


def test_restore_replaces_a_torn_copy_and_keeps_the_tuner(tmp_path):
    location = tmp_path / "state.zip"
    _step_end(DriverStateSnapshot(str(location)), _staging(tmp_path))
    experiment = tmp_path / "search-x"
    (experiment / "trial-a").mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"the tuner")
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_bytes(b"")  # truncated by a killed copy
    (experiment / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"a newer step's searcher")
    (experiment / "search_gen_state-2025-12-31_00-00-00.json").write_bytes(b"an older session's")
    restore_driver_state(read_snapshot(str(location)), str(experiment))
    assert sorted(path.name for path in experiment.iterdir()) == [
        "experiment_state-2026-01-01_00-00-00.json",
        "search_gen_state-2026-01-01_00-00-00.json",
        "searcher-state-2026-01-01_00-00-00.pkl",
        "trial-a",
        "tuner.pkl",
    ]
    assert (experiment / "searcher-state-2026-01-01_00-00-00.pkl").read_bytes() == b"optuna"
    assert (experiment / "tuner.pkl").read_bytes() == b"the tuner"


def test_no_snapshot_reads_as_empty(tmp_path):
    assert read_snapshot(str(tmp_path / "state.zip")) == {}
    assert finished_trials({}) == []
