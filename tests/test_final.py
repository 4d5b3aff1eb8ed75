"""The final stage's choices (raycf.stages.final): the debugged model is a searched trial, and a winning control is said."""

from __future__ import annotations

import pandas as pd
import pytest

from raycf.config import study_from_mapping
from raycf.search.leaderboard import sort_by_objective
from raycf.stages.final import best_searched_trial, control_verdict, full_control

STUDY = study_from_mapping({"name": "t"})


def board(*rows: tuple[str, bool, str, float, float]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trial_id", "is_control", "status", "val_acc", "val_loss"]).assign(checkpoint_path="")


def test_the_debugged_model_is_the_best_searched_trial_even_when_the_control_wins():
    frame = board(("control", True, "completed", 0.95, 0.20), ("a", False, "completed", 0.94, 0.10), ("b", False, "stopped", 0.94, 0.15))
    best = best_searched_trial(frame, STUDY)
    assert best["trial_id"] == "a"
    verdict = control_verdict(frame, best, STUDY)
    assert verdict.startswith("The control (plain fine-tuning, lambda1 = lambda2 = 0) beat every searched trial on validation: a better val_acc")
    assert "the debugged row is the best searched trial, a" in verdict


def test_a_control_that_wins_only_on_the_tie_break_is_named_and_a_full_tie_is_not_a_win():
    tie_break = board(("control", True, "completed", 0.95, 0.10), ("a", False, "completed", 0.95, 0.20))
    assert "the same val_acc" in control_verdict(tie_break, best_searched_trial(tie_break, STUDY), STUDY)
    full_tie = board(("control", True, "completed", 0.95, 0.10), ("a", False, "completed", 0.95, 0.10))
    assert control_verdict(full_tie, best_searched_trial(full_tie, STUDY), STUDY) == ""
    loses = board(("control", True, "completed", 0.90, 0.10), ("a", False, "completed", 0.95, 0.20))
    assert control_verdict(loses, best_searched_trial(loses, STUDY), STUDY) == ""


def test_no_searched_trial_is_an_error_not_the_control():
    only_control = board(("control", True, "completed", 0.95, 0.10), ("a", False, "error", float("nan"), float("nan")))
    with pytest.raises(RuntimeError, match="finished no searched trial"):
        best_searched_trial(only_control, STUDY)


def test_a_control_stopped_early_must_be_retrained():
    control, model = full_control(board(("control", True, "stopped", 0.9, 0.1), ("a", False, "completed", 0.95, 0.2)), b"")
    assert control["trial_id"] == "control" and model is None
    assert full_control(board(("a", False, "completed", 0.95, 0.2)), b"") == (None, None)


# ------------------------------------------------------------------ retraining seeds (final.seeds > 1)

from raycf.errors import UserError
from raycf.method.replication import GROUP_ROW, check_class_group, format_seed_summary, group_recall, paired_interval, seed_summary


def test_paired_interval_without_spread_is_the_mean_itself():
    interval = paired_interval([1, 1, 1, 1, 1])
    assert (interval.seeds, interval.mean, interval.sd, interval.low, interval.high) == (5, 1.0, 0.0, 1.0, 1.0)


def test_paired_interval_is_the_student_t_interval():
    # 1 … 5: mean 3, sd √2.5; t(0.975, 4) = 2.7764 (tables), half width 2.7764 · √2.5 / √5 = 1.9632
    interval = paired_interval([1, 2, 3, 4, 5])
    assert interval.mean == 3 and interval.sd == pytest.approx(2.5**0.5)
    assert (interval.low, interval.high) == (pytest.approx(3 - 1.96323, abs=1e-4), pytest.approx(3 + 1.96323, abs=1e-4))
    # two seeds: t(0.975, 1) = 12.706, sd 0.0141421, half width 12.706 · 0.0141421 / √2 = 0.12706
    two = paired_interval([0.01, -0.01])
    assert two.mean == pytest.approx(0) and (two.low, two.high) == (pytest.approx(-0.12706, abs=1e-4), pytest.approx(0.12706, abs=1e-4))
    one = paired_interval([0.02])
    assert one.mean == 0.02 and all(value != value for value in (one.sd, one.low, one.high))  # NaN: no spread from one seed


def seeds_table(test: dict[str, list[float]], val: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": model, "seed": seed, "test_acc": acc, "val_acc": val[model][seed]} for model, values in test.items() for seed, acc in enumerate(values)]
    )


def test_seed_summary_pairs_each_model_with_the_control_of_its_seed():
    frame = seeds_table(
        test={"control": [0.90, 0.91, 0.92], "reference": [0.91, 0.92, 0.93], "best": [0.92, 0.90, 0.95]},
        val={"control": [0.80, 0.80, 0.80], "reference": [0.80, 0.81, 0.80], "best": [0.85, 0.85, 0.85]},
    )
    summary = seed_summary(frame).set_index("comparison")
    reference, best = summary.loc["reference - control"], summary.loc["best - control"]
    assert reference["test_diff_mean"] == pytest.approx(0.01) and reference["test_diff_sd"] == pytest.approx(0, abs=1e-12)
    assert reference["test_diff_ci_low"] == pytest.approx(0.01) and reference["test_wins"] == 3
    assert best["test_diff_mean"] == pytest.approx((0.02 - 0.01 + 0.03) / 3) and best["test_wins"] == 2
    assert best["test_diff_ci_low"] == pytest.approx(paired_interval([0.02, -0.01, 0.03]).low)
    assert best["val_diff_mean"] == pytest.approx(0.05) and best["val_acc_mean"] == pytest.approx(0.85) and best["val_baseline_acc_mean"] == pytest.approx(0.80)
    assert summary["seeds"].tolist() == [3, 3]
    assert "best - control" in format_seed_summary(summary.reset_index())


def test_group_recall_changes_per_class_and_for_the_whole_group():
    rows = []
    for seed in range(2):
        for model, shirt, coat in (("control", 0.5, 0.8), ("reference", 0.5, 0.8), ("best", 0.6 + 0.1 * seed, 0.8)):
            rows.append({"model": model, "seed": seed, "class": "Shirt", "class_index": 6, "support": 100, "recall": shirt})
            rows.append({"model": model, "seed": seed, "class": "Coat", "class_index": 4, "support": 300, "recall": coat})
            rows.append({"model": model, "seed": seed, "class": "Bag", "class_index": 8, "support": 50, "recall": 1.0})
    table = group_recall(pd.DataFrame(rows), ["Shirt", "Coat"], {"Shirt": 0.4, "Coat": 0.7})
    best = table[table["model"] == "best"].set_index("class")
    assert list(best.index) == ["Shirt", "Coat", GROUP_ROW]  # the group's order, then the group as a whole
    assert best.loc["Shirt", "change_mean"] == pytest.approx(0.15) and best.loc["Shirt", "recall_base"] == 0.4
    assert best.loc["Shirt", "change_ci_low"] == pytest.approx(paired_interval([0.1, 0.2]).low)
    assert best.loc["Coat", "change_mean"] == pytest.approx(0) and best.loc["Coat", "support"] == 300
    # the whole group: (100 · shirt + 300 · coat) / 400 images, per seed
    assert best.loc[GROUP_ROW, "change_mean"] == pytest.approx((0.1 * 100 + 0.2 * 100) / 2 / 400) and best.loc[GROUP_ROW, "support"] == 400
    assert (table[table["model"] == "reference"]["change_mean"] == 0).all()


def test_an_unknown_class_in_the_group_is_one_line_naming_it_and_the_known_ones():
    check_class_group(["Shirt", "Coat"], ["T-shirt/top", "Coat", "Shirt"])
    with pytest.raises(UserError) as refused:
        check_class_group(["Shirt", "Tshirt"], ["T-shirt/top", "Coat", "Shirt"])
    assert str(refused.value) == "final.class_group: unknown class 'Tshirt' (the dataset's classes: T-shirt/top, Coat, Shirt)"


def test_the_final_section_of_the_study_file():
    assert STUDY.final.seeds == 1 and STUDY.final.class_group == ()
    digits = study_from_mapping({"name": "t", "final": {"seeds": 3, "class_group": [3, 5, 8]}})
    assert digits.final.class_group == ("3", "5", "8")  # YAML numbers are digits' class names
    with pytest.raises(UserError, match="final: class_group needs seeds > 1"):
        study_from_mapping({"name": "t", "final": {"class_group": ["Shirt"]}})
    from raycf.pipeline import stage_hash

    assert stage_hash(digits, "final") != stage_hash(STUDY, "final")  # the seeds change what the stage writes
    assert stage_hash(digits, "search") == stage_hash(STUDY, "search")  # and nothing before it


# ------------------------------------------------------------------ end to end: final.seeds = 2 on the smoke study's results

SEED_SETTINGS = ("final.seeds=2", "final.class_group=[3, 5, 8]")


@pytest.fixture(scope="module")
def seeded_results(smoke_study_results, tmp_path_factory):
    """A copy of the smoke study's results whose final stage reran with two retraining seeds (only it: every earlier stage is cached)."""
    import shutil
    import time

    from conftest import run_stage

    folder = tmp_path_factory.mktemp("seeded-final")
    shutil.copytree(smoke_study_results, folder / "results" / "digits", ignore=shutil.ignore_patterns("report", ".staging", "_ray", "logs"))
    started = time.time()
    done = run_stage("final", "studies/digits.yaml", f"storage_path={folder / 'results'}", *SEED_SETTINGS, env_extra={"RAYCF_READ_LOG": str(folder / "reads.log")})
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "stdout.txt").write_text(done.stdout)
    (folder / "stderr.txt").write_text(done.stderr + f"\n(final stage with two seeds: {time.time() - started:.1f} s)\n")
    return folder / "results" / "digits"


