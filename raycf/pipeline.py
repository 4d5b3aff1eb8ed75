"""Which stages run, and how what they write lands: the stage cache and the results folder.

A stage's identity is a hash of the study fields it reads (resource-only
fields excluded), of the stages it builds on and of raycf's version.  When a
stage finishes, its folder gets a ``_stage.json`` marker holding that hash; a
stage whose marker matches is *cached* and not run again (``--force STAGE``
reruns it).  The marker is the commit point: a stage that reruns first
withdraws its marker and its downstream stages' markers, and a reader
trusts a folder only with its marker.  On a local disk a stage writes into a
staging folder renamed into place when complete; an object store has no
rename, so there the stage's folder is emptied and written in place, and
the marker, written last, commits it.  Either way a crash never leaves a
folder a later stage trusts.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from raycf.results import artefacts, storage

from raycf.runtime import field_reads
from raycf.results.artefacts import MARKER_FILE
from raycf.runtime.cluster import check_gpus, check_storage_for_cluster
from raycf.config import StudyConfig, hash_object
from raycf.runtime.console import LOG_FOLDER, RAY_LOG_FILE, log, ray_log_path
from raycf.data.datasets import load_splits
from raycf.errors import UserError
from raycf.results.fingerprints import FILE_FIELDS, content_of, file_fingerprints, reads_field
from raycf.results.manifest import finish_manifest, iso_time, raycf_version, write_study_files
from raycf.data.prefix_cache import check_budget, uses_cache
from raycf.stages import STAGES, Stage, StageRun, stage_named

FOLDERS = {stage.name: stage.folder for stage in STAGES}


def stage_hash(study: StudyConfig, name: str, files: dict[str, dict] | None = None) -> str:
    """Hash of a stage's inputs (the files it names by content) and, recursively, of its upstream stages."""
    stage = stage_named(name)
    files = input_files(study) if files is None else files
    identity = {
        "stage": name,
        "reads": study.section_hash(*stage.reads),
        "upstream": [stage_hash(study, up, files) for up in stage.upstream],
        "raycf": raycf_version(),  # a new release may compute a stage differently
    }
    read_files = {field: print_ for field, print_ in files.items() if reads_field(stage.reads, field)}
    if read_files:
        identity["files"] = content_of(read_files)
    return hash_object(identity)


def input_files(study: StudyConfig) -> dict[str, dict]:
    """Content fingerprints of every file field the study names (model.weights, data.root)."""
    return file_fingerprints(study, FILE_FIELDS)


def read_marker(results: str, name: str) -> dict | None:
    """The marker of the finished stage ``name``, or None."""
    return artefacts.read_marker(results, FOLDERS[name])


def plan(study: StudyConfig, targets: list[str], force: set[str]) -> list[tuple[str, str]]:
    """Stages to visit in order, each with why it runs, or ``"cached"``."""
    needed: set[str] = set()

    def visit(name: str) -> None:
        needed.add(name)
        for up in stage_named(name).upstream:
            visit(up)

    for target in targets:
        visit(target)
    results = study.results_uri
    decisions: list[tuple[str, str]] = []
    rerun: set[str] = set()
    files = input_files(study)
    for stage in (stage for stage in STAGES if stage.name in needed):
        marker = read_marker(results, stage.name)
        if stage.name in force:
            reason = "forced"
        elif any(up in rerun for up in stage.upstream):
            reason = "an upstream stage reran"
        elif marker is None:
            reason = "no finished result yet"
        elif marker.get("hash") != stage_hash(study, stage.name, files):
            reason = "its inputs changed"
        else:
            decisions.append((stage.name, "cached"))
            continue
        decisions.append((stage.name, reason))
        rerun.add(stage.name)
    return decisions


