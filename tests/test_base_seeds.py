"""final.base_seeds: the control-vs-best comparison over several base models (raycf.method.base_models, raycf.stages.base_seeds)."""

from __future__ import annotations

import json
import shutil
import time

import pandas as pd
import pytest

from raycf.config import study_from_mapping
from raycf.errors import UserError
from raycf.method.base_models import BETWEEN, PER_BASE_MODEL, base_seed_summary, format_base_seed_summary


def frame_of(test: dict[int, dict[str, list[float]]]) -> pd.DataFrame:
    """``base_seeds.parquet``'s columns the summary reads, from {base seed: {model: [test_acc per retraining seed]}}."""
    return pd.DataFrame(
        [{"base_seed": b, "model": m, "seed": s, "test_acc": acc} for b, models in test.items() for m, values in models.items() for s, acc in enumerate(values)]
    )


def test_the_summary_averages_each_base_models_seeds_then_takes_the_t_interval_over_base_models():
    frame = frame_of(
        {
            0: {"control": [0.90, 0.92], "best": [0.91, 0.95]},  # differences +0.01, +0.03: mean +0.02
            1: {"control": [0.80, 0.80], "best": [0.80, 0.78]},  # 0, -0.02: mean -0.01
            2: {"control": [0.85, 0.87], "best": [0.88, 0.88]},  # +0.03, +0.01: mean +0.02
        }
    )
    summary = base_seed_summary(frame.sample(frac=1, random_state=3))  # row order does not matter
    assert summary["level"].tolist() == [PER_BASE_MODEL] * 3 + [BETWEEN]
    assert summary["base_seed"].tolist()[:3] == [0, 1, 2] and pd.isna(summary["base_seed"].iloc[3])
    rows = summary.iloc[:3]
    assert rows["test_diff_mean"].tolist() == pytest.approx([0.02, -0.01, 0.02])
    assert rows["test_acc_mean"].tolist() == pytest.approx([0.93, 0.79, 0.88]) and rows["test_baseline_acc_mean"].tolist() == pytest.approx([0.91, 0.80, 0.86])
    # within base model 0, over its 2 retraining seeds: sd 0.01·√2, t(0.975, 1) = 12.7062, half width 12.7062 · 0.0141421 / √2 = 0.127062
    assert rows["test_diff_sd"].iloc[0] == pytest.approx(0.0141421, abs=1e-6)
    assert (rows["test_diff_ci_low"].iloc[0], rows["test_diff_ci_high"].iloc[0]) == (pytest.approx(0.02 - 0.127062, abs=1e-5), pytest.approx(0.02 + 0.127062, abs=1e-5))
    assert rows["test_wins"].tolist() == [2, 0, 2] and rows["seeds"].tolist() == [2, 2, 2] and rows["base_seeds"].tolist() == [1, 1, 1]
    # between base models: means +0.02, -0.01, +0.02 -> mean +0.01, sd √(0.0006 / 2) = 0.0173205,
    # t(0.975, 2) = 4.302653 (tables), half width 4.302653 · 0.0173205 / √3 = 0.0430265
    between = summary.iloc[3]
    assert between["test_diff_mean"] == pytest.approx(0.01) and between["test_diff_sd"] == pytest.approx(0.0173205, abs=1e-6)
    assert between["test_diff_ci_low"] == pytest.approx(0.01 - 0.0430265, abs=1e-6) and between["test_diff_ci_high"] == pytest.approx(0.01 + 0.0430265, abs=1e-6)
    assert (between["base_seeds"], between["seeds"], between["test_wins"]) == (3, 2, 2)
    assert between["test_acc_mean"] == pytest.approx((0.93 + 0.79 + 0.88) / 3) and between["comparison"] == "best - control"
    text = format_base_seed_summary(summary)
    assert "base seed 1: control 80.00 %, best 79.00 %, difference -1.00 ± 1.41 sd over 2 retraining seeds" in text
    assert "over 3 base models: mean +1.00, between-base-model sd 1.73, 95 % t interval [-3.30, +5.30] (2 df); best better on 2 of 3" in text


