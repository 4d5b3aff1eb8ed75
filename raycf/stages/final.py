"""Stage ``final``: the best searched trial and the control, each run once over every split (paper Tables 2 and 3).

The debugged model is the best *searched* trial under the search's
objective and tie rule (:mod:`raycf.method.selection`); the control (plain
fine-tuning, λ1 = λ2 = 0) is never the debugged model.  When the control
ranks above every searched trial, ``final.parquet`` (column ``verdict``),
the report and the printed summary say so.  The control must have run its
whole schedule; one stopped early by ASHA (or failed) is retrained here.

Each retrained model is run once over train, val and test
(``final/predictions.parquet``; train and val from the frozen-prefix cache's
plain view where retraining runs on it, :mod:`raycf.outputs.predict`); the base
model's rows come from the features stage.  Tables 2 and 3 and
``class_recall.parquet`` are computed from those rows: the test split is
read once per model.

With ``final.seeds`` = n > 1 the stage also retrains, from the same base
model on the same frozen-prefix cache, three models n times each: the
control (λ1 = λ2 = 0), the study's own λ (``reference``: the study file's
``debug`` section) and the best searched trial's parameters (``best``).
Seed s (0 … n − 1) draws the data order, the view each image is seen in per
epoch and dropout from the study's seed + s (the views' augmentations are
those of the prefix cache); seed 0 is the search's own draw, so seed 0's
control and best model are the search's own (same seed, same schedule;
a best trial that ASHA stopped early is retrained).  The other runs are one
Ray Tune grid with the search's trial function, resources and job builder
(:mod:`raycf.stages.jobs`), ``search.max_concurrent`` at once, no early
stopping; an interrupted grid resumes with its finished runs kept.  Each
keeps its best validation epoch and is run once over every split;
``final/seeds.parquet``, ``final/seed_class_recall.parquet``,
``final/seed_predictions.parquet``, ``final/seed_summary.parquet`` (paired
t intervals, :mod:`raycf.method.replication`) and, with
``final.class_group``, ``final/group_recall.parquet`` hold the results.

With ``final.base_seeds`` = n > 1 the control and the best trial's
parameters are also retrained on n − 1 more base models, each trained with
its own seed on the same split (:mod:`raycf.stages.base_seeds`):
``final/base_seeds.parquet`` and ``final/base_seed_summary.parquet``
(:mod:`raycf.method.base_models`) hold the comparison over base models.

A study with groups (``data.plant``, ``data.groups``) adds
``final/groups.parquet`` (accuracy per model, split and group), the worst and
mean group accuracy of val and test to ``final.parquet`` and, with seeds,
to ``final/seeds.parquet``.  With ``final.dfr`` it also refits the base
model's head by DFR and compares it on test (``final/dfr.parquet``,
:mod:`raycf.stages.dfr`).

``final.treatments`` adds the suppression treatments to the grid
(:mod:`raycf.stages.treatments`), compared with the control the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from raycf.results import storage
from raycf.results.artefacts import PREDICTIONS_FILE, base_model_bytes, read_final_frame, base_predictions, class_names, prefix_ref, store_ref, trial_model_bytes
from raycf.models.checkpoint import CHECKPOINT_FILE, complete, parse_classifier_checkpoint
from raycf.runtime.cluster import ensure_ray
from raycf.config import StudyConfig
from raycf.runtime.console import log
from raycf.search.leaderboard import read_leaderboard, sort_by_objective
from raycf.method.replication import BEST, CONTROL, REFERENCE, check_class_group, format_seed_summary, group_recall, pooled_base_recall, seed_summary
from raycf.method.selection import SCORE_KEY, best_epoch, selection_key
from raycf.method.treatment import ModelEvaluation, evaluation_of, format_table2, format_table3, treatment_tables
from raycf.outputs.predict import predict_on_ray
from raycf.data.prefix_cache import PrefixRef
from raycf.data.image_store import open_store, read_groups
from raycf.method.groups import predictions_group_table, wide_group_metrics
from raycf.search.searcher import control_point, field_value, parameter_names, trial_study, trial_values
from raycf.stages.treatments import SUPPRESS_WEIGHT, plain_value, treatment_points
from raycf.stages.jobs import TrialContext, debug_job, run_trial, trainable_of, trial_context, tune_run
from raycf.training.debug import run_debug_training

SEEDS_FILE = "seeds.parquet"
SEED_SUMMARY_FILE = "seed_summary.parquet"
SEED_CLASS_RECALL_FILE = "seed_class_recall.parquet"
SEED_PREDICTIONS_FILE = "seed_predictions.parquet"
GROUP_RECALL_FILE = "group_recall.parquet"
GROUPS_FILE = "groups.parquet"  # a study with groups: accuracy per (model, split, group)

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def best_searched_trial(board: pd.DataFrame, study: StudyConfig) -> pd.Series:
    """The best finished trial that is not the control."""
    searched = board[(board["status"] != "error") & ~board["is_control"]]
    ranked = sort_by_objective(searched, study.search.metric, study.search.mode)
    if ranked.empty:
        raise RuntimeError("the search finished no searched trial: nothing to evaluate (see the error column of leaderboard.parquet)")
    return ranked.iloc[0]


def control_verdict(board: pd.DataFrame, best: pd.Series, study: StudyConfig) -> str:
    """One sentence when the control ranks strictly above every searched trial on validation, else ``""``.

    Strictly: a better objective, or the same objective and a lower validation
    loss (the tie rule); a control tied on both has not beaten anything.
    """
    controls = board[board["is_control"] & (board["status"] != "error")]
    if controls.empty:
        return ""
    control, metric, mode = controls.iloc[0], study.search.metric, study.search.mode
    if not selection_key(control, metric, mode) < selection_key(best, metric, mode):
        return ""
    how = "a better" if control[metric] != best[metric] else "the same"
    return (
        f"The control (plain fine-tuning, lambda1 = lambda2 = 0) beat every searched trial on validation: "
        f"{how} {metric} ({control[metric]:.4f} against {best[metric]:.4f}) and a validation loss of {control['val_loss']:.4f} "
        f"against {best['val_loss']:.4f}; the debugged row is the best searched trial, {best['trial_id']}."
    )


def full_control(board: pd.DataFrame, base_bytes: bytes, results: str = "") -> tuple[pd.Series | None, bytes | None]:
    """The control's row and its model, when it ran its whole schedule."""
    controls = board[board["is_control"]]
    if controls.empty:
        return None, None
    control = controls.iloc[0]
    if control["status"] != "completed":
        return control, None
    return control, trial_model_bytes(control, base_bytes, results)


