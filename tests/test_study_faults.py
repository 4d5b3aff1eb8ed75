"""Faults in a running study: the driver killed mid-search, and a trial's process killed mid-trial."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import CACHED_UP_TO_ANALYSIS, copy_study_parts, ray_address, run_cli, run_stage

SEARCH_SETTINGS = ["search.num_samples=2", "search.max_concurrent=1", "search.scheduler.asha=null"]


# The search driver is killed at each of these points in turn (raycf.runtime.kill_points), resuming the search in
# between: after a trial completes, after a searched point is proposed, after a trial starts, after an
# epoch is reported, while the driver state bundle is written.  A categorical parameter is searched and
# lambda2 is not: the values keep their type and the study's own lambda2 stands, through final and rerun.
KILL_SEQUENCE = ("completed:1", "proposed:1", "started:1", "reported:1", "bundle:2")
CATEGORICAL_SPACE = "search.space={debug.indicator: {choice: [paper, centred]}, lambda1: {loguniform: [0.001, 0.1]}}"


def _epochs_reported(trial_folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (trial_folder / "result.json").read_text().splitlines()]


def test_the_search_resumes_from_every_kill_point_and_a_categorical_space_runs_through_final_and_rerun(ray_session, smoke_study_results, tmp_path):
    import optuna

    from raycf.runtime.kill_points import KILL_AT

    storage = tmp_path / "results"
    results = storage / "digits"
    copy_study_parts(smoke_study_results, results, (*CACHED_UP_TO_ANALYSIS, "prefix"))
    args = ["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={storage}", "search.num_samples=3", "search.max_concurrent=1", "search.scheduler.asha=null", CATEGORICAL_SPACE]
    env = {"RAY_ADDRESS": ray_address(), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    for point in KILL_SEQUENCE:
        killed = run_cli(*args, env_extra={**env, KILL_AT: point})
        assert killed.returncode == -signal.SIGKILL, f"{point}: the driver was not killed there (exit {killed.returncode}): {killed.stderr[-3000:]}"
        assert not (results / "search" / "_stage.json").exists()  # the stage did not finish
    finished = run_cli(*args, env_extra=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming the interrupted search" in finished.stderr

    board = pd.read_parquet(results / "leaderboard.parquet")
    assert len(board) == 3 and (board["status"] == "completed").all() and int(board["is_control"].sum()) == 1
    # Nothing duplicated: three trial folders; the control ran once (each epoch reported once), every trial ran both epochs.
    trial_folders = {folder.name: folder for folder in (results / "_ray").glob("search-*/trial-*")}
    assert sorted(trial_folders) == sorted(f"trial-{trial_id}" for trial_id in board["trial_id"])
    assert _epochs_reported(trial_folders[f"trial-{board.loc[board['is_control'], 'trial_id'].iloc[0]}"]) == [1, 2]
    assert all(sorted(set(_epochs_reported(folder))) == [1, 2] for folder in trial_folders.values())
    assert list(board["epochs"]) == [2, 2, 2] and list(board["best_epoch"].between(1, 2)) == [True] * 3
    # Nothing lost: Optuna's storage holds each searched trial exactly once, complete, with the leaderboard's values.
    url = f"sqlite:///{results / 'optuna.db'}"
    (name,) = optuna.study.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).trials
    searched = board[~board["is_control"]]
    assert len(trials) == len(searched) == 2
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert sorted(t.params["lambda1"] for t in trials) == pytest.approx(sorted(searched["lambda1"]))
    assert sorted(t.params["debug.indicator"] for t in trials) == sorted(searched["debug.indicator"])
    assert len({(t.params["lambda1"], t.params["debug.indicator"]) for t in trials}) == 2  # the resumed sampler did not draw a point again
    # Typed values end to end: the text choice is text, the unsearched lambda2 is the study's own.
    assert set(searched["debug.indicator"]) <= {"paper", "centred"} and searched["lambda2"].isna().all()
    final = pd.read_parquet(results / "final" / "final.parquet").set_index("model")
    best = searched.set_index("trial_id").loc[final.loc["debugged", "trial_id"]]
    assert final.loc["debugged", "debug.indicator"] == best["debug.indicator"] and final.loc["control", "debug.indicator"] == "paper"
    assert final.loc["debugged", "lambda2"] == pytest.approx(3.2e-4) and final.loc["debugged", "lambda1"] == pytest.approx(best["lambda1"])
    rerun = run_cli("rerun", str(results), "--trial", str(best.name))
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def _session_raylet_pid() -> int:
    import ray

    node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def _trial_pids(raylet: int) -> list[int]:
    """Processes of this session's cluster (children of its raylet) running a search trial's training loop."""
    pids = []
    for folder in glob.glob("/proc/[0-9]*"):
        try:
            command = Path(folder, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int(Path(folder, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if command.startswith("ray::ImplicitFunc") and parent == raylet:  # a Tune function trainable
            pids.append(int(Path(folder).name))
    return pids


def _kill_first_trial(results: Path, killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs the first trial's process once that trial has saved a checkpoint."""
    raylet = _session_raylet_pid()

    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if glob.glob(str(results / "_ray" / "search-*" / "trial-*" / "checkpoint_*" / "model.pt")):
                for pid in _trial_pids(raylet):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _study_with_a_killed_trial(smoke_study_results: Path, tmp_path: Path, stage: str, *overrides: str) -> tuple[Path, subprocess.CompletedProcess, list[int]]:
    """Run the smoke study to ``stage`` (its stages before the search cached) while the search's first trial's process is killed."""
    storage = tmp_path / "results"
    results = storage / "digits"
    copy_study_parts(smoke_study_results, results, (*CACHED_UP_TO_ANALYSIS, "prefix"))
    killed: list[int] = []
    killer = _kill_first_trial(results, killed)
    completed = run_stage(stage, "studies/digits.yaml", f"storage_path={storage}", *overrides)
    killer.join(timeout=5)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert killed, "no trial process was found to kill"
    return results, completed, killed


