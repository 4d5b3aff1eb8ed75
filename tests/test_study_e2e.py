"""The whole digits study with --smoke, then what users do with its results folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from collections import Counter

import pandas as pd
import pytest

from conftest import REPO, run_cli
from raycf.models.checkpoint import load_classifier_checkpoint
from raycf.search.leaderboard import METRIC_COLUMNS, sort_by_objective
from raycf.outputs.report.blocks import GALLERY_GROUPS, GALLERY_PER_GROUP

EXPECTED_FILES = [
    "config.yaml",
    "manifest.json",
    "base/model.pt",
    "base/_stage.json",
    "cfe/_stage.json",
    "masks/_stage.json",
    "analysis/global_mc.parquet",
    "analysis/detection.parquet",
    "analysis/error_scores.parquet",
    "leaderboard.parquet",
    "optuna.db",
    "search/_stage.json",
    "final/final.parquet",
    "final/class_recall.parquet",
    "final/predictions.parquet",
    "final/table2.parquet",
    "final/table3.parquet",
]


def test_results_folder_holds_every_artefact(smoke_study_results):
    missing = [name for name in EXPECTED_FILES if not (smoke_study_results / name).exists()]
    assert not missing
    manifest = json.loads((smoke_study_results / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"base", "features", "cfe", "masks", "analyze", "search", "final"}


def test_leaderboard_columns_and_types_without_ray(smoke_study_results):
    script = textwrap.dedent(
        f"""
        import json, sys
        import pandas as pd
        board = pd.read_parquet({str(smoke_study_results / "leaderboard.parquet")!r})
        assert "ray" not in sys.modules, "reading the leaderboard imported ray"
        print(json.dumps({{"columns": list(board.columns), "dtypes": {{c: str(t) for c, t in board.dtypes.items()}}, "rows": board.to_dict("records")}}, default=str))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stderr
    board = json.loads(completed.stdout)
    columns, dtypes, rows = board["columns"], board["dtypes"], board["rows"]
    assert columns[:7] == ["trial_id", "status", "is_control", "lambda1", "lambda2", "tau", "freq_threshold"]
    assert set(METRIC_COLUMNS) <= set(columns)
    assert len(rows) == 2  # --smoke: two trials, the control first
    assert rows[0]["is_control"] is True and rows[0]["lambda1"] == 0 and rows[0]["lambda2"] == 0
    assert all(row["status"] == "completed" and row["epochs"] == 2 for row in rows)
    for column in ("lambda1", "lambda2", "tau", "freq_threshold", "val_acc", "det_auroc", "time_total_s"):
        assert dtypes[column] == "float64"
    for column in ("best_epoch", "epochs", "seed"):
        assert dtypes[column] == "int64"
    assert dtypes["is_control"] == "bool"


def test_every_leaderboard_checkpoint_exists_and_is_the_best_epochs(smoke_study_results):
    board = pd.read_parquet(smoke_study_results / "leaderboard.parquet")
    for row in board.to_dict("records"):
        checkpoint = load_classifier_checkpoint(f"{row['checkpoint_path']}/model.pt", expected_arch="vgg_tiny", expected_classes=10)
        assert checkpoint.metrics["epoch"] == row["best_epoch"]
        assert checkpoint.metrics["val_acc"] == pytest.approx(row["val_acc"])
        assert checkpoint.metrics["val_loss"] == pytest.approx(row["val_loss"])


def test_optuna_storage_is_readable_by_optuna(smoke_study_results):
    import optuna

    names = optuna.study.get_all_study_names(f"sqlite:///{smoke_study_results / 'optuna.db'}")
    assert len(names) == 1
    study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{smoke_study_results / 'optuna.db'}")
    board = pd.read_parquet(smoke_study_results / "leaderboard.parquet")
    searched = board[~board["is_control"]]
    assert len(study.trials) == len(searched) == 1  # the control is not Optuna's
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.params["lambda1"] == pytest.approx(float(searched["lambda1"].iloc[0]))
    assert trial.value == pytest.approx(float(searched["val_acc"].iloc[0]))  # the best epoch, as ranked


