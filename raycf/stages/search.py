"""Stage ``search``: Ray Tune + Optuna over λ1, λ2, τ and f (and whatever else the study file searches).

A Ray Tune ``Tuner`` over a function trainable.  Each trial recomputes the
global MC filters G from the masks with its own τ and f, then retrains the
base model with L_d (:mod:`raycf.training.debug`), reporting every epoch:

* a single-worker trial (``debug.workers: 1``) runs its training loop inside
  its own Tune trial: no worker group to start, Tune keeps its checkpoints,
  retries it from the latest one when it fails (``debug.max_failures``) and
  ASHA stops it early when it is weak;
* a multi-worker trial drives a ``TorchTrainer`` (DDP) from a light driver
  that may be pinned to the head (``search.driver_resources``).

The searcher (:mod:`raycf.search.searcher`) proposes the control first, then
Optuna's TPE points; ``leaderboard.parquet`` is rewritten atomically as
trials finish, and Tune's driver state is bundled after every step
(:mod:`raycf.search.tune_state`) so a killed driver resumes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from raycf.runtime import kill_points

from raycf.results import storage
from raycf.results.artefacts import base_model_bytes
from raycf.runtime.cluster import ensure_ray, wait_for_orphaned_actors
from raycf.config import StudyConfig
from raycf.runtime.console import log
from raycf.errors import UserError
from raycf.search.leaderboard import LeaderboardWriter, read_leaderboard, sort_by_objective
from raycf.results.manifest import versions
from raycf.search.console import TrialConsole, error_summary
from raycf.search.searcher import control_first_searcher, parameter_names, trial_study
from raycf.stages.jobs import trainable_of, trial_context, tune_run

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun


def leaderboard_writer(study: StudyConfig, results: str) -> LeaderboardWriter:
    """The leaderboard of this study's search."""
    return LeaderboardWriter(
        results, parameter_names(study), study.search.metric, study.search.mode, study.debug.epochs, study.seed, versions()
    )


def tune_callback(study: StudyConfig, writer: LeaderboardWriter):
    """A Tune callback that feeds the leaderboard as results and checkpoints arrive and trials end.

    Tune saves its state (every trial's history) beside the experiment state,
    and restores it on resume.
    """
    from ray.tune import Callback

    names = parameter_names(study)

    def record_of(trial):
        config_hash = trial_study(study, {name: trial.config[name] for name in names if name in trial.config}).config_hash()
        return writer.record(trial.trial_id, trial.config, config_hash)

    class LeaderboardCallback(Callback):
        def on_step_begin(self, iteration, trials, **info):
            for trial in trials:  # a trial's wall time starts when Tune creates it, before its process starts
                if trial.trial_id not in writer.records:
                    record_of(trial)

        def on_trial_start(self, iteration, trials, trial, **info):
            writer.order = [t.trial_id for t in trials]
            record = record_of(trial)
            record.status, record.error = "running", ""  # also a restarted one
            writer.write()
            kill_points.reached("started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            record = record_of(trial)
            writer.add_epoch(record, {key: value for key, value in result.items() if isinstance(value, (int, float, str)) and key != "config"})
            record.time_total_s = float(result.get("time_total_s", record.time_total_s))
            kill_points.reached("reported")

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            writer.add_checkpoint(record_of(trial), storage.with_scheme(checkpoint.path, writer.results))

        def on_trial_complete(self, iteration, trials, trial, **info):
            record = record_of(trial)
            writer.finish(record, writer.status_of_finished(record))
            kill_points.reached("completed")

        def on_trial_error(self, iteration, trials, trial, **info):
            writer.finish(record_of(trial), "error", error_summary(trial)[:300])

        def on_experiment_end(self, trials, **info):
            writer.write()

        def get_state(self) -> dict:
            return {"records": writer.records, "order": writer.order}

        def set_state(self, state: dict) -> None:
            writer.records, writer.order = dict(state["records"]), list(state["order"])

    return LeaderboardCallback()


OPTUNA_FILE = "optuna.db"


def optuna_storage_url(study: StudyConfig, results: str, stage_hash: str, resume: bool) -> tuple[str, str | None]:
    """(SQLAlchemy URL, local SQLite file kept in the results folder after every step, if any).

    A results folder on an object store cannot hold a live SQLite file: the
    driver works on a local copy, :class:`OptunaUpload` puts it in the bucket
    after every step that changed it, and a resumed search (on this head or
    a new one) starts from the bucket's copy, so no finished trial is lost.
    """
    if study.search.storage:
        return study.search.storage, None
    if storage.is_uri(results):
        local = Path(tempfile.gettempdir(), f"raycf-{study.name}-{stage_hash}-{OPTUNA_FILE}")
        local.unlink(missing_ok=True)
        saved = storage.join_uri(results, OPTUNA_FILE)
        if resume and storage.exists(saved):
            local.write_bytes(storage.read_bytes(saved))
        return f"sqlite:///{local}", str(local)
    Path(results).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(results, OPTUNA_FILE)}", None