def run(run: "StageRun") -> dict:
    """Write ``final/``: ``final.parquet``, ``class_recall.parquet``, predictions, Tables 2 and 3; the seed comparison with final.seeds > 1)."""
    study, results = run.study, run.results
    if study.final.seeds > 1:
        check_class_group(study.final.class_group, class_names(results))
    ensure_ray()
    board = read_leaderboard(results)
    best = best_searched_trial(board, study)
    base_bytes = base_model_bytes(results)
    best_bytes = trial_model_bytes(best, base_bytes, results)
    if best_bytes is None:
        raise RuntimeError(f"best trial {best['trial_id']}: its checkpoint {best['checkpoint_path']!r} is gone")
    control, control_run = the_control(run, board, base_bytes)
    points = seed_points(study, best) | treatment_points(study, results, best)  # treatments need final.seeds > 1
    seed_runs = train_seed_grid(run, points, base_bytes, search_seed_zero(study, best, best_bytes, control_run)) if study.final.seeds > 1 else []
    # Every retrained model's one pass over the splits, as parallel Ray tasks (the seed runs' many models share search.max_concurrent of them);
    # seed 0's models that are the search's own (the control and the debugged model) are not run again.
    models = {"control": control_run.model_bytes, "debugged": best_bytes, **{seed_run.name: seed_run.model_bytes for seed_run in seed_runs if not seed_run.reused_as}}
    retrained = predict_on_ray(study, store_ref(results), models, tasks=study.search.max_concurrent if seed_runs else None, prefix=scoring_cache(results, study, points))
    retrained = pd.concat([retrained, *(reused_rows(retrained, seed_run) for seed_run in seed_runs if seed_run.reused_as)], ignore_index=True)
    of_seeds = retrained["model"].isin([seed_run.name for seed_run in seed_runs])
    names = parameter_names(study)
    predictions = pd.concat([base_predictions(results), retrained[~of_seeds]], ignore_index=True)
    tables = treatment_tables(
        predictions,
        class_names(results),
        debugged_config=trial_study(study, trial_values(best, names)).debug,
        control_best_epoch=int(control_run.best["epoch"]),
        debugged_best_epoch=int(best["best_epoch"]),
    )
    verdict = control_verdict(board, best, study)
    control_values = control_point(study) if control is None else {**control_point(study), **trial_values(control, names)}
    final = final_frame(tables.table2, names, control_values, {name: field_value(study, name) for name in names} | trial_values(best, names), verdict)
    final.insert(1, "trial_id", ["", "" if control is None else str(control["trial_id"]), str(best["trial_id"])])
    groups_of = store_groups(results)
    if groups_of:  # a study with groups: accuracy per group of every model, the worst and mean group in final.parquet
        group_table = predictions_group_table(predictions, groups_of)
        storage.write_frame(group_table, run.path(GROUPS_FILE))
        final = final.merge(wide_group_metrics(group_table), on="model", how="left")
    storage.write_frame(predictions, run.path(PREDICTIONS_FILE))
    storage.write_frame(tables.table2, run.path("table2.parquet"))
    storage.write_frame(tables.table3, run.path("table3.parquet"))
    storage.write_frame(final, run.path("final.parquet"))
    storage.write_frame(tables.class_recall, run.path("class_recall.parquet"))
    print(summary_text(tables.table2, tables.table3, verdict), flush=True)
    rows = tables.table2.set_index("model")
    summary = {
        "best_trial": str(best["trial_id"]),
        "control_beats_searched": bool(verdict),
        **{f"{model}_{split}_acc": round(float(rows.loc[model, f"{split}_acc"]), 6) for model in rows.index for split in ("train", "val", "test")},
    }
    if groups_of:
        summary.update({f"{row.model}_test_worst_group_acc": round(float(row.test_worst_group_acc), 6) for row in final.itertuples()})
    if study.final.dfr:  # the DFR baseline on the base model's val and test features (raycf.stages.dfr)
        from raycf.stages.dfr import run_dfr

        summary.update(run_dfr(run, predictions, groups_of))
    if seed_runs:
        summary.update(write_seed_comparison(run, seed_runs, seed_rows(retrained[of_seeds], seed_runs), points, tables.class_recall))
    if study.final.base_seeds > 1:
        from raycf.stages.base_seeds import run_base_seeds

        seeds = storage.read_table(run.path(SEEDS_FILE)).to_pandas() if seed_runs else None
        summary.update(run_base_seeds(run, points, tables.table2, seeds))
    return summary