def test_a_killed_trial_resumes_from_its_checkpoint(ray_session, smoke_study_results, tmp_path):
    results, _, killed = _study_with_a_killed_trial(
        smoke_study_results, tmp_path, "search", "search.num_samples=2", "search.max_concurrent=1", "search.scheduler.asha=null", "debug.epochs=4", "debug.max_failures=2"
    )
    board = pd.read_parquet(results / "leaderboard.parquet")
    assert list(board["status"]) == ["completed", "completed"] and list(board["epochs"]) == [4, 4]
    assert all(Path(path, "model.pt").is_file() for path in board["checkpoint_path"])
    # The killed control resumed from its checkpoint: each epoch reported once, its checkpoints kept.
    control = next((results / "_ray").glob(f"search-*/trial-{board['trial_id'].iloc[0]}"))
    epochs = [json.loads(line)["epoch"] for line in (control / "result.json").read_text().splitlines()]
    assert sorted(set(epochs)) == [1, 2, 3, 4] and len(killed) >= 1


def test_a_failed_trial_does_not_end_the_study(ray_session, smoke_study_results, tmp_path):
    # No retries: killing the control's trial fails it; the search goes on, and the
    # final stage trains the control again for the full schedule.
    results, completed, _ = _study_with_a_killed_trial(
        smoke_study_results, tmp_path, "final", "search.num_samples=2", "search.max_concurrent=1", "debug.epochs=3", "debug.max_failures=0"
    )
    board = pd.read_parquet(results / "leaderboard.parquet")
    assert list(board["status"]) == ["error", "completed"] and board["is_control"].iloc[0]
    assert board["error"].iloc[0] and not board["error"].iloc[1]
    assert "final: training the control" in completed.stderr
    final = pd.read_parquet(results / "final" / "final.parquet")
    assert final["test_acc"].notna().all() and final.loc[2, "trial_id"] == board["trial_id"].iloc[1]


def _cfe_trials(results: Path) -> set[str]:
    return {folder.name for folder in (results / "_ray").glob("cfe-*/*") if folder.is_dir()}


def test_the_cfe_run_is_returned_after_a_crash_and_started_over_after_its_features_are_rewritten(ray_session, smoke_study_results, tmp_path):
    storage = tmp_path / "results"
    results = storage / "digits"
    copy_study_parts(smoke_study_results, results, ("config.yaml", "manifest.json", "images", "base", "features"))
    args = ["cfe", "studies/digits.yaml", "--smoke", "--set", f"storage_path={storage}"]
    env = {"RAY_ADDRESS": ray_address()}
    trained = run_cli(*args, env_extra=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    bank, trials = (results / "cfe" / "bank.pt").read_bytes(), _cfe_trials(results)
    assert len(trials) == 1
    # The stage crashed after its run finished: the run is returned (not trained again) and its bank is the stage's.
    shutil.rmtree(results / "cfe")
    returned = run_cli(*args, env_extra=env)
    assert returned.returncode == 0, returned.stderr[-3000:]
    assert _cfe_trials(results) == trials and (results / "cfe" / "bank.pt").read_bytes() == bank
    # The features are written again (--force features, as after --force base): the old run is not resumed.
    rewritten = run_cli(*args, "--force", "features", env_extra=env)
    assert rewritten.returncode == 0, rewritten.stderr[-3000:]
    assert "cfe: runs (an upstream stage reran)" in rewritten.stderr
    assert len(_cfe_trials(results)) == 1 and _cfe_trials(results) != trials and (results / "cfe" / "bank.pt").is_file()
