"""The user's own groups (``data.groups``): a CSV or Parquet table of ``image_id`` -> ``group``, read and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from raycf.errors import UserError


def read_groups_table(path: str) -> dict[str, str]:
    """``image_id -> group`` from a ``.csv`` or ``.parquet`` file with those two columns (UserError, one line, on a bad file)."""
    location = Path(path)
    if not location.is_file():
        raise UserError(f"data.groups: {path} not found (expected a CSV or Parquet file of image_id, group)")
    try:
        frame = pd.read_parquet(location) if location.suffix.lower() == ".parquet" else pd.read_csv(location, dtype=str)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"data.groups: {path} could not be read ({type(error).__name__}: {error}; expected a CSV or Parquet file of image_id, group)") from None
    missing = [column for column in ("image_id", "group") if column not in frame.columns]
    if missing:
        raise UserError(f"data.groups: {path} has no column {', '.join(missing)} (expected columns image_id and group; got {', '.join(map(str, frame.columns))})")
    ids = frame["image_id"].astype(str)
    if ids.duplicated().any():
        raise UserError(f"data.groups: {path} lists image {ids[ids.duplicated()].iloc[0]!r} twice (expected one group per image)")
    return dict(zip(ids, frame["group"].astype(str)))


def check_groups_table(table: dict[str, str], known_ids: Iterable[str], capped: bool = False) -> None:
    """Refuse a table naming images the dataset does not have (``capped``: the splits keep a sample, so unknown ids may be capped away)."""
    if capped:
        return
    known = set(known_ids)
    unknown = [image_id for image_id in table if image_id not in known]
    if unknown:
        raise UserError(f"data.groups: {len(unknown)} image ids are not in the dataset (e.g. {unknown[0]!r}; expected the dataset's image ids)")
