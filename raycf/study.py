"""The study: Ray Tune + Optuna over λ1, λ2, τ and f, the final test evaluation, and local reruns.

Stage ``search``: a Ray Tune ``Tuner`` over a function trainable; each trial
recomputes the global MC filters G from the masks Parquet with its own τ and
f, then builds and fits a TorchTrainer running the debug retraining
(``debug.workers`` DDP workers), reporting every epoch to Tune.  Optuna's
TPE sampler (seeded) proposes the points and keeps its history in an RDB
storage (``optuna.db``, SQLite, in the results folder unless
``search.storage`` names another SQLAlchemy URL); ASHA stops weak trials on
the per-epoch objective.  The control (λ1 = λ2 = 0, plain fine-tuning) runs
first, as a fixed point outside Optuna's space (λ = 0 is outside a log
range).  ``leaderboard.parquet`` is rewritten atomically as trials finish.

Stage ``final``: the best trial (by the objective on validation) and the
control are evaluated on the test split, once, beside the base model
(paper Tables 2 and 3: ``final.parquet``, ``class_recall.parquet``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raycf import storage
from raycf.config import PARAMETER_ALIASES, Distribution, StudyConfig, with_values
from raycf.errors import UserError
from raycf.leaderboard import (
    TrialRecord,
    leaderboard_frame,
    read_leaderboard,
    sort_by_objective,
    trial_row,
    write_leaderboard,
)
from raycf.pipeline import Stage, StageRun, clear_ray_runs, ensure_ray, log, register, versions

CONTROL_LAMBDAS = {"lambda1": 0.0, "lambda2": 0.0}
TRIAL_EXTRA_KEYS = ("det_auroc", "det_aupr", "maxsoftmax_auroc", "g_size")


# ------------------------------------------------------------------ space


def optuna_distributions(space: dict[str, Distribution]) -> dict[str, Any]:
    """The study file's ``search.space`` as Optuna distributions."""
    import optuna.distributions as od

    distributions = {}
    for name, spec in space.items():
        if spec.uniform is not None:
            distributions[name] = od.FloatDistribution(*spec.uniform)
        elif spec.loguniform is not None:
            distributions[name] = od.FloatDistribution(*spec.loguniform, log=True)
        elif spec.int is not None:
            distributions[name] = od.IntDistribution(*spec.int)
        else:
            distributions[name] = od.CategoricalDistribution(spec.choice)
    return distributions


def field_value(study: StudyConfig, name: str) -> Any:
    """The study's current value of a searched parameter (alias or dotted path)."""
    value: Any = study
    for part in PARAMETER_ALIASES.get(name, name).split("."):
        value = getattr(value, part)
    return value


def control_point(study: StudyConfig) -> dict[str, Any]:
    """λ1 = λ2 = 0; every other searched parameter at the study's own value."""
    return {name: CONTROL_LAMBDAS.get(name, field_value(study, name)) for name in parameter_names(study)}


def parameter_names(study: StudyConfig) -> list[str]:
    """Searched parameters, always including λ1 and λ2 (the control sets them to 0)."""
    return list(dict.fromkeys(["lambda1", "lambda2", *study.search.space]))


# --------------------------------------------------------------- searcher


