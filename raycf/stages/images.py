"""Stage ``images``: decode every image of every split once, on CPUs, into the uint8 image store (:mod:`raycf.data.image_store`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raycf.runtime.cluster import ensure_ray
from raycf.runtime.console import log
from raycf.data.datasets import stored_side
from raycf.data.image_store import write_store
from raycf.runtime.ray_data import data_context

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def run(run: "StageRun") -> dict:
    """Write ``<split>.npy`` and ``<split>.parquet`` for train, val and test."""
    study = run.study
    ensure_ray()
    data_context()
    counts, planted = write_store(study.data, study.seed, run.output, study.data.decode_actors)
    side = stored_side(study.data)
    size = sum(counts.values()) * side * side * 3
    log(f"images: {', '.join(f'{split} {count}' for split, count in counts.items())} images decoded at {side}×{side} ({size / 1e6:.1f} MB)")
    summary = {**{f"{split}_images": count for split, count in counts.items()}, "side": side, "bytes": size}
    if study.data.plant is not None:  # how many images of each split carry the planted feature
        summary.update({f"{split}_planted": count for split, count in planted.items()})
        log(f"images: planted {study.data.plant.kind} on {study.data.plant.class_name}: " + ", ".join(f"{split} {count}" for split, count in planted.items()))
    return summary
