"""The GPU benchmark on a machine without CUDA: one line, exit 0 (the numbers come from a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_bench_gpu_without_a_gpu_says_so_and_succeeds():
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "bench-gpu: no GPU"


def test_scaling_exponents_and_peak_from_a_known_table():
    import pandas as pd

    from benchmarks.scaling import ratios

    sizes = [7500, 15000, 30000, 60000]
    table = pd.DataFrame(
        [{"stage": "linear", "train_images": n, "seconds": 0.002 * n, "peak_rss_gb": 1.0} for n in sizes]
        + [{"stage": "square", "train_images": n, "seconds": 1e-8 * n * n, "peak_rss_gb": 2.0 + n / 60000} for n in sizes]
    )
    lines = {ratio.name: ratio for ratio in ratios(table)}
    assert abs(lines["linear_scaling_exponent"].value - 1.0) < 1e-9 and lines["linear_scaling_exponent"].met()
    assert abs(lines["square_scaling_exponent"].value - 2.0) < 1e-9 and not lines["square_scaling_exponent"].met()
    assert lines["peak_rss_gb_at_60k"].value == 3.0
    assert lines["peak_rss_gb_at_60k"].line() == "peak_rss_gb_at_60k: 3.000 (target <= 8)"


def test_scaling_subset_folder_reads_as_fashion_mnist(tmp_path):
    import numpy as np

    from benchmarks.scaling import TEST, VALIDATION, write_subset
    from raycf.config import DataConfig
    from raycf.data.datasets import load_splits

    images = np.random.default_rng(0).integers(0, 256, size=(5000, 28, 28), dtype=np.uint8)
    labels = np.arange(5000) % 10
    write_subset(tmp_path, images, labels, 1500)
    splits = load_splits(DataConfig(kind="fashion_mnist", root=str(tmp_path), val_fraction=VALIDATION / (1500 + VALIDATION)), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1500, VALIDATION, TEST)
    assert np.array_equal(splits.test.labels, labels[-TEST:])