def run_stages(study: StudyConfig, targets: list[str], force: set[str] | None = None, command: str = "", resume: bool = False) -> dict[str, dict]:
    """Run ``targets`` and whatever they depend on that is missing or stale.

    ``resume`` also retries the errored trials of an interrupted search.
    """
    force = force or set()
    unknown = force - set(FOLDERS)
    if unknown:
        raise UserError(f"--force {sorted(unknown)[0]}: unknown stage (expected one of {', '.join(FOLDERS)})")
    results = study.results_uri
    check_storage_for_cluster(study)
    check_gpus(study)
    if storage.is_uri(results):  # a missing bucket, no credentials or no permission: one line, before any stage
        storage.check_writable(results)
    decisions = plan(study, targets, force)
    if any(name == "prefix" and decision != "cached" for name, decision in decisions):
        check_prefix_budget(study)
    write_study_files(study, command)
    summaries: dict[str, dict] = {}
    durations: dict[str, float] = {}
    for name, decision in decisions:
        if decision == "cached":
            marker = read_marker(results, name) or {}
            log(f"{name}: skipped, cached (inputs unchanged since {marker.get('finished_at', '?')}; --force {name} reruns it)")
            summaries[name] = marker.get("summary", {})
            continue
        log(f"{name}: runs ({decision})")
        started = time.time()
        try:
            summaries[name] = run_stage(study, name, resume=resume, fresh=name in force)
        finally:
            keep_ray_log(results)
        durations[name] = time.time() - started
    finish_manifest(results, {name: marker for name in FOLDERS if (marker := read_marker(results, name)) is not None})
    if durations:
        log("stages done in " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in durations.items()) + f" ({sum(durations.values()):.0f} s)")
    return summaries


def keep_ray_log(results: str) -> None:
    """Copy Ray's log of this run into ``<results>/logs/`` when the results folder is a URI (written locally as lines come)."""
    local = ray_log_path(results)
    if storage.is_uri(results) and local.is_file():
        storage.write_bytes(storage.join_uri(results, LOG_FOLDER, RAY_LOG_FILE), local.read_bytes())


def check_prefix_budget(study: StudyConfig) -> None:
    """Refuse a frozen-prefix cache over ``prefix.max_gb`` before anything runs (counting the split sizes)."""
    if not uses_cache(study):
        return  # no cache: no need to scan the dataset for its size
    splits = load_splits(study.data, study.seed)
    check_budget(study, splits.num_classes, len(splits.train), len(splits.val))


def run_stage(study: StudyConfig, name: str, resume: bool = False, fresh: bool = False, results: str | None = None) -> dict:
    """Run one stage and commit it: its folder in place (staged and renamed locally, written in place on an object store), then its marker.

    Ray Train and Tune runs are named after the stage and its hash, so an
    interrupted stage resumes from its last checkpoint, if its upstream stages
    have not been written again since (:func:`keep_or_clear_runs`); ``fresh``
    (``--force``) deletes those runs first so the stage really starts over.  ``results``
    names the results folder when it is not the study's own location (one
    copied or downloaded elsewhere, as ``raycf report RESULTS`` reads it).
    """
    stage = stage_named(name)
    results = results or study.results_uri
    files = input_files(study)
    digest = stage_hash(study, name, files)
    keep_or_clear_runs(results, name, digest, fresh)
    withdraw_markers(results, name)
    started = time.time()
    stage_study = field_reads.tagged(study, name) if field_reads.enabled() else study
    run = StageRun(study=stage_study, results=results, output=storage.join_uri(results, stage.folder), stage_hash=digest, folders=FOLDERS, resume=resume)
    summary = run_in_place(stage, run) if storage.is_uri(results) else run_staged(stage, run)
    duration = time.time() - started
    marker = {
        "stage": name,
        "hash": digest,
        "config_hash": study.config_hash(),
        "started_at": iso_time(started),
        "finished_at": iso_time(time.time()),
        "duration_s": round(duration, 2),
        "inputs": {field: print_ for field, print_ in files.items() if reads_field(stage.reads, field)},
        "summary": summary,
    }
    storage.write_text(storage.join_uri(results, stage.folder, MARKER_FILE), json.dumps(marker, indent=2, default=str))
    return summary


