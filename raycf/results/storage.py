"""Reading and writing results on a local disk or any pyarrow filesystem (``s3://``).

A results location is a string: an absolute local path or a URI.  Every write
lands atomically: a file is written beside its target and renamed over it (on
object stores a single PUT is already atomic).  A stage's folder is built
elsewhere and moved into place by :func:`publish_folder` on a local disk; an
object store has no rename, and there the stage's marker, written last,
commits its folder (:mod:`raycf.pipeline`).
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations (s3, gs, ...), false for local paths."""
    return "://" in location and not location.startswith("file://")


def normalise_root(location: str) -> str:
    """A local path made absolute (Ray needs absolute paths); URIs unchanged."""
    if is_uri(location):
        return location.rstrip("/")
    return str(Path(location.removeprefix("file://")).expanduser().resolve())


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def with_scheme(path: str, like: str) -> str:
    """A path on the filesystem of ``like`` as a full location: its scheme restored.

    A pyarrow filesystem's paths carry no scheme (Ray's ``Checkpoint.path``
    of an ``s3://`` run is ``bucket/key``); a results folder records the full
    URI so that :func:`resolve` opens it from any machine.
    """
    if not is_uri(like) or is_uri(path) or not path or path.startswith("/"):
        return path
    return f"{like.split('://', 1)[0]}://{path.lstrip('/')}"


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), normalise_root(location)


def exists(location: str) -> bool:
    """Whether a file or folder exists at ``location``."""
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


READ_ATTEMPTS = 5


def read_bytes(location: str) -> bytes:
    """The whole content of a file.

    On an object store a read is a size lookup then ranged GETs: an object
    replaced in between (a leaderboard or driver-state file rewritten while
    it is read) would come back as a mix of two versions.  The read is kept
    only when the object's size and time are the same before and after it.
    """
    filesystem, path = resolve(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    for _ in range(READ_ATTEMPTS):
        before = filesystem.get_file_info(path)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read()
        after = filesystem.get_file_info(path)
        if (before.size, before.mtime) == (after.size, after.mtime) == (len(data), after.mtime):
            return data
    raise OSError(f"{location}: rewritten during each of {READ_ATTEMPTS} reads")


def write_bytes(location: str, data: bytes) -> None:
    """Write a file atomically (temporary sibling + rename locally)."""
    filesystem, path = resolve(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        return
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_table(table: pa.Table, location: str) -> None:
    """Write one Parquet file atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(location, buffer.getvalue())


def write_frame(frame: pd.DataFrame, location: str) -> None:
    """Write a pandas frame as one Parquet file atomically (no index column)."""
    write_table(pa.Table.from_pandas(frame, preserve_index=False), location)


def read_table(location: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a folder of Parquet files (sorted by file name)."""
    filesystem, path = resolve(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(location)
    if info.type == pafs.FileType.File and isinstance(filesystem, pafs.LocalFileSystem):
        return pq.read_table(path, filesystem=filesystem, columns=columns)
    if info.type == pafs.FileType.File:  # one consistent version of a file that may be rewritten meanwhile (read_bytes)
        return pq.read_table(pa.BufferReader(read_bytes(location)), columns=columns)
    files = sorted(
        entry.path
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        if entry.type == pafs.FileType.File and entry.path.endswith(".parquet")
    )
    tables = [pq.read_table(file, filesystem=filesystem, columns=columns) for file in files]
    if not tables:
        raise FileNotFoundError(f"{location}: no Parquet files")
    return pa.concat_tables(tables, promote_options="default")


def upload_file(local: Path, location: str) -> None:
    """Put a local file at ``location``: moved there on a local disk, copied (streamed) to an object store."""
    filesystem, path = resolve(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), path)
        return
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


def publish_folder(staging: str, target: str) -> None:
    """Move a fully written local folder into place, replacing an older one.

    The old folder is renamed away first and deleted after the new one is in
    place, so a reader never sees a half-written folder.
    """
    if is_uri(target):
        raise ValueError(f"{target}: an object store has no rename (its stages are committed by their marker)")
    target_path = Path(normalise_root(target))
    target_path.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if target_path.exists():
        retired = target_path.with_name(f".{target_path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target_path, retired)
    os.replace(normalise_root(staging), target_path)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def remove(location: str) -> None:
    """Delete a file or folder if it exists."""
    filesystem, path = resolve(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == pafs.FileType.File:
        filesystem.delete_file(path)


def check_writable(location: str, field: str = "storage_path") -> None:
    """Write and delete a probe file under ``location``; a missing bucket, no credentials or no permission is a UserError naming ``field``."""
    from raycf.errors import UserError

    probe = join_uri(location, f".raycf-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{field}: cannot write to {location} ({reason})") from error
