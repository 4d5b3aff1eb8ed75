"""Faults in a running study: the driver killed mid-search, and a trial's process killed mid-trial."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, ray_address, run_cli

SEARCH_SETTINGS = ["search.num_samples=2", "search.max_concurrent=1", "search.scheduler.asha=null"]


def _copy_cached_stages(source: Path, target: Path) -> None:
    """The smoke study's base…analyze stages, so a new search starts from cached results."""
    target.mkdir(parents=True)
    for name in ("config.yaml", "manifest.json", "base", "features", "cfe", "masks", "analysis"):
        path = source / name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / name)


def _finished_trials(results: Path) -> list[str]:
    """Trial ids that the search's saved driver state records as finished."""
    from raycf.tune_state import finished_trials, read_snapshot

    return [trial for snapshot in glob.glob(str(results / "_ray" / "search-*-driver" / "state.zip")) for trial in finished_trials(read_snapshot(snapshot))]


def test_resume_after_the_driver_is_killed(ray_session, smoke_study_results, tmp_path):
    import optuna

    storage = tmp_path / "results"
    results = storage / "digits"
    _copy_cached_stages(smoke_study_results, results)
    args = ["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={storage}", *SEARCH_SETTINGS]
    env = {**os.environ, "RAY_ADDRESS": ray_address(), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "raycf.cli", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _finished_trials(results):
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
    first = _finished_trials(results)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    killed_at = time.time()
    assert not (results / "search" / "_stage.json").exists()  # the stage did not finish

    resumed = run_cli(*args, "--resume", env_extra={"RAY_ADDRESS": ray_address()})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted search" in resumed.stderr

    board = pd.read_parquet(results / "leaderboard.parquet")
    assert len(board) == 2 and (board["status"] == "completed").all()
    assert set(first) <= set(board["trial_id"])
    # A trial that had finished was not run again: no checkpoint written after the kill, each epoch reported once.
    for trial_id in first:
        trial_folder = next((results / "_ray").glob(f"search-*/trial-{trial_id}"))
        checkpoints = [path for path in trial_folder.rglob("*") if "checkpoint_" in str(path.relative_to(trial_folder))]
        assert checkpoints and max(path.stat().st_mtime for path in checkpoints) < killed_at
        epochs = [json.loads(line)["epoch"] for line in (trial_folder / "result.json").read_text().splitlines()]
        assert epochs == list(range(1, len(epochs) + 1))
    # Optuna's storage holds each searched trial exactly once, all complete.
    url = f"sqlite:///{results / 'optuna.db'}"
    (name,) = optuna.study.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).trials
    searched = board[~board["is_control"]]
    assert len(trials) == len(searched) == 1
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert sorted(t.params["lambda1"] for t in trials) == pytest.approx(sorted(searched["lambda1"]))


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


def _study_with_a_killed_trial(smoke_study_results: Path, tmp_path: Path, *overrides: str) -> tuple[Path, subprocess.CompletedProcess, list[int]]:
    """Run the smoke study's search (earlier stages cached) while its first trial's process is killed."""
    storage = tmp_path / "results"
    results = storage / "digits"
    _copy_cached_stages(smoke_study_results, results)
    killed: list[int] = []
    killer = _kill_first_trial(results, killed)
    args = ["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={storage}", *overrides]
    completed = run_cli(*args, env_extra={"RAY_ADDRESS": ray_address()})
    killer.join(timeout=5)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert killed, "no trial process was found to kill"
    return results, completed, killed


def test_a_killed_trial_resumes_from_its_checkpoint(ray_session, smoke_study_results, tmp_path):
    results, _, killed = _study_with_a_killed_trial(
        smoke_study_results, tmp_path, "search.num_samples=2", "search.max_concurrent=1", "search.scheduler.asha=null", "debug.epochs=4", "debug.max_failures=2"
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
        smoke_study_results, tmp_path, "search.num_samples=2", "search.max_concurrent=1", "debug.epochs=3", "debug.max_failures=0"
    )
    board = pd.read_parquet(results / "leaderboard.parquet")
    assert list(board["status"]) == ["error", "completed"] and board["is_control"].iloc[0]
    assert board["error"].iloc[0] and not board["error"].iloc[1]
    assert "final: training the control" in completed.stderr
    final = pd.read_parquet(results / "final" / "final.parquet")
    assert final["test_acc"].notna().all() and final.loc[2, "trial_id"] == board["trial_id"].iloc[1]
