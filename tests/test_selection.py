"""One tie rule for every choice: the best epoch, the checkpoint kept, the trials' order (raycf.method.selection)."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from raycf.method.selection import SCORE_KEY, best_epoch, checkpoint_scores, rank_trials, selection_key
from raycf.training.session import LocalSession


def _history(*rows: tuple[float, float]) -> list[dict]:
    return [{"epoch": epoch, "val_acc": acc, "val_loss": loss} for epoch, (acc, loss) in enumerate(rows, start=1)]


def test_best_epoch_breaks_ties_on_validation_loss_then_the_earlier_epoch():
    history = _history((0.5, 0.9), (0.7, 0.4), (0.7, 0.3), (0.7, 0.3))
    assert best_epoch(history)["epoch"] == 3  # tied val_acc: lower val_loss; tied both: earlier
    assert best_epoch(history, "val_acc", "min")["epoch"] == 1
    assert best_epoch(history, "val_loss", "min")["epoch"] == 3
    assert best_epoch([]) == {}
    assert best_epoch([{"epoch": 1}]) == {}


def test_every_epoch_tied_picks_the_first():
    history = _history(*[(0.9, 0.25)] * 5)
    assert best_epoch(history)["epoch"] == 1
    assert checkpoint_scores(history) == [1.0, 0.5, 0.5, 0.5, 0.5]


def test_the_highest_checkpoint_score_is_the_best_epoch():
    generator = random.Random(0)
    for _ in range(500):
        # few distinct values: ties of accuracy, of loss and of both are common
        history = _history(*[(generator.choice([0.8, 0.9, 0.95]), generator.choice([0.1, 0.2])) for _ in range(generator.randint(1, 8))])
        scores = checkpoint_scores(history)
        best = max(range(len(scores)), key=scores.__getitem__)
        assert scores.count(scores[best]) == 1  # no tie for Ray to break
        assert history[best]["epoch"] == best_epoch(history)["epoch"]
        # what Ray sees at each report: the best so far has the highest score so far
        for end in range(1, len(history) + 1):
            prefix = scores[:end]
            assert history[prefix.index(max(prefix))]["epoch"] == best_epoch(history[:end])["epoch"]


def test_rank_trials_uses_the_same_rule_and_keeps_order_on_full_ties():
    frame = pd.DataFrame(
        {"trial_id": list("abcde"), "val_acc": [0.9, 0.95, 0.95, None, 0.95], "val_loss": [0.1, 0.3, 0.2, 0.1, 0.2]}
    )
    assert list(rank_trials(frame)["trial_id"]) == ["c", "e", "b", "a", "d"]
    assert selection_key({"val_acc": None}) > selection_key({"val_acc": 0.0, "val_loss": 99.0})


def test_local_session_keeps_the_latest_and_the_best_checkpoint(tmp_path):
    session = LocalSession(tmp_path)
    history = _history((0.8, 0.5), (0.9, 0.4), (0.9, 0.4), (0.85, 0.3))
    for end, row in enumerate(history, start=1):
        session.report({**row, SCORE_KEY: checkpoint_scores(history[:end])[-1]}, {"epoch.txt": str(row["epoch"]).encode()})
    assert (session.best / "epoch.txt").read_text() == "2"
    assert (session.latest / "epoch.txt").read_text() == "4"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted({session.best.name, session.latest.name})
    with session.checkpoint() as folder:
        assert folder == session.latest


@pytest.mark.parametrize("mode", ["max", "min"])
def test_selection_key_orients_the_objective(mode):
    better, worse = ({"val_acc": 0.9}, {"val_acc": 0.8}) if mode == "max" else ({"val_acc": 0.8}, {"val_acc": 0.9})
    assert selection_key(better, "val_acc", mode) < selection_key(worse, "val_acc", mode)
