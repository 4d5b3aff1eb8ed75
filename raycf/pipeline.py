"""Stages, their cache, and the results folder.

A stage's identity is a hash of the study sections it reads plus the hashes
of the stages it builds on.  When a stage finishes, its folder
``<results>/<stage>/`` gets a ``_stage.json`` marker holding that hash; a
stage whose marker matches is *cached* and not run again (``--force STAGE``
reruns it).  A stage writes into a staging folder that is moved into place
only when complete, so a crash never leaves a folder a later stage trusts.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from raycf import storage
from raycf.config import StudyConfig, dump_yaml
from raycf.errors import UserError

MARKER_FILE = "_stage.json"


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[raycf] {message}", file=sys.stderr, flush=True)


@dataclass
class StageRun:
    """What a stage's ``run`` function gets: the study, where to write, where upstream lives."""

    study: StudyConfig
    results: str
    output: str
    stage_hash: str
    resume: bool = False

    def path(self, *parts: str) -> str:
        """A location inside the stage's (staging) output folder."""
        return storage.join_uri(self.output, *parts)

    def upstream(self, stage: str, *parts: str) -> str:
        """A location inside a finished upstream stage's folder."""
        return storage.join_uri(self.results, stage_folder(stage), *parts)

    def ray_storage(self) -> str:
        """Where Ray Train / Tune keep their run state for this study."""
        return storage.join_uri(self.results, "_ray")


@dataclass(frozen=True)
class Stage:
    """A step of the study: what it reads, what it builds on, and how to run it."""

    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[StageRun], dict]
    describe: Callable[[str], str] | None = None
    extra_hash: Callable[[StudyConfig], object] | None = field(default=None)
    folder: str | None = None  # the results sub-folder, when it is not the stage's name (analyze → analysis)


_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the study's graph (stages register themselves on import)."""
    _STAGES[stage.name] = stage
    return stage


def stages() -> dict[str, Stage]:
    """All known stages, in dependency order."""
    _import_stage_modules()
    return dict(_STAGES)


