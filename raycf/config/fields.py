"""What every config section shares: the base model, the searchable and aliased fields, resource (unhashed) fields."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from raycf.runtime import field_reads

DATASET_KINDS = ("digits", "fashion_mnist", "cub200", "imagefolder")

# Short names for the parameters the paper's method is searched over; any other
# searched parameter is named by its dotted path in the study (``debug.lr``,
# ``debug.indicator``).  ``tau`` and ``freq_threshold`` are the τ and f of
# retraining's global sets (``debug.tau``, ``debug.freq_threshold``), those the
# search's objective depends on; detection has its own (``analysis.*``).
PARAMETER_ALIASES = {
    "lambda1": "debug.lambda1",
    "lambda2": "debug.lambda2",
    "tau": "debug.tau",
    "freq_threshold": "debug.freq_threshold",
}

# The fields a search trial consumes: retraining's own settings.  Everything
# else is read upstream of the search (cfe.*, masks.*, base.*, data.*, the
# prefix cache's debug.views and debug.trainable), only displayed (analysis.*)
# or a resource: searching it would change nothing or mean something else.
SEARCHABLE_FIELDS = (
    "debug.lambda1",
    "debug.lambda2",
    "debug.tau",
    "debug.freq_threshold",
    "debug.indicator",
    "debug.epochs",
    "debug.lr",
    "debug.momentum",
    "debug.batch_size",
    "debug.suppress_weight",
)


def searchable_names() -> str:
    """What ``search.space`` accepts, as one comma-separated list (aliases first)."""
    aliased = set(PARAMETER_ALIASES.values())
    return ", ".join([*PARAMETER_ALIASES, *(path for path in SEARCHABLE_FIELDS if path not in aliased)])


# What --smoke applies before the study file's own smoke: block (tiny epochs and
# trial counts), so that any study, even one that names only its data and model,
# runs end to end on a CPU.
# One base worker (one Tune trial: no worker group or process group to start) and one actor per Ray Data pool: on a
# smoke study's few hundred images, each more is a process to start and import torch in.
DEFAULT_SMOKE = {
    "base.epochs": 1,
    "base.workers": 1,
    "cfe.epochs": 1,
    "debug.epochs": 2,
    "search.num_samples": 2,
    "data.decode_actors": 1,
    "features.actors": 1,
    "masks.actors": 1,
    "prefix.actors": 1,
}

UNHASHED = "not part of stage hashes"


def resource_field(default: Any, description: str, **constraints: Any) -> Any:
    """A field that changes where or how fast work runs, not its results: left out of every stage hash."""
    return Field(default, description=f"{description} (resource only: {UNHASHED})", json_schema_extra={"hashed": False}, **constraints)


def is_hashed(field: Any) -> bool:
    """Whether a model field enters stage hashes (see :func:`resource_field`)."""
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("hashed") is False)


def names_as_text(names: Any) -> Any:
    """YAML reads class names such as 0 … 9 as numbers: take them as the names they spell."""
    if isinstance(names, (list, tuple)):
        return tuple(str(name) if isinstance(name, int) and not isinstance(name, bool) else name for name in names)
    return names


class StrictModel(BaseModel):
    """Base of every config section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


if field_reads.enabled():  # testing aid: record which fields each stage reads
    StrictModel.__getattribute__ = field_reads.recording_getattribute  # type: ignore[method-assign]
