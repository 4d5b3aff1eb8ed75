"""The Ray cluster a study runs on: joining or starting it, and what raycf checks before using it.

* :func:`ensure_ray` joins the cluster named by ``RAY_ADDRESS`` (``ray job
  submit`` sets it) or starts a local one;
* :func:`check_storage_for_cluster` refuses a local ``storage_path`` that
  nodes other than this one could not reach;
* :func:`check_gpus` refuses ``use_gpu: true`` where no GPU can be had;
* :func:`configure_ray_train` sets the Ray Train defaults raycf relies on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from raycf.config import StudyConfig
from raycf.errors import UserError
from raycf.results import storage

# Written on the head by `ray up` (the cluster launcher): the node types it may add.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
# Environment variables of raycf's own (RAYCF_*) travel to every Ray worker of the study, and so
# does an S3-compatible store's endpoint (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3): every node must reach the same store.
FORWARDED_PREFIX = ("RAYCF_", "AWS_ENDPOINT_URL")


def ensure_ray() -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one.

    Without ``RAY_ADDRESS`` a new local cluster is started even if another one
    runs on this machine (``ray.init()`` alone would join it, or wait on a
    dead one); ``RAY_ADDRESS=auto`` joins a cluster started with ``ray start``.

    Unless verbose (:func:`raycf.runtime.console.verbose`), and when the command line
    named the study's results folder (:func:`raycf.runtime.console.configure`), Ray's
    own console output goes to ``<results>/logs/ray.log`` instead
    (:func:`quiet_ray`), announced in one ``[raycf]`` line.
    """
    import ray

    from raycf.runtime import console

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = os.environ.get("RAY_ADDRESS") or "local"
    results = console.configured_results()
    log_file = quiet_ray(results) if results is not None and not console.verbose() else None
    forwarded = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_PREFIX)}
    with quiet_backend(log_file is not None, local=address == "local") as worker_env, native_stderr_to(log_file):
        env_vars = {**worker_env, **forwarded}
        ray.init(
            address=address,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
    if log_file is not None:
        console.quiet_ray_logging(log_file)  # again: ray.init reset the formatters of the ray logger
        console.filter_worker_output()
        console.log(f"Ray's own messages go to {log_file} (--verbose shows them here)")


def orphaned_actors() -> list[str]:
    """Ids of the actors still alive (or restarting) whose driver has died (detached actors outlive drivers by design).

    A SIGKILLed driver's actors outlive it until the cluster notices; its Tune
    trials keep training and writing checkpoints meanwhile.
    """
    from ray._private.state import (
        state,  # the GCS tables; the public state API needs the dashboard
    )

    dead_jobs = {job["JobID"] for job in state.job_table() if job["IsDead"]}
    return [actor_id for actor_id, actor in state.actor_table(None).items() if actor["JobID"] in dead_jobs and actor["State"] != "DEAD" and not actor["IsDetached"]]


def wait_for_orphaned_actors(timeout_s: float = 120.0, poll_s: float = 0.5) -> int:
    """Wait until no actor of a dead driver is alive; returns how many there were at first.

    A search resumed at once after its driver was killed would otherwise run
    beside the dead driver's trials: both rewrite the same checkpoint folders,
    and a trial can read a ``train_state.pt`` that the other has just truncated.
    """
    import time

    orphans = orphaned_actors()
    deadline = time.monotonic() + timeout_s
    while orphaned_actors():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(orphaned_actors())} actors of a dead driver are still alive after {timeout_s:.0f} s (ray list actors shows them)")
        time.sleep(poll_s)
    return len(orphans)


# Ray's C++ backend writes its ERROR lines on the stderr of every process
# (the driver's own included) whatever else it logs to files; FATAL silences
# them.  Read from the environment when a Ray process starts (ray/_raylet.so:
# "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"; levels
# trace, debug, info, warning, error, fatal).
BACKEND_LOG_LEVEL = "RAY_BACKEND_LOG_LEVEL"
# 0: Tune's legacy console, silent at verbose=0; the default console prints its
# configuration table, results folder and TensorBoard hint even then
# (ray/tune/experimental/output.py, experiment_started).
TUNE_NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"


def quiet_ray(results: str) -> Path:
    """Quiet mode's settings made before ``ray.init``; returns Ray's log file of the study.

    Ray's Python logging goes to ``<results>/logs/ray.log``
    (:func:`raycf.runtime.console.quiet_ray_logging`), and Tune's console is its
    legacy one, which ``verbose=0`` silences.  A user's own setting of
    ``RAY_AIR_NEW_OUTPUT`` wins.
    """
    from raycf.runtime import console

    os.environ.setdefault(TUNE_NEW_OUTPUT, "0")
    return console.quiet_ray_logging(console.ray_log_path(results))


@contextlib.contextmanager
def quiet_backend(quiet: bool, local: bool):
    """Around ``ray.init``: in quiet mode the driver's C++ backend prints no ERROR lines on the console.

    Sets ``RAY_BACKEND_LOG_LEVEL=fatal`` while Ray starts (the driver's core
    worker reads it then), unless the user set it.  A local cluster started
    now (``local``) inherits it too: its workers get Ray's default level
    (``info``) back through the job's runtime_env (yielded, to merge into
    ``env_vars``), so that their ERROR lines still reach Ray's log files and,
    forwarded to the driver, ``ray.log``; its raylet and GCS keep ``fatal``.
    """
    if not quiet or BACKEND_LOG_LEVEL in os.environ:
        yield {}
        return
    os.environ[BACKEND_LOG_LEVEL] = "fatal"
    try:
        yield {BACKEND_LOG_LEVEL: "info"} if local else {}
    finally:
        os.environ.pop(BACKEND_LOG_LEVEL, None)


