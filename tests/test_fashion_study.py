"""The Fashion-MNIST study's smoke run (Debian's dataset-fashion-mnist): every stage on real garments, and its report in Chromium."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ray_address, require_system, run_cli
from test_report import _run_chromium

SMOKE_IMAGES = 600  # the smoke block's data.max_per_split


@pytest.fixture(scope="module")
def fashion_smoke_results(ray_session, tmp_path_factory) -> Path:
    """``raycf study studies/fashion.yaml --smoke``, joining the session's cluster; the results folder."""
    require_system("fashion-mnist")
    folder = tmp_path_factory.mktemp("fashion-smoke")
    environment = {"RAY_ADDRESS": ray_address(), "RAYCF_READ_LOG": str(folder / "reads.log")}
    completed = run_cli("study", "studies/fashion.yaml", "--smoke", "--set", f"storage_path={folder / 'results'}", env_extra=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder / "results" / "fashion"


def test_fashion_smoke_study_runs_every_stage_on_capped_splits(fashion_smoke_results):
    for split in ("train", "val", "test"):
        index = pd.read_parquet(fashion_smoke_results / "images" / f"{split}.parquet")
        assert len(index) == SMOKE_IMAGES
        assert np.bincount(index["label"], minlength=10).tolist() == [SMOKE_IMAGES // 10] * 10  # a stratified sample
        assert index["image_id"].str.startswith(f"fashion-{'test' if split == 'test' else 'train'}-").all()
    board = pd.read_parquet(fashion_smoke_results / "leaderboard.parquet")
    assert len(board) == 2 and board["is_control"].iloc[0]
    final = pd.read_parquet(fashion_smoke_results / "final" / "final.parquet")
    assert {"base", "control", "debugged"} <= set(final["model"])
    assert (final["test_acc"] > 0.3).all()  # two epochs on 600 images: well above chance (0.1)


def test_fashion_report_opens_in_headless_chromium_with_garments_in_the_gallery(fashion_smoke_results, tmp_path):
    from raycf.results.artefacts import load_results_study
    from raycf.config import FASHION_MNIST_ROOT
    from raycf.data.datasets import FASHION_MNIST_FILES, read_idx
    from raycf.outputs.report.blocks import ReportContext
    from raycf.outputs.report.gallery import gallery_images

    index = (fashion_smoke_results / "report" / "index.html").resolve()
    figures = len(list(index.parent.glob("*.png")))
    dumped = _run_chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", index.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line] == []
    assert f'data-figures="{figures}"' in dumped.stdout and 'data-broken-figures="0"' in dumped.stdout
    assert any(path.name.startswith("gallery_") for path in index.parent.glob("*.png"))

    # The gallery's images are Fashion-MNIST's own test images (garments), pixel for pixel.
    official_test = read_idx(Path(FASHION_MNIST_ROOT) / FASHION_MNIST_FILES["test"][0])
    groups = gallery_images(ReportContext(str(fashion_smoke_results), load_results_study(str(fashion_smoke_results))))
    shown = [item for items in groups.values() for item in items]
    assert shown
    for item in shown:
        number = int(item.image_id.removeprefix("fashion-test-"))
        grey = item.image.mean(axis=2)
        assert grey.shape == (28, 28)
        assert np.abs(grey - official_test[number] / 255.0).max() < 0.02, item.image_id