def downstream_of(name: str) -> list[str]:
    """The stages that build on ``name``, directly or not, in table order."""
    below: set[str] = {name}
    for stage in STAGES:
        if any(up in below for up in stage.upstream):
            below.add(stage.name)
    return [stage.name for stage in STAGES if stage.name in below and stage.name != name]


def withdraw_markers(results: str, name: str) -> None:
    """Delete the markers of ``name`` and of every stage built on it, before ``name`` reruns.

    Until the stage finishes again, neither its folder nor a result derived
    from its old one (a final stage naming an old search's trial) is trusted.
    """
    for stage in (name, *downstream_of(name)):
        storage.remove(storage.join_uri(results, FOLDERS[stage], MARKER_FILE))


def run_staged(stage: Stage, run: StageRun) -> dict:
    """Run ``stage`` into a local staging folder and rename it into place once complete."""
    staging = storage.join_uri(run.results, ".staging", f"{stage.name}-{uuid.uuid4().hex[:8]}")
    Path(staging).mkdir(parents=True, exist_ok=True)
    run.output = staging
    try:
        summary = stage.run(run)
    except BaseException:
        storage.remove(staging)
        _remove_if_empty(storage.join_uri(run.results, ".staging"))
        raise
    storage.publish_folder(staging, storage.join_uri(run.results, stage.folder))
    _remove_if_empty(storage.join_uri(run.results, ".staging"))
    return summary


def run_in_place(stage: Stage, run: StageRun) -> dict:
    """Run ``stage`` straight into its folder on an object store (no rename there).

    The folder is emptied first (its marker is gone already), so no file of an
    earlier run survives beside the new ones; the marker, written by the
    caller after this returns, is the commit.  A crash leaves a folder
    without a marker, which no reader trusts and the next run empties.
    """
    storage.remove(run.output)
    return stage.run(run)


def clear_ray_runs(results: str, prefix: str) -> None:
    """Delete the Ray Train / Tune run folders of ``<results>/_ray`` whose names start with ``prefix``."""
    filesystem, root = storage.resolve(storage.join_uri(results, "_ray"))
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(prefix):
            filesystem.delete_dir(entry.path)


def upstream_writes(results: str, name: str) -> dict[str, str | None]:
    """The write of each stage ``name`` builds on (:func:`~raycf.results.artefacts.written_key`), None where it has not run."""
    markers = {up: read_marker(results, up) for up in stage_named(name).upstream}
    return {up: artefacts.marker_key(marker) if marker else None for up, marker in markers.items()}


def keep_or_clear_runs(results: str, name: str, digest: str, fresh: bool) -> None:
    """Keep the stage's Ray runs at ``digest`` for it to resume only if they were started on the upstream writes there now.

    The hash names a stage's inputs, not the bytes its upstream stages wrote:
    after ``--force base`` the CFE bank's run of the same hash was trained on
    the old base model's features, and resuming it (or, finished, returning
    it) would commit a stage built on the old model.  So each start records
    the upstream writes in ``_ray/<stage>-<hash>-upstream.json``; a record
    that differs, or none, or ``fresh`` (``--force``) deletes the runs first.
    """
    record = storage.join_uri(results, "_ray", f"{name}-{digest}-upstream.json")
    writes = upstream_writes(results, name)
    if not fresh and storage.exists(record) and json.loads(storage.read_text(record)) == writes:
        return
    clear_stage_runs(results, name, digest)
    storage.write_text(record, json.dumps(writes, indent=2, sort_keys=True))


def clear_stage_runs(results: str, name: str, digest: str) -> None:
    """Delete every Ray run of stage ``name`` at hash ``digest``: ``debug-<hash>``, ``debug-control-<hash>``, ``search-<hash>-driver``, …"""
    filesystem, root = storage.resolve(storage.join_uri(results, "_ray"))
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        return
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(f"{name}-") and digest in entry.base_name:
            filesystem.delete_dir(entry.path)


def _remove_if_empty(location: str) -> None:
    if not storage.is_uri(location):
        try:
            Path(location).rmdir()
        except OSError:
            pass