def control_first_searcher(study: StudyConfig, storage_url: str, study_name: str):
    """OptunaSearch (TPE, seeded, RDB storage) behind the fixed control point and a concurrency limit."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter, Searcher
    from ray.tune.search.optuna import OptunaSearch

    class ControlFirst(Searcher):
        """Suggests the control first, then delegates to the wrapped searcher.

        The control's result is not told to Optuna: λ = 0 lies outside the
        log-uniform space, and Optuna's study holds exactly the trials it
        proposed.  Optuna records each trial's best epoch (the leaderboard's
        objective and the checkpoint the trial keeps), not its last one.
        """

        def __init__(self, searcher: Searcher, control: dict[str, Any] | None, space: dict[str, Any]):
            self.searcher = searcher
            self.space = space
            self.control = control
            self.control_trial_id: str | None = None
            self.best_values: dict[str, float] = {}  # trial id -> best per-epoch objective so far
            super().__init__(metric=searcher.metric, mode=searcher.mode)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return self.searcher.set_search_properties(metric, mode, config, **spec)

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str):
            if self.control is not None and self.control_trial_id is None:
                self.control_trial_id = trial_id
                return dict(self.control)
            return self.adopt_orphan(trial_id) or self.searcher.suggest(trial_id)

        def adopt_orphan(self, trial_id: str) -> dict[str, Any] | None:
            """Hand out again a point Optuna proposed just before the driver died.

            Optuna writes a proposal to its storage at once; Tune saves the
            searcher's state a moment later.  A driver killed in between leaves
            a RUNNING trial in the storage that the restored searcher does not
            know: it becomes this trial, so the storage holds each trial once.
            """
            study, known = getattr(self.searcher, "_ot_study", None), getattr(self.searcher, "_ot_trials", None)
            if study is None or known is None:
                return None
            numbers = {trial.number for trial in known.values()}
            for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if frozen.number not in numbers:
                    trial = known[trial_id] = optuna.trial.Trial(study, frozen._trial_id)
                    # Optuna writes a proposal one parameter at a time: a
                    # driver killed midway leaves some unset, sampled now.
                    return {name: suggest_again(trial, name, distribution) for name, distribution in self.space.items()}
            return None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            self.remember_best(trial_id, result)
            if trial_id != self.control_trial_id:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None and trial_id in self.best_values:
                self.remember_best(trial_id, result)
                result = {**result, self.metric: self.best_values[trial_id]}
            if trial_id != self.control_trial_id:
                self.searcher.on_trial_complete(trial_id, result=result, error=error)

        def remember_best(self, trial_id: str, result: dict) -> None:
            value = result.get(self.metric)
            if value is None:
                return
            best = self.best_values.get(trial_id)
            better = best is None or (value > best if self.mode == "max" else value < best)
            self.best_values[trial_id] = float(value) if better else best

        # Tune saves wrappers (objects with a ``searcher``) through get_state /
        # set_state and the wrapped OptunaSearch through its own save_to_dir.
        def get_state(self) -> dict:
            return {"control": self.control, "control_trial_id": self.control_trial_id, "best_values": self.best_values}

        def set_state(self, state: dict) -> None:
            self.control, self.control_trial_id = state["control"], state["control_trial_id"]
            self.best_values = dict(state.get("best_values", {}))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = optuna_distributions(study.search.space)
    searcher = OptunaSearch(
        space=space,
        metric=study.search.metric,
        mode=study.search.mode,
        sampler=optuna.samplers.TPESampler(seed=study.seed),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(storage_url),
    )
    control = control_point(study) if study.search.include_control else None
    return ConcurrencyLimiter(ControlFirst(searcher, control, space), max_concurrent=study.search.max_concurrent)


def suggest_again(trial, name: str, distribution) -> Any:
    """An Optuna trial's value for ``name``: the stored one if set, else a new sample from ``distribution``."""
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    suggest = trial.suggest_int if isinstance(distribution, od.IntDistribution) else trial.suggest_float
    return suggest(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


# ------------------------------------------------------------------ trials


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs, shipped once through the object store."""

    study: StudyConfig
    results: str
    base_model: bytes
    train_storage: str


def trial_study(study: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The study with one trial's parameter values."""
    return with_values(study, params)


def run_trial(config: dict[str, Any], context: SearchContext) -> None:
    """Tune function trainable: debug retraining for one point, reported per epoch."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycf.analysis import detection_summary, global_mc_sets
    from raycf.debug import run_debug_training

    study = trial_study(context.study, config)
    tau, freq = study.analysis.tau, study.analysis.freq_threshold
    global_filters = global_mc_sets(context.results, tau, freq)
    detection = {key: float(value) for key, value in detection_summary(context.results, tau, freq, split="val").items()}
    detection["g_size"] = float(global_filters.sum(axis=1).mean())
    trial_id = ray.tune.get_context().get_trial_id()
    run_debug_training(
        study,
        global_filters,
        context.base_model,
        lambda1=study.debug.lambda1,
        lambda2=study.debug.lambda2,
        name=f"trial-{trial_id}",
        storage_path=context.train_storage,
        callbacks=[TuneReportCallback()],
        extra_metrics=detection,
        print_epochs=False,
    )


# --------------------------------------------------------------- leaderboard


def _now() -> str:
    return datetime.now(tz=timezone.utc).isoformat(timespec="seconds")


class LeaderboardWriter:
    """Keeps one :class:`TrialRecord` per trial and rewrites ``leaderboard.parquet``."""

    def __init__(self, study: StudyConfig, results: str):
        self.study = study
        self.results = results
        self.names = parameter_names(study)
        self.versions = versions()
        self.records: dict[str, TrialRecord] = {}
        self.order: list[str] = []  # trial ids in creation order (the control first)

    def record(self, trial_id: str, params: dict[str, Any]) -> TrialRecord:
        if trial_id not in self.records:
            self.records[trial_id] = TrialRecord(
                trial_id=trial_id,
                params={name: params.get(name) for name in self.names},
                started_at=_now(),
                config_hash=trial_study(self.study, {n: params[n] for n in self.names if n in params}).config_hash(),
            )
        return self.records[trial_id]

    def finish(self, record: TrialRecord, status: str, error: str = "") -> None:
        record.status = status
        record.error = error
        record.finished_at = _now()
        self.write()

    def status_of_finished(self, record: TrialRecord) -> str:
        """``completed`` if the trial ran every epoch, else ``stopped`` (ASHA)."""
        epochs = record.history[-1].get("epoch", 0) if record.history else 0
        return "completed" if epochs >= self.study.debug.epochs else "stopped"

    def write(self) -> None:
        position = {trial_id: index for index, trial_id in enumerate(self.order)}
        records = sorted(self.records.values(), key=lambda record: position.get(record.trial_id, len(position)))
        rows = [
            trial_row(record, self.names, self.study.search.metric, self.study.search.mode, self.study.seed, self.versions)
            for record in records
        ]
        write_leaderboard(leaderboard_frame(rows, self.names), self.results, self.names)


def tune_callback(writer: LeaderboardWriter):
    """A Tune callback that feeds the leaderboard as results arrive and trials end."""
    from ray.tune import Callback

    class LeaderboardCallback(Callback):
        """Tune saves its state (every trial's history) beside the experiment state, and restores it on resume."""

        def on_trial_start(self, iteration, trials, trial, **info):
            writer.order = [t.trial_id for t in trials]
            record = writer.record(trial.trial_id, trial.config)
            record.status, record.error = "running", ""  # also a restarted one
            writer.write()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            record = writer.record(trial.trial_id, trial.config)
            epoch = {key: value for key, value in result.items() if isinstance(value, (int, float, str)) and key != "config"}
            record.history = [row for row in record.history if row.get("epoch") != epoch.get("epoch")] + [epoch]
            record.time_total_s = float(result.get("time_total_s", record.time_total_s))

        def on_trial_complete(self, iteration, trials, trial, **info):
            record = writer.record(trial.trial_id, trial.config)
            writer.finish(record, writer.status_of_finished(record))

        def on_trial_error(self, iteration, trials, trial, **info):
            record = writer.record(trial.trial_id, trial.config)
            message = str(getattr(trial, "error_msg", "") or "trial failed").strip().splitlines()
            writer.finish(record, "error", message[-1][:300] if message else "trial failed")

        def on_experiment_end(self, trials, **info):
            writer.write()

        def get_state(self) -> dict:
            return {"records": writer.records, "order": writer.order}

        def set_state(self, state: dict) -> None:
            writer.records, writer.order = dict(state["records"]), list(state["order"])

    return LeaderboardCallback()


def trial_dirname(trial) -> str:
    """A trial's folder under the Tune experiment: ``trial-<trial id>``."""
    return f"trial-{trial.trial_id}"


# ------------------------------------------------------------------ search


def optuna_storage_url(study: StudyConfig, results: str) -> tuple[str, str | None]:
    """(SQLAlchemy URL, local SQLite file to upload to the results folder afterwards, if any)."""
    if study.search.storage:
        return study.search.storage, None
    if storage.is_uri(results):
        local = Path(tempfile.gettempdir(), f"raycf-{study.name}-optuna.db")
        return f"sqlite:///{local}", str(local)
    Path(results).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(results, 'optuna.db')}", None


def forget_optuna_study(url: str, name: str) -> None:
    """Delete a leftover Optuna study of that name: a fresh search must not inherit its trials."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


def check_driver_resources(study: StudyConfig) -> None:
    """Refuse resources no node offers: the trials would wait for them forever."""
    import ray

    offered = ray.cluster_resources()
    for name in study.search.driver_resources:
        if offered.get(name, 0) <= 0:
            raise UserError(
                f"search.driver_resources: no node of this Ray cluster offers {name!r} "
                "(expected the head node to advertise it, as cluster.yaml does; on one machine use --set search.driver_resources={})"
            )


def run_search_stage(run: StageRun) -> dict:
    """Run (or resume) the Tune search; write ``leaderboard.parquet`` and ``optuna.db``."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    from raycf.tune_state import DriverStateSnapshot, finished_trials, read_snapshot, restore_driver_state

    study = run.study
    if not study.search.space:
        raise UserError("search.space: no searched parameters (expected e.g. lambda1: {loguniform: [1.0e-4, 1.0]})")
    ensure_ray()
    check_driver_resources(study)
    results = run.results
    base_model = storage.read_bytes(run.upstream("base", "model.pt"))
    experiment = f"search-{run.stage_hash}"
    tune_storage = run.ray_storage()
    context = SearchContext(study=study, results=results, base_model=base_model, train_storage=storage.join_uri(tune_storage, experiment + "-train"))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": study.search.driver_cpus, **study.search.driver_resources},
    )
    # Tune's console: what its status table and trial summaries show (a
    # trainable attribute Tune reads for this), and no per-epoch result dumps.
    trainable._progress_metrics = ("epoch", "val_acc", "train_loss", "det_auroc")
    url, upload = optuna_storage_url(study, results)
    experiment_path = storage.join_uri(tune_storage, experiment)
    snapshot = storage.join_uri(tune_storage, f"{experiment}-driver", "state.zip")
    saved_state = read_snapshot(snapshot)
    if saved_state:
        restore_driver_state(saved_state, experiment_path)
        log(f"search: resuming the interrupted search at {experiment_path} (finished trials kept: {len(finished_trials(saved_state))})")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=run.resume, restart_errored=False)
    else:
        # Killed before its first trial existed (or never run): nothing to keep.
        clear_ray_runs(results, experiment)
        forget_optuna_study(url, f"{study.name}-{run.stage_hash}")
        scheduler = None
        if study.search.scheduler.asha is not None:
            asha = study.search.scheduler.asha
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=study.debug.epochs,
                grace_period=min(asha.grace_period, study.debug.epochs),
                reduction_factor=asha.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=study.search.metric,
                mode=study.search.mode,
                search_alg=control_first_searcher(study, url, study_name=f"{study.name}-{run.stage_hash}"),
                scheduler=scheduler,
                num_samples=study.search.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=tune_storage,
                callbacks=[tune_callback(LeaderboardWriter(study, results)), DriverStateSnapshot(snapshot)],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    tuner.fit()  # the leaderboard callback wrote leaderboard.parquet
    if upload:
        storage.write_bytes(storage.join_uri(results, "optuna.db"), Path(upload).read_bytes())
    board = sort_by_objective(read_leaderboard(results), study.search.metric, study.search.mode)
    finished = board[board["status"] != "error"]
    summary = {
        "trials": int(len(board)),
        "errored": int((board["status"] == "error").sum()),
        "stopped": int((board["status"] == "stopped").sum()),
        "best_trial": str(finished["trial_id"].iloc[0]) if len(finished) else "",
        f"best_{study.search.metric}": float(finished[study.search.metric].iloc[0]) if len(finished) else float("nan"),
        "control_val_acc": float(board["control_val_acc"].iloc[0]) if len(board) else float("nan"),
    }
    log(f"search: {summary['trials']} trials ({summary['stopped']} stopped early, {summary['errored']} failed); best {summary['best_trial']}")
    return summary


