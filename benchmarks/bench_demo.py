"""``make demo`` as a new user sees it: how many lines it prints and how long it takes.

Runs ``make demo``'s command sequence in a subprocess from the repository
root, into a temporary ``storage_path``, with a fresh Ray: no ``RAY_ADDRESS``
and none of the other ``RAY_*`` settings (or ``RAYCF_VERBOSE``) this process
may hold, so raycf starts its own local cluster in its default, quiet mode::

    .venv/bin/raycf study studies/digits.yaml --set storage_path=<tmp>
    .venv/bin/raycf leaderboard <tmp>/digits --top 5

It counts the lines both commands print, stdout and stderr together, and
times the whole sequence.  Then it prints the lines that are not raycf's own
(neither a ``[raycf]`` line nor a line of a table raycf prints: the final
stage's Tables 2 and 3, the leaderboard), so they can be inspected.

* ``demo_lines``: lines printed.  Target ≤ 80.
* ``demo_wall_s``: seconds, both commands.  Target ≤ 180.

``make bench`` includes it; it takes minutes (the whole study, base training
included): ``python -m benchmarks demo`` runs it alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import Ratio

ROOT = Path(__file__).resolve().parent.parent
STUDY = "studies/digits.yaml"
OWN_PREFIX = "[raycf]"


def raycf_command() -> str:
    """``make demo``'s ``.venv/bin/raycf``, or the one beside this interpreter."""
    local = ROOT / ".venv" / "bin" / "raycf"
    return str(local if local.exists() else Path(sys.executable).parent / "raycf")


def fresh_environment() -> dict[str, str]:
    """This process's environment without Ray's settings and raycf's verbose switch: a fresh local Ray, quiet mode."""
    return {key: value for key, value in os.environ.items() if not key.startswith("RAY_") and key != "RAYCF_VERBOSE"}


def table_lines(results: str) -> set[str]:
    """The lines of the tables raycf prints in the demo: the final stage's Tables 2 and 3 and the leaderboard."""
    from raycf.cli import main as raycf_main
    from raycf.stages.final import describe

    lines: set[str] = set()
    with contextlib.suppress(Exception):  # a failed study printed no tables
        lines.update(line.rstrip() for line in describe(results).splitlines())
    board = io.StringIO()
    with contextlib.suppress(Exception), contextlib.redirect_stdout(board):
        raycf_main(["leaderboard", results, "--top", "5"])
    lines.update(line.rstrip() for line in board.getvalue().splitlines())
    return lines


def measure() -> list[Ratio]:
    raycf = raycf_command()
    with tempfile.TemporaryDirectory(prefix="raycf-bench-demo-") as storage:
        results = str(Path(storage, "digits"))
        script = (
            f"{raycf} study {STUDY} --set storage_path={storage} && "
            f"{raycf} leaderboard {results} --top 5"
        )
        print(f"[bench_demo] running make demo's commands (a few minutes): {script}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=fresh_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        seconds = time.perf_counter() - started
        lines = done.stdout.splitlines()
        if done.returncode != 0:
            print("\n".join(lines[-40:]), flush=True)
            raise RuntimeError(f"make demo's commands failed (exit status {done.returncode}) after {seconds:.0f} s; the last lines are above")
        tables = table_lines(results)
    foreign = [line for line in lines if not line.startswith(OWN_PREFIX) and line.rstrip() not in tables]
    own = sum(line.startswith(OWN_PREFIX) for line in lines)
    print(
        f"[bench_demo] {len(lines)} lines in {seconds:.0f} s: {own} [raycf] lines, {len(lines) - own - len(foreign)} table lines, "
        f"{len(foreign)} other lines" + (":" if foreign else ""),
        flush=True,
    )
    for line in foreign:
        print(f"    | {line}", flush=True)
    return [Ratio("demo_lines", len(lines), "<=", 80), Ratio("demo_wall_s", seconds, "<=", 180)]
