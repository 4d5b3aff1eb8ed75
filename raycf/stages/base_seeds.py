"""The final stage's comparison over more base models (``final.base_seeds`` = n > 1).

Base seed 0 is the study's own base model: its control and best rows are
those of the final stage (its seed grid with ``final.seeds`` > 1, else the
search's own control and best trial).  Each base seed s = 1 … n − 1 gets a
results folder of its own, ``<results>/base_seeds/seed<s>/``, holding the
study's image store (linked locally, copied on an object store: the same
split and images) and the stages that depend on the base model, run by the
pipeline's own :func:`~raycf.pipeline.run_stage` for the study with seed
``study.seed + 1000·s``: ``base``, ``features``, ``cfe``, ``masks`` and
``prefix``.  That seed draws the base model's initialisation, data order,
augmentation and dropout, the CFE bank's draw and the views; the split
(drawn when the images were decoded) stays the study's.  Each stage there
is cached by its marker and hash as in the study's own folder, so an
interrupted run resumes.  Then the control and the best trial's parameters
(with G from that base model's own masks at the best trial's τ and f) are
retrained over ``final.seeds`` seeds with the final stage's seed grid
(:func:`raycf.stages.final.train_seed_grid`, resumable), run once over every
split, and committed as ``grid/seeds.parquet`` with ``grid/key.json``
(reused while the key, :func:`grid_key`, is unchanged).

Outputs, in ``final/``: ``base_seeds.parquet`` (one row per base seed,
model and retraining seed) and ``base_seed_summary.parquet``
(:func:`raycf.method.base_models.base_seed_summary`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from raycf.config import StudyConfig, hash_object, with_values
from raycf.method.base_models import base_seed_summary, format_base_seed_summary
from raycf.method.replication import BEST, CONTROL
from raycf.results import storage
from raycf.results.artefacts import MARKER_FILE, base_model_bytes, base_predictions, class_names, read_marker, store_ref
from raycf.results.manifest import raycf_version
from raycf.runtime.console import log
from raycf.stages.stage import StageRun

BASE_SEEDS_FOLDER = "base_seeds"
BASE_SEEDS_FILE = "base_seeds.parquet"
BASE_SEED_SUMMARY_FILE = "base_seed_summary.parquet"
SEED_STRIDE = 1000  # base seed s trains with the study's seed + 1000·s: apart from every retraining seed (study seed + 0 … final.seeds − 1)
BUILT_STAGES = ("base", "features", "cfe", "masks", "prefix")  # what a base model's comparison needs, in order
GRID_FOLDER, GRID_FILE, GRID_KEY_FILE = "grid", "seeds.parquet", "key.json"
COLUMNS = ["base_seed", "study_seed", "model", "seed", "order_seed", "best_epoch", "train_acc", "val_acc", "test_acc", "base_test_acc"]


def base_seed_study(study: StudyConfig, base_seed: int) -> StudyConfig:
    """The study as base seed ``base_seed`` runs it: its seed moved by 1000·``base_seed`` (0: the study itself)."""
    return study if base_seed == 0 else with_values(study, {"seed": study.seed + SEED_STRIDE * base_seed})


def base_seed_folder(results: str, base_seed: int) -> str:
    """``<results>/base_seeds/seed<s>``: the results folder of base seed ``s`` ≥ 1."""
    return storage.join_uri(results, BASE_SEEDS_FOLDER, f"seed{base_seed}")


def share_images(results: str, folder: str) -> None:
    """The study's image store in ``folder/images``, its marker last: hard links on a local disk, a copy on an object store.

    Nothing is done when the copy's marker is already the study's (the same write).
    """
    source, target = storage.join_uri(results, "images"), storage.join_uri(folder, "images")
    marker = storage.read_text(storage.join_uri(source, MARKER_FILE))
    target_marker = storage.join_uri(target, MARKER_FILE)
    if storage.exists(target_marker) and storage.read_text(target_marker) == marker:
        return
    storage.remove(target)
    filesystem, root = storage.resolve(source)
    _, destination = storage.resolve(target)
    files = [entry for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)) if entry.type == pafs.FileType.File and entry.base_name != MARKER_FILE]
    for entry in files:
        relative = entry.path[len(root.rstrip("/")) + 1 :]
        if isinstance(filesystem, pafs.LocalFileSystem):
            Path(destination, relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(entry.path, Path(destination, relative))  # the store is never written again: a link is a copy
            except OSError:
                shutil.copyfile(entry.path, Path(destination, relative))
        else:
            filesystem.copy_file(entry.path, f"{destination.rstrip('/')}/{relative}")
    storage.write_text(target_marker, marker)


def build_base_model(study: StudyConfig, results: str, base_seed: int) -> tuple[StudyConfig, str]:
    """Base seed ``base_seed``'s study and folder, with its base model and what depends on it there (each stage cached by its marker)."""
    from raycf.pipeline import FOLDERS, run_stage, stage_hash

    seeded, folder = base_seed_study(study, base_seed), base_seed_folder(results, base_seed)
    share_images(results, folder)
    for name in BUILT_STAGES:
        marker = read_marker(folder, FOLDERS[name])
        if marker is not None and marker.get("hash") == stage_hash(seeded, name):
            log(f"final: base seed {base_seed}: {name} cached")
            continue
        log(f"final: base seed {base_seed} (seed {seeded.seed}): {name} runs")
        run_stage(seeded, name, results=folder)
    return seeded, folder