def _register_search() -> None:
    register(
        Stage(
            name="search",
            sections=("search", "debug"),
            upstream=("masks",),
            run=run_search_stage,
            extra_hash=lambda study: (study.analysis.tau, study.analysis.freq_threshold),
        )
    )


_register_search()


# ------------------------------------------------------------------- rerun


def load_results_study(results: str) -> StudyConfig:
    """The resolved study saved in a results folder (``config.yaml``)."""
    location = storage.join_uri(storage.normalise_root(results), "config.yaml")
    if not storage.exists(location):
        raise UserError(f"{results}: no config.yaml (expected the results folder of a study, e.g. results/digits)")
    return StudyConfig.model_validate(yaml.safe_load(storage.read_text(location)))


def pick_trial(board: pd.DataFrame, trial_id: str | None, metric: str, mode: str) -> pd.Series:
    """The leaderboard row of ``trial_id``, or of the best finished trial when None."""
    if trial_id is None:
        finished = sort_by_objective(board[board["status"] != "error"], metric, mode)
        if finished.empty:
            raise UserError("leaderboard has no finished trial to rerun")
        return finished.iloc[0]
    chosen = board[board["trial_id"] == trial_id]
    if chosen.empty:
        raise UserError(f"--trial {trial_id}: no such trial (expected one of {', '.join(board['trial_id'].astype(str))})")
    return chosen.iloc[0]


