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
    assert "| control: max softmax, as many as Avg. F1 |" in text and "so the filters catch" in text
    centred = scores.loc[("test", "f1_centred")]
    assert f"| f1_centred | {centred['auroc']:.3f} [{centred['auroc_lo']:.3f}, {centred['auroc_hi']:.3f}] |" in text
    assert f"within each predicted class {f1['auroc_within']:.3f}" in text and "MC-set size alone" in text
    assert "f1 − max softmax, AUROC: " in text and "Holm p " in text
    assert "conditional on that fit" in text and "given the fit: " in text
    assert "McNemar" in text and noise["verdict"] in text and "ASHA decided asynchronously" in text
    assert "val Δ" not in text and "What these numbers say (generated from the intervals)" in text


def test_findings_refuse_a_folder_that_is_not_a_study(tmp_path):
    completed = _findings(str(tmp_path))
    assert completed.returncode == 2
    assert completed.stderr.strip() == "usage: python scripts/findings.py RESULTS (a study's results folder, with its config.yaml)"


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