def test_seeds_retrain_three_models_per_seed_and_seed_zero_is_the_searchs_own_draw(seeded_results, smoke_study_results):
    seeds = pd.read_parquet(seeded_results / "final" / "seeds.parquet")
    assert list(zip(seeds["model"], seeds["seed"])) == [(m, s) for s in (0, 1) for m in ("control", "reference", "best")]
    assert (seeds["order_seed"] == seeds["seed"]).all() and (seeds["epochs"] == 2).all()  # the study's seed is 0
    board = pd.read_parquet(smoke_study_results / "leaderboard.parquet")
    best = sort_by_objective(board[~board["is_control"]]).iloc[0]
    control = board[board["is_control"]].iloc[0]
    rows = seeds.set_index(["model", "seed"])
    for model, trial in (("best", best), ("control", control)):
        assert rows.loc[(model, 0), "lambda1"] == pytest.approx(trial["lambda1"]) and rows.loc[(model, 0), "tau"] == pytest.approx(trial["tau"])
        # seed 0 draws what the search drew: the same best epoch, validation accuracy and loss (on the CPU, exactly)
        assert rows.loc[(model, 0), "trial_id"] == trial["trial_id"]  # the search's own model: not trained again
        assert rows.loc[(model, 0), "best_epoch"] == trial["best_epoch"]
        assert rows.loc[(model, 0), "val_acc_at_selection"] == pytest.approx(trial["val_acc"], abs=1e-12)
        assert rows.loc[(model, 0), "val_loss"] == pytest.approx(trial["val_loss"], abs=1e-9)
    for model in ("control", "reference", "best"):
        assert rows.loc[(model, 1), "val_loss"] != rows.loc[(model, 0), "val_loss"]  # seed 1 is another draw
    study = load_study_file(seeded_results)
    assert rows.loc[("reference", 1), "lambda1"] == study.debug.lambda1 and rows.loc[("reference", 1), "lambda2"] == study.debug.lambda2
    assert (rows.xs("control", level="model")[["lambda1", "lambda2"]] == 0).all().all()


