"""Running a training loop: on Ray (a Ray Train ``TorchTrainer`` of DDP workers, or one Tune trial), or in this process.

A loop is ``loop(job, session) -> return value`` (see
:mod:`raycf.training.session`).  :func:`fit` runs it on Ray: on several
workers, a ``TorchTrainer`` retries a failed worker group from its latest
checkpoint; on one, the loop runs inside a single Ray Tune trial, which keeps
the same checkpoints and retries but starts no controller and worker group
(on small data that start-up was most of a stage's time).  :func:`run_local` runs it
here, without Ray.  All keep the best checkpoint by the reported
:data:`~raycf.method.selection.SCORE_KEY` and the latest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raycf.method.selection import SCORE_KEY
from raycf.results import storage
from raycf.runtime.cluster import configure_ray_train
from raycf.training.session import LocalSession, RayTrainSession, Session, TrainState, TuneSession

Loop = Callable[[Any, Session], Any]


@dataclass
class RunOutcome:
    """What a finished run leaves: the loop's return value and the files of its best checkpoint."""

    return_value: Any
    best_files: dict[str, bytes]  # file name -> content of the best reported checkpoint folder ({} without one)


def _files_of(folder: str | Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def _train_worker(config: dict[str, Any]) -> Any:
    """What each Ray Train worker runs: the loop with a :class:`RayTrainSession`."""
    return config["loop"](config["job"], RayTrainSession())


def fit(
    loop: Loop,
    job: Any,
    *,
    name: str,
    storage_path: str,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    callbacks: list | None = None,
) -> RunOutcome:
    """Run ``loop(job, session)`` on Ray: a TorchTrainer with ``workers`` DDP workers, or one Tune trial for one worker.

    A run with the same ``name`` and ``storage_path`` resumes from its latest
    checkpoint.  ``callbacks`` go to the TorchTrainer's RunConfig (several
    workers only).
    """
    if workers == 1 and not callbacks:
        return fit_in_trial(loop, job, name=name, storage_path=storage_path, use_gpu=use_gpu, max_failures=max_failures)
    return fit_on_trainer(loop, job, name=name, storage_path=storage_path, workers=workers, use_gpu=use_gpu, max_failures=max_failures, callbacks=callbacks)


def fit_on_trainer(
    loop: Loop,
    job: Any,
    *,
    name: str,
    storage_path: str,
    workers: int,
    use_gpu: bool,
    max_failures: int,
    callbacks: list | None = None,
) -> RunOutcome:
    """Run ``loop(job, session)`` on a TorchTrainer with ``workers`` DDP workers (see :func:`fit`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    configure_ray_train()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"loop": loop, "job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    files = _best_files(result)
    if result.return_value is None and result.checkpoint is not None:  # a resumed run that had nothing left to do
        with result.checkpoint.as_directory() as folder:
            return RunOutcome(TrainState.read(folder).history, files)
    return RunOutcome(result.return_value, files)


def _best_files(result) -> dict[str, bytes]:
    """The files of a Ray Train or Tune result's best kept checkpoint by SCORE_KEY (the latest without a score), {} without one."""
    kept = result.best_checkpoints or []  # the best by SCORE_KEY and the latest
    best = max(kept, key=lambda item: item[1].get(SCORE_KEY, 0))[0] if kept else result.checkpoint
    if best is None:
        return {}
    with best.as_directory() as folder:
        return _files_of(folder)


def _loop_in_trial(config: dict[str, Any], loop: Loop, job: Any, use_gpu: bool, returned: str) -> None:
    """What the one Tune trial of :func:`fit_in_trial` runs: the loop, then its return value written as JSON to ``returned``."""
    storage.write_text(returned, json.dumps(loop(job, TuneSession(use_gpu))))


def tune_run_config(name: str, storage_path: str, max_failures: int, callbacks: list | None = None):
    """Tune's ``RunConfig`` of every raycf run: retries from the latest checkpoint, one kept checkpoint (the best by
    :data:`~raycf.method.selection.SCORE_KEY`; Tune keeps the latest too), Tune's own console only with ``--verbose``."""
    import ray.tune as tune

    from raycf.runtime.console import verbose

    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"),
        verbose=1 if verbose() else 0,
    )


def fit_in_trial(loop: Loop, job: Any, *, name: str, storage_path: str, use_gpu: bool, max_failures: int) -> RunOutcome:
    """Run ``loop(job, session)`` inside one Ray Tune trial (one worker: no worker group to start).

    Tune keeps the checkpoints under ``storage_path/name`` and retries a
    failed trial from its latest one (``max_failures``); a run interrupted
    with its driver resumes from there.  The loop's return value comes back
    through ``storage_path/name-return.json`` (a trial cannot return one),
    so it must be JSON.
    """
    import ray.tune as tune

    from raycf.runtime.cluster import wait_for_orphaned_actors

    experiment, returned = storage.join_uri(storage_path, name), storage.join_uri(storage_path, f"{name}-return.json")
    trainable = tune.with_resources(
        tune.with_parameters(_loop_in_trial, loop=loop, job=job, use_gpu=use_gpu, returned=returned), {"cpu": 1, "gpu": 1 if use_gpu else 0}
    )
    if tune.Tuner.can_restore(experiment):
        wait_for_orphaned_actors()  # an interrupted driver's trial must not write beside the resumed one
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, restart_errored=False)
    else:
        tuner = tune.Tuner(trainable, run_config=tune_run_config(name, storage_path, max_failures))
    (result,) = list(tuner.fit())
    if result.error is not None:
        last_line = next((line for line in reversed(str(result.error).splitlines()) if line.strip()), type(result.error).__name__)
        raise RuntimeError(f"{name}: the training run failed: {last_line.strip()}") from result.error  # the traceback stays chained
    return RunOutcome(json.loads(storage.read_text(returned)), _best_files(result))


def run_local(loop: Loop, job: Any, folder: str | Path, use_gpu: bool = False) -> RunOutcome:
    """Run ``loop(job, session)`` in this process (no Ray); checkpoints live in ``folder``."""
    session = LocalSession(folder, use_gpu=use_gpu)
    value = loop(job, session)
    return RunOutcome(value, _files_of(session.best) if session.best is not None else {})
