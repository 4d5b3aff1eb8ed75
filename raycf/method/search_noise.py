"""Do the search's trials differ by more than validation noise?  numpy and pandas only.

Every trial's objective, ``val_acc``, is an accuracy on the same n validation
images.  One accuracy p measured on n images is uncertain by its binomial
standard error sqrt(p(1 − p) / n): the yardstick here, taken at the mean
accuracy of the searched trials.  The verdict compares the spread of the
searched trials' ``val_acc`` (sample standard deviation, control excluded,
stopped trials included: the search chooses among them all) with twice that
standard error.  A spread within it means the validation split cannot tell
the trials apart, and the search's choice is as much the split's noise as the
parameters'.  It is a yardstick, not a test: the trials share their
validation images (their noise is correlated), and ``val_acc`` is each
trial's best epoch (a maximum over epochs, biased upwards alike for all).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

NOISE_MULTIPLE = 2.0  # the spread must exceed this many binomial standard errors


def binomial_standard_error(accuracy: float, images: int) -> float:
    """sqrt(p(1 − p) / n): the standard error of an accuracy p measured on n images."""
    if images <= 0:
        raise ValueError(f"the number of validation images must be positive (got {images})")
    return math.sqrt(accuracy * (1 - accuracy) / images)


def search_noise(board: pd.DataFrame, validation_images: int, metric: str = "val_acc") -> dict[str, Any]:
    """The searched trials' spread of ``metric`` (an accuracy on ``validation_images`` images) against its binomial standard error.

    Keys: ``metric``, ``validation_images``, ``trials`` (searched trials with
    a value), ``trials_stopped``, ``control`` (the control's value, or None),
    ``mean``, ``sd``, ``min``, ``max``, ``range``, ``range_images`` (the range
    in validation images), ``binomial_se``, ``sd_over_se``, ``exceeds_noise``
    (sd > 2 SE; None with fewer than two trials) and ``verdict`` (a sentence).
    """
    is_control = board["is_control"].astype(bool) if "is_control" in board else pd.Series(False, index=board.index)
    values = pd.to_numeric(board[metric], errors="coerce")
    searched = board[~is_control & values.notna()]
    accuracies = values[searched.index].to_numpy(dtype=np.float64)
    controls = values[is_control].dropna()
    count = len(accuracies)
    mean = float(accuracies.mean()) if count else math.nan
    sd = float(accuracies.std(ddof=1)) if count > 1 else math.nan
    spread = float(accuracies.max() - accuracies.min()) if count else math.nan
    se = binomial_standard_error(mean, validation_images) if count else math.nan
    exceeds = bool(sd > NOISE_MULTIPLE * se) if count > 1 else None
    return {
        "metric": metric,
        "validation_images": int(validation_images),
        "trials": count,
        "trials_stopped": int((searched["status"] == "stopped").sum()) if "status" in searched else 0,
        "control": float(controls.iloc[0]) if len(controls) else None,
        "mean": mean,
        "sd": sd,
        "min": float(accuracies.min()) if count else math.nan,
        "max": float(accuracies.max()) if count else math.nan,
        "range": spread,
        "range_images": round(spread * validation_images, 3) if count else math.nan,
        "binomial_se": se,
        "sd_over_se": sd / se if count > 1 and se > 0 else math.nan,
        "exceeds_noise": exceeds,
        "verdict": _verdict(count, sd, se, validation_images, metric, exceeds),
    }


def _verdict(count: int, sd: float, se: float, images: int, metric: str, exceeds: bool | None) -> str:
    if exceeds is None:
        return f"{count} searched trial(s) with a {metric}: too few to compare their spread with validation noise."
    comparison = f"sd {sd:.4f} {'>' if exceeds else '≤'} {NOISE_MULTIPLE:g} × binomial SE {se:.4f} on {images} validation images"
    if exceeds:
        return f"The {count} searched trials differ by more than validation noise ({comparison})."
    return f"The {count} searched trials do not differ by more than validation noise ({comparison}): the split cannot tell them apart."
