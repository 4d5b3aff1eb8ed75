"""Leaderboard rows, ordering, Pareto front and formats (pure pandas; no Ray)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from raycf.errors import UserError
from raycf.search.leaderboard import (
    TrialRecord,
    leaderboard_frame,
    pareto_front,
    read_leaderboard,
    render,
    sort_by_objective,
    trial_row,
    write_leaderboard,
)

NAMES = ["lambda1", "lambda2", "tau"]
VERSIONS = {"raycf": "0.1.0", "ray": "2.60.0", "torch": "2.14.1"}


def _record(trial_id, lambda1, accs, det=0.7, status="completed"):
    history = [{"epoch": i + 1, "val_acc": a, "train_acc": 0.9 + i / 100, "train_loss": 1.0 - i / 10, "det_auroc": det, "checkpoint_path": f"/ck/{trial_id}/{i + 1}"} for i, a in enumerate(accs)]
    return TrialRecord(trial_id=trial_id, params={"lambda1": lambda1, "lambda2": 0.0 if lambda1 == 0 else 1e-3, "tau": 0.9}, status=status, history=history)


def _frame():
    rows = [
        trial_row(_record("c", 0.0, [0.90, 0.92, 0.91], det=0.80), NAMES, "val_acc", "max", 0, VERSIONS),
        trial_row(_record("a", 0.1, [0.93, 0.95], det=0.70, status="stopped"), NAMES, "val_acc", "max", 0, VERSIONS),
        trial_row(_record("b", 0.2, [0.94, 0.94, 0.90], det=0.85), NAMES, "val_acc", "max", 0, VERSIONS),
        trial_row(TrialRecord("e", {"lambda1": 0.3, "lambda2": 0.1, "tau": 0.5}, status="error", error="boom"), NAMES, "val_acc", "max", 0, VERSIONS),
    ]
    return leaderboard_frame(rows, NAMES)


def test_rows_are_flat_with_control_reference():
    frame = _frame()
    assert list(frame.columns[:6]) == ["trial_id", "status", "is_control", "lambda1", "lambda2", "tau"]
    control = frame.set_index("trial_id").loc["c"]
    assert control["is_control"] and control["val_acc"] == 0.92 and control["best_epoch"] == 2 and control["epochs"] == 3
    b = frame.set_index("trial_id").loc["b"]
    assert b["val_acc"] == 0.94 and b["val_acc_last"] == 0.90 and b["best_epoch"] == 1
    assert b["checkpoint_path"] == "/ck/b/1" and b["train_acc"] == pytest.approx(0.90)
    assert b["val_acc_gain"] == pytest.approx(0.02) and b["control_val_acc"] == 0.92
    error = frame.set_index("trial_id").loc["e"]
    assert error["status"] == "error" and math.isnan(error["val_acc"]) and error["epochs"] == 0 and error["error"] == "boom"
    assert frame["seed"].dtype == "int64" and frame["is_control"].dtype == bool


def test_sort_and_pareto():
    frame = _frame()
    assert list(sort_by_objective(frame)["trial_id"]) == ["a", "b", "c", "e"]
    front = pareto_front(frame, "val_acc", "det_auroc")
    assert list(front["trial_id"]) == ["a", "b"]  # c is dominated by b; e has no values


def test_round_trip_and_formats(tmp_path):
    frame = _frame()
    write_leaderboard(frame, str(tmp_path), NAMES)
    again = read_leaderboard(str(tmp_path))
    assert again.attrs["parameters"] == NAMES
    pd.testing.assert_frame_equal(again, frame, check_like=False)
    records = json.loads(render(again, "json"))
    assert [r["trial_id"] for r in records] == ["c", "a", "b", "e"] and records[3]["val_acc"] is None
    table = render(sort_by_objective(again), "table")
    assert table.splitlines()[0].split()[:5] == ["trial_id", "status", "lambda1", "lambda2", "tau"]
    assert render(again, "csv").splitlines()[0].startswith("trial_id,status,is_control,lambda1")


def test_missing_leaderboard_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no leaderboard.parquet"):
        read_leaderboard(str(tmp_path))


def test_ties_go_to_the_lower_validation_loss():
    rows = []
    for trial_id, loss in (("first", 0.30), ("second", 0.20), ("third", 0.20)):
        record = _record(trial_id, 0.1, [0.9])
        record.history[0]["val_loss"] = loss
        rows.append(trial_row(record, NAMES, "val_acc", "max", 0, VERSIONS))
    frame = leaderboard_frame(rows, NAMES)
    assert list(sort_by_objective(frame)["trial_id"]) == ["second", "third", "first"]
