"""The search on the console: one line when a trial starts, one when it ends, and a progress bar on a terminal.

:class:`TrialConsole` is a Ray Tune callback of the search stage::

    [raycf] search: trial 1/12 started (the control): lambda1 0  lambda2 0  tau 0.5  freq_threshold 0.2
    [raycf] search: trial 1/12 (control) completed in 14.2 s: val_acc 0.9753 (best epoch 7 of 10, val_loss 0.0812)
    [raycf] search: trial 5/12 stopped by ASHA after 3 of 10 epochs in 4.1 s: val_acc 0.9611 (best epoch 2, val_loss 0.1210)
    [raycf] search: trial 6/12 failed after 2.0 s: RuntimeError: CUDA out of memory

A trial's number is the order trials started in; its objective is the one
at its best epoch under :mod:`raycf.method.selection`'s tie rule (the better
objective, then the lower validation loss, then the earlier epoch), not the
last epoch's.  A trial that ran every epoch ``completed``; one that ended
earlier was stopped by ASHA.  Its time is Tune's ``time_total_s`` (as in the
leaderboard), else the time since it started.  On an interactive terminal
(and not in verbose mode) a bar counts finished trials and shows the best
objective so far.  Its state (numbers, histories) is saved with Tune's
experiment state and restored on resume (``get_state``/``set_state``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray.tune import Callback

from raycf.runtime import console
from raycf.search.leaderboard import is_control
from raycf.method.selection import TIE_BREAK, as_number, best_epoch, selection_key

STATE_VERSION = 1
COMPLETED, STOPPED, FAILED, RUNNING = "completed", "stopped", "failed", "running"


def format_value(value: Any) -> str:
    """A parameter's value, short: 0.0123, 4.1e-05, 0, 32, relu."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.3g}"
    return str(value)


def error_summary(trial: Any, limit: int = 300) -> str:
    """One line saying why a trial failed: ``RuntimeError: boom``.

    From ``trial.error_msg`` when the trial has one, else the exception Tune
    pickled for it (the trainable's own exception, unwrapped from Ray's
    RayTaskError), else the last line of its error file.
    """
    message = str(getattr(trial, "error_msg", "") or "").strip()
    if not message:
        error = None
        try:
            error = trial.get_pickled_error()
        except Exception:  # noqa: BLE001 - no error file, or one that does not unpickle here
            error = None
        if error is not None:
            cause = getattr(error, "cause", None)
            error = cause if isinstance(cause, BaseException) else error
            lines = [line for line in str(error).strip().splitlines() if line.strip()]
            message = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
            return message[:limit]
    if not message:
        path = getattr(trial, "error_file", None)
        try:
            message = Path(path).read_text() if path else ""
        except OSError:
            message = ""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else "no error message"


