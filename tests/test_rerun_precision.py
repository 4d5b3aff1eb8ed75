"""``raycf rerun`` of what a cluster trained: the recorded precision where the CPU runs it, and a difference it explains reported as such."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from raycf.search.leaderboard import read_leaderboard, write_leaderboard
from raycf.outputs.rerun import Conditions, RerunReport, rerun_precision, rerun_trial


def _report(differences: dict[str, float], recorded: Conditions, rerun: Conditions) -> RerunReport:
    tolerances = {"val_acc": (0.01, 0.03), "train_acc": (0.01, 0.03), "best_epoch": (0, 2), "train_loss": (1e-3, 0.05)}
    rows = [
        {"metric": name, "recorded": 0.5, "rerun": 0.5 + differences.get(name, 0.0), "difference": differences.get(name, 0.0), "tolerance": same, "explained_tolerance": explained}
        for name, (same, explained) in tolerances.items()
    ]
    return RerunReport("t", pd.DataFrame(rows), 0.01, recorded, rerun)


def test_the_verdict_tells_a_match_an_explained_difference_and_a_mismatch():
    cuda, cpu = Conditions("cuda", "bf16"), Conditions("cpu", "bf16")
    assert _report({"val_acc": 0.005}, cuda, cpu).verdict == "matches the recorded run"
    explained = _report({"val_acc": 0.02, "best_epoch": 1}, cuda, cpu)
    assert not explained.matches and explained.explained and "as the rerun's bf16 on cpu explains" in explained.verdict
    assert "(bf16 on cuda)" in explained.verdict
    # The same difference on the same device and precision is a real mismatch, and so is one beyond the explained tolerance.
    assert not _report({"val_acc": 0.02}, cpu, cpu).explained
    beyond = _report({"val_acc": 0.2}, cuda, cpu)
    assert not beyond.explained and beyond.verdict.startswith("DOES NOT match")


def test_the_rerun_keeps_the_recorded_precision_where_the_device_runs_it():
    assert rerun_precision("bf16", "cpu") == "bf16"  # bf16 autocast runs on CPUs
    assert rerun_precision("fp16", "cpu") == "fp32" and rerun_precision("fp16", "cuda") == "fp16"
    assert rerun_precision("fp32", "cpu") == "fp32"


def test_a_trial_recorded_as_bf16_on_cuda_reruns_within_tolerance_on_the_cpu(smoke_study_results, tmp_path: Path):
    """The smoke study's best trial, its leaderboard row marked as trained in bf16 on a GPU; its metrics are those the CPU recorded in fp32."""
    results = tmp_path / "digits"
    shutil.copytree(smoke_study_results, results, ignore=shutil.ignore_patterns("_ray", "report"))
    board = read_leaderboard(str(results))
    assert set(board["device"]) == {"cpu"} and set(board["precision"]) == {"fp32"}  # what the trials recorded
    board["device"], board["precision"] = "cuda", "bf16"
    write_leaderboard(board, str(results), board.attrs["parameters"])

    report = rerun_trial(str(results))
    assert report.recorded == Conditions("cuda", "bf16") and report.rerun == Conditions("cpu", "bf16")
    comparison = report.comparison.set_index("metric")
    assert (comparison["difference"].abs() <= comparison["explained_tolerance"]).all(), comparison
    assert comparison.loc["val_acc", "explained_tolerance"] == pytest.approx(max(0.03, 3 * report.tolerance))
    assert report.matches or report.explained
