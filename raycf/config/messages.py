"""pydantic's validation errors as one line naming the field and what was expected."""

from __future__ import annotations

import re

from pydantic import (
    BaseModel,
    ValidationError,
)

from raycf.config.study import StudyConfig


def describe_validation_error(error: ValidationError) -> str:
    """One line for the first problem pydantic found: ``field: what was expected (got value)``."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-after", "literal")))
    location = re.sub(r"\.(tagged-union|union)\[[^\]]*\]", "", location)
    kind = first["type"]
    message = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent, _, field = location.rpartition(".")
        known = _known_fields(parent)
        return f"{location}: unknown field {field!r}" + (f" (expected one of: {', '.join(known)})" if known else "")
    if kind == "missing":
        return f"{location}: required field is missing"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or kind.startswith("value_error") else f" (got {got!r})"
    prefix = f"{location}: " if location else ""
    return f"{prefix}{message}{shown}"


def _known_fields(dotted: str) -> list[str]:
    model: type[BaseModel] = StudyConfig
    for part in filter(None, dotted.split(".")):
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
