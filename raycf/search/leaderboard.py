"""The search's leaderboard: one flat Parquet row per trial, and how to read it.

This module never imports Ray: ``raycf leaderboard`` (and pandas or DuckDB)
read a results folder, local or ``s3://``, without a cluster.

Columns of ``leaderboard.parquet`` (one row per trial, stopped and errored
trials included):

=====================  ===========================================================
column                 meaning
=====================  ===========================================================
``trial_id``           Ray Tune trial id
``status``             ``completed``, ``stopped`` (early, by ASHA), ``error``, ``running``
``is_control``         true for the λ1 = λ2 = 0 fixed first point (plain fine-tuning)
(each parameter)       one column per searched parameter under its own name
                       (``lambda1``, ``lambda2``, ``tau``, ``freq_threshold``, ...)
``val_acc``            best validation accuracy over the trial's epochs (the objective
                       unless ``search.metric`` names another)
``val_acc_last``       validation accuracy of the last epoch run
``val_loss``           validation loss at the best epoch (breaks ties of ``val_acc``)
``best_epoch``         epoch of ``val_acc``; ``epochs``: epochs run
``train_acc``          training accuracy at the best epoch; ``train_loss`` likewise
``det_auroc``          AUROC of the trial's MC-agreement score for "is an error" on val,
                       with the trial's τ and f; ``det_aupr``; ``maxsoftmax_auroc``
                       (the max-softmax baseline on the same images)
``g_size``             mean size of the global MC sets G_c for the trial's τ and f
``control_val_acc``    the control's ``val_acc``; ``val_acc_gain`` = val_acc − that
``time_total_s``       Tune's time of the trial (its reported iterations); ``started_at``, ``finished_at`` (UTC)
``wall_s``             the trial's wall time as the driver saw it, from its creation (its process
                       start included) to its end (retries included)
``epochs_s``           the sum of its epochs' times (``epoch_s``): ``wall_s − epochs_s`` is its overhead
``checkpoint_path``    folder of the best epoch's checkpoint (``model.pt`` inside); the
                       checkpoint the trial kept, so it exists (one tie rule everywhere);
                       a full URI (``s3://...``) when the results folder is one
``seed``               the study seed; ``config_hash``: hash of the trial's resolved study
``raycf_version``,     versions that produced the row (``torch_version``: the trial's own process's)
``ray_version``,
``torch_version``
``device``             where the trial trained (``cuda``, ``cpu``); ``precision``: its arithmetic
                       (``bf16``, ``fp16``, ``fp32``); ``raycf rerun`` reruns with them where it can
``error``              first line of the error of a failed trial
``val_worst_group_acc`` a study with groups (``data.plant``, ``data.groups``): the lowest
                       group accuracy on val at the best epoch; ``val_mean_group_acc`` the
                       mean over groups (either can be ``search.metric``)
=====================  ===========================================================
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raycf.results import storage
from raycf.errors import UserError
from raycf.method.selection import as_number, best_epoch, rank_trials

LEADERBOARD_FILE = "leaderboard.parquet"
FIXED_COLUMNS = ("trial_id", "status", "is_control")
METRIC_COLUMNS = (
    "val_acc",
    "val_acc_last",
    "val_loss",
    "best_epoch",
    "epochs",
    "train_acc",
    "train_loss",
    "det_auroc",
    "det_aupr",
    "maxsoftmax_auroc",
    "g_size",
    "control_val_acc",
    "val_acc_gain",
    "time_total_s",
    "wall_s",
    "epochs_s",
    "started_at",
    "finished_at",
    "checkpoint_path",
    "seed",
    "config_hash",
    "raycf_version",
    "ray_version",
    "torch_version",
    "device",
    "precision",
    "error",
)
DETECTION_KEYS = ("det_auroc", "det_aupr", "maxsoftmax_auroc", "g_size")
GROUP_KEYS = ("val_worst_group_acc", "val_mean_group_acc")  # only in a study with groups (data.plant, data.groups)


@dataclass
class TrialRecord:
    """What the search knows about one trial (filled from Tune's callbacks)."""

    trial_id: str
    params: dict[str, Any]
    status: str = "running"
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    started_at: str = ""
    finished_at: str = ""
    time_total_s: float = 0.0
    started: float = 0.0  # unix time of its first start
    wall_s: float = float("nan")
    config_hash: str = ""

    @property
    def is_control(self) -> bool:
        return is_control(self.params)


def is_control(params: Mapping[str, Any]) -> bool:
    """λ1 = λ2 = 0: the control, plain fine-tuning."""
    return params.get("lambda1") == 0 and params.get("lambda2") == 0


def trial_row(record: TrialRecord, parameter_names: list[str], metric: str, mode: str, seed: int, versions: dict[str, str]) -> dict[str, Any]:
    """One flat leaderboard row."""
    best = best_epoch(record.history, metric, mode)
    last = record.history[-1] if record.history else {}
    row: dict[str, Any] = {"trial_id": record.trial_id, "status": record.status, "is_control": record.is_control}
    row.update({name: record.params.get(name) for name in parameter_names})  # as given: a number, a text choice, a boolean or None (not given)
    row.update(
        {
            "val_acc": as_number(best.get("val_acc")),
            "val_acc_last": as_number(last.get("val_acc")),
            "val_loss": as_number(best.get("val_loss")),
            "best_epoch": int(best.get("epoch", 0)),
            "epochs": int(last.get("epoch", 0)),
            "train_acc": as_number(best.get("train_acc")),
            "train_loss": as_number(best.get("train_loss")),
            **{key: as_number(last.get(key, best.get(key))) for key in DETECTION_KEYS},
            "time_total_s": float(record.time_total_s),
            "wall_s": float(record.wall_s),
            "epochs_s": float(sum(as_number(row.get("epoch_s")) for row in record.history)) if record.history else float("nan"),
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "checkpoint_path": str(best.get("checkpoint_path") or ""),
            "seed": int(seed),
            "config_hash": record.config_hash,
            "raycf_version": versions.get("raycf", ""),
            "ray_version": versions.get("ray", ""),
            "torch_version": str(last.get("torch") or versions.get("torch", "")),
            "device": str(last.get("device", "")),
            "precision": str(last.get("precision", "")),
            "error": record.error,
        }
    )
    for key in GROUP_KEYS:  # a study with groups: the worst and mean group accuracy at the best epoch
        if key in best:
            row[key] = as_number(best.get(key))
    if metric not in row:
        row[metric] = as_number(best.get(metric))
    return row


def leaderboard_frame(rows: list[dict[str, Any]], parameter_names: list[str]) -> pd.DataFrame:
    """Rows → a DataFrame with the documented column order and the control's reference values."""
    columns = [*FIXED_COLUMNS, *parameter_names, *METRIC_COLUMNS]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns + [c for r in rows for c in r])))
    control = frame.loc[frame["is_control"] & frame["val_acc"].notna(), "val_acc"]
    frame["control_val_acc"] = float(control.iloc[0]) if len(control) else np.nan
    frame["val_acc_gain"] = frame["val_acc"] - frame["control_val_acc"]
    return frame.astype({"is_control": bool, "best_epoch": "int64", "epochs": "int64", "seed": "int64"})


