"""What raycf prints while it works: one ``[raycf]`` line per event, on stderr.

Ray's own console output (its Python loggers, the lines its workers print,
Tune's tables) is shown only in verbose mode (``--verbose``, or
``RAYCF_VERBOSE=1`` in the environment, which :func:`raycf.runtime.cluster.ensure_ray`
forwards to every Ray worker).  Otherwise it goes to a log file of the study,
``<results>/logs/ray.log`` (:func:`ray_log_path`), and the screen keeps the
``[raycf]`` lines only, those printed by Ray workers included:

* :func:`quiet_ray_logging` sends the ``ray`` loggers of this process (Tune,
  Train, Data, the autoscaler, ``ray.init`` itself) and the Python warnings
  raised in Ray's code to that file;
* :func:`filter_worker_output` keeps Ray's forwarding of worker output to the
  driver (``log_to_driver``) but prints only the workers' ``[raycf]`` lines
  and writes every other line to the file.

This module is imported by Ray workers too: it imports neither Ray nor tqdm
at import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

PREFIX = "[raycf]"
VERBOSE_ENV = "RAYCF_VERBOSE"
LOG_FOLDER = "logs"  # in the results folder
RAY_LOG_FILE = "ray.log"
# Ray's name for the handler that prints forwarded worker output on the driver, and ours.
RAY_PRINT_HANDLER = "ray_print_logs"
RAYCF_PRINT_HANDLER = "raycf_print_logs"
# What a line of ray.experimental.tqdm_ray carries (a progress bar's state, not text).
RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"
# The logger that writes forwarded worker lines and Ray's Python warnings to the log file.
OUTPUT_LOGGER = "raycf.ray_output"

_write_lock = threading.RLock()
_bars: list[Any] = []  # tqdm bars of ours now on screen: lines are written above them
_results: str | None = None  # the results folder of the study this process runs (set by the CLI)


def log(message: str) -> None:
    """One progress line on stderr."""
    write_line(f"{PREFIX} {message}")


def spaced_epochs(total: int, count: int = 5) -> set[int]:
    """About ``count`` evenly spaced (1-based) epochs of ``total``, always the last."""
    every = max(1, total // count)
    return {epoch for epoch in range(1, total + 1) if epoch % every == 0 or epoch == total}


def shown_epochs(total: int, lines: int = 5) -> set[int]:
    """The (1-based) epochs whose progress line is printed: :func:`spaced_epochs`; all in verbose mode."""
    return set(range(1, total + 1)) if verbose() else spaced_epochs(total, lines)


def write_line(line: str) -> None:
    """Print a finished line on stderr, above our progress bar when one is shown."""
    with _write_lock:
        if _bars:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)


def progress(iterable, description: str, total: int | None = None):
    """A tqdm progress bar on an interactive terminal, the bare iterable otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, disable=None, leave=False)


def progress_bar(total: int, description: str, initial: int = 0):
    """A counting tqdm bar on stderr when it is an interactive terminal, else None.

    While it is open, :func:`log` writes its lines above it; close it with
    :func:`close_bar`.
    """
    if not stderr_is_terminal():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True, unit="trial")
    with _write_lock:
        _bars.append(bar)
    return bar


def close_bar(bar) -> None:
    """Remove a bar of :func:`progress_bar` from the screen (None: nothing to do)."""
    if bar is None:
        return
    with _write_lock:
        if bar in _bars:
            _bars.remove(bar)
        bar.close()


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


# ---------------------------------------------------------------- verbose mode


def verbose() -> bool:
    """Whether Ray's own console output is wanted (``--verbose`` or ``RAYCF_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def set_verbose(on: bool) -> None:
    """Turn verbose mode on or off for this process and, through ``ensure_ray``, its Ray workers."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def configure(results: str | None, verbose: bool = False) -> None:
    """What the command line knows before any stage runs: ``--verbose``, and where the study's results go.

    ``verbose`` only turns verbose mode on (``RAYCF_VERBOSE=1`` set in the
    environment keeps it on without the option).  ``results`` is where Ray's
    log goes in quiet mode (:func:`ray_log_path`).  Prints and creates nothing.
    """
    global _results
    if verbose:
        set_verbose(True)
    _results = results


def configured_results() -> str | None:
    """The results folder given to :func:`configure`, or None (then Ray's output is left as Ray prints it)."""
    return _results


