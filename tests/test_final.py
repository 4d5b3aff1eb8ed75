"""The final stage's choices (raycf.stages.final): the debugged model is a searched trial, and a winning control is said."""

from __future__ import annotations

import pandas as pd
import pytest

from raycf.config import study_from_mapping
from raycf.stages.final import best_searched_trial, control_verdict, full_control

STUDY = study_from_mapping({"name": "t"})


def board(*rows: tuple[str, bool, str, float, float]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trial_id", "is_control", "status", "val_acc", "val_loss"]).assign(checkpoint_path="")


def test_the_debugged_model_is_the_best_searched_trial_even_when_the_control_wins():
    frame = board(("control", True, "completed", 0.95, 0.20), ("a", False, "completed", 0.94, 0.10), ("b", False, "stopped", 0.94, 0.15))
    best = best_searched_trial(frame, STUDY)
    assert best["trial_id"] == "a"
    verdict = control_verdict(frame, best, STUDY)
    assert verdict.startswith("The control (plain fine-tuning, lambda1 = lambda2 = 0) beat every searched trial on validation: a better val_acc")
    assert "the debugged row is the best searched trial, a" in verdict


def test_a_control_that_wins_only_on_the_tie_break_is_named_and_a_full_tie_is_not_a_win():
    tie_break = board(("control", True, "completed", 0.95, 0.10), ("a", False, "completed", 0.95, 0.20))
    assert "the same val_acc" in control_verdict(tie_break, best_searched_trial(tie_break, STUDY), STUDY)
    full_tie = board(("control", True, "completed", 0.95, 0.10), ("a", False, "completed", 0.95, 0.10))
    assert control_verdict(full_tie, best_searched_trial(full_tie, STUDY), STUDY) == ""
    loses = board(("control", True, "completed", 0.90, 0.10), ("a", False, "completed", 0.95, 0.20))
    assert control_verdict(loses, best_searched_trial(loses, STUDY), STUDY) == ""


def test_no_searched_trial_is_an_error_not_the_control():
    only_control = board(("control", True, "completed", 0.95, 0.10), ("a", False, "error", float("nan"), float("nan")))
    with pytest.raises(RuntimeError, match="finished no searched trial"):
        best_searched_trial(only_control, STUDY)


def test_a_control_stopped_early_must_be_retrained():
    control, model = full_control(board(("control", True, "stopped", 0.9, 0.1), ("a", False, "completed", 0.95, 0.2)), b"")
    assert control["trial_id"] == "control" and model is None
    assert full_control(board(("a", False, "completed", 0.95, 0.2)), b"") == (None, None)
