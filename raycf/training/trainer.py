"""Running a training loop: on a Ray Train ``TorchTrainer`` (DDP workers), or in this process.

A loop is ``loop(job, session) -> return value`` (see
:mod:`raycf.training.session`).  :func:`fit` runs it on ``workers`` Ray Train
workers, retrying a failed worker group from its latest checkpoint;
:func:`run_local` runs it here, without Ray.  Both keep the best checkpoint
by the reported :data:`~raycf.method.selection.SCORE_KEY` and the latest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raycf.runtime.cluster import configure_ray_train
from raycf.method.selection import SCORE_KEY
from raycf.training.session import LocalSession, RayTrainSession, Session, TrainState

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
    """Run ``loop(job, session)`` on a TorchTrainer with ``workers`` DDP workers.

    A run with the same ``name`` and ``storage_path`` resumes from its latest
    checkpoint.  ``callbacks`` go to the RunConfig.
    """
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
    kept = result.best_checkpoints or []  # the best by SCORE_KEY and the latest
    best = max(kept, key=lambda item: item[1].get(SCORE_KEY, 0))[0] if kept else result.checkpoint
    if best is None:
        return RunOutcome(result.return_value, {})
    with best.as_directory() as folder:
        files = _files_of(folder)
    if result.return_value is None and result.checkpoint is not None:  # a resumed run that had nothing left to do
        with result.checkpoint.as_directory() as folder:
            return RunOutcome(TrainState.read(folder).history, files)
    return RunOutcome(result.return_value, files)


def run_local(loop: Loop, job: Any, folder: str | Path, use_gpu: bool = False) -> RunOutcome:
    """Run ``loop(job, session)`` in this process (no Ray); checkpoints live in ``folder``."""
    session = LocalSession(folder, use_gpu=use_gpu)
    value = loop(job, session)
    return RunOutcome(value, _files_of(session.best) if session.best is not None else {})
