"""Every stage's hash covers the study fields its code reads, and it declares no field it does not read.

The smoke study (and ``raycf debug`` on a copy of it) ran with
``RAYCF_FIELD_LOG``: each stage's code, on the driver and in Ray's workers,
recorded the study fields it read (:mod:`raycf.runtime.field_reads`).  A read that
the stage's hash does not cover (its own ``reads`` and, through their hashes,
its upstream stages') would serve a stale result; a declared field that the
code never reads reruns it for nothing.  Resource fields are aside (they
change where work runs, not what it computes).
"""

from __future__ import annotations

import shutil
import typing

import pytest
from pydantic import BaseModel

from conftest import ray_address, run_cli
from raycf.config import StudyConfig, is_hashed
from raycf.runtime.field_reads import FIELD_LOG, reads_by_stage
from raycf.stages import STAGES, stage_named

# Declared fields the digits smoke study's code path does not reach: other
# datasets, other weights, other schedules.  Each is read on another branch.
OTHER_BRANCHES = {
    "data.root",  # digits is embedded
    "data.bbox_crop",  # cub200 only
    "base.head_lr",  # base.head_epochs: 0
    "final.class_group",  # final.seeds: 1
    "final.suppress_auto",  # final.treatments: none
    "data.preprocess.resize",  # resize_crop and weights only: the smoke study squashes
}
# Where results go, not what they hold (the Optuna study and the report are named after the study).
LOCATION_FIELDS = {"name", "storage_path"}


def _field(path: list[str]):
    """The pydantic field at ``path`` (None past a tuple or mapping of models)."""
    model: type[BaseModel] = StudyConfig
    field = None
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return field
        field = model.model_fields[part]
        model = field.annotation
    return field


def is_resource(dotted: str) -> bool:
    """Whether ``dotted`` is, or lies under, a resource field (a display field a stage names, search.pareto, is not)."""
    if covered(dotted, named_display_fields()):
        return False
    parts = dotted.split(".")
    return any(field is not None and not is_hashed(field) for field in (_field(parts[: k + 1]) for k in range(len(parts))))


def named_display_fields() -> set[str]:
    """Unhashed fields that a stage names on its own in its reads (search.pareto, by the report): hashed there."""
    fields = {read: _field(read.split(".")) for stage in STAGES for read in stage.reads}
    return {read for read, field in fields.items() if field is not None and not is_hashed(field)}


def leaves(dotted: str) -> set[str]:
    """The hashed leaf fields under a declared read (a section or a field)."""
    field = _field(dotted.split("."))
    annotation = field.annotation if field is not None else None
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return {dotted}
    found = set()
    for name, child in annotation.model_fields.items():
        if is_hashed(child):
            found |= leaves(f"{dotted}.{name}")
    return found


def covered(field: str, reads: typing.Iterable[str]) -> bool:
    return any(field == read or field.startswith(f"{read}.") for read in reads)


def hash_reads(name: str) -> set[str]:
    """The reads a stage's hash covers: its own, its upstream stages' (through their hashes) and the seed."""
    stage = stage_named(name)
    return {"seed", *stage.reads, *(read for up in stage.upstream for read in hash_reads(up))}


@pytest.fixture(scope="module")
def field_reads(smoke_study_results, tmp_path_factory) -> dict[str, set[str]]:
    """The fields each stage read: the smoke study's log, plus ``raycf debug`` run on a copy of its results."""
    log = smoke_study_results.parent.parent / "fields.log"
    folder = tmp_path_factory.mktemp("debug-reads")
    shutil.copytree(smoke_study_results, folder / "results" / "digits", ignore=shutil.ignore_patterns("_ray", "search", "final", "report"))
    debug_log = folder / "fields.log"
    completed = run_cli(
        "debug", "studies/digits.yaml", "--smoke", "--set", f"storage_path={folder / 'results'}", "debug.epochs=1",
        env_extra={"RAY_ADDRESS": ray_address(), FIELD_LOG: str(debug_log)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    reads = reads_by_stage(str(log))
    reads["debug"] = reads_by_stage(str(debug_log))["debug"]
    return {stage: {field for field in fields if not is_resource(field) and field not in LOCATION_FIELDS} for stage, fields in reads.items()}


def test_every_stage_ran_under_the_log(field_reads):
    assert set(field_reads) == {stage.name for stage in STAGES}


@pytest.mark.parametrize("name", [stage.name for stage in STAGES])
def test_a_stages_hash_covers_every_field_its_code_reads(field_reads, name):
    uncovered = sorted(field for field in field_reads[name] if not covered(field, hash_reads(name)))
    assert uncovered == [], f"{name} reads fields its hash does not cover"


def upstream_closure(name: str) -> set[str]:
    """The stage and every stage it builds on."""
    return {name, *(up_name for up in stage_named(name).upstream for up_name in upstream_closure(up))}


@pytest.mark.parametrize("name", [stage.name for stage in STAGES])
def test_a_stage_reads_every_field_it_declares(field_reads, name):
    """A declared field is read by the stage or by a stage it builds on (it then reruns with it anyway)."""
    declared = {leaf for read in stage_named(name).reads for leaf in leaves(read)}
    read_here = set().union(*(field_reads[stage] for stage in upstream_closure(name)))
    unread = sorted(leaf for leaf in declared - OTHER_BRANCHES if not any(covered(field, [leaf]) for field in read_here))
    assert unread == [], f"{name} declares fields no code it depends on reads"


def test_the_other_branch_fields_are_not_read_here(field_reads):
    """The exemptions above stay true: a field read on this path must not be exempted."""
    read_anywhere = set().union(*field_reads.values())
    assert sorted(OTHER_BRANCHES & read_anywhere) == []
