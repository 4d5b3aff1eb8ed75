"""The final stage's suppression treatment end to end: final.treatments=[suppress_auto] over two seeds on a copy of the smoke study."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from raycf.method.atlas import error_specific_filters

SETTINGS = ("final.seeds=2", "final.treatments=[suppress_auto]", "final.suppress_auto=2")  # debug.suppress_weight: its default, 0.1


@pytest.fixture(scope="module")
def treated_results(smoke_study_results, tmp_path_factory):
    """A copy of the smoke study's results whose final stage reran with the suppress_auto treatment (the search is cached: no debug field changed)."""
    from conftest import run_stage

    folder = tmp_path_factory.mktemp("treated-final")
    shutil.copytree(smoke_study_results, folder / "results" / "digits", ignore=shutil.ignore_patterns("report", ".staging", "_ray", "logs"))
    done = run_stage("final", "studies/digits.yaml", f"storage_path={folder / 'results'}", *SETTINGS)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "stderr.txt").write_text(done.stderr)
    (folder / "stdout.txt").write_text(done.stdout)
    return folder / "results" / "digits"


def test_suppress_auto_retrains_each_seed_on_the_error_specific_filters_and_is_compared_with_the_control(treated_results):
    from raycf.results.artefacts import class_names, load_masks

    stderr = (treated_results.parent.parent / "stderr.txt").read_text()
    assert "search: skipped, cached" in stderr and "final: runs" in stderr  # a treatment changes no debug field: the search is not rerun
    seeds = pd.read_parquet(treated_results / "final" / "seeds.parquet")
    assert list(zip(seeds["model"], seeds["seed"])) == [(m, s) for s in (0, 1) for m in ("control", "reference", "best", "suppress_auto")]
    treated = seeds[seeds["model"] == "suppress_auto"]
    assert (treated["lambda1"] == 0).all() and (treated["lambda2"] == 0).all() and (treated["debug.suppress_weight"] == 0.1).all()
    # the filters are the atlas's error-specific ranking on the validation masks, by class name
    val = load_masks(str(treated_results), "val", ["label", "pred", "mc_mask"])
    names = class_names(str(treated_results))
    expected = {names[cls]: filters for cls, filters in error_specific_filters(val["mc_mask"], val["label"], val["pred"], len(names), 2).items()}
    assert expected and all(len(filters) <= 2 for filters in expected.values())
    assert {json.dumps(expected, sort_keys=True)} == set(treated["debug.suppress"])
    assert seeds.loc[seeds["model"] != "suppress_auto", "debug.suppress"].isna().all()
    # a seed changes the draw; a treatment is not the control (the penalty moved the model)
    rows = seeds.set_index(["model", "seed"])
    assert rows.loc[("suppress_auto", 0), "val_loss"] != rows.loc[("control", 0), "val_loss"]
    summary = pd.read_parquet(treated_results / "final" / "seed_summary.parquet").set_index("model")
    assert list(summary.index) == ["reference", "best", "suppress_auto"]
    row = summary.loc["suppress_auto"]
    differences = rows.loc["suppress_auto", "test_acc"] - rows.loc["control", "test_acc"]
    assert row["seeds"] == 2 and row["test_diff_mean"] == pytest.approx(float(np.mean(differences)))
    assert row["test_diff_ci_low"] <= row["test_diff_mean"] <= row["test_diff_ci_high"] or math.isnan(row["test_diff_ci_low"])
    assert "worst_group_diff_mean" not in summary  # digits has no groups
    assert "suppress_auto - control" in (treated_results.parent.parent / "stdout.txt").read_text()