def _import_stage_modules() -> None:
    import importlib

    for module in ("raycf.training",):
        importlib.import_module(module)
    for module in ("raycf.features", "raycf.cfe", "raycf.masks", "raycf.analysis", "raycf.debug", "raycf.study", "raycf.report"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def stage_folder(name: str) -> str:
    """The sub-folder of the results folder a stage writes (its name unless it says otherwise)."""
    stage = stages().get(name)
    return (stage.folder if stage is not None else None) or name


def stage_hash(study: StudyConfig, name: str) -> str:
    """Hash of a stage's sections and, recursively, of its upstream stages."""
    from raycf.config import hash_object

    stage = stages()[name]
    extra = stage.extra_hash(study) if stage.extra_hash else None
    return hash_object(
        {
            "stage": name,
            "sections": study.section_hash(*stage.sections),
            "extra": extra,
            "upstream": [stage_hash(study, up) for up in stage.upstream],
            "raycf": raycf_version(),  # a new release may compute a stage differently
        }
    )


@functools.cache
def raycf_version() -> str:
    """The installed raycf's version, as the manifest records it (read once per process)."""
    return versions()["raycf"]


def read_marker(results: str, name: str) -> dict | None:
    """A finished stage's marker, or None."""
    location = storage.join_uri(results, stage_folder(name), MARKER_FILE)
    if not storage.exists(location):
        return None
    return json.loads(storage.read_text(location))


def is_fresh(study: StudyConfig, results: str, name: str) -> bool:
    marker = read_marker(results, name)
    return marker is not None and marker.get("hash") == stage_hash(study, name)


def plan(study: StudyConfig, targets: list[str], force: set[str]) -> list[tuple[str, str]]:
    """Stages to visit in order, each with why it runs, or ``"cached"``."""
    graph = stages()
    order: list[str] = []

    def visit(name: str) -> None:
        for up in graph[name].upstream:
            visit(up)
        if name not in order:
            order.append(name)

    for target in targets:
        visit(target)
    results = study.results_uri
    decisions: list[tuple[str, str]] = []
    rerun: set[str] = set()
    for name in order:
        marker = read_marker(results, name)
        if name in force:
            reason = "forced"
        elif any(up in rerun for up in graph[name].upstream):
            reason = "an upstream stage reran"
        elif marker is None:
            reason = "no finished result yet"
        elif marker.get("hash") != stage_hash(study, name):
            reason = "its inputs changed"
        else:
            decisions.append((name, "cached"))
            continue
        decisions.append((name, reason))
        rerun.add(name)
    return decisions


def run_stages(
    study: StudyConfig, targets: list[str], force: set[str] | None = None, command: str = "", resume: bool = False
) -> dict[str, dict]:
    """Run ``targets`` and whatever they depend on that is missing or stale.

    ``resume`` also retries the errored trials of an interrupted search.
    """
    force = force or set()
    unknown = force - set(stages())
    if unknown:
        raise UserError(f"--force {sorted(unknown)[0]}: unknown stage (expected one of {', '.join(stages())})")
    results = study.results_uri
    check_storage_for_cluster(study)
    write_study_files(study, command)
    summaries: dict[str, dict] = {}
    for name, decision in plan(study, targets, force):
        if decision == "cached":
            marker = read_marker(results, name) or {}
            log(f"{name}: skipped, cached (inputs unchanged since {marker.get('finished_at', '?')}; --force {name} reruns it)")
            summaries[name] = marker.get("summary", {})
            continue
        log(f"{name}: runs ({decision})")
        summaries[name] = run_stage(study, name, resume=resume, fresh=name in force)
    finish_manifest(study)
    return summaries


def run_stage(study: StudyConfig, name: str, resume: bool = False, fresh: bool = False, results: str | None = None) -> dict:
    """Run one stage into a staging folder, publish it, write its marker.

    Ray Train and Tune runs are named after the stage and its hash, so an
    interrupted stage resumes from its last checkpoint; ``fresh`` (``--force``)
    deletes those runs first so the stage really starts over.  ``results``
    names the results folder when it is not the study's own location (one
    copied or downloaded elsewhere, as ``raycf report RESULTS`` reads it).
    """
    stage = stages()[name]
    results = results or study.results_uri
    digest = stage_hash(study, name)
    if fresh:
        clear_ray_runs(results, f"{name}-{digest}")
    staging = storage.join_uri(results, ".staging", f"{name}-{uuid.uuid4().hex[:8]}")
    if not storage.is_uri(staging):
        Path(staging).mkdir(parents=True, exist_ok=True)
    log(f"{name}: start")
    started = time.time()
    try:
        summary = stage.run(StageRun(study=study, results=results, output=staging, stage_hash=digest, resume=resume))
    except BaseException:
        storage.remove(staging)
        _remove_if_empty(storage.join_uri(results, ".staging"))
        raise
    storage.publish_folder(staging, storage.join_uri(results, stage_folder(name)))
    _remove_if_empty(storage.join_uri(results, ".staging"))
    duration = time.time() - started
    marker = {
        "stage": name,
        "hash": digest,
        "config_hash": study.config_hash(),
        "started_at": _iso(started),
        "finished_at": _iso(time.time()),
        "duration_s": round(duration, 2),
        "summary": summary,
    }
    storage.write_text(storage.join_uri(results, stage_folder(name), MARKER_FILE), json.dumps(marker, indent=2, default=str))
    log(f"{name}: done in {duration:.1f} s")
    return summary


def clear_ray_runs(results: str, prefix: str) -> None:
    """Delete the Ray Train / Tune run folders of ``<results>/_ray`` whose names start with ``prefix``."""
    import pyarrow.fs as pafs

    filesystem, root = storage.resolve(storage.join_uri(results, "_ray"))
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(prefix):
            filesystem.delete_dir(entry.path)


def _remove_if_empty(location: str) -> None:
    if not storage.is_uri(location):
        try:
            Path(location).rmdir()
        except OSError:
            pass


# ------------------------------------------------------------ study files


def versions() -> dict[str, str]:
    """Versions of raycf and the libraries its numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("raycf", "torch", "torchvision", "ray", "optuna", "pandas", "pyarrow", "numpy", "scikit-learn"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_commit() -> str | None:
    """The commit of the raycf source tree, when it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        completed = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() or None if completed.returncode == 0 else None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def manifest(study: StudyConfig, command: str, started_at: float) -> dict:
    """The ``manifest.json`` content: versions, hashes, commit, times."""
    return {
        "study": study.name,
        "config_hash": study.config_hash(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": command,
        "host": socket.gethostname(),
        "started_at": _iso(started_at),
        "finished_at": None,
    }


def write_study_files(study: StudyConfig, command: str) -> None:
    """``config.yaml`` (the resolved study) and ``manifest.json`` in the results folder."""
    results = study.results_uri
    storage.write_text(storage.join_uri(results, "config.yaml"), dump_yaml(study))
    storage.write_text(storage.join_uri(results, "manifest.json"), json.dumps(manifest(study, command, time.time()), indent=2))


def finish_manifest(study: StudyConfig) -> None:
    """Record the end time and the stages' hashes in ``manifest.json``."""
    location = storage.join_uri(study.results_uri, "manifest.json")
    content = json.loads(storage.read_text(location))
    content["finished_at"] = _iso(time.time())
    content["stages"] = {
        name: {"hash": marker["hash"], "finished_at": marker["finished_at"]}
        for name in stages()
        if (marker := read_marker(study.results_uri, name)) is not None
    }
    storage.write_text(location, json.dumps(content, indent=2))


# ------------------------------------------------------------------ Ray


def ensure_ray() -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one.

    Without ``RAY_ADDRESS`` a new local cluster is started even if another one
    runs on this machine (``ray.init()`` alone would join it, or wait on a
    dead one); ``RAY_ADDRESS=auto`` joins a cluster started with ``ray start``.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")


# Written on the head by `ray up` (the cluster launcher): the node types it may add.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def check_storage_for_cluster(study: StudyConfig) -> None:
    """Refuse a local ``storage_path`` when the study's work can run on other machines.

    Trial drivers and training workers write results and checkpoints to
    ``storage_path`` from whichever node they run on, so on a Ray cluster of
    several nodes, or one the cluster launcher can grow (cluster.yaml's GPU
    workers start from zero), a local folder would scatter them over machines.
    A ``file://`` URI declares a folder that every node mounts (NFS, EFS).
    Starts nothing: the check connects only to a cluster raycf would join.
    """
    if storage.is_uri(study.storage_path) or study.storage_path.startswith("file://"):
        return
    import ray

    if not (ray.is_initialized() or os.environ.get("RAY_ADDRESS") or Path(LAUNCHER_CONFIG).expanduser().is_file()):
        return  # raycf will start a one-node local cluster
    ensure_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    growable = launcher_worker_types()
    if nodes > 1:
        where = f"it has {nodes} nodes"
    elif growable:
        where = f"ray up may add {', '.join(growable)} nodes, per {LAUNCHER_CONFIG}"
    else:
        return
    raise UserError(
        f"storage_path={study.storage_path}: a local folder, which work on other nodes of this Ray cluster "
        f"could not reach ({where}); expected an s3:// or other shared filesystem URI, e.g. "
        f"--set storage_path=s3://BUCKET/raycf, or file:///PATH for a folder every node mounts"
    )


def launcher_worker_types(location: str = LAUNCHER_CONFIG) -> list[str]:
    """Names of the worker node types the cluster launcher may start, from its config on the head."""
    path = Path(location).expanduser()
    if not path.is_file():
        return []
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    head = config.get("head_node_type")
    return sorted(
        name
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head and spec.get("max_workers", config.get("max_workers", 0)) > 0
    )
