"""Multiple comparisons: Holm's step-down adjustment of p-values.  numpy only.

Holm (1979) controls the family-wise error rate at α with no assumption on
how the tests depend on each other: sorted ascending, the i-th smallest of m
p-values (i from 1) is multiplied by m − i + 1; the adjusted values are made
non-decreasing in that order (a running maximum) and capped at 1.  A
comparison *survives* at α when its adjusted p-value is at most α.  NaN
p-values (undefined comparisons) are left out of m and stay NaN.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, in the order given (NaN stays NaN and does not count)."""
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(values))
    order = defined[np.argsort(values[defined], kind="stable")]
    count = len(order)
    multiplied = values[order] * (count - np.arange(count))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(multiplied)) if count else multiplied
    return adjusted


def survives(adjusted: float, alpha: float = ALPHA) -> bool:
    """Whether a Holm-adjusted p-value rejects "no difference" at ``alpha`` (False when undefined)."""
    return bool(not np.isnan(adjusted) and adjusted <= alpha)
