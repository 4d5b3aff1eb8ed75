"""search.deterministic: one trial at a time, so ASHA's stop decisions and TPE's proposals follow trial order and a rerun reproduces the search;
every trial keeps its validation predictions for McNemar's test."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import run_stage

# Three trials of three epochs, ASHA deciding after the first epoch: stops are possible, and the order decides them.
SETTINGS = ("search.deterministic=true", "search.num_samples=3", "search.max_concurrent=2", "debug.epochs=3", "search.scheduler.asha.grace_period=1")
COMPARED = ["trial_order", "status", "lambda1", "lambda2", "tau", "freq_threshold", "val_acc", "val_loss", "best_epoch", "epochs"]


def _search_copy(smoke_study_results, folder) -> pd.DataFrame:
    results = folder / "results" / "digits"
    results.mkdir(parents=True)
    for name in ("config.yaml", "manifest.json", "images", "base", "features", "cfe", "masks", "analysis", "prefix"):
        path = smoke_study_results / name
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, results / name)
    done = run_stage("search", "studies/digits.yaml", f"storage_path={folder / 'results'}", *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    board = pd.read_parquet(results / "leaderboard.parquet")
    board["trial_order"] = pd.to_datetime(board["started_at"]).rank(method="first").astype(int)
    return board.sort_values("trial_order").reset_index(drop=True)


def test_a_deterministic_search_reruns_to_the_same_leaderboard(smoke_study_results, tmp_path):
    first = _search_copy(smoke_study_results, tmp_path / "first")
    second = _search_copy(smoke_study_results, tmp_path / "second")
    assert len(first) == 3 and first["is_control"].iloc[0]
    pd.testing.assert_frame_equal(first[COMPARED], second[COMPARED])
    # one trial at a time: each started after the one before it finished
    starts, ends = pd.to_datetime(first["started_at"]), pd.to_datetime(first["finished_at"])
    assert (starts.iloc[1:].to_numpy() >= ends.iloc[:-1].to_numpy()).all()
    # every trial kept the validation predictions of its best epoch: they reproduce its val_acc
    labels = pd.read_parquet(smoke_study_results / "images" / "val.parquet")["label"].to_numpy()
    for row in first.to_dict("records"):
        predicted = np.load(io.BytesIO(open(f"{row['checkpoint_path']}/val_pred.npy", "rb").read()))
        assert predicted.dtype == np.uint16 and len(predicted) == len(labels)
        assert (predicted == labels).mean() == pytest.approx(row["val_acc"], abs=1e-12)
