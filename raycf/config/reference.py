"""The study-file reference (every field, its default and meaning), generated from the schema for the docs."""

from __future__ import annotations

import json
from typing import Any

from pydantic import (
    BaseModel,
)

from raycf.config.study import StudyConfig


def study_reference_markdown() -> str:
    """The study file reference (docs/study-file.md, filled in by the docs build): every field, its default and meaning, from the schema."""
    lines = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name != "smoke":
                lines.append(f"| `{prefix}{name}` | | {((annotation.__doc__ or '').strip().splitlines() or [''])[0]} |")
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else _shown_default(field)
            lines.append(f"| `{prefix}{field.alias or name}` | {default} | {field.description or ''} |")
            item = getattr(annotation, "__args__", (None,))[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                walk(item, f"{prefix}{name}{'.' if type(None) in annotation.__args__ else '[].'}")  # an optional section, or a list of them

    walk(StudyConfig, "")
    return "\n".join(lines) + "\n"


def _shown_default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} rows (the paper's)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return f"`{text}`" if text not in ("", "{}") else f"`{text or chr(34) * 2}`"