def test_one_retraining_seed_per_base_model_and_an_unpaired_row():
    # one retraining seed: no spread inside a base model, the interval over base models only; a best row without its control is left out
    frame = frame_of({0: {"control": [0.5], "best": [0.6]}, 1: {"control": [0.5], "best": [0.5]}})
    frame = pd.concat([frame, pd.DataFrame([{"base_seed": 1, "model": "best", "seed": 1, "test_acc": 0.9}])], ignore_index=True)
    summary = base_seed_summary(frame)
    assert summary["seeds"].tolist() == [1, 1, 1] and summary["test_diff_sd"].iloc[:2].isna().all()
    between = summary.iloc[-1]
    # +0.1 and 0: mean 0.05, sd 0.0707107, t(0.975, 1) · sd / √2 = 12.7062 · 0.05 = 0.63531
    assert between["test_diff_mean"] == pytest.approx(0.05) and between["test_diff_ci_high"] == pytest.approx(0.05 + 0.63531, abs=1e-5)
    assert "difference +10.00\n" in format_base_seed_summary(summary) + "\n"


def test_the_base_seeds_field():
    study = study_from_mapping({"name": "t"})
    assert study.final.base_seeds == 1
    with pytest.raises(UserError, match="final.base_seeds"):
        study_from_mapping({"name": "t", "final": {"base_seeds": 0}})
    with pytest.raises(UserError) as adopted:
        study_from_mapping({"name": "t", "model": {"weights": "/tmp/m.pt"}, "base": {"train": False}, "final": {"base_seeds": 2}})
    assert "final.base_seeds: 2 needs base.train: true" in str(adopted.value)
    from raycf.pipeline import stage_hash

    two = study_from_mapping({"name": "t", "final": {"base_seeds": 2}})
    assert stage_hash(two, "final") != stage_hash(study, "final") and stage_hash(two, "search") == stage_hash(study, "search")


def test_a_base_seeds_study_moves_only_the_seed():
    from raycf.stages.base_seeds import base_seed_folder, base_seed_study

    study = study_from_mapping({"name": "t", "seed": 7, "final": {"base_seeds": 3}})
    assert base_seed_study(study, 0) is study
    seeded = base_seed_study(study, 2)
    assert seeded.seed == 2007 and seeded.model_dump(exclude={"seed"}) == study.model_dump(exclude={"seed"})
    assert base_seed_folder("s3://b/runs/t", 2) == "s3://b/runs/t/base_seeds/seed2"


def _fake_images(results: str) -> None:
    from raycf.results import storage

    storage.write_bytes(storage.join_uri(results, "images", "test.npy"), b"pixels")
    storage.write_bytes(storage.join_uri(results, "images", "test.parquet"), b"index")
    storage.write_text(storage.join_uri(results, "images", "_stage.json"), '{"stage": "images", "hash": "h", "finished_at": "t1"}')


def test_a_base_seed_shares_the_studys_image_store_locally_as_links(tmp_path):
    import os

    from raycf.stages.base_seeds import base_seed_folder, share_images

    results = str(tmp_path / "study")
    _fake_images(results)
    folder = base_seed_folder(results, 1)
    share_images(results, folder)
    shared = tmp_path / "study" / "base_seeds" / "seed1" / "images"
    assert sorted(path.name for path in shared.iterdir()) == ["_stage.json", "test.npy", "test.parquet"]
    assert os.stat(shared / "test.npy").st_ino == os.stat(tmp_path / "study" / "images" / "test.npy").st_ino  # a link, not a copy
    assert (shared / "_stage.json").read_text() == (tmp_path / "study" / "images" / "_stage.json").read_text()
    # a new write of the study's store (another marker) replaces the shared one; the same marker leaves it alone
    (tmp_path / "study" / "images" / "test.npy").unlink()
    (tmp_path / "study" / "images" / "test.npy").write_bytes(b"new pixels")
    share_images(results, folder)
    assert (shared / "test.npy").read_bytes() == b"pixels"
    (tmp_path / "study" / "images" / "_stage.json").write_text('{"stage": "images", "hash": "h", "finished_at": "t2"}')
    share_images(results, folder)
    assert (shared / "test.npy").read_bytes() == b"new pixels" and "t2" in (shared / "_stage.json").read_text()