def optuna_upload(local: str, location: str):
    """A Tune callback that writes the local SQLite file to ``location`` (atomically) after every step that changed it.

    Optuna writes in the driver's thread during a step, so at a step's end
    the file is consistent.
    """
    from ray.tune import Callback

    class OptunaUpload(Callback):
        def __init__(self) -> None:
            self.saved: tuple[int, int] | None = None

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            path = Path(local)
            if not path.is_file():
                return
            fingerprint = (path.stat().st_size, path.stat().st_mtime_ns)
            if fingerprint != self.saved:
                storage.write_bytes(location, path.read_bytes())
                self.saved = fingerprint

        def on_experiment_end(self, trials: list, **info) -> None:
            self.on_step_end(0, trials)

    return OptunaUpload()


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


def asha_scheduler(study: StudyConfig):
    """ASHA on the per-epoch objective, or None when the study turns it off."""
    from ray.tune.schedulers import ASHAScheduler

    asha = study.search.scheduler.asha
    if asha is None:
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=study.debug.epochs,
        grace_period=min(asha.grace_period, study.debug.epochs),
        reduction_factor=asha.reduction_factor,
    )


def run(run: "StageRun") -> dict:
    """Run (or resume) the Tune search; write ``leaderboard.parquet`` and ``optuna.db``."""
    import ray.tune as tune

    from raycf.pipeline import clear_ray_runs
    from raycf.search.tune_state import DriverStateSnapshot, finished_trials, read_snapshot, restore_driver_state

    study, results = run.study, run.results
    if study.search.space is None:
        shown = ", ".join(f"{name} {spec.model_dump(exclude_none=True)}" for name, spec in study.search.searched_space.items())
        log(f"search: search.space not given: searching the default space ({shown})")
    ensure_ray()
    if study.debug.workers > 1:
        check_driver_resources(study)
    experiment = f"search-{run.stage_hash}"
    tune_storage = run.ray_storage()
    context = trial_context(study, results, base_model_bytes(results), tune_storage, experiment)
    trainable = trainable_of(study, context)
    experiment_path = storage.join_uri(tune_storage, experiment)
    snapshot = storage.join_uri(tune_storage, f"{experiment}-driver", "state.zip")
    saved_state = read_snapshot(snapshot)
    url, upload = optuna_storage_url(study, results, run.stage_hash, resume=bool(saved_state))
    uploads = [optuna_upload(upload, storage.join_uri(results, OPTUNA_FILE))] if upload else []
    if saved_state:
        wait_for_orphaned_actors()  # the interrupted driver's trials must not write beside the resumed ones
        restore_driver_state(saved_state, experiment_path)
        log(f"search: resuming the interrupted search at {experiment_path} (finished trials kept: {len(finished_trials(saved_state))})")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=run.resume, restart_errored=False)
    else:
        # Killed before its first trial existed (or never run): nothing to keep.
        clear_ray_runs(results, experiment)
        forget_optuna_study(url, f"{study.name}-{run.stage_hash}")
        tuner = tune_run(
            study,
            trainable,
            name=experiment,
            storage_path=tune_storage,
            # The console callback last: Tune restores callback state by position.
            callbacks=[
                tune_callback(study, leaderboard_writer(study, results)),
                # Optuna's file first: the bucket's copy is never older than the driver state it goes with
                # (a proposal newer than that state is adopted on resume, see searcher.adopt_orphan).
                *uploads,
                DriverStateSnapshot(snapshot),
                TrialConsole(parameter_names(study), study.search.metric, study.search.mode, total_trials=study.search.num_samples, epochs=study.debug.epochs),
            ],
            metric=study.search.metric,
            mode=study.search.mode,
            search_alg=control_first_searcher(study, url, study_name=f"{study.name}-{run.stage_hash}"),
            scheduler=asha_scheduler(study),
            num_samples=study.search.num_samples,
        )
    tuner.fit()  # the leaderboard callback wrote leaderboard.parquet
    if upload:
        storage.write_bytes(storage.join_uri(results, OPTUNA_FILE), Path(upload).read_bytes())
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
    return summary
