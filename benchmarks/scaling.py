"""Cost growth of the study's stages with the training set: Fashion-MNIST at 7.5k, 15k, 30k and 60k training images.

    python -m benchmarks.scaling [--sizes 7500 15000 30000 60000] [--output scaling.parquet]   (make bench-scaling)

For each size N the benchmark writes a Fashion-MNIST folder in the official
IDX format holding N + 1,000 training records (1,000 become the validation
split: ``data.val_fraction`` = 1000 / (N + 1000)) and 2,000 test records,
drawn from Debian's ``dataset-fashion-mnist`` (the 70,000 images pooled, so
the 60k point has its 61,000), and runs on it, with ``studies/fashion.yaml``'s
settings:

* ``features``, ``cfe``, ``masks``, ``analyze`` and ``prefix`` as the study
  runs them (Ray; each stage's ``duration_s`` from its marker);
* ``debug_epoch``: one epoch of debug retraining on the prefix cache, in this
  process (:func:`raycf.training.debug.run_debug_training`, ``workers=0``).

The base model is the same at every size: trained once (one epoch on the
7.5k folder) and adopted with ``base.train: false``, so it costs nothing in
the table.  While a stage runs, a thread samples the memory of this process
and every process under it (Ray's raylet, object store, workers) every
0.25 s: the sum of their proportional set sizes (PSS: resident memory, with a
page shared by k processes counted 1/k in each, so the object store is
counted once).  Its peak per stage is ``peak_rss_gb``.

Prints one line per stage, ``<stage>_scaling_exponent: x (target <= 1.1)``,
the least-squares slope of log(time) against log(N), and
``peak_rss_gb_at_60k: x (target <= 8)``, the largest stage peak at the
largest size; writes the table (stage, N, seconds, peak GB) to ``--output``.
Takes about 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from benchmarks import Ratio

STUDY = Path(__file__).resolve().parent.parent / "studies" / "fashion.yaml"
SIZES = (7500, 15000, 30000, 60000)
VALIDATION, TEST = 1000, 2000
STAGES = ("features", "cfe", "masks", "analyze", "prefix")
EXPONENT_TARGET, PEAK_GB_TARGET = 1.1, 8.0
SAMPLE_EVERY_S = 0.25


def write_idx(path: Path, array: np.ndarray) -> None:
    """An array of unsigned bytes as a gzip IDX file (the format of MNIST and Fashion-MNIST)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def pooled_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 70,000 images and labels of Debian's Fashion-MNIST, train then test, in a fixed shuffled order."""
    from raycf.config import FASHION_MNIST_ROOT
    from raycf.data.datasets import FASHION_MNIST_FILES, read_idx

    root = Path(FASHION_MNIST_ROOT)
    images = np.concatenate([read_idx(root / FASHION_MNIST_FILES[s][0]) for s in ("train", "test")])
    labels = np.concatenate([read_idx(root / FASHION_MNIST_FILES[s][1]) for s in ("train", "test")])
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order]


def write_subset(folder: Path, images: np.ndarray, labels: np.ndarray, train_images: int) -> None:
    """A Fashion-MNIST folder with ``train_images`` + 1,000 training records and the pool's last 2,000 as test."""
    folder.mkdir(parents=True, exist_ok=True)
    train = slice(0, train_images + VALIDATION)
    test = slice(len(labels) - TEST, len(labels))
    write_idx(folder / "train-images-idx3-ubyte.gz", images[train])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[train])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[test])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[test])


class MemorySampler:
    """Peak summed PSS (bytes) of this process and its descendants, sampled in a thread."""

    def __init__(self):
        import psutil

        self._root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        import psutil

        total = 0
        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.total())


@contextmanager
def sampled(rows: list[dict], stage: str, train_images: int) -> Iterator[dict]:
    """Time a block and its peak memory; append the row (its ``seconds`` may be replaced by a marker's)."""
    row = {"stage": stage, "train_images": train_images}
    started = time.perf_counter()
    with MemorySampler() as sampler:
        yield row
    row.setdefault("seconds", time.perf_counter() - started)
    row["peak_rss_gb"] = sampler.peak / 1e9
    rows.append(row)
    print(f"  {stage} at {train_images}: {row['seconds']:.1f} s, peak {row['peak_rss_gb']:.2f} GB", flush=True)


def study_for(folder: Path, train_images: int, base_weights: str, storage: Path):
    """``studies/fashion.yaml`` on the written folder, adopting the shared base model."""
    from raycf.config import load_study

    overrides = [
        f"name=scaling-{train_images}",
        f"storage_path={storage}",
        f"data.root={folder}",
        f"data.val_fraction={VALIDATION / (train_images + VALIDATION)!r}",
        "base.train=false",
        f"model.weights={base_weights}",
        "debug.epochs=1",
    ]
    return load_study(STUDY, overrides)


