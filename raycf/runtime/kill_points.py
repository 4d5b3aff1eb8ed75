"""Testing aid: kill the search driver at a named point, so fault tests do not depend on timing.

``RAYCF_KILL_AT=<point>[:<n>]`` makes this process SIGKILL itself the n-th
time (default: the first) it reaches ``<point>``:

* ``proposed``: the searcher has handed Tune a searched point (Optuna stored it), before the trial starts;
* ``started``: a trial has started (the leaderboard callback saw it), before the driver state is saved;
* ``reported``: a trial's epoch result reached the driver, before the driver state is saved;
* ``completed``: a trial has completed, before the driver state is saved;
* ``bundle``: the driver state bundle is built, before it is written.

Nothing happens without the variable.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "RAYCF_KILL_AT"
POINTS = ("proposed", "started", "reported", "completed", "bundle")
_reached: dict[str, int] = {}


def reached(point: str) -> None:
    """Count ``point``; SIGKILL this process when ``RAYCF_KILL_AT`` names it and this is the n-th time."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
