"""The study report: figure builders on tiny inputs, the page, and the digits smoke study's report in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import require_system, run_cli_without_ray
from raycf.config import dump_yaml, study_from_mapping
from raycf.outputs.report.blocks import Figure, Section
from raycf.outputs.report.figures import auroc_figure, global_mc_figure, pareto_figure, pick_gallery, recall_change_figure
from raycf.outputs.report.page import build_report, render_page

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _not_blank(pixels: np.ndarray) -> bool:
    """Some ink on the page: the image is not one flat colour."""
    return pixels.std() > 5 and (pixels < 200).mean() > 0.01


# ------------------------------------------------------------------ pure parts


def test_pick_gallery_groups_and_orders_images():
    labels = np.array([0, 0, 1, 1, 1, 0])
    before = np.array([[0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.1, 0.9], [0.45, 0.55], [0.6, 0.4]])
    after = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.05, 0.95], [0.2, 0.8], [0.7, 0.3]])
    predictions = (before.argmax(1), before.max(1), after.argmax(1), after.max(1))
    groups = pick_gallery(labels, *predictions, per_group=4)
    assert groups["fixed"].tolist() == [0, 1]  # wrong → right; the more confident fix first
    assert groups["broken"].tolist() == [2]  # right → wrong
    assert groups["confidence"].tolist() == [4, 5, 3]  # rises 0.25, 0.10, 0.05
    assert pick_gallery(labels, *predictions, per_group=1)["confidence"].tolist() == [4]


def _global_mc_frame(num_classes: int = 3, num_filters: int = 8) -> pd.DataFrame:
    counts = np.arange(num_classes * num_filters).reshape(num_classes, num_filters) % 5
    return pd.DataFrame(
        {
            "class": np.repeat(np.arange(num_classes), num_filters),
            "class_name": np.repeat([f"c{c}" for c in range(num_classes)], num_filters),
            "filter": np.tile(np.arange(num_filters), num_classes),
            "count": counts.reshape(-1),
            "magnitude": 0.0,
            "in_global": (counts > 2).reshape(-1),
            "images": 4,
            "tau": 0.9,
            "freq_threshold": 0.15,
        }
    )


def _figures() -> dict[str, bytes]:
    class_recall = pd.DataFrame(
        {"class": ["a", "b", "c"], "class_index": [0, 1, 2], "support": [5, 5, 5], "recall_base": [0.5, 0.8, 0.6], "recall_control": [0.6, 0.8, 0.6], "recall_debugged": [0.7, 0.6, 0.6]}
    )
    error_scores = pd.DataFrame(
        [
            {"split": split, "score": score, "auroc": value, "aupr": value / 2, "images": 10, "errors": 3, "tau": 0.9, "freq_threshold": 0.15}
            for split in ("test", "val")
            for score, value in (("recall", 0.6), ("f1", 0.7), ("max_softmax", 0.9), ("max_softmax_x_f1", 0.85))
        ]
    )
    board = pd.DataFrame({"trial_id": ["a", "b", "c"], "is_control": [True, False, False], "val_acc": [0.9, 0.92, 0.91], "det_auroc": [0.6, 0.5, 0.7]})
    return {
        "global_mc": global_mc_figure(_global_mc_frame()),
        "class_recall": recall_change_figure(class_recall),
        "auroc": auroc_figure(error_scores),
        "pareto": pareto_figure(board, board.iloc[[1, 2]], "val_acc", "det_auroc"),
    }


def test_figure_builders_draw_png_from_tiny_frames():
    for name, png in _figures().items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = _decoded(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
        assert _not_blank(pixels), name


def test_global_mc_heatmap_has_one_row_per_class():
    narrow = _decoded(global_mc_figure(_global_mc_frame(num_classes=2)))
    tall = _decoded(global_mc_figure(_global_mc_frame(num_classes=30)))
    assert tall.shape[0] > narrow.shape[0]  # the figure grows with the number of classes


def test_page_is_self_contained_and_escapes_text():
    section = Section("one", "Section <one>")
    section.table(pd.DataFrame({"class": ["<script>alert(1)</script>"], "value": [0.5]}), "a caption & more")
    section.note("missing <thing>")
    png = _figures()["pareto"]
    section.add(Figure("pareto", "trials", png))
    page = render_page("report <t>", "sub", [section])
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<caption>a caption &amp; more</caption>" in page
    assert 'href="#one"' in page and 'id="one"' in page
    embedded = EMBEDDED_PNG.findall(page)
    assert [base64.b64decode(data) for data in embedded] == [png]
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere


def test_report_of_an_unfinished_study_says_what_is_missing(tmp_path):
    study = study_from_mapping({"name": "unfinished", "storage_path": str(tmp_path)})
    results = tmp_path / "unfinished"
    results.mkdir()
    (results / "config.yaml").write_text(dump_yaml(study))
    output = tmp_path / "out"
    summary = build_report(str(results), str(output), study)
    assert summary["figures"] == []
    assert summary["sections"] == ["study", "detection", "learned-detector", "final", "search", "search-noise", "global-mc", "atlas", "gallery"]
    page = (output / "index.html").read_text()
    for missing in ("analysis/detection.parquet", "analysis/learned_detector.parquet", "final/table2.parquet", "leaderboard.parquet", "analysis/global_mc.parquet", "final/final.parquet"):
        assert missing in page
    assert "masks/train, masks/val, cfe/bank.pt or base/model.pt is missing" in page  # the filter atlas
    assert summary["notes"] == 8
    assert not (output / "search_noise.json").exists()


def test_report_shows_intervals_the_learned_detector_and_the_search_noise(tmp_path):
    from raycf.config import AnalysisConfig
    from raycf.method.detection import analyse
    from raycf.method.learned_detector import learned_detector_frame
    from test_detection import tiny_study_data
    from test_learned_detector import tiny_study_with_validation

    study = study_from_mapping({"name": "tiny", "storage_path": str(tmp_path)})
    results = tmp_path / "tiny"
    (results / "analysis").mkdir(parents=True)
    (results / "config.yaml").write_text(dump_yaml(study))
    data = tiny_study_with_validation(tiny_study_data())
    tables = analyse(data, AnalysisConfig(bootstrap=100, tau=0.9, freq_threshold=0.0), seed=0)
    tables["learned_detector"] = learned_detector_frame(data, 0.9, 0.0, resamples=100, seed=0)
    for name, frame in tables.items():
        frame.to_parquet(results / "analysis" / f"{name}.parquet")
    board = pd.DataFrame({"trial_id": ["c", "a", "b", "d"], "status": "completed", "is_control": [True, False, False, False], "val_acc": [0.5, 2 / 6, 3 / 6, 4 / 6]})
    # each trial's kept checkpoint holds its validation predictions: all labels are 0, trial t is right on its first k images
    (results / "images").mkdir()
    pd.DataFrame({"label": np.zeros(6, dtype=np.int64)}).to_parquet(results / "images" / "val.parquet")
    for trial_id, right in zip(board["trial_id"], (3, 2, 3, 4)):
        folder = tmp_path / "checkpoints" / trial_id
        folder.mkdir(parents=True)
        np.save(folder / "val_pred.npy", (np.arange(6) >= right).astype(np.uint16))
    board["checkpoint_path"] = [str(tmp_path / "checkpoints" / trial_id) for trial_id in board["trial_id"]]
    board.to_parquet(results / "leaderboard.parquet")
    output = tmp_path / "out"
    summary = build_report(str(results), str(output), study)
    assert "auroc" in summary["figures"]
    page = (output / "index.html").read_text()
    assert "test: error detection without thresholds" in page and "AUROC − max softmax [95 % CI]" in page
    assert "f1_centred" in page and "within-class AUROC [95 % CI]" in page and "Holm p" in page and "mc_size" in page
    assert "control: skip gate alone" in page and "control: max softmax, as many as Avg. F1" in page
    assert "test, class-aware: F1 agreement centred on its predicted class" in page and "within each predicted class, weighted by its errors" in page
    assert "Learned detector" in page and "AUROC − confidence [95 % CI]" in page and "Fitted coefficients" in page
    # against the best (d, right on 4): a has b = 2, c = 0 (p = 0.5), b has b = 1 (p = 1): neither is distinguishable
    assert "2 of the 2 other searched trials compared are not distinguishable from it" in page
    assert "ASHA stops trials asynchronously, 2 at a time" in page
    noise = json.loads((output / "search_noise.json").read_text())
    assert (noise["trials"], noise["validation_images"], noise["best_trial"], noise["indistinguishable"]) == (3, 6, "d", 2)
    assert {row["trial_id"]: row["p"] for row in noise["comparisons"]} == pytest.approx({"c": 1.0, "a": 0.5, "b": 1.0})
    assert noise["mean"] == pytest.approx(0.5) and noise["binomial_se"] == pytest.approx((0.25 / 6) ** 0.5)
    assert noise["importances"] == {} and "No parameter importances: no Optuna study found" in page


# ------------------------------------------------------------------ the digits smoke study


def _chromium() -> str:
    require_system("chromium")
    return shutil.which("chromium")


def _run_chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_stage_writes_page_and_figures(smoke_study_results):
    folder = smoke_study_results / "report"
    marker = json.loads((folder / "_stage.json").read_text())
    pngs = sorted(path.name for path in folder.glob("*.png"))
    assert sorted(f"{name}.png" for name in marker["summary"]["figures"]) == pngs
    # What a smoke study always has: Table 1's AUROC chart, the recall change, the Pareto plot, the heat map, and a gallery.
    assert {"auroc.png", "class_recall.png", "pareto.png", "global_mc.png"} <= set(pngs)
    assert any(name.startswith("gallery_") for name in pngs)
    page = (folder / "index.html").read_text()
    embedded = sorted(base64.b64decode(data) for data in EMBEDDED_PNG.findall(page))
    assert embedded == sorted((folder / name).read_bytes() for name in pngs)  # the page embeds exactly the PNG files
    for heading in ("Table 1", "Table 2", "Table 3", "Leaderboard", "Pareto front", "Global MC filters", "Gallery"):
        assert heading in page, heading
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_report_opens_in_headless_chromium_without_errors(smoke_study_results, tmp_path):
    index = (smoke_study_results / "report" / "index.html").resolve()
    figures = len(list(index.parent.glob("*.png")))
    dumped = _run_chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", index.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    body = re.search(r"<body[^>]*>", dumped.stdout).group(0)
    assert f'data-figures="{figures}"' in body and 'data-broken-figures="0"' in body  # every figure decoded
    assert len(re.findall(r'<img src="data:image/png;base64,', dumped.stdout)) == figures
    for heading in ("Misclassification detection (paper Table 1)", "Debug retraining (paper Tables 2 and 3)", "Search (Ray Tune + Optuna)"):
        assert f">{heading}</h2>" in dumped.stdout

    screenshot = tmp_path / "report.png"
    shot = _run_chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1400,4000", index.as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = _decoded(screenshot.read_bytes())
    assert pixels.shape == (4000, 1400)
    assert _not_blank(pixels)
    # Ink all the way down: tables and figures fill the page, not just a header.
    assert all(_not_blank(band) for band in np.array_split(pixels, 4))


def test_report_command_rebuilds_from_the_results_folder_alone(smoke_study_results, tmp_path):
    copy = tmp_path / "digits"
    shutil.copytree(smoke_study_results, copy, ignore=shutil.ignore_patterns("report", ".staging"))
    completed = run_cli_without_ray("report", str(copy))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == str(copy / "report" / "index.html")
    original = json.loads((smoke_study_results / "report" / "_stage.json").read_text())
    rebuilt = json.loads((copy / "report" / "_stage.json").read_text())
    assert rebuilt["hash"] == original["hash"]  # the same stage, so `raycf study` treats it as cached
    assert sorted(p.name for p in (copy / "report").iterdir()) == sorted(p.name for p in (smoke_study_results / "report").iterdir())
    assert not (copy / ".staging").exists()


def test_report_command_refuses_a_folder_that_is_not_a_study(tmp_path, capsys):
    from raycf.cli import main

    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "config.yaml" in error[0]


def test_parameter_importances_come_from_the_study_optuna_storage_seeded(tmp_path):
    import optuna

    from raycf.pipeline import stage_hash
    from raycf.outputs.report.blocks import ReportContext
    from raycf.outputs.report.search_sections import param_importances

    study = study_from_mapping({"name": "tiny", "storage_path": str(tmp_path), "seed": 3})
    results = tmp_path / "tiny"
    results.mkdir()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    searched = optuna.create_study(study_name=f"tiny-{stage_hash(study, 'search')}", storage=f"sqlite:///{results / 'optuna.db'}", direction="maximize")
    searched.optimize(lambda trial: trial.suggest_float("lambda1", 0, 1) - 0.01 * trial.suggest_float("tau", 0, 1), n_trials=12)
    context = ReportContext(results=str(results), study=study)
    importances, why = param_importances(context)
    assert why == "" and set(importances) == {"lambda1", "tau"} and sum(importances.values()) == pytest.approx(1)
    assert importances["lambda1"] > importances["tau"]
    assert param_importances(context)[0] == importances  # seeded: the same numbers on every rebuild
