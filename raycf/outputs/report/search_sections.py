"""Sections on the search: the leaderboard, its Pareto front, Optuna's views, trials against validation noise."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from raycf.config import StudyConfig
from raycf.outputs.report.blocks import (
    LEADERBOARD_METRICS,
    LEADERBOARD_TOP,
    Figure,
    ReportContext,
    Section,
    png_bytes,
)
from raycf.outputs.report.figures import pareto_figure
from raycf.results import storage

if TYPE_CHECKING:
    pass

def search_section(context: ReportContext) -> Section:
    """The leaderboard's top trials, its Pareto front, and Optuna's views of the search."""
    from raycf.search.leaderboard import (
        pareto_front,
        read_leaderboard,
        sort_by_objective,
    )

    section = Section("search", "Search (Ray Tune + Optuna)")
    if context.required(section, "leaderboard.parquet", remedy="the search has not run (`raycf study STUDY`)") is None:
        return section
    search = context.study.search
    board = read_leaderboard(context.results)
    parameters = board.attrs.get("parameters", [])
    ranked = sort_by_objective(board, search.metric, search.mode)
    wanted = ("trial_id", "status", "is_control", *parameters, search.metric, *LEADERBOARD_METRICS)
    columns = [c for c in dict.fromkeys(wanted) if c in ranked.columns]
    section.table(ranked[columns].head(LEADERBOARD_TOP), f"Leaderboard: top {min(LEADERBOARD_TOP, len(ranked))} of {len(ranked)} trials by {search.metric} ({search.mode})")
    x, y = search.pareto
    if x in board.columns and y in board.columns:
        front = pareto_front(board, x, y)
        section.table(front[[c for c in columns if c in front.columns]], f"Pareto front of {x} vs {y} (both maximised)")
        section.add(Figure("pareto", f"Every trial in ({x}, {y}); the Pareto front joined.", pareto_figure(board, front, x, y)))
    for figure in optuna_figures(context, section):
        section.add(figure)
    return section


def optuna_figures(context: ReportContext, section: Section) -> list[Figure]:
    """Parameter importances and parallel coordinates from the study's Optuna storage."""
    import warnings

    import matplotlib.pyplot as plt
    import optuna

    study = load_optuna_study(context)
    if study is None:
        section.note("No Optuna study found (optuna.db or search.storage): no parameter importances.")
        return []
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    section.paragraph(f"Optuna study {study.study_name}: {len(finished)} finished trials told to the sampler (the control is run apart from it).")
    figures = []
    plots: list[tuple[str, str, Callable]] = [
        ("param_importances", "Optuna's parameter importances (fANOVA) for the objective.", functools.partial(optuna.visualization.matplotlib.plot_param_importances, evaluator=importance_evaluator(context))),
        ("parallel_coordinate", "Optuna's parallel coordinates: each line a trial, coloured by the objective.", optuna.visualization.matplotlib.plot_parallel_coordinate),
    ]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name, caption, plot in plots:
        if len(finished) < 2:
            section.note(f"{name.replace('_', ' ')}: needs at least 2 finished Optuna trials (this study has {len(finished)}).")
            continue
        # Optuna's plots switch pyplot to its ggplot style: keep that inside this context.
        with warnings.catch_warnings(), plt.style.context("default"), plt.rc_context({"figure.figsize": (9.0, 5.0)}):
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib module experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as error:  # e.g. importances of parameters that never varied
                section.note(f"{name.replace('_', ' ')}: Optuna could not draw it ({str(error).splitlines()[0]}).")
                continue
            figure = np.ravel(axes)[0].figure
            figures.append(Figure(name, caption, png_bytes(figure)))
    return figures


def search_noise_section(context: ReportContext) -> Section:
    """Do the trials differ by more than validation noise?  The spread of val_acc, its binomial standard error, Optuna's importances.

    Also writes the numbers as ``search_noise.json`` beside the page
    (validation data only: the leaderboard, the validation split's size and
    the Optuna storage).
    """
    from raycf.method.search_noise import search_noise, seed_spread
    from raycf.search.leaderboard import read_leaderboard

    section = Section("search-noise", "Search: do trials differ by more than validation noise?")
    images = validation_images(context)
    if not storage.exists(storage.join_uri(context.results, "leaderboard.parquet")) or images is None:
        section.note("leaderboard.parquet or the validation split's size (analysis/error_scores.parquet) is missing: the search has not run.")
        return section
    board = read_leaderboard(context.results)
    comparison, best = trial_comparison(context, board)
    seeds = context.frame("final", "seeds.parquet")
    noise = search_noise(board, images, comparison=comparison, best=best, seeds=seed_spread(seeds) if seeds is not None else None)
    section.paragraph(noise["verdict"])
    section.paragraph(scheduler_note(context.study))
    shown = {key: value for key, value in noise.items() if key not in ("verdict", "metric", "seed_sd")}
    values = ["–" if value is None or value != value else f"{value:.4g}" if isinstance(value, float) else str(value) for value in shown.values()]
    section.table(pd.DataFrame({"": list(shown), noise["metric"]: values}), "The searched trials' objective (control excluded) and McNemar's comparison with the best trial")
    if comparison is not None and len(comparison):
        section.table(comparison, f"McNemar's exact test of each trial against the best ({best}) on the validation images they disagree on")
        noise["comparisons"] = comparison.to_dict("records")
    importances, why = param_importances(context)
    if importances:
        frame = pd.DataFrame({"parameter": list(importances), "importance": list(importances.values())})
        section.table(frame, f"Optuna's parameter importances (fANOVA, seed {context.study.seed}) for the objective")
    else:
        section.note(f"No parameter importances: {why}.")
    record = {**noise, "importances": importances, "importance_evaluator": "fanova", "importance_seed": context.study.seed}
    section.files["search_noise.json"] = json.dumps({key: _plain(value) for key, value in record.items()}, indent=2)
    return section


