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