def grid_key(seeded: StudyConfig, points: dict[str, dict[str, Any]]) -> str:
    """What a base model's seed grid depends on: its masks and prefix cache, the retraining settings, the parameters, the seeds."""
    from raycf.pipeline import stage_hash

    return hash_object(
        {
            "masks": stage_hash(seeded, "masks"),
            "prefix": stage_hash(seeded, "prefix"),
            "retraining": seeded.section_hash("debug", "search.metric", "search.mode", "final.seeds"),
            "points": points,
            "raycf": raycf_version(),
        }
    )


def base_seed_grid(run: StageRun, seeded: StudyConfig, folder: str, points: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The control and best retrained over ``final.seeds`` seeds on one base model: ``final/seeds.parquet``'s rows (reused when committed with this key)."""
    from raycf.outputs.predict import predict_on_ray
    from raycf.pipeline import FOLDERS
    from raycf.stages.final import scoring_cache, seed_rows, seeds_frames, train_seed_grid

    key = grid_key(seeded, points)
    location, key_location = storage.join_uri(folder, GRID_FOLDER, GRID_FILE), storage.join_uri(folder, GRID_FOLDER, GRID_KEY_FILE)
    if storage.exists(key_location) and json.loads(storage.read_text(key_location)).get("key") == key:
        log(f"final: base seed {seeded.seed}: its seed grid is cached ({location})")
        return storage.read_table(location).to_pandas()
    storage.remove(key_location)
    grid_run = StageRun(study=seeded, results=folder, output=storage.join_uri(folder, GRID_FOLDER), stage_hash=key[:16], folders=FOLDERS, resume=run.resume)
    base_bytes = base_model_bytes(folder)
    seed_runs = train_seed_grid(grid_run, points, base_bytes, {})
    models = {seed_run.name: seed_run.model_bytes for seed_run in seed_runs}
    predictions = predict_on_ray(seeded, store_ref(folder), models, tasks=seeded.search.max_concurrent, prefix=scoring_cache(folder, seeded, points))
    seeds, _ = seeds_frames(seeded, seed_runs, seed_rows(predictions, seed_runs), points, class_names(folder))
    storage.write_frame(seeds, location)
    storage.write_text(key_location, json.dumps({"key": key, "study_seed": seeded.seed}))  # the commit: written last
    return seeds


def base_test_accuracy(results: str) -> float:
    """The base model's test accuracy, from its features stage's predictions."""
    test = base_predictions(results).query("split == 'test'")
    return float((test["pred"] == test["label"]).mean())


def own_rows(study: StudyConfig, results: str, table2: pd.DataFrame, seeds: pd.DataFrame | None) -> pd.DataFrame:
    """Base seed 0's rows: the control and best of the seed grid (``final.seeds`` > 1), else Table 2's control and debugged model (seed 0)."""
    if seeds is not None:
        frame = seeds[seeds["model"].isin([CONTROL, BEST])].copy()
    else:
        rows = table2.set_index("model").loc[["control", "debugged"]].reset_index()
        frame = rows.assign(model=[CONTROL, BEST], seed=0, order_seed=study.seed)
    return frame.assign(base_seed=0, study_seed=study.seed, base_test_acc=base_test_accuracy(results))


def base_seed_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """``final/base_seeds.parquet``: every base seed's control and best rows, in (base seed, seed, model) order."""
    frame = pd.concat([f[COLUMNS] for f in frames], ignore_index=True)
    frame["order"] = frame["model"].map({CONTROL: 0, BEST: 1})
    frame = frame.sort_values(["base_seed", "seed", "order"], kind="stable").drop(columns="order").reset_index(drop=True)
    return frame.astype({"base_seed": "int64", "study_seed": "int64", "seed": "int64", "order_seed": "int64", "best_epoch": "int64"})


def run_base_seeds(run: StageRun, points: dict[str, dict[str, Any]], table2: pd.DataFrame, seeds: pd.DataFrame | None) -> dict:
    """Every base seed's comparison (see the module docstring); writes ``final/base_seeds.parquet`` and ``final/base_seed_summary.parquet``, prints the summary."""
    study, results = run.study, run.results
    count = study.final.base_seeds
    compared = {CONTROL: points[CONTROL], BEST: points[BEST]}
    log(f"final: the control and the best trial's parameters on {count} base models (base seeds 1 … {count - 1} under {base_seed_folder(results, 1).rsplit('/', 1)[0]})")
    frames = [own_rows(study, results, table2, seeds)]
    for base_seed in range(1, count):
        seeded, folder = build_base_model(study, results, base_seed)
        grid = base_seed_grid(run, seeded, folder, compared)
        frames.append(grid.assign(base_seed=base_seed, study_seed=seeded.seed, base_test_acc=base_test_accuracy(folder)))
    frame = base_seed_frame(frames)
    summary = base_seed_summary(frame)
    storage.write_frame(frame, run.path(BASE_SEEDS_FILE))
    storage.write_frame(summary, run.path(BASE_SEED_SUMMARY_FILE))
    print(f"\n{format_base_seed_summary(summary)}", flush=True)
    between = summary.iloc[-1]
    return {
        "base_seeds": count,
        **{f"best_minus_control_test_acc_over_base_models{suffix}": round(float(between[column]), 6)
           for suffix, column in (("", "test_diff_mean"), ("_sd", "test_diff_sd"), ("_ci_low", "test_diff_ci_low"), ("_ci_high", "test_diff_ci_high"))},
    }  # fmt: skip