def store_groups(results: str) -> dict[str, np.ndarray]:
    """Each split's groups from the image store (empty for a study without groups)."""
    store = open_store(store_ref(results))
    return {split: groups for split in ("train", "val", "test") if (groups := read_groups(store, split)) is not None}


def the_control(run: "StageRun", board: pd.DataFrame, base_bytes: bytes) -> tuple[pd.Series | None, "SeedRun"]:
    """The control's leaderboard row (None when it was not searched) and its run (seed 0); retrained for the full schedule when the search's stopped early."""
    study, results = run.study, run.results
    control, control_bytes = full_control(board, base_bytes, results)
    if control_bytes is not None:
        return control, searched_run(CONTROL, control, control_bytes)
    # Stopped early by ASHA, failed, or not searched: the comparison needs the full schedule.
    log("final: training the control (lambda1 = lambda2 = 0) for the full schedule")
    job = debug_job(trial_study(study, control_point(study)), results, base_bytes, lambdas=(0.0, 0.0))
    trained = run_debug_training(job, name=f"final-{run.stage_hash}-control", storage_path=run.ray_storage())
    best = next(row for row in trained.history if int(row["epoch"]) == trained.best_epoch)
    epochs = int(max(row["epoch"] for row in trained.history))
    time_total_s = float(sum(row.get("epoch_s", 0.0) for row in trained.history))
    return control, SeedRun(CONTROL, 0, "" if control is None else str(control["trial_id"]), epochs, time_total_s, best, trained.best_model_bytes)