def test_leaderboard_command_formats(smoke_study_results):
    as_json = run_cli("leaderboard", str(smoke_study_results), "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert [r["val_acc"] for r in records] == sorted((r["val_acc"] for r in records), reverse=True)
    top = run_cli("leaderboard", str(smoke_study_results), "--top", "1")
    assert top.returncode == 0 and len(top.stdout.strip().splitlines()) == 2
    csv = run_cli("leaderboard", str(smoke_study_results), "--pareto", "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.startswith("trial_id,status")
    bad = run_cli("leaderboard", str(smoke_study_results / "nowhere"))
    assert bad.returncode == 2 and "no leaderboard.parquet" in bad.stderr


def test_rerun_best_reproduces_the_recorded_validation_accuracy(smoke_study_results):
    completed = run_cli("rerun", str(smoke_study_results), "--best", "--device", "cpu")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "matches the recorded run" in completed.stdout
    val_row = next(line for line in completed.stdout.splitlines() if line.strip().startswith("val_acc"))
    recorded, rerun = (float(value) for value in val_row.split()[1:3])
    assert rerun == pytest.approx(recorded, abs=1e-9)


def test_final_tables_compare_the_best_searched_trial_with_the_control(smoke_study_results):
    final = pd.read_parquet(smoke_study_results / "final" / "final.parquet")
    assert list(final["model"]) == ["base", "control", "debugged"]
    assert final[["train_acc", "val_acc", "test_acc"]].notna().all().all()
    board = pd.read_parquet(smoke_study_results / "leaderboard.parquet")
    assert "test_acc" not in board.columns  # the search never saw the test split
    best = sort_by_objective(board[~board["is_control"]]).iloc[0]
    assert final.loc[2, "trial_id"] == best["trial_id"] != board.loc[board["is_control"], "trial_id"].iloc[0]
    assert final.loc[2, "val_acc"] == pytest.approx(best["val_acc"])
    ranked = sort_by_objective(board)
    control_won = bool(ranked["is_control"].iloc[0])
    assert (final["control_beats_searched"] == control_won).all()
    printed = (smoke_study_results.parent.parent / "stdout.txt").read_text()
    assert ("The control (plain fine-tuning" in printed) == control_won == bool(final.loc[0, "verdict"])


def test_the_test_split_is_read_once_per_model(smoke_study_results):
    """Base (its features), control and debugged (the final stage) read every test image once; the report only draws a few."""
    reads = Counter(line.split()[1] for line in (smoke_study_results.parent.parent / "reads.log").read_text().splitlines() if line.startswith("test "))
    predictions = pd.read_parquet(smoke_study_results / "final" / "predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    assert set(test["model"]) == {"base", "control", "debugged"}
    images = test["image_index"].nunique()
    assert len(reads) == images  # every test image was read ...
    assert min(reads.values()) == 3  # ... once per model
    drawn = [index for index, count in reads.items() if count == 4]  # the report's gallery
    assert max(reads.values()) <= 4 and len(drawn) <= len(GALLERY_GROUPS) * GALLERY_PER_GROUP
    table2 = pd.read_parquet(smoke_study_results / "final" / "table2.parquet").set_index("model")
    for model, rows in test.groupby("model"):
        assert table2.loc[model, "test_acc"] == pytest.approx((rows["pred"] == rows["label"]).mean())


def test_a_cached_study_reruns_nothing(ray_session, smoke_study_results):
    from conftest import ray_address

    completed = run_cli("study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={smoke_study_results.parent}", env_extra={"RAY_ADDRESS": ray_address()})
    assert completed.returncode == 0, completed.stderr[-2000:]
    skipped = [line for line in completed.stderr.splitlines() if "skipped, cached" in line]
    assert len(skipped) >= 7 and "runs (" not in completed.stderr


def test_a_study_prints_raycfs_lines_only_and_ray_logs_to_a_file(smoke_study_results):
    folder = smoke_study_results.parent.parent
    stderr = (folder / "stderr.txt").read_text().splitlines()
    stdout = (folder / "stdout.txt").read_text().splitlines()
    assert [line for line in stderr if not line.startswith("[raycf] ")] == []  # no Ray chatter on the screen
    assert all(line.startswith(("Table ", "  ", "The control")) or not line for line in stdout)  # Tables 2 and 3
    assert len(stderr) + len(stdout) <= 60  # a smoke study: two trials (`python -m benchmarks demo` counts the whole demo)
    trial_lines = [line for line in stderr if "search: trial " in line]
    assert len(trial_lines) == 4 and sum("completed in" in line for line in trial_lines) == 2  # a line when each trial starts and ends
    assert any("stages done in images" in line for line in stderr)
    assert (smoke_study_results / "logs" / "ray.log").stat().st_size > 0