def trial_comparison(context: ReportContext, board: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """McNemar's test of every trial that kept its validation predictions against the best such searched trial, and that trial's id."""
    from raycf.method.search_noise import compare_with_best
    from raycf.results.artefacts import trial_val_predictions
    from raycf.search.leaderboard import sort_by_objective

    labels = context.frame("images", "val.parquet")
    predictions = trial_val_predictions(board)
    ranked = sort_by_objective(board, context.study.search.metric, context.study.search.mode)
    candidates = [str(row["trial_id"]) for row in ranked.to_dict("records") if not row.get("is_control") and str(row["trial_id"]) in predictions]
    if labels is None or not candidates:
        return None, ""
    return compare_with_best(predictions, labels["label"].to_numpy(), candidates[0]), candidates[0]


def scheduler_note(study: StudyConfig) -> str:
    """Whether the search's stop decisions can be reproduced: ASHA's asynchronous ones depend on timing."""
    search = study.search
    if search.scheduler.asha is None:
        return "No early stopping: every trial ran its whole schedule."
    if search.deterministic:
        return "Deterministic search (search.deterministic): one trial at a time, so ASHA's stop decisions and TPE's proposals follow trial order and a rerun reproduces them."
    return (
        f"ASHA stops trials asynchronously, {search.max_concurrent} at a time: which trials it stops depends on the order results arrive in, "
        "so on timing and machine load, and a rerun may stop others (search.deterministic: true runs one trial at a time and reproduces them)."
    )


def validation_images(context: ReportContext) -> int | None:
    """The validation split's size, from the analysis (or the masks), or None."""
    error_scores = context.frame("analysis", "error_scores.parquet")
    if error_scores is not None and (error_scores["split"] == "val").any():
        return int(error_scores.loc[error_scores["split"] == "val", "images"].iloc[0])
    location = storage.join_uri(context.results, "masks", "val")
    return storage.read_table(location, columns=["image_index"]).num_rows if storage.exists(location) else None


def param_importances(context: ReportContext) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances of the searched parameters (seeded by the study seed), or ``{}`` and why not."""
    import optuna

    study = load_optuna_study(context)
    if study is None:
        return {}, "no Optuna study found (optuna.db or search.storage)"
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < 2:
        return {}, f"needs at least 2 finished Optuna trials (this study has {len(finished)})"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=importance_evaluator(context))
    except (ValueError, RuntimeError) as error:  # e.g. parameters that never varied
        return {}, f"Optuna could not compute them ({str(error).splitlines()[0]})"
    return {name: float(value) for name, value in importances.items()}, ""


def importance_evaluator(context: ReportContext):
    """fANOVA seeded by the study seed: the figure and search_noise.json give the same numbers on every rebuild."""
    from optuna.importance import FanovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=context.study.seed)


def _plain(value):
    """A JSON-ready value: NaN as None, numpy scalars as Python numbers, dicts element-wise."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_optuna_study(context: ReportContext):
    """The search's Optuna study (``<study name>-<search stage hash>``), or None."""
    import optuna

    from raycf.pipeline import stage_hash

    url = context.study.search.storage
    local_copy = None
    if not url:
        location = storage.join_uri(context.results, "optuna.db")
        if not storage.exists(location):
            return None
        if storage.is_uri(location):  # SQLite needs a local file
            local_copy = Path(tempfile.mkdtemp(prefix="raycf-report-")) / "optuna.db"
            local_copy.write_bytes(storage.read_bytes(location))
            location = str(local_copy)
        url = f"sqlite:///{location}"
    names = optuna.study.get_all_study_names(storage=url)
    expected = f"{context.study.name}-{stage_hash(context.study, 'search')}"
    name = expected if expected in names else (names[0] if len(names) == 1 else None)
    if name is None:
        return None
    return optuna.load_study(study_name=name, storage=url)