@dataclass
class RerunReport:
    """A trial rerun beside its recorded metrics."""

    trial_id: str
    comparison: pd.DataFrame
    tolerance: float

    @property
    def matches(self) -> bool:
        return bool((self.comparison["difference"].abs() <= self.comparison["tolerance"]).all())


def rerun_trial(results: str, trial_id: str | None = None, device: str = "cpu") -> RerunReport:
    """Rerun one trial's exact configuration in this process (Ray Train local mode, no cluster).

    Same seed, same parameters, same number of epochs as recorded (a trial
    stopped early by ASHA reruns the epochs it ran), same G recomputed from
    the masks.  The stated tolerance for accuracies is one validation image.
    """
    import torch

    from raycf.analysis import global_mc_sets
    from raycf.data import load_splits
    from raycf.debug import run_debug_training
    from raycf.leaderboard import best_epoch

    results = storage.normalise_root(results)
    study = load_results_study(results)
    board = read_leaderboard(results)
    row = pick_trial(board, trial_id, study.search.metric, study.search.mode)
    if row["status"] == "error" or int(row["epochs"]) == 0:
        raise UserError(f"trial {row['trial_id']} has no finished epoch to compare with (status {row['status']})")
    params = {name: row[name] for name in board.attrs["parameters"]}
    trial = with_values(study, {**params, "debug.epochs": int(row["epochs"]), "debug.use_gpu": device == "cuda"})
    global_filters = global_mc_sets(results, trial.analysis.tau, trial.analysis.freq_threshold)
    base_model = storage.read_bytes(storage.join_uri(results, "base", "model.pt"))
    torch.set_num_threads(1)  # as in a one-CPU Ray worker: same reduction order, same numbers
    with tempfile.TemporaryDirectory() as folder:
        rerun = run_debug_training(
            trial, global_filters, base_model, lambda1=trial.debug.lambda1, lambda2=trial.debug.lambda2, name="rerun", storage_path=folder, workers=0
        )
    best = best_epoch(rerun.history, study.search.metric, study.search.mode)
    one_image = 1.0 / max(len(load_splits(study.data, study.seed).val), 1)
    rows = []
    for metric, tolerance in (("val_acc", one_image), ("train_acc", one_image), ("best_epoch", 0), ("train_loss", 1e-3)):
        recorded, again = float(row[metric]), float(best.get(metric if metric != "best_epoch" else "epoch", np.nan))
        rows.append({"metric": metric, "recorded": recorded, "rerun": again, "difference": again - recorded, "tolerance": tolerance})
    return RerunReport(trial_id=str(row["trial_id"]), comparison=pd.DataFrame(rows), tolerance=one_image)