def final_frame(table2: pd.DataFrame, names: list[str], control: dict[str, Any], best: dict[str, Any], verdict: str) -> pd.DataFrame:
    """``final.parquet``: Table 2's rows with every searched parameter's value (of its own type; none for the base) and the verdict on the control."""
    parameters = pd.DataFrame([{name: None for name in names}, {name: control[name] for name in names}, {name: best[name] for name in names}], dtype=object)
    final = pd.concat([table2.drop(columns=["lambda1", "lambda2"]), parameters], axis=1)
    final["control_beats_searched"] = bool(verdict)
    final["verdict"] = verdict
    return final


def summary_text(table2: pd.DataFrame, table3: pd.DataFrame, verdict: str) -> str:
    """Tables 2 and 3 as printed at the end of a study, with the verdict on the control when there is one."""
    text = f"{format_table2(table2)}\n\n{format_table3(table3)}"
    return f"{text}\n\n{verdict}" if verdict else text


def describe(results: str) -> str:
    """Tables 2 and 3 of the study's best searched trial."""
    folder = storage.join_uri(results, "final")
    table2 = storage.read_table(storage.join_uri(folder, "table2.parquet")).to_pandas()
    table3 = storage.read_table(storage.join_uri(folder, "table3.parquet")).to_pandas()
    final = read_final_frame(results, "final.parquet")
    text = summary_text(table2, table3, str(final["verdict"].iloc[0]) if "verdict" in final else "")
    if storage.exists(storage.join_uri(folder, "dfr.parquet")):  # final.dfr
        from raycf.stages.dfr import summary_line

        text = f"{text}\n\n{summary_line(storage.read_table(storage.join_uri(folder, 'dfr.parquet')).to_pandas())}"
    if not storage.exists(storage.join_uri(folder, SEED_SUMMARY_FILE)):
        return with_base_seeds(text, folder)
    seeds = storage.read_table(storage.join_uri(folder, SEED_SUMMARY_FILE)).to_pandas()
    group_location = storage.join_uri(folder, GROUP_RECALL_FILE)
    group = storage.read_table(group_location).to_pandas() if storage.exists(group_location) else None
    text = f"{text}\n\n{format_seed_summary(seeds, group)}"
    return with_base_seeds(text, folder)


def with_base_seeds(text: str, folder: str) -> str:
    """``text`` and, where the stage compared several base models (final.base_seeds > 1), their summary."""
    from raycf.method.base_models import format_base_seed_summary
    from raycf.stages.base_seeds import BASE_SEED_SUMMARY_FILE

    location = storage.join_uri(folder, BASE_SEED_SUMMARY_FILE)
    if not storage.exists(location):
        return text
    return f"{text}\n\n{format_base_seed_summary(storage.read_table(location).to_pandas())}"


# ------------------------------------------------------------------ retraining seeds (final.seeds > 1)