def train_shared_base(folder: Path, storage: Path) -> str:
    """Train the base model once (one epoch, the smallest folder); return its checkpoint's path."""
    from raycf.config import load_study
    from raycf.pipeline import run_stages

    study = load_study(STUDY, ["name=scaling-base", f"storage_path={storage}", f"data.root={folder}", "base.epochs=1"])
    run_stages(study, ["base"], command="python -m benchmarks.scaling")
    return str(Path(study.results_uri) / "base" / "model.pt")


def measure_size(train_images: int, folder: Path, base_weights: str, storage: Path, rows: list[dict]) -> None:
    """Run every measured stage at one size."""
    from raycf.results.artefacts import global_mc_sets, prefix_ref, store_ref
    from raycf.pipeline import read_marker, run_stages
    from raycf.training.debug import DebugJob, run_debug_training

    study = study_for(folder, train_images, base_weights, storage)
    results = study.results_uri
    run_stages(study, ["images", "base"], command="python -m benchmarks.scaling")
    for stage in STAGES:
        with sampled(rows, stage, train_images) as row:
            run_stages(study, [stage], command="python -m benchmarks.scaling")
        row["seconds"] = float(read_marker(results, stage)["duration_s"])
    job = DebugJob(
        study=study, global_filters=global_mc_sets(results, study.analysis.tau, study.debug.freq_threshold), base_model=Path(base_weights).read_bytes(),
        lambda1=study.debug.lambda1, lambda2=study.debug.lambda2, images=store_ref(results), prefix=prefix_ref(results, study), print_epochs=False,
    )  # fmt: skip
    with sampled(rows, "debug_epoch", train_images) as row:
        result = run_debug_training(job, name="scaling-debug", storage_path=str(Path(results) / "debug-runs"), workers=0)
    row["seconds"] = float(result.history[0]["epoch_s"])


def exponent(table: pd.DataFrame) -> float:
    """The slope of log(seconds) against log(train_images), least squares."""
    slope, _ = np.polyfit(np.log(table["train_images"]), np.log(table["seconds"]), 1)
    return float(slope)


def ratios(table: pd.DataFrame) -> list[Ratio]:
    """One exponent per stage, then the peak memory at the largest size."""
    lines = [Ratio(f"{stage}_scaling_exponent", exponent(table[table["stage"] == stage]), "<=", EXPONENT_TARGET) for stage in table["stage"].unique()]
    largest = table[table["train_images"] == table["train_images"].max()]
    lines.append(Ratio(f"peak_rss_gb_at_{round(largest['train_images'].iloc[0] / 1000)}k", float(largest["peak_rss_gb"].max()), "<=", PEAK_GB_TARGET))
    return lines


def run(sizes: tuple[int, ...], scratch: Path) -> pd.DataFrame:
    """The measured table, every size in ``sizes``."""
    from raycf.runtime import console
    from raycf.runtime.cluster import ensure_ray

    images, labels = pooled_fashion_mnist()
    if max(sizes) + VALIDATION + TEST > len(labels):
        raise SystemExit(f"scaling: at most {len(labels) - VALIDATION - TEST} training images (asked for {max(sizes)})")
    storage = scratch / "results"
    console.configure(str(storage / "scaling"))  # Ray's own messages to its logs/ray.log, as the command line does
    ensure_ray()
    rows: list[dict] = []
    for size in sorted(sizes):
        write_subset(scratch / f"fashion-{size}", images, labels, size)
    base_weights = train_shared_base(scratch / f"fashion-{min(sizes)}", storage)
    for size in sorted(sizes):
        print(f"scaling: {size} training images", flush=True)
        measure_size(size, scratch / f"fashion-{size}", base_weights, storage, rows)
    return pd.DataFrame(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="training set sizes (at least two)")
    parser.add_argument("--output", default="scaling.parquet", help="where the measured table goes")
    arguments = parser.parse_args(argv)
    if len(set(arguments.sizes)) < 2:
        parser.error("--sizes needs at least two sizes to fit an exponent")
    with tempfile.TemporaryDirectory(prefix="raycf-scaling-") as scratch:
        table = run(tuple(arguments.sizes), Path(scratch))
    table.to_parquet(arguments.output, index=False)
    print(table.pivot(index="stage", columns="train_images", values="seconds").round(1).to_string(), flush=True)
    for line in ratios(table):
        print(line.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
