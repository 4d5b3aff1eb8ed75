"""A search trial's overhead: its wall time beyond its epochs, on the digits smoke study with a search of 8 trials.

Runs what ``raycf study studies/digits.yaml --smoke --set search.num_samples=8``
runs up to its final stage (every stage the search and the final evaluation
need), in this process, into a temporary ``storage_path``, with Ray started by raycf
(:func:`raycf.runtime.cluster.ensure_ray`, or the cluster this process already
joined).  Then, from ``leaderboard.parquet``, for each trial that did not
fail: ``wall_s`` (its wall time from the driver's start event to its end
event) minus ``epochs_s`` (the sum of its epochs' ``epoch_s``): what the trial
costs beyond training and validating (reading G, the image store and the
prefix cache, reporting and checkpointing) and, for a trial that starts a
new actor, the actor's start and imports.  The search stage's own duration is
printed beside the ratio.

``trial_overhead_s``: the median over trials, in seconds.  Target ≤ 2.
The smoke study's own search (2 trials, 2 at a time) would time only the
first wave, whose trials start the search's actors; a search of 8 trials, 2
at a time, is the shape of a real one: the first wave starts the actors and
the later trials reuse them (``TuneConfig(reuse_actors=True)``).  The first
wave's median is printed beside the ratio.  Takes a few minutes (base
training and every stage before the search run too).

The profile printed beside it splits each trial's overhead (medians over
trials): ``start`` (the driver creating the trial → its function running:
scheduling, the actor's start and imports, unpacking the trial context),
``job`` (building the debug job: masks, G, detection quality), ``setup``
(the loop's start-up: image store, prefix cache, model, loaders),
``reports`` (every epoch's report and checkpoint but the last) and ``end``
(the last report, the trial's end and the driver seeing it).  The times
come from the driver's leaderboard records (this process is the driver)
and the per-epoch ``setup_s``, ``report_s``, ``job_s`` and ``entered_at``
metrics the trials report.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

from benchmarks import Ratio

STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"
COLUMNS = ("wall_s", "epochs_s")
OVERRIDES = ("search.num_samples=8",)  # the smoke study's max_concurrent (2) stands


def measure() -> list[Ratio]:
    from raycf.runtime import console
    from raycf.config import load_study
    from raycf.search.leaderboard import read_leaderboard
    from raycf.pipeline import read_marker, run_stages

    with tempfile.TemporaryDirectory(prefix="raycf-bench-search-") as storage, finished_records() as records:
        study = load_study(STUDY, overrides=[f"storage_path={storage}", *OVERRIDES], smoke=True)
        previous = console.configured_results()
        console.configure(study.results_uri)  # as the command line does: Ray's own messages go to <results>/logs/ray.log
        started = time.perf_counter()
        try:
            run_stages(study, ["final"], command="python -m benchmarks search")
        finally:
            console.configure(previous)
        total = time.perf_counter() - started
        board = read_leaderboard(study.results_uri)
        search_s = (read_marker(study.results_uri, "search") or {}).get("duration_s", float("nan"))
    missing = [column for column in COLUMNS if column not in board.columns]
    if missing:
        raise RuntimeError(f"leaderboard.parquet has no {', '.join(missing)} column (columns: {', '.join(board.columns)})")
    overheads: dict[str, float] = {}  # trial id -> seconds outside its epochs, for every trial that did not fail
    first_wave = set(board.sort_values("started_at").head(study.search.max_concurrent)["trial_id"])
    for row in board.itertuples(index=False):
        overhead = float(row.wall_s) - float(row.epochs_s)
        counted = row.status != "error" and math.isfinite(overhead)
        if counted:
            overheads[row.trial_id] = overhead
        print(
            f"search: trial {row.trial_id} ({row.status}{', control' if row.is_control else ''}, {row.epochs} epochs): "
            f"wall {float(row.wall_s):.1f} s, epochs {float(row.epochs_s):.1f} s, overhead {overhead:.1f} s{'' if counted else ' (not counted)'}"
            f"{' (first wave: starts an actor)' if row.trial_id in first_wave else ''}",
            flush=True,
        )
    first_overheads = [seconds for trial_id, seconds in overheads.items() if trial_id in first_wave]
    first_shown = f"{statistics.median(first_overheads):.1f} s" if first_overheads else "none finished"
    print(f"search: the first wave's {len(first_wave)} trials start the actors (median overhead {first_shown}); every later trial reuses one", flush=True)
    if not overheads:
        raise RuntimeError(f"the smoke search finished no trial with a wall time and epoch times ({len(board)} trials)")
    print(
        f"search: digits smoke study to its final stage in {total:.0f} s; search stage {search_s:.1f} s for {len(board)} trials "
        f"(at most {study.search.max_concurrent} at a time) whose epochs took {float(board['epochs_s'].sum()):.1f} s",
        flush=True,
    )
    print_profile(list(records.values()))
    return [Ratio("trial_overhead_s", statistics.median(overheads.values()), "<=", 2.0)]


@contextlib.contextmanager
def finished_records() -> Iterator[dict]:
    """Every search trial's leaderboard record as the driver finishes it (trial id -> record), collected while the search runs here."""
    from raycf.search.leaderboard import LeaderboardWriter

    records: dict = {}
    finish = LeaderboardWriter.finish

    def collecting(self, record, status, error=""):
        finish(self, record, status, error)
        records[record.trial_id] = record

    LeaderboardWriter.finish = collecting
    try:
        yield records
    finally:
        LeaderboardWriter.finish = finish


def trial_profile(record) -> dict[str, float] | None:
    """Where one trial's time outside its epochs went, in seconds (see the module's docstring); None without epochs."""
    history = sorted(record.history, key=lambda row: row.get("epoch", 0))
    if not history or "entered_at" not in history[0] or not record.started:
        return None
    first = history[0]
    parts = {
        "start": float(first["entered_at"]) - record.started,
        "job": float(first["job_s"]),
        "setup": float(first["setup_s"]),
        "reports": float(sum(row["report_s"] for row in history[1:])),
    }
    epochs = sum(float(row["epoch_s"]) for row in history)
    parts["end"] = float(record.wall_s) - epochs - sum(parts.values())
    return parts


def print_profile(records: list) -> None:
    """The median of each part of the trials' overhead, one line."""
    profiles = [profile for profile in map(trial_profile, records) if profile is not None and math.isfinite(profile["end"])]
    if not profiles:
        print("search: no trial profile (no trial reported its start-up times)", flush=True)
        return
    parts = {name: statistics.median(profile[name] for profile in profiles) for name in profiles[0]}
    shown = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items())
    print(f"search: trial overhead profile, median of {len(profiles)} trials: {shown}", flush=True)
