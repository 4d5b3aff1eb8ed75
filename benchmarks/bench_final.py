"""The final stage's cost beside the search's, on the Fashion-MNIST smoke study.

Runs ``raycf study studies/fashion.yaml --smoke`` up to its final stage, in
this process, into a temporary ``storage_path`` (Ray started by raycf, or
the cluster this process already joined), and reads each stage's
``duration_s`` from its marker.

``final_over_search``: the final stage's seconds over the search stage's.
Target ≤ 0.5: the final stage scores the control and the debugged model
(train and val from the prefix cache, test through the model) and retrains
nothing the search already trained.  Needs Debian's dataset-fashion-mnist
(``make test`` as root installs it); takes a few minutes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks import Ratio

STUDY = Path(__file__).resolve().parent.parent / "studies" / "fashion.yaml"
STAGES = ("images", "base", "features", "cfe", "masks", "analyze", "prefix", "search", "final")


def measure() -> list[Ratio]:
    from raycf.runtime import console
    from raycf.config import FASHION_MNIST_ROOT, load_study
    from raycf.pipeline import read_marker, run_stages

    if not Path(FASHION_MNIST_ROOT).is_dir():
        raise RuntimeError(f"final: Fashion-MNIST is not at {FASHION_MNIST_ROOT} (install Debian's dataset-fashion-mnist: ./.ci/system-packages.sh)")
    with tempfile.TemporaryDirectory(prefix="raycf-bench-final-") as storage:
        study = load_study(STUDY, overrides=[f"storage_path={storage}"], smoke=True)
        previous = console.configured_results()
        console.configure(study.results_uri)  # as the command line does: Ray's own messages go to <results>/logs/ray.log
        started = time.perf_counter()
        try:
            run_stages(study, ["final"], command="python -m benchmarks final")
        finally:
            console.configure(previous)
        total = time.perf_counter() - started
        seconds = {stage: float((read_marker(study.results_uri, stage) or {}).get("duration_s", float("nan"))) for stage in STAGES}
    shown = ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items() if value == value)  # stages without a marker time left out
    print(f"final: fashion smoke study to its final stage in {total:.0f} s ({shown})", flush=True)
    return [Ratio("final_over_search", seconds["final"] / seconds["search"], "<=", 0.5)]
