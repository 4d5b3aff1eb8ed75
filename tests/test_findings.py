"""scripts/findings.py: the README's findings section, read from a results folder's own files."""

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
    assert f"| base | {round(durations['base'], 1)} |" in text
    # The smoke study runs one seed: the seed comparison is named as missing, not invented.
    assert "_final/seed_summary.parquet is missing: the study has not written it._" in text


def test_findings_refuse_a_folder_that_is_not_a_study(tmp_path):
    completed = _findings(str(tmp_path))
    assert completed.returncode == 2
    assert completed.stderr.strip() == "usage: python scripts/findings.py RESULTS (a study's results folder, with its config.yaml)"
