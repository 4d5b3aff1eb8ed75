"""Testing aid: which study fields each stage's code reads, wherever it runs.

With ``RAYCF_FIELD_LOG`` naming a file (forwarded to Ray's workers like every
``RAYCF_`` variable), :mod:`raycf.config` records every read of a study
field made through a study that the pipeline handed to a stage: one line
``<stage>\t<dotted field>`` per field and process.  The pipeline tags the
stage's copy of the study (:func:`tagged`), the tag travels with it to Ray
workers (it is pickled with the model) and to the trial studies derived from
it (:func:`carry_tag`).  A test compares the lines with the stage table's
``reads`` (tests/test_stage_reads.py).  Without the variable nothing is
tagged or recorded.
"""

from __future__ import annotations

import os
from typing import Any

FIELD_LOG = "RAYCF_FIELD_LOG"
_TAG = "_raycf_reads"  # (stage, dotted path of the section) on each tagged section
_seen: set[tuple[str, str]] = set()


def enabled() -> bool:
    """Whether reads are being recorded in this process."""
    return bool(os.environ.get(FIELD_LOG))


def record(tag: tuple[str, str], field: str) -> None:
    """Append ``<stage>\\t<section>.<field>`` to the log, once per process."""
    stage, section = tag
    key = (stage, f"{section}.{field}" if section else field)
    if key in _seen:
        return
    _seen.add(key)
    with open(os.environ[FIELD_LOG], "a") as log:
        log.write(f"{key[0]}\t{key[1]}\n")


def recording_getattribute(self: Any, name: str) -> Any:
    """``__getattribute__`` of a config section that records field reads of tagged sections."""
    value = object.__getattribute__(self, name)
    if name.startswith("_") or name not in type(self).model_fields:
        return value
    tag = _tag_of(self)
    if tag is not None and not _is_section(value):
        record(tag, name)
    return value


def _tag_of(section: Any) -> tuple[str, str] | None:
    private = object.__getattribute__(section, "__pydantic_private__") or {}
    return private.get(_TAG)


def _is_section(value: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(value, BaseModel)


def _walk(model: Any, path: str, stage: str) -> None:
    from pydantic import BaseModel

    private = object.__getattribute__(model, "__pydantic_private__")
    if private is None:
        object.__setattr__(model, "__pydantic_private__", {})
        private = object.__getattribute__(model, "__pydantic_private__")
    private[_TAG] = (stage, path)
    for name in type(model).model_fields:
        value = object.__getattribute__(model, name)
        child = f"{path}.{name}" if path else name
        items = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                _walk(item, child, stage)


def tagged(study: Any, stage: str) -> Any:
    """A deep copy of ``study`` whose field reads are recorded as ``stage``'s."""
    copy = study.model_copy(deep=True)
    _walk(copy, "", stage)
    return copy


def carry_tag(source: Any, derived: Any) -> Any:
    """``derived`` (a study built from ``source``, e.g. a trial's) tagged as ``source`` is."""
    tag = _tag_of(source)
    if tag is not None:
        _walk(derived, "", tag[0])
    return derived


def reads_by_stage(path: str) -> dict[str, set[str]]:
    """The log's fields, by stage."""
    reads: dict[str, set[str]] = {}
    with open(path) as log:
        for line in log:
            stage, _, field = line.rstrip("\n").partition("\t")
            reads.setdefault(stage, set()).add(field)
    return reads
