"""Do the trials differ by more than validation noise (raycf.method.search_noise)?  McNemar on hand-made 2×2 tables, a toy leaderboard."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raycf.method.search_noise import binomial_standard_error, compare_with_best, mcnemar_p_value, search_noise, seed_spread


def toy_board() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["control", "a", "b", "c", "d", "e"],
            "status": ["completed", "completed", "stopped", "completed", "completed", "error"],
            "is_control": [True, False, False, False, False, False],
            "val_acc": [0.80, 0.90, 0.91, 0.92, 0.93, np.nan],  # the control and the failed trial are left out of the spread
        }
    )


def test_mcnemar_on_a_two_by_two_table():
    # 2×2: both right 80, best only 8, trial only 2, both wrong 10.  Exact test on the 10 discordant images:
    # P(X ≤ 2 | n = 10, ½) = (1 + 10 + 45) / 1024, two-sided: 112 / 1024
    assert mcnemar_p_value(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_p_value(2, 8) == pytest.approx(112 / 1024)  # symmetric
    assert mcnemar_p_value(5, 5) == 1.0 and mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(6, 0) == pytest.approx(2 / 64)  # all six discordant one way: 2 · (½)^6


def test_compare_with_best_counts_the_table_and_adjusts_by_holm():
    labels = np.zeros(100, dtype=int)
    best = np.zeros(100, dtype=int)
    best[:10] = 1  # the best is wrong on images 0-9
    close = best.copy()
    close[:2] = 0  # right on 0, 1 ...
    close[50:58] = 1  # ... wrong on 50-57: b = 8, c = 2
    far = best.copy()
    far[20:40] = 1  # b = 20, c = 0
    frame = compare_with_best({"best": best, "close": close, "far": far}, labels, "best").set_index("trial_id")
    assert frame.loc["close", ["both_right", "best_only", "trial_only", "both_wrong"]].tolist() == [82, 8, 2, 8]  # both wrong: 2-9
    assert frame.loc["close", "accuracy_diff"] == pytest.approx(-0.06)
    assert frame.loc["close", "p"] == pytest.approx(112 / 1024) and not frame.loc["close", "distinguishable"]
    assert frame.loc["far", "p"] == pytest.approx(2 * 0.5**20)
    # Holm over two: the smaller p doubled, the larger kept (and at least the smaller's)
    assert frame.loc["far", "p_holm"] == pytest.approx(4 * 0.5**20) and frame.loc["close", "p_holm"] == pytest.approx(112 / 1024)
    assert frame.loc["far", "distinguishable_holm"] and not frame.loc["close", "distinguishable_holm"]
    with pytest.raises(ValueError, match="trial x has 3 validation predictions for 100 validation images"):
        compare_with_best({"best": best, "x": np.zeros(3)}, labels, "best")


def test_search_noise_counts_trials_not_distinguishable_from_the_best():
    board = toy_board()
    comparison = pd.DataFrame(
        {"trial_id": ["control", "a", "b", "c"], "p": [0.001, 0.01, 0.2, 0.7], "distinguishable": [True, True, False, False], "distinguishable_holm": [True, False, False, False]}
    )
    noise = search_noise(board, validation_images=1000, comparison=comparison, best="d")
    assert (noise["trials"], noise["trials_stopped"], noise["control"]) == (4, 1, 0.80)
    assert noise["mean"] == pytest.approx(0.915) and noise["sd"] == pytest.approx(0.0129099, abs=1e-7)
    assert (noise["min"], noise["max"]) == (0.90, 0.93) and noise["range_images"] == pytest.approx(30)
    assert noise["binomial_se"] == pytest.approx(math.sqrt(0.915 * 0.085 / 1000))
    assert (noise["compared"], noise["indistinguishable"], noise["indistinguishable_holm"], noise["control_p"]) == (3, 2, 3, 0.001)
    assert "2 of the 3 other searched trials compared are not distinguishable from it" in noise["verdict"]
    assert "3 after Holm's adjustment over the 4 comparisons" in noise["verdict"]
    assert "sd_over_se" not in noise and "exceeds_noise" not in noise  # the binomial SE is a scale, not the test


def test_without_predictions_and_with_a_seed_grid():
    seeds = pd.DataFrame({"model": ["control", "best"] * 3, "seed": [0, 0, 1, 1, 2, 2], "val_acc": [0.90, 0.91, 0.92, 0.91, 0.91, 0.94]})
    spread = seed_spread(seeds)
    assert spread["control"]["sd"] == pytest.approx(0.01) and spread["best"]["seeds"] == 3
    noise = search_noise(toy_board(), validation_images=500, seeds=spread)
    assert noise["compared"] == 0 and "none kept validation predictions, so McNemar's test cannot compare" in noise["verdict"]
    only_control = pd.DataFrame({"trial_id": ["control"], "p": [0.25], "distinguishable": [False], "distinguishable_holm": [False]})
    alone = search_noise(toy_board(), validation_images=500, comparison=only_control, best="d")
    assert "is the only searched trial with validation predictions" in alone["verdict"] and "p = 0.25" in alone["verdict"]
    assert "over 3 seeds moves val_acc by an sd of control 0.0100" in noise["verdict"]
    with pytest.raises(ValueError, match="positive"):
        binomial_standard_error(0.9, 0)
    assert binomial_standard_error(1.0, 283) == 0.0
