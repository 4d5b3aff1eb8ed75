"""Replication of the paper's debug-vs-fine-tuning gain (Table 2) across seeds.

For each seed, the study runs from scratch up to its debug stage
(:func:`raycf.pipeline.run_stages` with target ``debug``: images → base →
features → cfe → masks, prefix → debug; each seed has its own results folder
``<root>/digits-seed<N>``, so a rerun reuses finished stages), and the debug
stage's ``debug/table2.parquet`` gives the test accuracy of plain
fine-tuning (control) and of debug retraining.  The seed changes the data
splits, the base model, the CFE bank, the augmented views and the data order.

    python -m benchmarks.replicate_debug [--seeds 0 1 2 3 4] [--root /tmp/raycf-replication] [--set KEY=VALUE ...]

Prints one line per seed and the mean and spread of (debugged − control)
test accuracy; writes ``<root>/replication.parquet`` (or ``--output``).
``--set`` changes the study for every seed; only the stages that read the
changed fields rerun.  Variants worth comparing:

* the default: G at ``analysis.tau`` and ``debug.freq_threshold`` (0 by
  default, the reference's retraining: any filter seen once; what the old
  ``--set analysis.freq_threshold=0`` variant gave);
* ``--set debug.freq_threshold=0.15``: G at the detection's f (the study
  file's ``analysis.freq_threshold``), the old default;
* ``--set debug.indicator=centred``: the standardised activity indicator;
* ``--set debug.lambda1=... debug.lambda2=...``: other λ.

Ray's own console output goes to ``<root>/logs/ray.log`` (``--verbose``
shows it).  Not part of ``make bench`` (it trains a base model per seed:
minutes a seed on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"


def run_seed(seed: int, root: str, overrides: list[str]) -> dict:
    """Run the study for one seed up to the debug stage; return its Table 2 in one row."""
    from raycf.results import storage
    from raycf.config import load_study
    from raycf.pipeline import run_stages

    study = load_study(STUDY, [f"seed={seed}", f"name=digits-seed{seed}", f"storage_path={root}", *overrides])
    run_stages(study, ["debug"], command=f"python -m benchmarks.replicate_debug (seed {seed})")
    table2 = storage.read_table(storage.join_uri(study.results_uri, "debug", "table2.parquet")).to_pandas().set_index("model")
    config = study.debug
    row = {
        "seed": seed,
        "lambda1": config.lambda1,
        "lambda2": config.lambda2,
        "indicator": config.indicator,
        "tau": study.analysis.tau,
        "freq_threshold": config.freq_threshold,
    }
    for model in ("base", "control", "debugged"):
        for split in ("train", "val", "test"):
            row[f"{model}_{split}_acc"] = float(table2.loc[model, f"{split}_acc"])
    row["debugged_minus_control_test"] = row["debugged_test_acc"] - row["control_test_acc"]
    row["control_minus_base_test"] = row["control_test_acc"] - row["base_test_acc"]
    return row


def summarise(rows: list[dict]) -> str:
    """Mean, sample standard deviation and a 95 % t-interval of the gain, in points."""
    gains = [100 * row["debugged_minus_control_test"] for row in rows]
    mean = statistics.fmean(gains)
    lines = [f"debugged - control test accuracy over {len(gains)} seeds: mean {mean:+.2f} points"]
    if len(gains) > 1:
        spread = statistics.stdev(gains)
        # two-sided 95 % Student t quantiles for 1..9 degrees of freedom
        t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}.get(len(gains) - 1, 1.96)
        half = t * spread / math.sqrt(len(gains))
        lines[0] += f", sd {spread:.2f}, min {min(gains):+.2f}, max {max(gains):+.2f}, 95 % CI [{mean - half:+.2f}, {mean + half:+.2f}]"
    wins = sum(g > 0 for g in gains)
    ties = sum(g == 0 for g in gains)
    lines.append(f"debugged better on {wins}, equal on {ties}, worse on {len(gains) - wins - ties} of {len(gains)} seeds (paper: +0.44 points)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--root", default="/tmp/raycf-replication", help="results root (one study folder per seed)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="study overrides for every seed")
    parser.add_argument("--output", default=None, help="the Parquet table of every seed (default <root>/replication.parquet)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own console output too")
    args = parser.parse_args(argv)

    from raycf.runtime import console
    from raycf.runtime.cluster import ensure_ray

    # As the command line does: Ray's own output goes to <root>/logs/ray.log.  Without
    # RAY_ADDRESS a private local cluster is started, never one another process started.
    console.configure(args.root, verbose=args.verbose)
    ensure_ray()
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args.root, args.overrides)
        rows.append(row)
        print(
            f"seed {seed}: test acc base {100 * row['base_test_acc']:.2f}  control {100 * row['control_test_acc']:.2f}  "
            f"debugged {100 * row['debugged_test_acc']:.2f}  (debugged - control {100 * row['debugged_minus_control_test']:+.2f} points)",
            flush=True,
        )
    output = Path(args.output or Path(args.root) / "replication.parquet")
    output.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(output, index=False)
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
