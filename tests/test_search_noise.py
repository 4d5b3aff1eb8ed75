"""Do the trials differ by more than validation noise (raycf.method.search_noise)? A toy leaderboard."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raycf.method.search_noise import binomial_standard_error, search_noise


def toy_board() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["control", "a", "b", "c", "d", "e"],
            "status": ["completed", "completed", "stopped", "completed", "completed", "error"],
            "is_control": [True, False, False, False, False, False],
            "val_acc": [0.80, 0.90, 0.91, 0.92, 0.93, np.nan],  # the control and the failed trial are left out
        }
    )


def test_spread_within_noise_on_a_thousand_validation_images():
    noise = search_noise(toy_board(), validation_images=1000)
    assert (noise["trials"], noise["trials_stopped"], noise["control"]) == (4, 1, 0.80)
    assert noise["mean"] == pytest.approx(0.915) and noise["sd"] == pytest.approx(0.0129099, abs=1e-7)
    assert (noise["min"], noise["max"]) == (0.90, 0.93) and noise["range"] == pytest.approx(0.03) and noise["range_images"] == pytest.approx(30)
    assert noise["binomial_se"] == pytest.approx(math.sqrt(0.915 * 0.085 / 1000))  # 0.00882: 2 SE = 0.0176 > sd
    assert noise["sd_over_se"] == pytest.approx(0.0129099 / 0.0088194, abs=1e-4)
    assert noise["exceeds_noise"] is False and "do not differ by more than validation noise" in noise["verdict"]


def test_spread_beyond_noise_on_a_hundred_thousand_images():
    noise = search_noise(toy_board(), validation_images=100_000)  # SE 0.00088: the same spread is now 15 SE
    assert noise["exceeds_noise"] is True and "differ by more than validation noise" in noise["verdict"]


def test_too_few_trials_and_a_bad_split_size():
    board = toy_board().iloc[:2]
    noise = search_noise(board, validation_images=500)
    assert noise["trials"] == 1 and noise["exceeds_noise"] is None and math.isnan(noise["sd"]) and "too few" in noise["verdict"]
    assert search_noise(board.iloc[:1], validation_images=500)["trials"] == 0
    with pytest.raises(ValueError, match="positive"):
        binomial_standard_error(0.9, 0)
    assert binomial_standard_error(1.0, 283) == 0.0