def test_a_base_seed_copies_the_image_store_in_a_bucket(s3_bucket):
    from raycf.results import storage
    from raycf.stages.base_seeds import base_seed_folder, share_images

    results = f"{s3_bucket}/share-images/study"
    _fake_images(results)
    share_images(results, base_seed_folder(results, 2))
    shared = storage.join_uri(results, "base_seeds", "seed2", "images")
    assert storage.read_bytes(storage.join_uri(shared, "test.npy")) == b"pixels" and storage.read_bytes(storage.join_uri(shared, "test.parquet")) == b"index"
    assert storage.read_text(storage.join_uri(shared, "_stage.json")) == storage.read_text(storage.join_uri(results, "images", "_stage.json"))


# ------------------------------------------------------------------ end to end: final.base_seeds = 2 on the smoke study's results

SETTINGS = ("final.base_seeds=2",)


@pytest.fixture(scope="module")
def base_seeded_results(smoke_study_results, tmp_path_factory):
    """A copy of the smoke study's results whose final stage reran with two base models (every earlier stage is cached)."""
    from conftest import run_stage

    folder = tmp_path_factory.mktemp("base-seeds")
    shutil.copytree(smoke_study_results, folder / "results" / "digits", ignore=shutil.ignore_patterns("report", ".staging", "_ray", "logs"))
    started = time.time()
    done = run_stage("final", "studies/digits.yaml", f"storage_path={folder / 'results'}", *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "stdout.txt").write_text(done.stdout)
    (folder / "stderr.txt").write_text(done.stderr + f"\n(final stage with two base models: {time.time() - started:.1f} s)\n")
    return folder / "results" / "digits"


def test_the_second_base_model_is_its_own_and_the_first_is_the_studys(base_seeded_results, smoke_study_results):
    frame = pd.read_parquet(base_seeded_results / "final" / "base_seeds.parquet")
    assert list(zip(frame["base_seed"], frame["model"], frame["seed"])) == [(0, "control", 0), (0, "best", 0), (1, "control", 0), (1, "best", 0)]
    assert frame["study_seed"].tolist() == [0, 0, 1000, 1000] and frame["order_seed"].tolist() == [0, 0, 1000, 1000]
    # base seed 0 is the study's own comparison: Table 2's control and debugged model, not retrained
    table2 = pd.read_parquet(smoke_study_results / "final" / "table2.parquet").set_index("model")
    assert frame["test_acc"].iloc[:2].tolist() == [table2.loc["control", "test_acc"], table2.loc["debugged", "test_acc"]]
    assert (frame["base_test_acc"].iloc[:2] == table2.loc["base", "test_acc"]).all()
    # base seed 1: its own base model and everything built on it, on the study's split (its image store is the study's)
    seed1 = base_seeded_results / "base_seeds" / "seed1"
    for stage in ("base", "features", "cfe", "masks", "prefix"):
        assert json.loads((seed1 / stage / "_stage.json").read_text())["stage"] == stage
    assert (seed1 / "images" / "_stage.json").read_text() == (smoke_study_results / "images" / "_stage.json").read_text()
    assert (seed1 / "images" / "test.npy").read_bytes() == (smoke_study_results / "images" / "test.npy").read_bytes()
    assert (seed1 / "base" / "model.pt").read_bytes() != (smoke_study_results / "base" / "model.pt").read_bytes()
    assert (seed1 / "cfe" / "bank.pt").read_bytes() != (smoke_study_results / "cfe" / "bank.pt").read_bytes()
    features = pd.read_parquet(seed1 / "features" / "test", columns=["label", "pred"])
    assert frame["base_test_acc"].iloc[2] == pytest.approx((features["pred"] == features["label"]).mean(), abs=1e-12)
    grid = pd.read_parquet(seed1 / "grid" / "seeds.parquet").set_index("model")
    assert frame["test_acc"].iloc[2:].tolist() == [grid.loc["control", "test_acc"], grid.loc["best", "test_acc"]]
    board = pd.read_parquet(smoke_study_results / "leaderboard.parquet").set_index("trial_id")
    best = board.loc[json.loads((smoke_study_results / "final" / "_stage.json").read_text())["summary"]["best_trial"]]
    assert grid.loc["best", "lambda1"] == pytest.approx(best["lambda1"]) and grid.loc["control", "lambda1"] == 0  # the study's best parameters