# ------------------------------------------------------------------- final


def trial_model_bytes(row: pd.Series) -> bytes | None:
    """The best epoch's ``model.pt`` of a leaderboard row, if its checkpoint is still there."""
    folder = str(row.get("checkpoint_path") or "")
    if not folder:
        return None
    location = storage.join_uri(folder, "model.pt")
    return storage.read_bytes(location) if storage.exists(location) else None


def debugged_model_bytes(results: str, final: pd.DataFrame) -> tuple[str, bytes] | None:
    """The best trial of ``final`` (final.parquet's debugged row): its id and ``model.pt``, if its checkpoint is still there."""
    debugged = final[final["model"] == "debugged"]
    if debugged.empty:
        return None
    trial_id = str(debugged["trial_id"].iloc[0])
    board = read_leaderboard(results)
    rows = board[board["trial_id"] == trial_id]
    model_bytes = trial_model_bytes(rows.iloc[0]) if len(rows) else None
    return None if model_bytes is None else (trial_id, model_bytes)


def run_final_stage(run: StageRun) -> dict:
    """Base, control and best trial on train/val/test; the test split is read here only (Tables 2 and 3)."""
    from raycf.analysis import global_mc_sets
    from raycf.debug import format_table2, format_table3, run_debug_training, treatment_tables

    study = run.study
    ensure_ray()
    results = run.results
    board = read_leaderboard(results)
    ranked = sort_by_objective(board[board["status"] != "error"], study.search.metric, study.search.mode)
    if ranked.empty:
        raise RuntimeError("the search finished no trial: nothing to evaluate (see the error column of leaderboard.parquet)")
    best = ranked.iloc[0]
    best_bytes = trial_model_bytes(best)
    if best_bytes is None:
        raise RuntimeError(f"best trial {best['trial_id']}: its checkpoint {best['checkpoint_path']!r} is gone")
    base_bytes = storage.read_bytes(run.upstream("base", "model.pt"))
    control, control_bytes = _full_control(board)
    if control_bytes is None:
        # Stopped early by ASHA (or not searched): the comparison needs the full schedule.
        log("final: training the control (λ1 = λ2 = 0) for the full schedule")
        control_study = with_values(study, control_point(study))
        filters = global_mc_sets(results, control_study.analysis.tau, control_study.analysis.freq_threshold)
        control_run = run_debug_training(
            control_study, filters, base_bytes, lambda1=0.0, lambda2=0.0, name=f"final-{run.stage_hash}-control", storage_path=run.ray_storage()
        )
        control_bytes, control_epoch = control_run.best_model_bytes, control_run.best_epoch
    else:
        control_epoch = int(control["best_epoch"])
    tables = treatment_tables(
        study,
        base_bytes,
        control_bytes,
        best_bytes,
        debugged_config=trial_study(study, {name: best[name] for name in parameter_names(study)}).debug,
        control_best_epoch=control_epoch,
        debugged_best_epoch=int(best["best_epoch"]),
    )
    table2, table3, class_recall = tables.table2, tables.table3, tables.class_recall
    names = parameter_names(study)
    control_values = control_point(study) if control is None else {name: control[name] for name in names}
    parameters = pd.DataFrame(
        [{name: np.nan for name in names}, {name: float(control_values[name]) for name in names}, {name: float(best[name]) for name in names}]
    )
    final = pd.concat([table2.drop(columns=["lambda1", "lambda2"]), parameters], axis=1)
    final.insert(1, "trial_id", ["", "" if control is None else str(control["trial_id"]), str(best["trial_id"])])
    for frame, location in (
        (table2, run.path("table2.parquet")),
        (table3, run.path("table3.parquet")),
        (final, storage.join_uri(results, "final.parquet")),
        (class_recall, storage.join_uri(results, "class_recall.parquet")),
    ):
        storage.write_frame(frame, location)
    print(f"{format_table2(table2)}\n\n{format_table3(table3)}", flush=True)
    rows = table2.set_index("model")
    return {
        "best_trial": str(best["trial_id"]),
        **{f"{model}_{split}_acc": round(float(rows.loc[model, f"{split}_acc"]), 6) for model in rows.index for split in ("train", "val", "test")},
    }


def _full_control(board: pd.DataFrame) -> tuple[pd.Series | None, bytes | None]:
    """The control's row and its model, when it ran its whole schedule."""
    controls = board[board["is_control"]]
    if controls.empty:
        return None, None
    control = controls.iloc[0]
    if control["status"] != "completed":
        return control, None
    return control, trial_model_bytes(control)


def describe_final(results: str) -> str:
    """Tables 2 and 3 of the study's best trial."""
    from raycf.debug import format_table2, format_table3

    folder = storage.join_uri(results, "final")
    table2 = storage.read_table(storage.join_uri(folder, "table2.parquet")).to_pandas()
    table3 = storage.read_table(storage.join_uri(folder, "table3.parquet")).to_pandas()
    return f"{format_table2(table2)}\n\n{format_table3(table3)}"


register(Stage(name="final", sections=(), upstream=("search",), run=run_final_stage, describe=describe_final))
