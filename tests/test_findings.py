"""scripts/findings.py: the Fashion-MNIST block of docs/measured.md, read from a results folder's own files."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from conftest import REPO


def _findings(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "findings.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_findings_of_the_smoke_study_quote_its_files(smoke_study_results):
    completed = _findings(str(smoke_study_results))
    assert completed.returncode == 0, completed.stderr[-2000:]
    text = completed.stdout
    scores = pd.read_parquet(smoke_study_results / "analysis" / "error_scores.parquet").set_index(["split", "score"])
    f1 = scores.loc[("test", "f1")]
    assert f"| f1 | {f1['auroc']:.3f} [{f1['auroc_lo']:.3f}, {f1['auroc_hi']:.3f}] |" in text
    learned = pd.read_parquet(smoke_study_results / "analysis" / "learned_detector.parquet").set_index("detector")
    assert f"{learned.loc['confidence', 'auroc']:.3f} [{learned.loc['confidence', 'auroc_lo']:.3f}" in text
    noise = json.loads((smoke_study_results / "report" / "search_noise.json").read_text())
    assert f"{noise['trials']} searched trials" in text and noise["verdict"] in text
    base = pd.read_parquet(smoke_study_results / "final" / "table2.parquet").set_index("model").loc["base"]
    assert f"test {100 * base['test_acc']:.2f} %" in text
    durations = {path.parent.name: json.loads(path.read_text())["duration_s"] for path in smoke_study_results.glob("*/_stage.json")}
    assert f"| base | {pd.Series([durations['base']]).round(1).iloc[0]} |" in text  # rounded as the script rounds (half to even on the scaled value)
    # The smoke study runs one seed: the seed comparison is named as missing, not invented.
    assert "_final/seed_summary.parquet is missing: the study has not written it._" in text
    assert "_One base model (final.base_seeds: 1): every comparison above rests on the study's own base model._" in text
    # Table 1's controls, the class-aware scores and their readings, all from the files
    detection = pd.read_parquet(smoke_study_results / "analysis" / "detection.parquet")
    gate = detection[(detection["split"] == "test") & (detection["control"] == "skip gate")].iloc[0]
    assert f"| {gate['setting']} |" in text and f"flags {gate['flagged']} and catches {gate['errors_detected']}" in text
    assert "| control: max softmax, as many as Avg. F1 |" in text
    test_rows = detection[detection["split"] == "test"].set_index("setting")
    gained = int(test_rows.loc["Avg. F1", "errors_detected"]) - int(test_rows.loc["control: max softmax, as many as Avg. F1", "errors_detected"])
    versus = f"{abs(gained)} {'more' if gained > 0 else 'fewer'} errors than it" if gained else "as many errors as it"
    assert f"so at the same count the filters catch {versus}" in text  # the count's sign in words, never "catch -3 errors"
    centred = scores.loc[("test", "f1_centred")]
    assert f"| f1_centred | {centred['auroc']:.3f} [{centred['auroc_lo']:.3f}, {centred['auroc_hi']:.3f}] |" in text
    assert f"within each predicted class {f1['auroc_within']:.3f}" in text and "MC-set size alone" in text
    assert "f1 − max softmax, AUROC: " in text and "Holm p " in text
    assert "conditional on that fit" in text and "given the fit: " in text
    assert "McNemar" in text and noise["verdict"] in text and "ASHA decided asynchronously" in text
    assert "val Δ" not in text and "What these numbers say (generated from the intervals)" in text
    assert "Does the method point at the planted feature?" not in text and "**Repair.**" not in text  # no data.plant: no planted sections


def test_findings_refuse_a_folder_that_is_not_a_study(tmp_path):
    completed = _findings(str(tmp_path))
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "usage: python scripts/findings.py [--base-models] RESULTS (a study's results folder, with its config.yaml; "
        "--base-models: only its stage times and the comparison over base models)"
    )


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("findings_script", REPO / "scripts" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reading_of_an_interval_follows_its_bounds():
    reading = _script().reading
    assert reading(0.002, -0.001, 0.005, margin=0.01).startswith("no difference detected (+0.002 [-0.001, +0.005]")
    # a bound that excludes zero never prints as zero: the three numbers get the decimals it needs
    assert reading(0.003, 0.0004, 0.005, margin=0.01).startswith("negligible (+0.0030 [+0.0004, +0.0050]: the interval excludes zero but lies within ±0.01")
    assert reading(0.02, 0.00004, 0.04, margin=0.01) == "higher (+0.02000 [+0.00004, +0.04000])"
    assert reading(0.0036, 0.000001, 0.006, margin=0.001, scale=100, digits=2, unit=" points") == "higher (+0.3600 [+0.0001, +0.6000] points)"
    assert reading(-0.36, -0.60, -0.11, margin=0.01).startswith("lower (-0.360 [-0.600, -0.110]")
    assert reading(0.0036, 0.0011, 0.006, margin=0.001, scale=100, digits=2, unit=" points") == "higher (+0.36 [+0.11, +0.60] points)"


def test_no_nonzero_number_prints_as_zero_and_zero_stays_zero():
    script = _script()
    assert script.enough_digits((0.0004, 0.005)) == 4 and script.enough_digits((0.0, 0.5)) == 3  # an exact zero (a score against itself) needs none
    assert script.enough_digits((1e-12,)) == 3 + script.MAX_EXTRA_DIGITS  # no end of decimals for a rounding residue
    assert script.interval(0.0, 0.0, 0.0, signed=True) == "+0.000 [+0.000, +0.000]"
    assert script.bounds(-0.00003, 0.0012, scale=100, digits=2, signed=True) == "[-0.003, +0.120]"
    assert script.mean_sd(0.00004, 0.0011) == "+0.004 ± 0.110"
    assert script.mean_sd(0.0123, float("nan")) == "+1.23"  # one seed: no sd
    for low, high in ((0.0004, 0.006), (-0.006, -0.0004), (0.00002, 0.00003)):
        text = script.reading((low + high) / 2, low, high, margin=0.001)
        assert "0.000," not in text and "gain" not in text and not text.startswith("no difference")


# ------------------------------------------------------------------ a planted study's answer, on hand-made frames


def test_two_intervals_are_read_by_whether_they_overlap():
    overlap = _script().overlap
    assert overlap(0.006, 0.005, 0.007, 0.0015, 0.0018) == "higher (+0.0060 [+0.0050, +0.0070] against [+0.0015, +0.0018]: the intervals do not overlap)"
    assert overlap(0.004, 0.0035, 0.0040, 0.0043, 0.0050).startswith("lower (")
    assert overlap(0.0017, 0.0012, 0.0021, 0.0015, 0.0018).startswith("no difference detected (") and "the intervals overlap" in overlap(0.0017, 0.0012, 0.0021, 0.0015, 0.0018)
    assert overlap(0.1, float("nan"), 0.2, 0.0, 0.1).startswith("undefined")


def _plant_frame() -> pd.DataFrame:
    rows = []
    for k, values in ((1, {"cfe_frequency": (0.006, 0.005, 0.007), "attribution": (-0.008, -0.009, -0.007), "random": (0.0016, 0.0015, 0.0018)}),
                      (3, {"cfe_frequency": (0.0017, 0.0012, 0.0021), "attribution": (0.0007, 0.0001, 0.0014), "random": (0.0016, 0.0015, 0.0018)})):  # fmt: skip
        rows += [{"class": "Coat", "kind": "patch", "ranking": name, "k": k, "sensitivity": v, "lo": lo, "hi": hi, "filters": "", "images": 34} for name, (v, lo, hi) in values.items()]
    return pd.DataFrame(rows)


def test_the_rankings_table_and_its_sentences_follow_the_intervals(tmp_path):
    (tmp_path / "analysis").mkdir()
    _plant_frame().to_parquet(tmp_path / "analysis" / "plant.parquet")
    text, sentences = _script().plant_rankings(str(tmp_path))
    assert "| 1 | +0.0060 [+0.0050, +0.0070] | -0.0080 [-0.0090, -0.0070] | +0.0016 [+0.0015, +0.0018] |" in text and "on its 34 clean images" in text
    assert sentences[0] == (
        "Top 1 by cfe_frequency, against random: higher (+0.0060 [+0.0050, +0.0070] against [+0.0015, +0.0018]: the intervals do not overlap); "
        "against attribution: higher (+0.0060 [+0.0050, +0.0070] against [-0.0090, -0.0070]: the intervals do not overlap)."
    )
    assert sentences[1].startswith("Top 3 by cfe_frequency, against random: no difference detected (") and sentences[1].count("the intervals overlap") == 2
    assert len(sentences) == 2  # no cfe_specificity in this frame: no sentence for it


def _repairs_folder(tmp_path, dfr_worst: tuple[float, float, float], treatment_worst: tuple[float, float, float]) -> str:
    (tmp_path / "final").mkdir()
    nan = float("nan")  # the control gains most, and is still no repair: it is the treatments' baseline
    dfr = pd.DataFrame({"model": ["base", "dfr", "control"], "test_acc": [0.80, 0.79, 0.85], "test_worst_group_acc": [0.40, 0.40 + dfr_worst[0], 0.7], "test_mean_group_acc": [0.7, 0.72, 0.8],
                        "acc_minus_base": [nan, -0.01, 0.05], "acc_minus_base_lo": [nan, -0.02, 0.04], "acc_minus_base_hi": [nan, -0.004, 0.06],
                        "worst_group_acc_minus_base": [nan, dfr_worst[0], 0.3], "worst_group_acc_minus_base_lo": [nan, dfr_worst[1], 0.2],
                        "worst_group_acc_minus_base_hi": [nan, dfr_worst[2], 0.4]})  # fmt: skip
    dfr.to_parquet(tmp_path / "final" / "dfr.parquet")
    summary = pd.DataFrame({"comparison": ["suppress_auto - control"], "model": ["suppress_auto"], "baseline": ["control"], "seeds": [5],
                            "test_diff_mean": [0.002], "test_diff_ci_low": [-0.001], "test_diff_ci_high": [0.005],
                            "worst_group_diff_mean": [treatment_worst[0]], "worst_group_diff_ci_low": [treatment_worst[1]], "worst_group_diff_ci_high": [treatment_worst[2]]})  # fmt: skip
    summary.to_parquet(tmp_path / "final" / "seed_summary.parquet")
    return str(tmp_path)


def test_a_treatment_whose_interval_excludes_zero_upward_is_named_the_repair(tmp_path):
    script = _script()
    text, sentences = script.repairs(_repairs_folder(tmp_path, (0.10, 0.05, 0.15), (0.01, -0.02, 0.04)))
    assert sentences[0] == "dfr − base (paired bootstrap over test images, one run): test worst-group accuracy higher (+10.00 [+5.00, +15.00] points); test accuracy lower (-1.00 [-2.00, -0.40] points)."
    assert sentences[1] == "control − base (paired bootstrap over test images, one run): test worst-group accuracy higher (+30.00 [+20.00, +40.00] points); test accuracy higher (+5.00 [+4.00, +6.00] points)."
    assert sentences[2].startswith("suppress_auto − control (t interval over 5 seeds): test worst-group accuracy no difference detected (+1.00 [-2.00, +4.00] points: the interval includes zero); test accuracy no difference detected (")
    assert sentences[3] == (
        "The best repair shown: dfr, worst-group accuracy +10.00 [+5.00, +15.00] points against base; "
        "its test accuracy lower (-1.00 [-2.00, -0.40] points): so it costs accuracy."
    )
    assert "| dfr − base | paired bootstrap over test images, one run | +10.00 [+5.00, +15.00] | -1.00 [-2.00, -0.40] |" in text
    assert "_final/groups.parquet is missing: the study has not written it._" in text


def test_no_repair_is_named_when_every_interval_holds_zero_or_lies_below_it(tmp_path):
    sentences = _script().repairs(_repairs_folder(tmp_path, (-0.05, -0.08, -0.02), (0.01, -0.02, 0.04)))[1]
    assert "test worst-group accuracy lower (-5.00 [-8.00, -2.00] points)" in sentences[0]
    assert sentences[-1] == "No treatment is shown to repair worst-group accuracy: no interval of its change excludes zero upward."


def test_a_planted_study_names_its_missing_files(tmp_path):
    script = _script()
    assert script.plant_effect(str(tmp_path)) == ("_analysis/plant_effect.parquet is missing: the study has not written it._", [])
    assert script.plant_rankings(str(tmp_path)) == ("_analysis/plant.parquet is missing: the study has not written it._", [])
    text, sentences = script.repairs(str(tmp_path))
    assert text.split("\n\n") == [script.missing("final", "groups.parquet"), script.missing("final", "dfr.parquet"), script.missing("final", "seed_summary.parquet")] and sentences == []


def test_the_plant_effect_quotes_its_file(tmp_path):
    (tmp_path / "analysis").mkdir()
    pd.DataFrame({"measure": ["class_recall"], "description": ["Coat images predicted Coat"], "images": [40], "clean": [0.5], "planted": [0.875], "change": [0.375]}).to_parquet(
        tmp_path / "analysis" / "plant_effect.parquet"
    )
    text, sentences = _script().plant_effect(str(tmp_path))
    assert "| Coat images predicted Coat | 40 | 50.00 % | 87.50 % | +37.50 |" in text
    assert sentences == ["With the feature planted, Coat images predicted Coat: 50.00 % → 87.50 % (+37.50 points, 40 images)."]
