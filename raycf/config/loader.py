"""YAML in, overrides applied (``--set``, ``--smoke``), a validated :class:`StudyConfig` out."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from raycf.config.fields import DEFAULT_SMOKE, PARAMETER_ALIASES
from raycf.config.messages import describe_validation_error
from raycf.config.study import StudyConfig
from raycf.errors import UserError
from raycf.runtime import field_reads


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (), smoke: bool = False) -> StudyConfig:
    """Read, override and validate a study file.

    Raises :class:`UserError` (one line naming the file and field) for a
    missing file, a YAML syntax error, an unknown field, a wrong type or a bad
    value, in the file itself, in its ``smoke:`` block or in ``--set``.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    return study_from_mapping(raw, overrides=overrides, smoke=smoke, source=str(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping."""
    if not path.is_file():
        raise UserError(f"{path}: study file not found (expected a YAML file, e.g. studies/digits.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of study fields at the top level (got {type(raw).__name__})")
    return raw


def study_from_mapping(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), smoke: bool = False, source: str = "study"
) -> StudyConfig:
    """Validate a study given as a mapping (see :func:`load_study`)."""
    raw = copy.deepcopy(raw)
    smoke_block = raw.get("smoke") or {}
    if not isinstance(smoke_block, dict):
        raise UserError(f"{source}: smoke: expected a mapping of overrides (got {type(smoke_block).__name__})")
    study = _validate(raw, source)
    # The smoke variant is validated even when not applied, so a broken smoke
    # block is found before CI runs it.
    smoke_raw = apply_overrides(copy.deepcopy(raw), list(DEFAULT_SMOKE.items()) + _flatten(smoke_block), source=f"{source}: smoke")
    smoke_study = _validate(smoke_raw, f"{source} (with its smoke block)")
    if smoke:
        raw, study = smoke_raw, smoke_study
    if not overrides:
        return study
    raw = apply_overrides(raw, [_split_assignment(item) for item in overrides], source="--set")
    return _validate(raw, "--set")


def _validate(raw: dict[str, Any], source: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {describe_validation_error(error)}") from None



def _split_assignment(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set base.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _flatten(block: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{base: {epochs: 2}}`` → ``[("base.epochs", 2)]``; leaves under ``search.space`` stay whole."""
    items: list[tuple[str, Any]] = []
    for key, value in block.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("search.space", "search.driver_resources"):
            items.extend(_flatten(value, f"{path}."))
        else:
            items.append((path, value))
    return items


def apply_overrides(raw: dict[str, Any], assignments: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """Set dotted keys in a raw study mapping; intermediate mappings are created."""
    for key, value in assignments:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source}: {key}: {part!r} is not a section (got {child!r})")
            node = child
        node[parts[-1]] = value
    return raw


def with_values(config: StudyConfig, values: dict[str, Any]) -> StudyConfig:
    """A copy of ``config`` with dotted fields (or search aliases) replaced, re-validated."""
    raw = config.model_dump(mode="json")
    assignments = [(PARAMETER_ALIASES.get(key, key), value) for key, value in values.items()]
    return field_reads.carry_tag(config, _validate(apply_overrides(raw, assignments, source="values"), "values"))


def dump_yaml(config: StudyConfig) -> str:
    """The resolved study as YAML (what ``config.yaml`` in the results folder holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------ reference