def test_the_summary_is_what_the_rows_give_and_tables_2_and_3_are_unchanged(base_seeded_results, smoke_study_results):
    from scipy import stats

    frame = pd.read_parquet(base_seeded_results / "final" / "base_seeds.parquet").set_index(["base_seed", "model"])
    summary = pd.read_parquet(base_seeded_results / "final" / "base_seed_summary.parquet")
    differences = [frame.loc[(b, "best"), "test_acc"] - frame.loc[(b, "control"), "test_acc"] for b in (0, 1)]
    assert summary["test_diff_mean"].iloc[:2].tolist() == pytest.approx(differences, abs=1e-12)
    between = summary.iloc[-1]
    mean, sd = sum(differences) / 2, abs(differences[0] - differences[1]) / 2**0.5
    assert between["level"] == "between base models" and between["base_seeds"] == 2
    assert between["test_diff_mean"] == pytest.approx(mean, abs=1e-12) and between["test_diff_sd"] == pytest.approx(sd, abs=1e-12)
    assert between["test_diff_ci_low"] == pytest.approx(mean - stats.t.ppf(0.975, 1) * sd / 2**0.5, abs=1e-12)
    for name in ("final/final.parquet", "final/class_recall.parquet", "final/table2.parquet", "final/table3.parquet", "final/predictions.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(base_seeded_results / name), pd.read_parquet(smoke_study_results / name), check_exact=True)
    marker = json.loads((base_seeded_results / "final" / "_stage.json").read_text())
    assert marker["summary"]["base_seeds"] == 2 and marker["summary"]["best_minus_control_test_acc_over_base_models"] == pytest.approx(mean, abs=1e-6)
    assert "over 2 base models: mean" in (base_seeded_results.parent.parent / "stdout.txt").read_text()
    from raycf.stages.final import describe

    assert "Over base models" in describe(str(base_seeded_results))


def test_a_rerun_reuses_the_second_base_model_and_its_grid(base_seeded_results, tmp_path):
    from conftest import run_stage

    results = tmp_path / "results" / "digits"
    shutil.copytree(base_seeded_results, results)
    shutil.rmtree(results / "final")  # the final stage did not finish: it reruns, its base models stay
    done = run_stage("final", "studies/digits.yaml", f"storage_path={tmp_path / 'results'}", *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("base", "features", "cfe", "masks", "prefix"):
        assert f"final: base seed 1: {stage} cached" in done.stderr
    assert "its seed grid is cached" in done.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(results / "final" / "base_seeds.parquet"), pd.read_parquet(base_seeded_results / "final" / "base_seeds.parquet"), check_exact=True)


def test_findings_print_the_comparison_over_base_models_with_its_reading(base_seeded_results):
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "scripts" / "findings.py"), str(base_seeded_results)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    between = pd.read_parquet(base_seeded_results / "final" / "base_seed_summary.parquet").iloc[-1]
    low, high = 100 * between["test_diff_ci_low"], 100 * between["test_diff_ci_high"]
    reading = "no difference detected" if low <= 0 <= high else "negligible" if max(abs(low), abs(high)) < 0.1 else "higher" if low > 0 else "lower"
    assert f"best - control over 2 base models, test accuracy: {reading} (" in done.stdout
    assert f"between-base-model sd {100 * between['test_diff_sd']:.2f} points." in done.stdout and "### Over base models" in done.stdout
    alone = subprocess.run([sys.executable, str(REPO / "scripts" / "findings.py"), "--base-models", str(base_seeded_results)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert alone.returncode == 0, alone.stderr[-2000:]
    # --base-models: the stage times and this section alone, the same section as in the whole findings
    section = done.stdout.split("### Over base models\n\n", 1)[1].split("\n\n### ", 1)[0]
    assert alone.stdout.startswith("Study `digits` with final.base_seeds = 2: ") and "### Time per stage" in alone.stdout
    assert section in alone.stdout and "### Detection" not in alone.stdout
    assert f"- **Over base models.** best - control over 2 base models, test accuracy: {reading} (" in alone.stdout
