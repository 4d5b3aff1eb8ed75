"""One debug job for every stage that retrains, and one Tune launcher.

The search's trials, the final stage's control and seed grid, ``raycf debug``
and ``raycf rerun`` all build their :class:`~raycf.training.debug.DebugJob`
through :func:`debug_job`, and the search and the seed grid start Tune through
:func:`tune_run`, so they cannot drift apart: the same study gives the same G,
the same inputs (image store, prefix cache) and the same Tune settings
(failures, kept checkpoint, console).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from raycf.results import storage
from raycf.results.artefacts import global_mc_sets, load_study_data, prefix_ref, store_ref, written_key
from raycf.config import StudyConfig
from raycf.data.image_store import StoreRef
from raycf.method.detection import StudyData, detection_quality
from raycf.search.searcher import trial_study
from raycf.training.debug import DebugJob, debug_train_loop
from raycf.training.session import TuneSession
from raycf.training.trainer import fit, tune_run_config


def debug_job(
    study: StudyConfig,
    results: str,
    base_model: bytes,
    *,
    lambdas: tuple[float, float] | None = None,
    order_seed: int | None = None,
    with_detection: bool = False,
    print_epochs: bool = True,
) -> DebugJob:
    """The debug (or control) run of ``study`` on ``results``: G at ``debug.tau`` and ``debug.freq_threshold``, its inputs.

    ``lambdas``: (λ1, λ2), the study's own by default (``(0, 0)``: the
    control, which suppresses nothing; otherwise ``debug.suppress`` applies when
    ``debug.suppress_weight`` > 0).  ``with_detection`` adds the detection quality on val of that G
    (the run's own τ and f: no detection setting, ``analysis.*``, enters a
    search) and G's mean size as constant metrics of every report (a search
    trial's).  ``order_seed``: see :attr:`DebugJob.order_seed`.
    """
    tau, freq_threshold = study.debug.tau, study.debug.freq_threshold
    lambda1, lambda2 = (study.debug.lambda1, study.debug.lambda2) if lambdas is None else lambdas
    extra: dict[str, float] = {}
    if with_detection:
        data = validation_masks(results, written_key(results, "masks"))
        global_filters = data.global_filters(tau, freq_threshold)
        extra = {key: float(value) for key, value in detection_quality(data, tau, freq_threshold, split="val").items()}
        extra["g_size"] = float(np.asarray(global_filters).sum(axis=1).mean())
    else:
        global_filters = global_mc_sets(results, tau, freq_threshold)
    return DebugJob(
        study=study,
        global_filters=np.asarray(global_filters, dtype=bool),
        base_model=base_model,
        lambda1=lambda1,
        lambda2=lambda2,
        extra_metrics=extra,
        print_epochs=print_epochs,
        images=store_ref(results),
        prefix=prefix_ref(results, study),
        order_seed=order_seed,
        suppress=None if lambdas == (0.0, 0.0) else suppression_of(study, results, np.asarray(global_filters).shape[1]),  # the control suppresses nothing
    )


def suppression_of(study: StudyConfig, results: str, num_filters: int) -> np.ndarray | None:
    """S (C×K) of ``debug.suppress`` when the study suppresses (filters named, ``debug.suppress_weight`` > 0), else None."""
    suppress, weight = study.debug.suppress, study.debug.suppress_weight
    if not suppress or weight == 0:
        return None
    from raycf.method.suppress import suppression_matrix
    from raycf.results.artefacts import class_names

    return suppression_matrix(suppress, class_names(results), num_filters)


@functools.lru_cache(maxsize=2)
def validation_masks(results: str, masks_key: str) -> StudyData:
    """The masks a trial's G and detection quality come from, read once per process and write of the masks stage
    (``masks_key``): a reused trial actor does not read them again."""
    return load_study_data(results, splits=("val",), with_head=False)


@dataclass(frozen=True)
class TrialContext:
    """What every Tune trial of a stage needs, shipped once through the object store."""

    study: StudyConfig
    results: str
    base_model: bytes
    images: StoreRef
    train_storage: str  # where multi-worker trials keep their Ray Train runs


def trial_context(study: StudyConfig, results: str, base_model: bytes, tune_storage: str, experiment: str) -> TrialContext:
    """The context of the trials of ``experiment`` (their multi-worker runs go beside it)."""
    return TrialContext(study, results, base_model, store_ref(results), storage.join_uri(tune_storage, experiment + "-train"))


def trial_job(study: StudyConfig, context: TrialContext, order_seed: int | None = None) -> DebugJob:
    """The debug run of one trial: G at the trial's τ and f, and its detection quality (on val) as extra metrics."""
    return debug_job(study, context.results, context.base_model, order_seed=order_seed, with_detection=True, print_epochs=False)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: debug retraining for one point of the search space (``config``), reported per epoch.

    ``config["order_seed"]``, when there, draws the data order, views and
    dropout (the final stage's retraining seeds; see :attr:`DebugJob.order_seed`).
    """
    entered = time.time()
    point = {name: value for name, value in config.items() if name != "order_seed"}
    study = trial_study(context.study, point)
    job = trial_job(study, context, config.get("order_seed"))
    # When the trial's function started and how long building its job took (benchmarks/bench_search.py's profile).
    profile = {"entered_at": entered, "job_s": time.time() - entered}
    train_in_trial(replace(job, extra_metrics={**job.extra_metrics, **profile}), context)


def train_in_trial(job: DebugJob, context: TrialContext) -> None:
    """Run ``job`` inside the calling Tune trial (one worker), or drive a TorchTrainer from it (several), reporting every epoch to Tune."""
    import ray.tune

    study = job.study
    if study.debug.workers == 1:
        debug_train_loop(job, TuneSession(study.debug.use_gpu))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    fit(
        debug_train_loop,
        job,
        name=f"trial-{trial_id}",
        storage_path=context.train_storage,
        workers=study.debug.workers,
        use_gpu=study.debug.use_gpu,
        max_failures=study.debug.max_failures,
        callbacks=[TuneReportCallback()],
    )


def trial_dirname(trial) -> str:
    """A trial's folder under the Tune experiment: ``trial-<trial id>``."""
    return f"trial-{trial.trial_id}"


def trial_resources(study: StudyConfig) -> dict[str, float]:
    """What one trial reserves: a CPU and ``debug.gpus_per_trial`` of a GPU when it trains in the trial (several
    small trials share a GPU), a driver's share otherwise (its TorchTrainer's workers reserve their own)."""
    if study.debug.workers == 1:
        return {"cpu": 1, "gpu": study.debug.gpus_per_trial if study.debug.use_gpu else 0}
    return {"cpu": study.search.driver_cpus, **study.search.driver_resources}


def trainable_of(study: StudyConfig, context: TrialContext, function: Callable = run_trial):
    """``function(config, context)`` as a Tune trainable with a trial's resources and the metrics Tune's console shows."""
    import ray.tune as tune

    trainable = tune.with_resources(tune.with_parameters(function, context=context), trial_resources(study))
    # Tune's console (--verbose): what its status table and trial summaries show
    # (a trainable attribute Tune reads for this), and no per-epoch result dumps.
    trainable._progress_metrics = ("epoch", "val_acc", "train_loss", "det_auroc")
    return trainable


def tune_run(study: StudyConfig, trainable, *, name: str, storage_path: str, callbacks: list, param_space: dict | None = None, **tune_config):
    """A Tune ``Tuner`` of debug trials: the study's failure budget, one kept checkpoint (the best by the selection score),
    ``reuse_actors`` (a finished trial's process serves the next), Tune's own console only with ``--verbose``.

    ``tune_config``: the rest of the ``TuneConfig`` (searcher, scheduler, samples, concurrency).
    """
    import ray.tune as tune

    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(trial_dirname_creator=trial_dirname, reuse_actors=True, **tune_config),
        run_config=tune_run_config(name, storage_path, study.debug.max_failures if study.debug.workers == 1 else 0, callbacks),
    )