def load_study_file(results):
    from raycf.results.artefacts import load_results_study

    return load_results_study(str(results))


def test_each_seed_model_reads_the_test_split_once_and_its_accuracies_are_its_predictions(seeded_results):
    from collections import Counter

    reads = Counter(line.split()[1] for line in (seeded_results.parent.parent / "reads.log").read_text().splitlines() if line.startswith("test "))
    predictions = pd.read_parquet(seeded_results / "final" / "seed_predictions.parquet")
    test = predictions[predictions["split"] == "test"]
    images = test["image_index"].nunique()
    assert test.groupby(["model", "seed"]).size().tolist() == [images] * 6
    # the control and the debugged model of Tables 2 and 3 (seed 0's control and best: the same models, not run again),
    # then the four seed models trained here: each test image read 6 times, no more
    assert len(reads) == images and set(reads.values()) == {6}
    # train and val come from the prefix cache: the final stage reads none of their images
    assert not any(line.startswith(("train ", "val ")) for line in (seeded_results.parent.parent / "reads.log").read_text().splitlines())
    seeds = pd.read_parquet(seeded_results / "final" / "seeds.parquet").set_index(["model", "seed"])
    for (model, seed), rows in predictions.groupby(["model", "seed"]):
        for split, split_rows in rows.groupby("split"):
            assert seeds.loc[(model, seed), f"{split}_acc"] == pytest.approx((split_rows["pred"] == split_rows["label"]).mean())
    recalls = pd.read_parquet(seeded_results / "final" / "seed_class_recall.parquet")
    shirt = recalls[(recalls["model"] == "best") & (recalls["seed"] == 1) & (recalls["class"] == "3")].iloc[0]
    rows = test[(test["model"] == "best") & (test["seed"] == 1) & (test["label"] == 3)]
    assert shirt["support"] == len(rows) and shirt["recall"] == pytest.approx((rows["pred"] == 3).mean())


