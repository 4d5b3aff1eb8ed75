"""A node's local copy of a large artefact in the results folder, fetched at most once per node.

The uint8 image store and the frozen-prefix cache are read memory-mapped by
every training process of a node.  Memory-mapping needs a local file: when
the results folder is an ``s3://`` URI, the first process of a node that needs
an artefact downloads it into ``<temp>/raycf-cache/<key>/`` under a file lock;
every later process (the other trials the node runs) finds it there.  ``key``
names one write of the artefact (the stage hash of the stage that wrote it
and when that stage finished, :func:`raycf.results.artefacts.written_key`), so a
rerun stage's new bytes never meet an old copy.  A local results folder is used in place.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from raycf.results import storage

COMPLETE = ".complete"


def cache_root() -> Path:
    """Where node-local copies live (``RAYCF_NODE_CACHE`` or the temp folder)."""
    return Path(os.environ.get("RAYCF_NODE_CACHE", Path(tempfile.gettempdir(), "raycf-cache")))


def local_folder(location: str, key: str) -> Path:
    """A local folder holding the files of ``location`` (a results sub-folder), downloaded once per node when remote."""
    if not storage.is_uri(location):
        return Path(storage.normalise_root(location))
    target = cache_root() / key
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other processes of this node wait for the first download
        if not (target / COMPLETE).exists():
            download(location, target)
    return target


def download(location: str, target: Path) -> None:
    """Copy the files under ``location`` into ``target`` (written elsewhere first, then moved into place)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    filesystem, path = storage.resolve(location)
    pafs.copy_files(path, str(staging), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    (staging / COMPLETE).write_text("")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
