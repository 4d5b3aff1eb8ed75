"""Which epoch of a run, and which trial of a search, is best: one tie rule for every place that chooses.

The rule: the better objective (``search.metric`` in ``search.mode``); on a
tie, the lower validation loss; on a tie of both, the earlier epoch (or the
earlier trial).  Accuracy on a few hundred validation images moves in steps
of one image, so ties are the rule, not the exception.

Every choice goes through :func:`selection_key`: the epoch a training run
keeps as its best checkpoint (:func:`checkpoint_scores` turns the rule into
the single score Ray's checkpoint manager ranks by), the leaderboard's best
epoch and order, the value Optuna records, and ``raycf rerun``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

TIE_BREAK = "val_loss"  # lower is better
SCORE_KEY = "selection_score"  # what a run reports for Ray to keep its best checkpoint by


def as_number(value: Any) -> float:
    """``float(value)``, or NaN for a missing or non-numeric value (a metric a trial never reported)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def selection_key(row: Mapping[str, Any], metric: str = "val_acc", mode: str = "max", position: float = 0) -> tuple[float, float, float]:
    """Sort key of one epoch (or trial): smaller is better.

    ``position`` is the epoch (or the trial's index) that breaks a full tie;
    rows without a value of ``metric`` sort last.
    """
    value, loss = as_number(row.get(metric)), as_number(row.get(TIE_BREAK))
    objective = math.inf if math.isnan(value) else (-value if mode == "max" else value)
    return objective, math.inf if math.isnan(loss) else loss, float(position)


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str = "val_acc", mode: str = "max") -> dict[str, Any]:
    """The best epoch of a run's history under the tie rule; ``{}`` without epochs that have ``metric``."""
    rows = [row for row in history if not math.isnan(as_number(row.get(metric)))]
    if not rows:
        return {}
    return dict(min(rows, key=lambda row: selection_key(row, metric, mode, as_number(row.get("epoch", 0)))))


def checkpoint_scores(history: Sequence[Mapping[str, Any]], metric: str = "val_acc", mode: str = "max") -> list[float]:
    """One score per epoch such that the highest score is the best epoch under the tie rule.

    Ray keeps the checkpoint with the highest reported score (and the
    latest); it cannot rank by two metrics.  The score of an epoch is the
    number of times the best so far changed up to it, minus one half when
    the epoch is not itself the new best: the best epoch gets a score no
    earlier epoch has and no later one reaches, whatever Ray does on ties.
    """
    scores, changes, incumbent = [], 0, None
    for row in history:
        key = selection_key(row, metric, mode, as_number(row.get("epoch", 0)))
        if incumbent is None or key < incumbent:
            changes, incumbent = changes + 1, key
            scores.append(float(changes))
        else:
            scores.append(changes - 0.5)
    return scores


def rank_trials(frame: pd.DataFrame, metric: str = "val_acc", mode: str = "max") -> pd.DataFrame:
    """Trials best first under the tie rule (full ties keep the frame's order); no value last."""
    keys = [selection_key(row, metric, mode, position) for position, row in enumerate(frame.to_dict("records"))]
    order = sorted(range(len(frame)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)