def test_seed_summary_and_group_recall_are_what_the_seed_tables_give(seeded_results):
    from scipy import stats

    seeds = pd.read_parquet(seeded_results / "final" / "seeds.parquet").set_index(["model", "seed"])
    summary = pd.read_parquet(seeded_results / "final" / "seed_summary.parquet").set_index("comparison")
    assert list(summary.index) == ["reference - control", "best - control"]
    t = stats.t.ppf(0.975, 1)
    for model in ("reference", "best"):
        row = summary.loc[f"{model} - control"]
        for split in ("test", "val"):
            differences = [seeds.loc[(model, s), f"{split}_acc"] - seeds.loc[("control", s), f"{split}_acc"] for s in (0, 1)]
            mean, sd = sum(differences) / 2, abs(differences[0] - differences[1]) / 2**0.5
            assert row[f"{split}_diff_mean"] == pytest.approx(mean, abs=1e-12) and row[f"{split}_diff_sd"] == pytest.approx(sd, abs=1e-12)
            assert row[f"{split}_diff_ci_low"] == pytest.approx(mean - t * sd / 2**0.5, abs=1e-12)
            assert row[f"{split}_diff_ci_high"] == pytest.approx(mean + t * sd / 2**0.5, abs=1e-12)
            assert row[f"{split}_wins"] == sum(d > 0 for d in differences) and row["seeds"] == 2
    group = pd.read_parquet(seeded_results / "final" / "group_recall.parquet")
    recalls = pd.read_parquet(seeded_results / "final" / "seed_class_recall.parquet").set_index(["model", "seed", "class"])
    assert list(group["class"]) == ["3", "5", "8", "(group)"] * 2
    base = pd.read_parquet(seeded_results / "final" / "class_recall.parquet").set_index("class")
    for row in group[group["class"] != "(group)"].to_dict("records"):
        changes = [recalls.loc[(row["model"], s, row["class"]), "recall"] - recalls.loc[("control", s, row["class"]), "recall"] for s in (0, 1)]
        assert row["change_mean"] == pytest.approx(sum(changes) / 2, abs=1e-12) and row["recall_base"] == base.loc[row["class"], "recall_base"]
    printed = (seeded_results.parent.parent / "stdout.txt").read_text()
    assert "Retraining over 2 seeds" in printed and "best - control" in printed and "(group)" in printed


def test_the_seed_runs_leave_tables_2_and_3_as_they_were(seeded_results, smoke_study_results):
    import json

    for name in ("final/final.parquet", "final/class_recall.parquet", "final/table2.parquet", "final/table3.parquet", "final/predictions.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(seeded_results / name), pd.read_parquet(smoke_study_results / name), check_exact=True)
    marker = json.loads((seeded_results / "final" / "_stage.json").read_text())
    assert marker["summary"]["seeds"] == 2 and set(marker["summary"]) >= {"best_minus_control_test_acc", "reference_minus_control_test_acc"}


def test_an_interrupted_seed_grid_resumes_with_its_finished_runs_kept(seeded_results, tmp_path):
    """The final stage killed after its seed grid (no marker, no outputs; the grid's Tune run left): rerun, it retrains nothing."""
    import shutil

    from conftest import run_stage

    results = tmp_path / "results" / "digits"
    shutil.copytree(seeded_results, results)
    shutil.rmtree(results / "final")  # its outputs and marker: the stage never finished
    done = run_stage("final", "studies/digits.yaml", f"storage_path={tmp_path / 'results'}", *SEED_SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final: resuming the interrupted seed grid" in done.stderr
    # every run kept as it finished: the same epochs, losses and times (a retrained run would have its own times)
    pd.testing.assert_frame_equal(pd.read_parquet(results / "final" / "seeds.parquet"), pd.read_parquet(seeded_results / "final" / "seeds.parquet"), check_exact=True)


def test_the_report_and_the_describe_text_show_the_seed_comparison(seeded_results):
    from raycf.outputs.report.blocks import ReportContext
    from raycf.outputs.report.final_sections import final_section
    from raycf.stages.final import describe

    assert "Retraining over 2 seeds" in describe(str(seeded_results))
    section = final_section(ReportContext(str(seeded_results), load_study_file(seeded_results)))
    page = "".join(block for block in section.blocks if isinstance(block, str))
    assert "Over retraining seeds" in page and "reference - control" in page and "(group)" in page


def test_an_unknown_class_group_name_stops_the_study_before_anything_runs(tmp_path, capsys):
    from raycf.cli import main

    code = main(["study", "studies/digits.yaml", "--smoke", "--set", f"storage_path={tmp_path}", "final.seeds=2", "final.class_group=[3, Shirt]"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["raycf: error: final.class_group: unknown class 'Shirt' (the dataset's classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"]
    assert list(tmp_path.iterdir()) == []
