"""``raycf rerun RESULTS``: one trial's exact configuration again, in this process, beside its recorded metrics."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycf import storage
from raycf.artefacts import base_model_bytes, load_results_study
from raycf.config import with_values
from raycf.image_store import open_store
from raycf.errors import UserError
from raycf.leaderboard import read_leaderboard, sort_by_objective
from raycf.method.selection import best_epoch
from raycf.searcher import trial_values
from raycf.stages.jobs import debug_job
from raycf.training.debug import run_debug_training


def pick_trial(board: pd.DataFrame, trial_id: str | None, metric: str, mode: str) -> pd.Series:
    """The leaderboard row of ``trial_id``, or of the best finished trial when None."""
    if trial_id is None:
        finished = sort_by_objective(board[board["status"] != "error"], metric, mode)
        if finished.empty:
            raise UserError("leaderboard has no finished trial to rerun")
        return finished.iloc[0]
    chosen = board[board["trial_id"] == trial_id]
    if chosen.empty:
        raise UserError(f"--trial {trial_id}: no such trial (expected one of {', '.join(board['trial_id'].astype(str))})")
    return chosen.iloc[0]


@dataclass
class RerunReport:
    """A trial rerun beside its recorded metrics."""

    trial_id: str
    comparison: pd.DataFrame
    tolerance: float

    @property
    def matches(self) -> bool:
        return bool((self.comparison["difference"].abs() <= self.comparison["tolerance"]).all())


def rerun_trial(results: str, trial_id: str | None = None, device: str = "cpu") -> RerunReport:
    """Rerun one trial's exact configuration in this process (no Ray, no cluster).

    Same seed, same parameters, same number of epochs as recorded (a trial
    stopped early by ASHA reruns the epochs it ran), same G recomputed from
    the masks, the same tie rule for its best epoch.  The stated tolerance
    for accuracies is one validation image.
    """
    import torch

    results = storage.normalise_root(results)
    study = load_results_study(results)
    board = read_leaderboard(results)
    row = pick_trial(board, trial_id, study.search.metric, study.search.mode)
    if row["status"] == "error" or int(row["epochs"]) == 0:
        raise UserError(f"trial {row['trial_id']} has no finished epoch to compare with (status {row['status']})")
    params = trial_values(row, board.attrs["parameters"])
    trial = with_values(study, {**params, "debug.epochs": int(row["epochs"]), "debug.use_gpu": device == "cuda"})
    job = debug_job(trial, results, base_model_bytes(results), print_epochs=False)  # on the prefix cache when the trial was
    torch.set_num_threads(1)  # as in a one-CPU Ray worker: same reduction order, same numbers
    with tempfile.TemporaryDirectory() as folder:
        rerun = run_debug_training(job, name="rerun", storage_path=folder, workers=0)
    best = best_epoch(rerun.history, study.search.metric, study.search.mode)
    one_image = 1.0 / max(len(open_store(job.images).labels("val")), 1)
    rows = []
    for metric, tolerance in (("val_acc", one_image), ("train_acc", one_image), ("best_epoch", 0), ("train_loss", 1e-3)):
        recorded, again = float(row[metric]), float(best.get(metric if metric != "best_epoch" else "epoch", np.nan))
        rows.append({"metric": metric, "recorded": recorded, "rerun": again, "difference": again - recorded, "tolerance": tolerance})
    return RerunReport(trial_id=str(row["trial_id"]), comparison=pd.DataFrame(rows), tolerance=one_image)
