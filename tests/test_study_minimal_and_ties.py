"""Two whole studies beyond the digits smoke study: a study file that names only its data and model, and a search whose
every epoch of every trial ties."""

from __future__ import annotations


import pandas as pd
import yaml

from conftest import CACHED_UP_TO_ANALYSIS, copy_study_parts, ray_address, run_cli, run_stage
from raycf.models.checkpoint import load_classifier_checkpoint


def test_a_study_file_with_only_data_and_model_runs_its_smoke_study(ray_session, imagefolder_root, tmp_path):
    study_file = tmp_path / "minimal.yaml"
    study = {"name": "minimal", "storage_path": str(tmp_path / "results"), "data": {"kind": "imagefolder", "root": str(imagefolder_root)}, "model": {"arch": "resnet18"}}
    study_file.write_text(yaml.safe_dump(study))
    completed = run_cli("study", str(study_file), "--smoke", env_extra={"RAY_ADDRESS": ray_address()})
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "search: search.space not given: searching the default space (lambda1 {'loguniform'" in completed.stderr
    results = tmp_path / "results" / "minimal"
    board = pd.read_parquet(results / "leaderboard.parquet")
    assert list(board.columns[3:7]) == ["lambda1", "lambda2", "tau", "freq_threshold"] and len(board) == 2
    assert (results / "final" / "final.parquet").is_file() and (results / "report" / "index.html").is_file()


def test_a_search_whose_epochs_all_tie_keeps_every_best_checkpoint(ray_session, smoke_study_results, tmp_path):
    storage = tmp_path / "results"
    results = storage / "digits"
    copy_study_parts(smoke_study_results, results, CACHED_UP_TO_ANALYSIS)
    # Only the head, at a vanishing learning rate: no weight moves, so every epoch of every trial has the same val_acc and val_loss.
    settings = ["debug.trainable=head", "debug.lr=1.0e-12", "debug.epochs=2", "search.num_samples=3", "search.scheduler.asha=null"]
    completed = run_stage("final", "studies/digits.yaml", f"storage_path={storage}", *settings)  # the search and final stages (no report)
    assert completed.returncode == 0, completed.stderr[-3000:]
    board = pd.read_parquet(results / "leaderboard.parquet")
    assert len(board) == 3 and board["val_acc"].nunique() == 1 and board["val_loss"].nunique() == 1
    for row in board.to_dict("records"):
        assert row["best_epoch"] == 1 and row["epochs"] == 2  # the rule: the earliest of tied epochs
        assert load_classifier_checkpoint(f"{row['checkpoint_path']}/model.pt").metrics["epoch"] == 1  # and it was kept
    final = pd.read_parquet(results / "final" / "final.parquet").set_index("model")
    assert final.loc["debugged", "trial_id"] == board.loc[~board["is_control"], "trial_id"].iloc[0]  # a searched trial: the earlier of the tied
    assert not final["control_beats_searched"].any()  # tied, not beaten
