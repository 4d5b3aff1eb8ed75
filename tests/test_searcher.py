"""The search's pieces without a cluster: space, control point, searcher wrapper, trial picking."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest

from raycf.config import study_from_mapping
from raycf.errors import UserError
from raycf.outputs.rerun import pick_trial
from raycf.search.searcher import control_first_searcher, control_point, optuna_distributions, parameter_names

SPACE = {
    "lambda1": {"loguniform": [1e-3, 1.0]},
    "lambda2": {"loguniform": [1e-5, 1e-1]},
    "tau": {"uniform": [0.5, 0.99]},
    "debug.lr": {"choice": [0.001, 0.01]},
}


def _study(**search):
    return study_from_mapping({"name": "s", "search": {"space": SPACE, "metric": "val_acc", "mode": "max", **search}})


def test_space_and_control_point():
    study = _study()
    distributions = optuna_distributions(study.search.searched_space)
    assert distributions["lambda1"].log and distributions["lambda1"].low == 1e-3
    assert not distributions["tau"].log and distributions["debug.lr"].choices == (0.001, 0.01)
    assert parameter_names(study) == ["lambda1", "lambda2", "tau", "debug.lr"]
    assert control_point(study) == {"lambda1": 0.0, "lambda2": 0.0, "tau": 0.9, "debug.lr": study.debug.lr}


def test_control_first_then_optuna_which_never_sees_the_control(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = control_first_searcher(_study(max_concurrent=4), url, "s-1")
    first = searcher.suggest("t1")
    assert first["lambda1"] == 0 and first["lambda2"] == 0
    second = searcher.suggest("t2")
    assert 1e-3 <= second["lambda1"] <= 1 and 0.5 <= second["tau"] <= 0.99
    searcher.on_trial_complete("t1", {"val_acc": 0.9})
    searcher.on_trial_complete("t2", {"val_acc": 0.8})
    trials = optuna.load_study(study_name="s-1", storage=url).trials
    assert [(t.number, t.state, t.value) for t in trials] == [(0, optuna.trial.TrialState.COMPLETE, 0.8)]


def test_optuna_records_the_best_epoch_like_the_leaderboard(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = control_first_searcher(_study(max_concurrent=4, include_control=False), url, "s-3")
    searcher.suggest("t1")
    for epoch, val_acc in enumerate([0.90, 0.95, 0.93], start=1):
        searcher.on_trial_result("t1", {"val_acc": val_acc, "training_iteration": epoch})
    assert searcher.searcher.get_state()["best_epochs"]["t1"]["val_acc"] == 0.95  # saved with Tune's experiment state
    searcher.on_trial_complete("t1", {"val_acc": 0.93, "training_iteration": 3})
    (trial,) = optuna.load_study(study_name="s-3", storage=url).trials
    assert trial.value == 0.95
    assert trial.intermediate_values == {1: 0.90, 2: 0.95, 3: 0.93}


def test_seeded_search_proposes_the_same_points(tmp_path):
    points = []
    for run in ("a", "b"):
        searcher = control_first_searcher(_study(max_concurrent=4, include_control=False), f"sqlite:///{tmp_path / run}.db", "s")
        points.append([searcher.suggest(f"t{i}") for i in range(3)])
    assert points[0] == points[1]


def test_a_proposal_orphaned_by_a_killed_driver_is_adopted(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = _study(max_concurrent=4, include_control=False)
    before = control_first_searcher(study, url, "s-2").suggest("t1")  # written to storage, then the driver dies
    restored = control_first_searcher(study, url, "s-2")  # a searcher state saved before that proposal
    adopted = restored.suggest("t9")
    assert adopted == before
    restored.on_trial_complete("t9", {"val_acc": 0.7})
    restored.suggest("t10")  # a new proposal, not the adopted one again
    trials = optuna.load_study(study_name="s-2", storage=url).trials
    assert [(t.number, t.state) for t in trials] == [(0, optuna.trial.TrialState.COMPLETE), (1, optuna.trial.TrialState.RUNNING)]


def test_a_proposal_cut_short_by_a_killed_driver_gets_its_missing_values(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cut_short = optuna.create_study(storage=url, study_name="s-4", direction="maximize").ask()
    lambda1 = cut_short.suggest_float("lambda1", 1e-3, 1.0, log=True)  # then the driver dies
    restored = control_first_searcher(_study(max_concurrent=4, include_control=False), url, "s-4")
    adopted = restored.suggest("t9")
    assert set(adopted) == set(SPACE) and adopted["lambda1"] == lambda1
    assert 1e-5 <= adopted["lambda2"] <= 1e-1 and 0.5 <= adopted["tau"] <= 0.99 and adopted["debug.lr"] in (0.001, 0.01)
    restored.on_trial_complete("t9", {"val_acc": 0.7})
    (trial,) = optuna.load_study(study_name="s-4", storage=url).trials
    assert trial.params == adopted and trial.state == optuna.trial.TrialState.COMPLETE


def test_pick_trial():
    board = pd.DataFrame(
        {"trial_id": ["a", "b", "c"], "status": ["completed", "error", "stopped"], "val_acc": [0.8, None, 0.9], "val_loss": [0.2, None, 0.3]}
    )
    assert pick_trial(board, None, "val_acc", "max")["trial_id"] == "c"
    assert pick_trial(board, "a", "val_acc", "max")["val_acc"] == 0.8
    with pytest.raises(UserError, match="--trial zz: no such trial"):
        pick_trial(board, "zz", "val_acc", "max")


def test_a_resumed_sampler_does_not_draw_again_the_points_of_earlier_trials():
    """The sampler rebuilt on resume (from the seed) draws for trial n what an uninterrupted one draws: no point twice."""
    import pickle

    import optuna

    from raycf.search.searcher import trial_seeded_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def points(restart_at: int | None) -> list[tuple[float, str]]:
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(sampler=trial_seeded_sampler(0), storage=storage)
        drawn = []
        for number in range(4):
            if number == restart_at:  # the driver died: a new sampler from the same seed, the trials from the storage
                study = optuna.load_study(study_name=study.study_name, storage=storage, sampler=trial_seeded_sampler(0))
            trial = study.ask()
            drawn.append((trial.suggest_float("x", 0, 1), trial.suggest_categorical("c", ["paper", "centred"])))
            study.tell(trial, drawn[-1][0])
        return drawn

    uninterrupted = points(None)
    assert len(set(uninterrupted)) == 4
    assert points(2) == points(1) == uninterrupted
    # Tune pickles the searcher into its driver state: the sampler survives it and draws the same points.
    study = optuna.create_study(sampler=pickle.loads(pickle.dumps(trial_seeded_sampler(0))))
    trial = study.ask()
    assert (trial.suggest_float("x", 0, 1), trial.suggest_categorical("c", ["paper", "centred"])) == uninterrupted[0]