def ray_log_path(results: str) -> Path:
    """Where Ray's own messages go in quiet mode: ``<results>/logs/ray.log``.

    A results folder that is a URI (``s3://...``) has no local folder to
    write to as lines come: the log then goes to
    ``<temp>/raycf-logs/<study>-<hash of the URI>/ray.log`` on this machine.
    """
    from raycf.results.storage import is_uri, normalise_root  # pyarrow: not needed by the rest of this module

    if is_uri(results):
        digest = hashlib.sha256(results.encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", results.rstrip("/").rsplit("/", 1)[-1]) or "study"
        return Path(tempfile.gettempdir(), "raycf-logs", f"{name}-{digest}", RAY_LOG_FILE)
    return Path(normalise_root(results)) / LOG_FOLDER / RAY_LOG_FILE


# ------------------------------------------------- Ray's Python logging -> file


class _LogFormat(logging.Formatter):
    """Ray's records with their logger; forwarded worker lines with the worker they came from."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        origin = getattr(record, "origin", None)
        if origin is None:
            return super().format(record)
        return f"{self.formatTime(record)} {origin} {record.getMessage()}"


class _State:
    handler: logging.FileHandler | None = None
    removed: dict[str, list[tuple[int, logging.Handler]]] = {}  # logger name -> (position, console handler) we took off it
    attached: set[str] = set()  # loggers we added our handler to
    showwarning: Any = None  # warnings.showwarning before ours


def _is_console_handler(handler: logging.Handler) -> bool:
    """A handler printing on stderr or stdout: Ray's ``PlainRayHandler``, or a stream handler on either."""
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    if type(handler).__name__ in ("PlainRayHandler", "_StderrHandler"):  # ray/_private/log.py: sys.stderr at emit time
        return True
    return any(getattr(handler, "stream", None) is stream for stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def _ray_loggers() -> list[logging.Logger]:
    """The ``ray`` logger and every existing ``ray.*`` logger (placeholders not created)."""
    names = sorted(name for name, found in logging.root.manager.loggerDict.items() if name.startswith("ray.") and isinstance(found, logging.Logger))
    return [logging.getLogger("ray"), *(logging.getLogger(name) for name in names)]


def quiet_ray_logging(path: str | Path) -> Path:
    """Send Ray's Python logging and the warnings raised in Ray's code to ``path`` (appended), not the console.

    Every ``ray`` logger of this process loses its console handlers; ``ray``
    and the ``ray.*`` loggers that do not propagate to it (``ray.data``) get
    a handler that appends to ``path``.  Ray Data, Tune and Train are imported
    first so that the handlers they install at import time are there to be
    replaced.  Safe to call again (``ray.init`` rewrites the ``ray``
    logger's formatters: call it once more after); :func:`restore_ray_logging`
    undoes it.  Returns the log file's path.
    """
    import importlib

    for module in ("ray", "ray.data", "ray.tune", "ray.train"):
        try:
            importlib.import_module(module)
        except ImportError:  # pragma: no cover - raycf installs them all
            pass
    path = Path(path)
    if _State.handler is not None and Path(_State.handler.baseFilename) != path.resolve():
        _detach_handler()
    if _State.handler is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _State.handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        _State.handler.setLevel(logging.INFO)
    handler = _State.handler
    handler.setFormatter(_LogFormat())
    for logger in _ray_loggers():
        for position, found in reversed(list(enumerate(logger.handlers))):
            if _is_console_handler(found):
                logger.removeHandler(found)
                _State.removed.setdefault(logger.name, []).insert(0, (position, found))
        if (logger.name == "ray" or not logger.propagate) and handler not in logger.handlers:
            logger.addHandler(handler)
            _State.attached.add(logger.name)
    output = logging.getLogger(OUTPUT_LOGGER)
    output.setLevel(logging.INFO)
    output.propagate = False
    if handler not in output.handlers:
        output.addHandler(handler)
    if _State.showwarning is None:
        _State.showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
    return path.resolve()


def _detach_handler() -> None:
    handler = _State.handler
    if handler is None:
        return
    for name in [*_State.attached, OUTPUT_LOGGER]:
        logging.getLogger(name).removeHandler(handler)
    _State.attached.clear()
    handler.close()
    _State.handler = None


def restore_ray_logging() -> None:
    """Undo :func:`quiet_ray_logging` and :func:`filter_worker_output`: Ray's console handlers and printing back."""
    _detach_handler()
    for name, handlers in _State.removed.items():
        logger = logging.getLogger(name)
        for position, handler in handlers:  # back where they were
            if handler not in logger.handlers:
                logger.handlers.insert(min(position, len(logger.handlers)), handler)
    _State.removed = {}
    if _State.showwarning is not None:
        if warnings.showwarning is _show_warning:
            warnings.showwarning = _State.showwarning
        _State.showwarning = None
    dispatcher = _dispatcher()
    if dispatcher is not None:
        dispatcher.remove_handler(RAYCF_PRINT_HANDLER)


def _ray_folder() -> str:
    import ray

    return os.path.dirname(os.path.abspath(ray.__file__)) + os.sep


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings raised in Ray's code (or of Ray's own warning classes) go to the log file."""
    from_ray = os.path.abspath(str(filename)).startswith(_ray_folder()) or getattr(category, "__module__", "").startswith("ray.")
    if from_ray and _State.handler is not None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        logging.getLogger(OUTPUT_LOGGER).warning("%s", text, extra={"origin": "(python warning)"})
        return
    (_State.showwarning or warnings._showwarning_orig)(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]


# ------------------------------------------- forwarded worker output -> filter


def _dispatcher():
    """Ray's dispatcher of the worker output it forwards to the driver (``log_to_driver``), or None."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:  # pragma: no cover - another Ray version
        return None
    if not all(hasattr(global_worker_stdstream_dispatcher, name) for name in ("add_handler", "remove_handler")):
        return None  # pragma: no cover
    return global_worker_stdstream_dispatcher


def filter_worker_output() -> bool:
    """Print only the ``[raycf]`` lines of Ray's workers; write their other output to the log file.

    Ray forwards what its workers print to the driver (``ray.init(log_to_driver=True)``)
    and prints it there with a ``(pid=...)`` prefix.  This replaces that
    printer (Ray's dispatcher handler ``ray_print_logs``, ray/_private/worker.py)
    with :func:`route_worker_output`.  Call it after ``ray.init`` and after
    :func:`quiet_ray_logging`; False when there is nothing to replace
    (``log_to_driver=False``, or a Ray without that dispatcher).
    """
    dispatcher = _dispatcher()
    if dispatcher is None:
        return False
    names = [name for name, _ in getattr(dispatcher, "handlers", [])]
    if RAY_PRINT_HANDLER not in names and RAYCF_PRINT_HANDLER not in names:
        return False
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.remove_handler(RAYCF_PRINT_HANDLER)
    dispatcher.add_handler(RAYCF_PRINT_HANDLER, route_worker_output)
    return True


def _origin(batch: dict[str, Any]) -> str:
    """``(RayTrainWorker pid=123, ip=10.0.0.2)``, as Ray prefixes a forwarded line."""
    pid = batch.get("pid")
    name = batch.get("actor_name") or batch.get("task_name")
    where = f"{name} pid={pid}" if name else (str(pid) if pid in ("raylet", "autoscaler") else f"pid={pid}")
    ip = batch.get("ip")
    if ip and ip != batch.get("localhost"):
        where += f", ip={ip}"
    return f"({where})"


def route_worker_output(batch: dict[str, Any]) -> None:
    """One batch of forwarded worker output: ``[raycf]`` lines to the screen, the rest to the log file."""
    origin = _origin(batch)
    output = logging.getLogger(OUTPUT_LOGGER)
    from_worker = batch.get("pid") not in ("raylet", "autoscaler")
    lines = batch.get("lines") or []
    if batch.get("pid") == "autoscaler":
        lines = _autoscaler_events(lines)
    for line in lines:
        if RAY_TQDM_MAGIC in line:
            continue  # a distributed progress bar's state: no text
        if from_worker and line.startswith(PREFIX):
            write_line(line)
        elif _State.handler is not None:
            output.info("%s", line, extra={"origin": origin})


def _autoscaler_events(lines: list[str]) -> list[str]:
    """The autoscaler's event lines, as Ray prints them, without its periodic status reports."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:  # pragma: no cover - another Ray version
        return lines
    try:
        return list(filter_autoscaler_events(lines))
    except Exception:  # noqa: BLE001 - a format this Ray does not parse: keep the lines
        return lines