class TrialConsole(Callback):
    """Ray Tune callback: the ``[raycf]`` lines of the search's trials and its progress bar.

    ``parameter_names`` are the searched parameters shown (in that order),
    ``metric``/``mode`` the objective, ``total_trials`` the number of trials
    (``search.num_samples``; 0: Tune's count) and ``epochs`` what a trial runs
    when ASHA does not stop it.  ``progress_bar``: None draws the bar when
    stderr is a terminal and Ray's console is not verbose.
    """

    def __init__(
        self,
        parameter_names: Iterable[str],
        metric: str = "val_acc",
        mode: str = "max",
        total_trials: int = 0,
        epochs: int = 0,
        progress_bar: bool | None = None,
        label: str = "search",
    ):
        self.parameter_names = list(parameter_names)
        self.metric, self.mode = metric, mode
        self.total_trials = int(total_trials)
        self.epochs = int(epochs)
        self.progress_bar = progress_bar
        self.label = label
        self._numbers: dict[str, int] = {}  # trial id -> its number, in the order trials started
        self._trials: dict[str, dict[str, Any]] = {}  # trial id -> what the lines need (see _entry)
        self._clock: dict[str, float] = {}  # trial id -> time.monotonic() when it (re)started here
        self._bar = None

    # -------------------------------------------------------------- state

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the Tuner: no bar, no clock."""
        state = dict(self.__dict__)
        state["_bar"], state["_clock"] = None, {}
        return state

    def get_state(self) -> dict:
        trials = {trial_id: {**entry, "elapsed_s": self._elapsed(trial_id)} for trial_id, entry in self._trials.items()}
        return {"version": STATE_VERSION, "numbers": dict(self._numbers), "trials": trials}

    def set_state(self, state: dict) -> None:
        self._numbers = {str(key): int(value) for key, value in state.get("numbers", {}).items()}
        self._trials = {str(key): dict(value) for key, value in state.get("trials", {}).items()}
        self._clock = {}
        for entry in self._trials.values():
            entry.setdefault("history", [])  # a trial still running then: Tune starts it again ("resumed")

    # -------------------------------------------------------------- Tune hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        if not self.total_trials and total_num_samples and total_num_samples < 10**9:
            self.total_trials = int(total_num_samples)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        trial_id = str(trial.trial_id)
        known = trial_id in self._numbers
        entry = self._entry(trial)
        self._stop_clock(trial_id)  # a start with no end seen since the last one: count that run
        self._clock[trial_id] = time.monotonic()
        if known and entry.get("starts", 0) > 0:
            if entry.pop("recovering", False):
                why = f"restarted after failure {entry.get('failures', 1)}"
            else:
                why = "resumed" if entry.get("status") == RUNNING else "restarted"
            entry.update(status=RUNNING, starts=entry.get("starts", 0) + 1)
            self._say(f"{self._name(trial_id)} {why}")
        else:
            entry.update(status=RUNNING, starts=entry.get("starts", 0) + 1)
            control = " (the control)" if entry["control"] else ""
            self._say(f"trial {self._number(trial_id)} started{control}: {self._parameters(entry['params'])}")
        self._update_bar()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        entry = self._entry(trial)
        epoch = result.get("epoch", result.get("training_iteration"))
        try:
            epoch = int(epoch)
        except (TypeError, ValueError):
            epoch = len(entry["history"]) + 1
        row = {"epoch": epoch, self.metric: as_number(result.get(self.metric)), TIE_BREAK: as_number(result.get(TIE_BREAK))}
        # A retried trial reports its epochs again from its checkpoint: the new run of an epoch replaces the old.
        entry["history"] = [old for old in entry["history"] if old["epoch"] != epoch] + [row]
        if result.get("time_total_s") is not None:
            entry["time_total_s"] = float(result["time_total_s"])
        self._update_bar()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        trial_id = str(trial.trial_id)
        if trial_id not in self._numbers:
            return  # never started (stopped while pending): nothing to say
        entry = self._entry(trial)
        if entry.get("status") in (COMPLETED, STOPPED):
            return
        self._stop_clock(trial_id)
        ran = self._epochs_run(entry)
        status = STOPPED if self.epochs and ran < self.epochs else COMPLETED
        entry["status"] = status
        entry["seconds"] = self._seconds(trial_id)
        if status == COMPLETED:
            head = f"completed in {entry['seconds']:.1f} s"
        else:
            of = f" of {self.epochs}" if self.epochs else ""
            head = f"stopped by ASHA after {ran}{of} epoch{'s' if ran != 1 or of else ''} in {entry['seconds']:.1f} s"
        self._say(f"{self._name(trial_id)} {head}: {self._objective(entry)}")
        self._update_bar()

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        trial_id = str(trial.trial_id)
        entry = self._entry(trial)
        self._stop_clock(trial_id)
        entry["failures"] = int(getattr(trial, "num_failures", 0) or entry.get("failures", 0) + 1)
        entry["recovering"] = True
        source = " from its last checkpoint" if getattr(trial, "checkpoint", None) is not None else ""
        if not source:  # it starts over: its epochs so far do not count
            entry["history"], entry["time_total_s"] = [], None
        self._say(f"{self._name(trial_id)} failed after {self._seconds(trial_id):.1f} s, retrying{source}: {error_summary(trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        trial_id = str(trial.trial_id)
        entry = self._entry(trial)
        self._stop_clock(trial_id)
        entry["status"] = FAILED
        entry["seconds"] = self._seconds(trial_id)
        ran = self._epochs_run(entry)
        after = f"after {ran} epoch{'s' if ran != 1 else ''} in" if ran else "after"
        self._say(f"{self._name(trial_id)} failed {after} {entry['seconds']:.1f} s: {error_summary(trial)}")
        self._update_bar()

    def on_experiment_end(self, trials: list, **info):
        console.close_bar(self._bar)
        self._bar = None
        if not self._trials:
            return
        statuses = [entry.get("status") for entry in self._trials.values()]
        counts = [f"{statuses.count(status)} {word}" for status, word in ((COMPLETED, "completed"), (STOPPED, "stopped by ASHA"), (FAILED, "failed"), (RUNNING, "unfinished")) if statuses.count(status)]
        best = self._best_trial()
        where = f"; best {self.metric} {best[1][self.metric]:.4f} (trial {self._number(best[0])})" if best else ""
        self._say(f"{len(self._trials)} trials: {', '.join(counts)}{where}")

    # -------------------------------------------------------------- helpers

    def _entry(self, trial) -> dict[str, Any]:
        trial_id = str(trial.trial_id)
        if trial_id not in self._numbers:
            self._numbers[trial_id] = len(self._numbers) + 1
        if trial_id not in self._trials:
            config = getattr(trial, "config", None) or {}
            params = {name: config.get(name) for name in self.parameter_names if name in config}
            self._trials[trial_id] = {"params": params, "control": is_control(params), "history": [], "status": RUNNING, "starts": 0}
        return self._trials[trial_id]

    def _number(self, trial_id: str) -> str:
        number = self._numbers[trial_id]
        return f"{number}/{self.total_trials}" if self.total_trials else str(number)

    def _name(self, trial_id: str) -> str:
        return f"trial {self._number(trial_id)}" + (" (control)" if self._trials.get(trial_id, {}).get("control") else "")

    def _parameters(self, params: Mapping[str, Any]) -> str:
        return "  ".join(f"{name} {format_value(value)}" for name, value in params.items()) or "(no searched parameters)"

    def _epochs_run(self, entry: dict[str, Any]) -> int:
        return max((row["epoch"] for row in entry["history"]), default=0)

    def _elapsed(self, trial_id: str) -> float:
        """Seconds this trial has run, as this driver (and the ones before a resume) saw it."""
        started = self._clock.get(trial_id)
        before = float(self._trials.get(trial_id, {}).get("elapsed_s", 0.0))
        return before + (time.monotonic() - started if started is not None else 0.0)

    def _stop_clock(self, trial_id: str) -> None:
        started = self._clock.pop(trial_id, None)
        if started is not None and trial_id in self._trials:
            entry = self._trials[trial_id]
            entry["elapsed_s"] = float(entry.get("elapsed_s", 0.0)) + time.monotonic() - started

    def _seconds(self, trial_id: str) -> float:
        entry = self._trials.get(trial_id, {})
        if entry.get("time_total_s") is not None:
            return float(entry["time_total_s"])
        return self._elapsed(trial_id)

    def _objective(self, entry: dict[str, Any]) -> str:
        best = best_epoch(entry["history"], self.metric, self.mode)
        if not best:
            return f"{self.metric} n/a (no epoch reported it)"
        ran = self._epochs_run(entry)
        details = [f"best epoch {best['epoch']}" + (f" of {ran}" if ran > 1 and ran == self.epochs else "")]
        if self.metric != TIE_BREAK and not math.isnan(best[TIE_BREAK]):
            details.append(f"{TIE_BREAK} {best[TIE_BREAK]:.4f}")
        return f"{self.metric} {best[self.metric]:.4f} ({', '.join(details)})"

    def _best_trial(self) -> tuple[str, dict[str, Any]] | None:
        """(trial id, its best epoch) of the best trial so far, failed ones aside (as the stage's summary); ties go to the trial that started first."""
        candidates = []
        for trial_id, entry in self._trials.items():
            if entry.get("status") == FAILED:
                continue
            best = best_epoch(entry["history"], self.metric, self.mode)
            if best:
                candidates.append((selection_key(best, self.metric, self.mode, self._numbers[trial_id]), trial_id, best))
        if not candidates:
            return None
        _, trial_id, best = min(candidates, key=lambda found: found[0])
        return trial_id, best

    def _say(self, text: str) -> None:
        console.log(f"{self.label}: {text}")

    def _update_bar(self) -> None:
        wanted = self.progress_bar if self.progress_bar is not None else not console.verbose()
        if not wanted:
            return
        done = sum(1 for entry in self._trials.values() if entry.get("status") in (COMPLETED, STOPPED, FAILED))
        if self._bar is None:
            total = max(self.total_trials, len(self._trials))
            self._bar = console.progress_bar(total, f"{self.label}", initial=done)
            if self._bar is None:
                self.progress_bar = False  # not a terminal: no bar, for good
                return
        bar = self._bar
        if bar.total is not None and len(self._trials) > bar.total:
            bar.total = len(self._trials)
        bar.n = done
        best = self._best_trial()
        bar.set_postfix_str(f"best {self.metric} {best[1][self.metric]:.4f}" if best else "", refresh=False)
        bar.refresh()
