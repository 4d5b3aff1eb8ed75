"""The final stage's suppression treatments (``final.treatments``, issue 24 item 6): their points in the seed grid and their checks.

Beside the control (λ1 = λ2 = 0), the study's own λ and the best trial, the
seed grid retrains one model per treatment and seed, each plain fine-tuning
(λ1 = λ2 = 0) plus the suppression penalty of :mod:`raycf.method.debug_loss`
at ``debug.suppress_weight`` (the best trial's value when the search
searched it):

* ``suppress``: the filters the user names in ``debug.suppress`` (from the atlas);
* ``suppress_auto``: the ``final.suppress_auto`` most error-specific filters
  of each class (:func:`raycf.method.atlas.error_specific_filters` on the
  validation split's MC masks: filters in the MC sets of the errors
  predicted as the class, rarely in its correct predictions), penalised on
  the class's own training images: a shortcut the class's errors rely on is
  learnt from, and fires on, the class's training images (a planted feature
  mostly sits there), and the filter is shared, so quieting it there quiets it
  on the other classes' images too.

Each is compared with the control of the same seed like the other models
(paired t intervals, :mod:`raycf.method.replication`); when the study's
images have groups, also on worst-group test accuracy (the final stage adds
``test_worst_group_acc`` to every (model, seed) row before the summary).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from raycf.config import StudyConfig
from raycf.method.atlas import error_specific_filters
from raycf.method.suppress import auto_suppress, check_suppress
from raycf.runtime.console import log
from raycf.search.searcher import control_point, trial_values

SUPPRESS_WEIGHT = "debug.suppress_weight"


def num_filters_of(study: StudyConfig, num_classes: int) -> int:
    """K of the study's model, built on the meta device (no memory, no weights loaded)."""
    import torch

    from raycf.models.build import build_model

    with torch.device("meta"):
        return int(build_model(study.model, num_classes, load_weights=False).num_filters)


def check_treatment_inputs(study: StudyConfig, class_names: list[str]) -> None:
    """``debug.suppress``'s classes and filter indices against the dataset and K (UserError, one line), before anything runs."""
    if study.debug.suppress:
        check_suppress(study.debug.suppress, class_names, num_filters_of(study, len(class_names)))


def suppress_weight(study: StudyConfig, best: pd.Series) -> float:
    """The treatments' weight: the best trial's when the search searched it, else ``debug.suppress_weight``."""
    searched = trial_values(best, [SUPPRESS_WEIGHT]) if SUPPRESS_WEIGHT in (study.search.space or {}) else {}
    return float(searched.get(SUPPRESS_WEIGHT, study.debug.suppress_weight))


def auto_filters(results: str, study: StudyConfig) -> dict[str, list[int]]:
    """``debug.suppress`` (class name -> filters) of the ``suppress_auto`` treatment, from the validation split's masks."""
    from raycf.results.artefacts import class_names, load_masks

    names = class_names(results)
    val = load_masks(results, "val", ["label", "pred", "mc_mask"])
    chosen = auto_suppress(error_specific_filters(val["mc_mask"], val["label"], val["pred"], len(names), study.final.suppress_auto), names)
    log(f"final: suppress_auto suppresses {', '.join(f'{name}: {filters}' for name, filters in chosen.items()) or 'nothing (no validation error)'}")
    return chosen


def treatment_points(study: StudyConfig, results: str, best: pd.Series) -> dict[str, dict[str, Any]]:
    """The seed grid's point of every treatment of ``final.treatments``: the control's values, the suppression weight and its filters."""
    points: dict[str, dict[str, Any]] = {}
    if not study.final.treatments:
        return points
    weight = suppress_weight(study, best)
    for treatment in study.final.treatments:
        point = {**control_point(study), SUPPRESS_WEIGHT: weight}
        if treatment == "suppress_auto":
            point["debug.suppress"] = auto_filters(results, study)
        points[treatment] = point
    return points


def plain_value(value: Any) -> Any:
    """A point's value as a Parquet cell: filters (a list or a mapping) as JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value
