"""Searched values keep their type from the leaderboard to the trial's study; an unsearched parameter keeps the study's value; the prefix cache must match the job."""

from __future__ import annotations

import pandas as pd
import pytest

from raycf.config import study_from_mapping
from raycf.errors import UserError
from raycf.search.leaderboard import LeaderboardWriter, read_leaderboard
from raycf.search.searcher import control_point, field_value, parameter_names, trial_study, trial_values

SPACE = {"debug.indicator": {"choice": ["paper", "centred"]}, "lambda1": {"loguniform": [0.001, 0.1]}}  # lambda2 not searched


def _study(tmp_path):
    return study_from_mapping({"name": "x", "storage_path": str(tmp_path), "debug": {"lambda2": 3.2e-4}, "search": {"space": SPACE}})


def test_a_text_choice_and_a_boolean_survive_the_leaderboard_and_an_empty_cell_is_not_a_value(tmp_path):
    study = _study(tmp_path)
    names = [*parameter_names(study), "flag"]
    assert names[:3] == ["lambda1", "lambda2", "debug.indicator"]
    writer = LeaderboardWriter(str(tmp_path), names, "val_acc", "max", 2, 0, {})
    writer.order = ["control", "searched"]
    control = writer.record("control", {**control_point(study), "flag": False})
    searched = writer.record("searched", {"lambda1": 0.05, "debug.indicator": "centred", "flag": True})  # as Optuna proposes: no lambda2
    for record in (control, searched):
        writer.add_epoch(record, {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0})
        writer.finish(record, "completed")
    board = read_leaderboard(str(tmp_path))
    rows = {row["trial_id"]: row for _, row in board.iterrows()}
    got = trial_values(rows["searched"], names)
    assert got == {"lambda1": 0.05, "debug.indicator": "centred", "flag": True}
    assert type(got["debug.indicator"]) is str and type(got["flag"]) is bool and type(got["lambda1"]) is float
    assert trial_values(rows["control"], names) == {"lambda1": 0.0, "lambda2": 0.0, "debug.indicator": "paper", "flag": False}
    trial = trial_study(study, trial_values(rows["searched"], names[:3]))
    assert (trial.debug.lambda1, trial.debug.lambda2, trial.debug.indicator) == (0.05, 3.2e-4, "centred")  # the study's own λ2


def test_final_parquet_keeps_each_values_type(tmp_path):
    from raycf.stages.final import final_frame

    study = _study(tmp_path)
    names = parameter_names(study)
    table2 = pd.DataFrame({"model": ["base", "control", "debugged"], "lambda1": [0.0, 0.0, 0.05], "lambda2": [0.0, 0.0, 3.2e-4], "test_acc": [0.9, 0.91, 0.92]})
    best = {name: field_value(study, name) for name in names} | {"lambda1": 0.05, "debug.indicator": "centred"}
    frame = final_frame(table2, names, control_point(study), best, "")
    path = tmp_path / "final.parquet"
    frame.to_parquet(path)
    back = pd.read_parquet(path)
    assert list(back["debug.indicator"])[1:] == ["paper", "centred"] and pd.isna(back["debug.indicator"].iloc[0])
    assert list(back["lambda2"])[1:] == [0.0, 3.2e-4] and pd.isna(back["lambda2"].iloc[0])


def test_a_prefix_cache_built_for_other_views_augmentation_or_seed_is_refused():
    from raycf.data.prefix_cache import cache_identity, check_cache_matches

    study = study_from_mapping({"name": "x"})
    meta = {"enabled": True, "dtype": "float16", **cache_identity(study)}
    check_cache_matches(meta, study, "results/prefix")  # its own cache
    check_cache_matches({"scope": study.debug.trainable, "views": study.debug.views}, study, "old")  # an older cache records less
    for changes, key in (({"debug": {"views": 2}}, "views"), ({"data": {"augment": {"rotation": 3}}}, "augment"), ({"seed": 5}, "seed"), ({"debug": {"trainable": "head"}}, "scope")):
        other = study_from_mapping({"name": "x", **changes})
        with pytest.raises(UserError, match=rf"results/prefix: the frozen-prefix cache was built with {key} .*--force prefix"):
            check_cache_matches(meta, other, "results/prefix")


def test_a_search_over_cfe_epochs_exits_2_with_the_searchable_fields_before_anything_runs(tmp_path, capsys):
    from raycf.cli import main

    code = main(["study", "studies/digits.yaml", "--set", f"storage_path={tmp_path}", "search.space={cfe.epochs: {choice: [1, 2]}}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0] == (
        "raycf: error: --set: search.space: 'cfe.epochs' cannot be searched: a trial does not consume it "
        "(searchable: lambda1, lambda2, tau, freq_threshold, debug.indicator, debug.epochs, debug.lr, debug.momentum, debug.batch_size, debug.suppress_weight)"
    )
    assert not (tmp_path / "digits").exists()
