"""studies/fashion_shortcut.yaml's smoke run (CI): a patch planted on Coat, group metrics in every table, analysis/plant.parquet, the report in Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from conftest import ray_address, require_system, run_cli
from test_report import _run_chromium

COAT = 4  # Fashion-MNIST's class order: T-shirt/top, Trouser, Pullover, Dress, Coat, ...


@pytest.fixture(scope="module")
def shortcut_smoke_results(ray_session, tmp_path_factory) -> Path:
    """``raycf study studies/fashion_shortcut.yaml --smoke`` with the worst group as the search's objective and the DFR baseline; the results folder."""
    require_system("fashion-mnist")
    folder = tmp_path_factory.mktemp("shortcut-smoke")
    completed = run_cli(
        "study", "studies/fashion_shortcut.yaml", "--smoke", "--set", f"storage_path={folder / 'results'}", "--set", "search.metric=val_worst_group_acc", "--set", "final.dfr=true",
        env_extra={"RAY_ADDRESS": ray_address()},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder / "results" / "fashion_shortcut"


def test_the_store_carries_the_patch_at_the_configured_rates(shortcut_smoke_results):
    images = shortcut_smoke_results / "images"
    for split in ("train", "val", "test"):
        index = pd.read_parquet(images / f"{split}.parquet")
        pixels = np.load(images / f"{split}.npy", mmap_mode="r")
        planted = index["planted"].to_numpy()
        assert (np.asarray(pixels[planted][:, :4, :4]) == 255).all()  # the 4×4 top-left patch, white
        coat = index["label"].to_numpy() == COAT
        rates = (0.95, 0.05) if split == "train" else (0.5, 0.5)
        for flags, rate in ((planted[coat], rates[0]), (planted[~coat], rates[1])):
            low, high = binom.ppf([1e-4, 1 - 1e-4], len(flags), rate)
            assert low <= flags.sum() <= high
        assert set(index["group"]) <= {f"{name} | {state}" for name in _classes() for state in ("planted", "clean")}
        assert (index.loc[planted & coat, "group"] == "Coat | planted").all()


def _classes() -> list[str]:
    from raycf.data.datasets import FASHION_MNIST_CLASSES

    return list(FASHION_MNIST_CLASSES)


def test_group_metrics_in_the_base_summary_the_leaderboard_and_the_final_tables(shortcut_smoke_results):
    base = json.loads((shortcut_smoke_results / "base" / "summary.json").read_text())
    groups = pd.read_parquet(shortcut_smoke_results / "base" / "groups.parquet")
    val = groups[groups["split"] == "val"]
    assert base["val_worst_group_acc"] == pytest.approx(val["acc"].min(), abs=1e-6)
    assert base["val_mean_group_acc"] == pytest.approx(val["acc"].mean(), abs=1e-6)
    assert val["images"].sum() == len(pd.read_parquet(shortcut_smoke_results / "images" / "val.parquet"))
    board = pd.read_parquet(shortcut_smoke_results / "leaderboard.parquet")
    assert board["val_worst_group_acc"].between(0, 1).all() and (board["val_worst_group_acc"] <= board["val_mean_group_acc"]).all()
    final = pd.read_parquet(shortcut_smoke_results / "final" / "final.parquet").set_index("model")
    table = pd.read_parquet(shortcut_smoke_results / "final" / "groups.parquet")
    for model in ("base", "control", "debugged"):
        test = table[(table["model"] == model) & (table["split"] == "test")]
        assert final.loc[model, "test_worst_group_acc"] == pytest.approx(test["acc"].min())
        assert (test["correct"].sum() / test["images"].sum()) == pytest.approx(final.loc[model, "test_acc"])  # the groups partition the split


def test_dfr_is_scored_on_the_final_models_test_images_with_paired_intervals(shortcut_smoke_results):
    dfr = pd.read_parquet(shortcut_smoke_results / "final" / "dfr.parquet").set_index("model")
    assert list(dfr.index) == ["base", "control", "debugged", "dfr"]
    final = pd.read_parquet(shortcut_smoke_results / "final" / "final.parquet").set_index("model")
    for model in ("base", "control", "debugged"):  # the same test images and predictions as the final stage's
        assert dfr.loc[model, "test_acc"] == pytest.approx(final.loc[model, "test_acc"])
        assert dfr.loc[model, "test_worst_group_acc"] == pytest.approx(final.loc[model, "test_worst_group_acc"])
        assert dfr.loc[model, "test_mean_group_acc"] == pytest.approx(final.loc[model, "test_mean_group_acc"])
    row = dfr.loc["dfr"]
    assert 0 < row["test_worst_group_acc"] <= row["test_mean_group_acc"] <= 1 and row["c"] > 0
    val_groups = pd.read_parquet(shortcut_smoke_results / "images" / "val.parquet")["group"]
    assert row["fit_images"] % val_groups.nunique() == 0  # every group subsampled to the same count
    assert 0 < row["fit_images"] <= len(val_groups) // 2 + val_groups.nunique() and row["tune_images"] == len(val_groups) - (val_groups.value_counts() + 1).floordiv(2).sum()
    for name in ("acc", "worst_group_acc", "mean_group_acc"):
        assert row[f"{name}_minus_base"] == pytest.approx(row[f"test_{name}"] - dfr.loc["base", f"test_{name}"])
        assert row[f"{name}_minus_base_lo"] <= row[f"{name}_minus_base"] + 1e-9 and row[f"{name}_minus_base"] <= row[f"{name}_minus_base_hi"] + 1e-9
    summary = json.loads((shortcut_smoke_results / "final" / "_stage.json").read_text())["summary"]
    assert summary["dfr_test_worst_group_acc"] == pytest.approx(row["test_worst_group_acc"], abs=1e-6)
    from raycf.stages.dfr import summary_line
    from raycf.stages.final import describe

    assert describe(str(shortcut_smoke_results)).endswith(summary_line(dfr.reset_index()))  # raycf describe's final stage ends with the DFR line


def test_plant_parquet_ranks_filters_by_each_method_with_intervals(shortcut_smoke_results):
    plant = pd.read_parquet(shortcut_smoke_results / "analysis" / "plant.parquet")
    assert set(plant["ranking"]) == {"cfe_frequency", "cfe_specificity", "attribution", "random", "oracle"}
    assert (plant["lo"] <= plant["sensitivity"] + 1e-9).all() and (plant["sensitivity"] <= plant["hi"] + 1e-9).all()
    for k, rows in plant.groupby("k"):
        by = rows.set_index("ranking")["sensitivity"]
        assert by.drop("oracle").max() <= by["oracle"] + 1e-9  # no ranking beats the filters the feature drives most
    assert (plant["class"] == "Coat").all() and plant["images"].iloc[0] > 0
    effect = pd.read_parquet(shortcut_smoke_results / "analysis" / "plant_effect.parquet").set_index("measure")
    assert effect.loc["class_recall", "images"] > 0 and effect["change"].between(-1, 1).all()


def test_the_report_shows_the_planted_and_group_sections_in_chromium(shortcut_smoke_results, tmp_path):
    index = (shortcut_smoke_results / "report" / "index.html").resolve()
    dumped = _run_chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", index.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line] == []
    page = dumped.stdout
    assert 'data-broken-figures="0"' in page
    assert page.index('id="planted"') < page.index('id="study"')  # the first section
    for text in ("The planted bug: patch on Coat", "Coat images predicted Coat", "other images predicted Coat", "CFE global-MC frequency", "Group accuracy", "Coat | planted", "Worst-group and mean-group accuracy", "DFR baseline"):
        assert text in page, text


def test_findings_answer_the_planted_question_from_the_studys_files(shortcut_smoke_results):
    import importlib.util

    from conftest import REPO

    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "findings.py"), str(shortcut_smoke_results)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    text = completed.stdout
    spec = importlib.util.spec_from_file_location("findings_script", REPO / "scripts" / "findings.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    effect = pd.read_parquet(shortcut_smoke_results / "analysis" / "plant_effect.parquet").set_index("measure")
    recall = effect.loc["class_recall"]
    assert f"| Coat images predicted Coat | {recall['images']} | {100 * recall['clean']:.2f} % | {100 * recall['planted']:.2f} % | {100 * recall['change']:+.2f} |" in text
    plant = pd.read_parquet(shortcut_smoke_results / "analysis" / "plant.parquet").set_index(["k", "ranking"])
    for k in plant.index.get_level_values("k").unique():
        cfe, random = plant.loc[(k, "cfe_frequency")], plant.loc[(k, "random")]
        assert f"Top {k} by cfe_frequency, against random: {script.overlap(cfe['sensitivity'], cfe['lo'], cfe['hi'], random['lo'], random['hi'])}" in text
    dfr = pd.read_parquet(shortcut_smoke_results / "final" / "dfr.parquet").set_index("model").loc["dfr"]
    worst = script.interval(dfr["worst_group_acc_minus_base"], dfr["worst_group_acc_minus_base_lo"], dfr["worst_group_acc_minus_base_hi"], 100, 2, True)
    assert f"| dfr − base | paired bootstrap over test images, one run | {worst} |" in text
    reading = script.reading(dfr["worst_group_acc_minus_base"], dfr["worst_group_acc_minus_base_lo"], dfr["worst_group_acc_minus_base_hi"], script.NEGLIGIBLE["worst_group"], scale=100, digits=2, unit=" points")
    assert f"dfr − base (paired bootstrap over test images, one run): test worst-group accuracy {reading}; " in text
    assert ("The best repair shown: " in text) != ("No treatment is shown to repair worst-group accuracy" in text)  # exactly one verdict
    groups = pd.read_parquet(shortcut_smoke_results / "final" / "groups.parquet")
    test = groups[(groups["split"] == "test") & (groups["model"] == "base")]
    base_worst = test.loc[test["acc"].idxmin()]
    assert f"| base | {base_worst['group'].replace('|', chr(92) + '|')} | {base_worst['images']} | {100 * base_worst['acc']:.2f} % |" in text
    assert script.missing("final", "seed_summary.parquet") in text  # the smoke block runs one seed: no seed comparison, named as missing