@dataclass(frozen=True)
class SeedGrid:
    """What every seed run needs: the trials' context, each model's parameter values and each run's (model, seed)."""

    context: TrialContext
    points: dict[str, dict[str, Any]]  # control, reference, best -> the searched parameters' values
    runs: dict[str, tuple[str, int]]  # run name (best-seed1) -> (model, seed)


@dataclass
class SeedRun:
    """One finished (model, seed) retraining: its epochs, its best validation epoch and that epoch's whole model.

    ``reused_as``: the name of the final pass's model this run is (``control``,
    ``debugged``) when seed 0's model is the search's own; "" when trained here.
    """

    model: str
    seed: int
    trial_id: str
    epochs: int
    time_total_s: float
    best: dict[str, Any]
    model_bytes: bytes
    reused_as: str = ""

    @property
    def name(self) -> str:
        """The run's model name in the final pass over the splits: ``best-seed1``."""
        return run_name(self.model, self.seed)


def run_name(model: str, seed: int) -> str:
    """A seed run's name: ``best-seed1``."""
    return f"{model}-seed{seed}"


def seed_points(study: StudyConfig, best: pd.Series) -> dict[str, dict[str, Any]]:
    """The three retrained models' searched parameters: λ = 0, the study's own values, the best trial's."""
    names = parameter_names(study)
    return {
        CONTROL: control_point(study),
        REFERENCE: {name: field_value(study, name) for name in names} | ({SUPPRESS_WEIGHT: 0.0} if SUPPRESS_WEIGHT in names else {}),  # the paper's method: nothing suppressed
        BEST: {name: field_value(study, name) for name in names} | trial_values(best, names),
    }


def searched_run(model: str, row: pd.Series, model_bytes: bytes) -> SeedRun:
    """A search trial that ran its whole schedule as seed 0's run of ``model``: the search trains on the study's own seed."""
    best = {"epoch": int(row["best_epoch"]), "val_acc": float(row["val_acc"]), "val_loss": float(row["val_loss"])}
    return SeedRun(model, 0, str(row["trial_id"]), int(row["epochs"]), float(row["time_total_s"]), best, model_bytes)


def search_seed_zero(study: StudyConfig, best: pd.Series, best_bytes: bytes, control_run: SeedRun) -> dict[str, SeedRun]:
    """Seed 0's runs that need no retraining: the control (searched, or retrained above for the full schedule) and the best
    trial when it ran every epoch (one stopped by ASHA is retrained for the full schedule)."""
    reused = {CONTROL: replace(control_run, reused_as="control")}
    if best["status"] == "completed" and int(best["epochs"]) == study.debug.epochs:
        reused[BEST] = replace(searched_run(BEST, best, best_bytes), reused_as="debugged")
    return reused


def scoring_cache(results: str, study: StudyConfig, points: dict[str, dict[str, Any]]) -> PrefixRef | None:
    """The prefix cache the final pass scores train and val from: the study's, when every retrained model kept its frozen layers
    (each one's scope is the cache's); None (every split through the whole network) otherwise."""
    scopes = {trial_study(study, point).debug.trainable for point in points.values()}
    return prefix_ref(results, study) if scopes == {study.debug.trainable} else None


def reused_rows(predictions: pd.DataFrame, seed_run: SeedRun) -> pd.DataFrame:
    """A reused seed-0 run's rows of the final pass: those of the model it is, under its own name."""
    return predictions[predictions["model"] == seed_run.reused_as].assign(model=seed_run.name)


def run_seed_trial(config: dict[str, Any], context: SeedGrid) -> None:
    """Tune function trainable: one (model, seed) retraining, reported per epoch as a search trial is."""
    model, seed = context.runs[config["run"]]
    run_trial({**context.points[model], "order_seed": context.context.study.seed + seed}, context.context)