def write_leaderboard(frame: pd.DataFrame, results: str, parameter_names: list[str]) -> None:
    """Write ``leaderboard.parquet`` atomically; the searched names go in its schema metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = {**(table.schema.metadata or {}), b"raycf.parameters": json.dumps(parameter_names).encode()}
    storage.write_table(table.replace_schema_metadata(metadata), storage.join_uri(results, LEADERBOARD_FILE))


def read_leaderboard(results: str) -> pd.DataFrame:
    """Read a results folder's leaderboard (local path or URI); ``frame.attrs["parameters"]`` names the searched columns."""
    location = storage.join_uri(storage.normalise_root(results), LEADERBOARD_FILE)
    if not storage.exists(location):
        raise UserError(f"{results}: no {LEADERBOARD_FILE} (expected the results folder of a study that ran its search)")
    table = storage.read_table(location)
    frame = table.to_pandas()
    frame.attrs["parameters"] = json.loads((table.schema.metadata or {}).get(b"raycf.parameters", b"[]"))
    return frame


def objective_of(results: str) -> tuple[str, str]:
    """(metric, mode) of the search, from the results folder's ``config.yaml``."""
    import yaml

    location = storage.join_uri(storage.normalise_root(results), "config.yaml")
    if not storage.exists(location):
        return "val_acc", "max"
    search = (yaml.safe_load(storage.read_text(location)) or {}).get("search", {})
    return search.get("metric", "val_acc"), search.get("mode", "max")