@contextlib.contextmanager
def native_stderr_to(path: Path | None):
    """While Ray starts: what is written on this process's file descriptor 2 (stderr) is appended to ``path``.

    Ray's C++ core worker starts in this process inside ``ray.init`` and
    prints there, before its own log files exist, a line no setting silences
    (``logging.cc: Set ray log level from environment variable
    RAY_BACKEND_LOG_LEVEL``, and other start-up lines).  ``sys.stderr`` and
    file descriptor 2 are the terminal again as soon as ``ray.init`` returns
    or fails.  None: nothing redirected.
    """
    if path is None:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no file descriptor 2 here
        yield
        return
    try:
        with open(path, "ab") as target:
            os.dup2(target.fileno(), 2)
        yield
    finally:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)


def configure_ray_train() -> None:
    """Ray Train settings raycf relies on, set once in the driver (environment defaults).

    Ray Train propagates these variables from the driver to its controller and
    workers: plain ``print`` (not re-logged through Train's logger, which
    doubles every line), no preemption watcher (a cloud-spot feature whose
    start-up logs an error line on every run), a patient worker start and a
    prompt controller.  A user's own setting of any of them wins.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Worker start-up imports torch; on a loaded laptop or CI box it can take
    # longer than Ray's 60 s default, which Ray would count as a failure.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # A worker's report waits for the controller's next poll (2 s by default):
    # with epochs of a second or two that doubled every run on small studies.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def check_storage_for_cluster(study: StudyConfig) -> None:
    """Refuse a local ``storage_path`` when the study's work can run on other machines.

    Trial drivers and training workers write results and checkpoints to
    ``storage_path`` from whichever node they run on, so on a Ray cluster of
    several nodes, or one the cluster launcher can grow (cluster.yaml's GPU
    workers start from zero), a local folder would scatter them over machines.
    A ``file://`` URI declares a folder that every node mounts (NFS, EFS).
    Starts nothing: the check connects only to a cluster raycf would join.
    """
    if storage.is_uri(study.storage_path) or study.storage_path.startswith("file://"):
        return
    import ray

    if not (ray.is_initialized() or os.environ.get("RAY_ADDRESS") or Path(LAUNCHER_CONFIG).expanduser().is_file()):
        return  # raycf will start a one-node local cluster
    ensure_ray()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    growable = launcher_worker_types()
    if nodes > 1:
        where = f"it has {nodes} nodes"
    elif growable:
        where = f"ray up may add {', '.join(growable)} nodes, per {LAUNCHER_CONFIG}"
    else:
        return
    raise UserError(
        f"storage_path={study.storage_path}: a local folder, which work on other nodes of this Ray cluster "
        f"could not reach ({where}); expected an s3:// or other shared filesystem URI, e.g. "
        f"--set storage_path=s3://BUCKET/raycf, or file:///PATH for a folder every node mounts"
    )


def _launcher_config(location: str = LAUNCHER_CONFIG) -> dict:
    path = Path(location).expanduser()
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def launcher_worker_types(location: str = LAUNCHER_CONFIG) -> list[str]:
    """Names of the worker node types the cluster launcher may start, from its config on the head."""
    config = _launcher_config(location)
    head = config.get("head_node_type")
    return sorted(
        name
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head and spec.get("max_workers", config.get("max_workers", 0)) > 0
    )


def launcher_can_add_gpus(location: str = LAUNCHER_CONFIG) -> bool:
    """Whether a node type the cluster launcher may start has GPUs.

    ``ray up`` fills each node type's resources from its instance type; a
    type whose resources it did not fill (no ``CPU`` count) may have GPUs too.
    """
    types = _launcher_config(location).get("available_node_types") or {}
    resources = [types[name].get("resources") or {} for name in launcher_worker_types(location)]
    return any(found.get("GPU", 0) > 0 or "CPU" not in found for found in resources)


def gpu_fields(study: StudyConfig) -> list[str]:
    """The study's ``<section>.use_gpu`` fields that are true."""
    return [f"{name}.use_gpu" for name in type(study).model_fields if getattr(getattr(study, name), "use_gpu", False) is True]


def check_gpus(study: StudyConfig) -> None:
    """Refuse ``use_gpu: true`` when neither torch here nor the Ray cluster can provide a GPU.

    Without this a study would wait for GPUs forever or, worse, compute on the
    CPU while it says it uses GPUs.  A cluster counts when it has a GPU now or
    its launcher may add GPU nodes (they start from zero in cluster.yaml).
    """
    fields = gpu_fields(study)
    if not fields:
        return
    import torch

    if torch.cuda.is_available():
        return
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray()
        if ray.cluster_resources().get("GPU", 0) > 0 or launcher_can_add_gpus():
            return
    elif launcher_can_add_gpus():
        return
    raise UserError(
        f"{fields[0]}: true, but no GPU is visible here (torch sees no CUDA device and no Ray cluster offers one); "
        f"expected a machine or Ray cluster with NVIDIA GPUs, or --set {' '.join(f'{field}=false' for field in fields)}"
    )
