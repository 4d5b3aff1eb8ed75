"""``raycf rerun RESULTS``: one trial's exact configuration again, in this process, beside its recorded metrics."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import base_model_bytes, load_results_study
from raycf.config import with_values
from raycf.data.image_store import open_store
from raycf.errors import UserError
from raycf.search.leaderboard import read_leaderboard, sort_by_objective
from raycf.method.selection import best_epoch
from raycf.search.searcher import trial_values
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


# How far a rerun on another device or in other arithmetic may land from the
# recorded run and still count as the same trial: accuracies within 3 points
# (or 3 validation images), the training loss within 5 %, the best epoch
# anywhere (near-equal epochs swap under rounding).  Same device and precision:
# one validation image, 1e-3 in loss, the same epoch.
CROSS_ACCURACY_POINTS = 0.03
CROSS_ACCURACY_IMAGES = 3
CROSS_LOSS_RELATIVE = 0.05


@dataclass(frozen=True)
class Conditions:
    """Where and in what arithmetic a run trained."""

    device: str
    precision: str

    def __str__(self) -> str:
        return f"{self.precision} on {self.device}"


def rerun_precision(recorded: str, device: str) -> str:
    """The precision a rerun on ``device`` uses: the recorded one where it runs there (bf16 autocast runs on CPUs; fp16 needs CUDA)."""
    if recorded in ("bf16", "fp32") or (recorded == "fp16" and device == "cuda"):
        return recorded
    return "fp32"


@dataclass
class RerunReport:
    """A trial rerun beside its recorded metrics.

    ``comparison`` holds, per metric, the recorded and rerun values, their
    difference, ``tolerance`` (same conditions) and ``explained_tolerance``
    (what a device or precision change explains).
    """

    trial_id: str
    comparison: pd.DataFrame
    tolerance: float
    recorded: Conditions = Conditions("", "")
    rerun: Conditions = Conditions("", "")

    @property
    def matches(self) -> bool:
        """Within the same-conditions tolerance."""
        return bool((self.comparison["difference"].abs() <= self.comparison["tolerance"]).all())

    @property
    def conditions_differ(self) -> bool:
        return self.recorded != self.rerun

    @property
    def explained(self) -> bool:
        """Outside the same-conditions tolerance, within what the changed device or precision explains."""
        within = (self.comparison["difference"].abs() <= self.comparison["explained_tolerance"]).all()
        return not self.matches and self.conditions_differ and bool(within)

    @property
    def verdict(self) -> str:
        """One line: matches, differs as the changed device/precision explains, or does not match."""
        if self.matches:
            return "matches the recorded run"
        if self.explained:
            return (
                f"differs from the recorded run ({self.recorded}) as the rerun's {self.rerun} explains: every difference "
                "is within the explained tolerance (not a failure)"
            )
        return "DOES NOT match the recorded run within tolerance"


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
    recorded = recorded_conditions(row, study)
    rerun_conditions = Conditions(device, rerun_precision(recorded.precision, device))
    trial = with_values(
        study, {**params, "debug.epochs": int(row["epochs"]), "debug.use_gpu": device == "cuda", "model.precision": rerun_conditions.precision}
    )
    job = debug_job(trial, results, base_model_bytes(results), print_epochs=False)  # on the prefix cache when the trial was
    torch.set_num_threads(1)  # as in a one-CPU Ray worker: same reduction order, same numbers
    with tempfile.TemporaryDirectory() as folder:
        rerun = run_debug_training(job, name="rerun", storage_path=folder, workers=0)
    best = best_epoch(rerun.history, study.search.metric, study.search.mode)
    one_image = 1.0 / max(len(open_store(job.images).labels("val")), 1)
    cross_accuracy = max(CROSS_ACCURACY_POINTS, CROSS_ACCURACY_IMAGES * one_image)
    rows = []
    for metric, tolerance, explained in (
        ("val_acc", one_image, cross_accuracy),
        ("train_acc", one_image, cross_accuracy),
        ("best_epoch", 0, float(row["epochs"])),
        ("train_loss", 1e-3, CROSS_LOSS_RELATIVE * abs(float(row["train_loss"]))),
    ):
        value, again = float(row[metric]), float(best.get(metric if metric != "best_epoch" else "epoch", np.nan))
        rows.append({"metric": metric, "recorded": value, "rerun": again, "difference": again - value, "tolerance": tolerance, "explained_tolerance": explained})
    return RerunReport(trial_id=str(row["trial_id"]), comparison=pd.DataFrame(rows), tolerance=one_image, recorded=recorded, rerun=rerun_conditions)


def recorded_conditions(row: pd.Series, study) -> Conditions:
    """The device and precision a leaderboard row records; an older leaderboard without them: the study's CPU defaults."""
    device = str(row.get("device") or "") or ("cuda" if study.debug.use_gpu else "cpu")
    precision = str(row.get("precision") or "") or (study.model.precision if study.model.precision != "auto" else ("bf16" if device == "cuda" else "fp32"))
    return Conditions(device, precision)