def train_seed_grid(run: "StageRun", points: dict[str, dict[str, Any]], base_bytes: bytes, reused: dict[str, SeedRun]) -> list[SeedRun]:
    """Every (model, seed) retraining but seed 0's ``reused`` ones, as one Tune grid, ``search.max_concurrent`` at once; their best-validation models.

    An interrupted grid resumes: its finished runs are kept, the others start over.
    """
    import ray.tune as tune

    from raycf.pipeline import clear_ray_runs
    from raycf.search.console import TrialConsole

    study, seeds = run.study, run.study.final.seeds
    runs = {run_name(model, seed): (model, seed) for seed in range(seeds) for model in points if not (seed == 0 and model in reused)}
    searched = f"; seed 0 of {', '.join(reused)} is the search's" if reused else ""
    log(f"final: retraining {', '.join(points)} over {seeds} seeds ({len(runs)} runs, {study.search.max_concurrent} at once{searched})")
    experiment, tune_storage = f"final-{run.stage_hash}-seeds", run.ray_storage()
    grid = SeedGrid(trial_context(study, run.results, base_bytes, tune_storage, experiment), points, runs)
    trainable = trainable_of(study, grid, run_seed_trial)
    experiment_path = storage.join_uri(tune_storage, experiment)
    if tune.Tuner.can_restore(experiment_path):
        log(f"final: resuming the interrupted seed grid at {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False)
    else:
        clear_ray_runs(run.results, experiment)
        tuner = tune_run(
            study,
            trainable,
            name=experiment,
            storage_path=tune_storage,
            callbacks=[TrialConsole(["run"], study.search.metric, study.search.mode, total_trials=len(runs), epochs=study.debug.epochs, label="final")],
            param_space={"run": tune.grid_search(list(runs))},
            max_concurrent_trials=study.search.max_concurrent,
        )
    trained = [seed_run(result, runs, study, base_bytes) for result in tuner.fit()]
    return [*reused.values(), *trained]


def seed_run(result, runs: dict[str, tuple[str, int]], study: StudyConfig, base_bytes: bytes) -> SeedRun:
    """A finished grid trial's epochs and its best validation epoch's model (completed with the base model)."""
    model, seed = runs[str(result.config["run"])]
    if result.error is not None:
        raise RuntimeError(f"final: the {model} retraining of seed {seed} failed: {result.error}")
    history = result.metrics_dataframe.to_dict("records")
    chosen = best_epoch(history, study.search.metric, study.search.mode)
    checkpoint = result.get_best_checkpoint(SCORE_KEY, "max")
    if checkpoint is None or not chosen:
        raise RuntimeError(f"final: the {model} retraining of seed {seed} kept no checkpoint")
    with checkpoint.as_directory() as folder:
        saved = parse_classifier_checkpoint(Path(folder, CHECKPOINT_FILE).read_bytes(), f"{model} seed {seed} checkpoint")
    if int(saved.metrics["epoch"]) != int(chosen["epoch"]):
        raise RuntimeError(f"final: the {model} retraining of seed {seed} kept epoch {saved.metrics['epoch']}, but its best epoch is {chosen['epoch']}")
    trial_id = str(result.metrics.get("trial_id", "")) if result.metrics else ""
    epochs = int(max(row["epoch"] for row in history))
    time_total_s = float(max(row.get("time_total_s", 0.0) for row in history))
    return SeedRun(model, seed, trial_id, epochs, time_total_s, chosen, complete(saved, base_bytes).to_bytes())


def seed_rows(predictions: pd.DataFrame, runs: list[SeedRun]) -> pd.DataFrame:
    """The seed runs' rows of the final pass, ``model`` (control, reference, best) and ``seed`` for the run's name."""
    by_name = {seed_run.name: seed_run for seed_run in runs}
    frame = predictions.reset_index(drop=True)
    frame.insert(frame.columns.get_loc("model") + 1, "seed", frame["model"].map({name: seed_run.seed for name, seed_run in by_name.items()}).astype(np.int64))
    frame["model"] = frame["model"].map({name: seed_run.model for name, seed_run in by_name.items()})
    return frame


def seeds_frames(study: StudyConfig, runs: list[SeedRun], predictions: pd.DataFrame, points: dict[str, dict[str, Any]], classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``final/seeds.parquet`` (one row per model and seed) and ``final/seed_class_recall.parquet`` (per model, seed and test class)."""
    rows, recalls = [], []
    for seed_run in sorted(runs, key=lambda seed_run: (seed_run.seed, list(points).index(seed_run.model))):
        evaluation = evaluation_of(predictions[(predictions["model"] == seed_run.model) & (predictions["seed"] == seed_run.seed)], len(classes))
        rows.append(seed_row(study, seed_run, evaluation, points[seed_run.model]))
        recalls.append(
            pd.DataFrame(
                {
                    "model": seed_run.model,
                    "seed": seed_run.seed,
                    "class": classes,
                    "class_index": np.arange(len(classes), dtype=np.int64),
                    "support": evaluation.support["test"].astype(np.int64),
                    "recall": evaluation.recall["test"],
                }
            )
        )
    return pd.DataFrame(rows), pd.concat(recalls, ignore_index=True)


def seed_row(study: StudyConfig, seed_run: SeedRun, evaluation: ModelEvaluation, point: dict[str, Any]) -> dict[str, Any]:
    """One row of ``final/seeds.parquet``: the run, its parameters, its best epoch and its accuracies from the final pass."""
    return {
        "model": seed_run.model,
        "seed": seed_run.seed,
        "order_seed": study.seed + seed_run.seed,
        "trial_id": seed_run.trial_id,
        **{name: float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else plain_value(value) for name, value in point.items()},
        "best_epoch": int(seed_run.best["epoch"]),
        "epochs": seed_run.epochs,
        **{f"{split}_acc": evaluation.accuracy.get(split, np.nan) for split in ("train", "val", "test")},
        "val_acc_at_selection": float(seed_run.best.get("val_acc", np.nan)),  # as training measured it (on the prefix cache when it trains on it)
        "val_loss": float(seed_run.best["val_loss"]),
        "time_total_s": seed_run.time_total_s,
    }


def write_seed_comparison(run: "StageRun", runs: list[SeedRun], predictions: pd.DataFrame, points: dict[str, dict[str, Any]], class_recall: pd.DataFrame) -> dict:
    """Write the seed runs' tables and their comparison with the control (``final/seed*.parquet``, ``group_recall.parquet``); print it."""
    study = run.study
    seeds, class_recalls = seeds_frames(study, runs, predictions, points, class_names(run.results))
    groups_of = store_groups(run.results)
    if groups_of:  # the seed grid's worst and mean group accuracy per model and seed; the summary compares test_worst_group_acc
        seeds = seeds.merge(wide_group_metrics(predictions_group_table(predictions, groups_of)), on=["model", "seed"], how="left")
    summary = seed_summary(seeds)
    group = study.final.class_group
    group_table = group_recall(class_recalls, group, pooled_base_recall(class_recall, group)) if group else None
    storage.write_frame(seeds, run.path(SEEDS_FILE))
    storage.write_frame(class_recalls, run.path(SEED_CLASS_RECALL_FILE))
    storage.write_frame(predictions, run.path(SEED_PREDICTIONS_FILE))
    storage.write_frame(summary, run.path(SEED_SUMMARY_FILE))
    if group_table is not None:
        storage.write_frame(group_table, run.path(GROUP_RECALL_FILE))
    print(f"\n{format_seed_summary(summary, group_table)}", flush=True)
    by_model = summary.set_index("model")
    return {"seeds": study.final.seeds, **{f"{model}_minus_control_test_acc": round(float(by_model.loc[model, "test_diff_mean"]), 6) for model in by_model.index}}