def sort_by_objective(frame: pd.DataFrame, metric: str = "val_acc", mode: str = "max") -> pd.DataFrame:
    """Best first under :mod:`raycf.method.selection`'s rule; trials without a value last.

    Ties of the objective (common: accuracy moves in steps of one validation
    image) go to the lower validation loss, then to the earlier trial.
    """
    return rank_trials(frame, metric, mode)


def pareto_front(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated in (x, y), both maximised; sorted by x descending."""
    valid = frame.dropna(subset=[x, y])
    values = valid[[x, y]].to_numpy(dtype=float)
    keep = []
    for xi, yi in values:
        dominated = np.any((values[:, 0] >= xi) & (values[:, 1] >= yi) & ((values[:, 0] > xi) | (values[:, 1] > yi)))
        keep.append(not dominated)
    return valid[np.array(keep, dtype=bool)].sort_values(x, ascending=False, kind="stable").reset_index(drop=True)


SUMMARY_COLUMNS = ("trial_id", "status", "val_acc", "val_acc_gain", "det_auroc", "best_epoch", "epochs")


def render(frame: pd.DataFrame, fmt: str, parameter_names: list[str] | None = None) -> str:
    """The leaderboard as a text table, CSV or JSON (records)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=2)
    names = parameter_names if parameter_names is not None else frame.attrs.get("parameters", [])
    shown = [c for c in (*SUMMARY_COLUMNS[:2], *names, *SUMMARY_COLUMNS[2:]) if c in frame.columns]
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        return frame[shown].to_string(index=False)


class LeaderboardWriter:
    """Keeps one :class:`TrialRecord` per trial and rewrites ``leaderboard.parquet`` as they change."""

    def __init__(self, results: str, parameter_names: list[str], metric: str, mode: str, epochs: int, seed: int, versions: dict[str, str]):
        self.results = results
        self.names = parameter_names
        self.metric, self.mode = metric, mode
        self.epochs = epochs  # a trial that ran fewer was stopped early
        self.seed = seed
        self.versions = versions
        self.records: dict[str, TrialRecord] = {}
        self.order: list[str] = []  # trial ids in creation order (the control first)

    def record(self, trial_id: str, params: dict[str, Any], config_hash: str = "") -> TrialRecord:
        """The record of a trial, created on first sight."""
        if trial_id not in self.records:
            self.records[trial_id] = TrialRecord(
                trial_id=trial_id, params={name: params.get(name) for name in self.names}, started_at=_now(), config_hash=config_hash, started=time.time()
            )
        return self.records[trial_id]

    def add_epoch(self, record: TrialRecord, epoch: dict[str, Any]) -> None:
        """An epoch's metrics; a rerun epoch (after a retry) replaces the earlier one."""
        record.history = [row for row in record.history if row.get("epoch") != epoch.get("epoch")] + [epoch]

    def add_checkpoint(self, record: TrialRecord, path: str) -> None:
        """The checkpoint saved with the trial's latest epoch."""
        if record.history:
            record.history[-1]["checkpoint_path"] = path

    def finish(self, record: TrialRecord, status: str, error: str = "") -> None:
        record.status = status
        record.error = error
        record.finished_at = _now()
        if record.started:
            record.wall_s = time.time() - record.started
        self.write()

    def status_of_finished(self, record: TrialRecord) -> str:
        """``completed`` if the trial ran every epoch, else ``stopped`` (ASHA)."""
        epochs = record.history[-1].get("epoch", 0) if record.history else 0
        return "completed" if epochs >= self.epochs else "stopped"

    def write(self) -> None:
        position = {trial_id: index for index, trial_id in enumerate(self.order)}
        records = sorted(self.records.values(), key=lambda record: position.get(record.trial_id, len(position)))
        rows = [trial_row(record, self.names, self.metric, self.mode, self.seed, self.versions) for record in records]
        write_leaderboard(leaderboard_frame(rows, self.names), self.results, self.names)


def _now() -> str:
    return datetime.now(tz=timezone.utc).isoformat(timespec="seconds")
