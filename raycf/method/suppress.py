"""Suppression treatments (issue 24, item 6): which filters each class's retraining penalises.

``debug.suppress`` names filters as a list (every image) or as class name ->
list (the images of that class); :func:`suppression_matrix` turns it into the
C×K 0/1 matrix ``S`` the debug loss reads (:mod:`raycf.method.debug_loss`).
:func:`check_suppress` refuses a class or a filter index the study does not
have, in one line, before anything runs.  numpy only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from raycf.errors import UserError

Suppress = Sequence[int] | Mapping[str, Sequence[int]]


def check_suppress(suppress: Suppress, class_names: Sequence[str], num_filters: int, field: str = "debug.suppress") -> None:
    """UserError (one line naming ``field``) for an unknown class name or a filter index ≥ K."""
    names = list(class_names)
    per_class = suppress.items() if isinstance(suppress, Mapping) else [(None, suppress)]
    for name, filters in per_class:
        if name is not None and name not in names:
            raise UserError(f"{field}: unknown class {name!r} (the dataset's classes: {', '.join(names)})")
        beyond = [int(index) for index in filters if not 0 <= int(index) < num_filters]
        if beyond:
            where = f"{field}.{name}" if name is not None else field
            raise UserError(f"{where}: filter {beyond[0]} does not exist (the model has K = {num_filters} filters: expected indices 0 to {num_filters - 1})")


def suppression_matrix(suppress: Suppress, class_names: Sequence[str], num_filters: int) -> np.ndarray:
    """``S`` (C×K booleans): the filters penalised on the images of each class (a list: the same row for every class)."""
    check_suppress(suppress, class_names, num_filters)
    matrix = np.zeros((len(class_names), num_filters), dtype=bool)
    if isinstance(suppress, Mapping):
        for name, filters in suppress.items():
            matrix[list(class_names).index(name), list(filters)] = True
    else:
        matrix[:, list(suppress)] = True
    return matrix


def auto_suppress(error_filters: Mapping[int, Sequence[int]], class_names: Sequence[str]) -> dict[str, list[int]]:
    """``debug.suppress`` (class name -> filters) from the atlas's error-specific filters per class index."""
    return {str(class_names[cls]): [int(index) for index in filters] for cls, filters in sorted(error_filters.items())}
