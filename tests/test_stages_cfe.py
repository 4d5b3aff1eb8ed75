"""End to end on the digits smoke study: features → cfe → masks → analyze through the stages and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raycf import cli
from raycf.results.artefacts import global_mc_sets, load_bank, load_features, load_masks, load_study_data
from raycf.config import load_study
from raycf.method.detection import detection_quality
from raycf.method.masks import compute_masks

REPO = Path(__file__).resolve().parent.parent

READ_WITHOUT_RAY = """
import json, sys
import numpy as np, pandas as pd
results = sys.argv[1]
masks = pd.read_parquet(results + "/masks/test")
detection = pd.read_parquet(results + "/analysis/detection.parquet")
scores = pd.read_parquet(results + "/analysis/error_scores.parquet")
global_mc = pd.read_parquet(results + "/analysis/global_mc.parquet")
learned = pd.read_parquet(results + "/analysis/learned_detector.parquet")
first_mask = np.asarray(masks["mc_mask"].iloc[0])
print(json.dumps({
    "ray_imported": any(name == "ray" or name.startswith("ray.") for name in sys.modules),
    "masks_rows": len(masks), "mask_width": len(first_mask), "mask_dtype": str(first_mask.dtype),
    "masks_columns": list(masks.columns),
    "errors": int((masks["pred"] != masks["label"]).sum()),
    "detection": detection.to_dict("records"),
    "scores": scores.to_dict("records"),
    "global_rows": len(global_mc), "global_columns": list(global_mc.columns),
    "in_global": global_mc.sort_values(["class", "filter"])["in_global"].tolist(),
    "learned": learned.to_dict("records"),
    "summary": json.load(open(results + "/analysis/summary.json")),
}, default=float))
"""


def test_digits_smoke_study_features_to_analyze(smoke_study_results: Path, capsys):
    # The session's smoke study ran every stage; `raycf analyze` on it finds them cached and prints its tables.
    study_file = str(REPO / "studies" / "digits.yaml")
    storage = str(smoke_study_results.parent)
    assert cli.main(["analyze", study_file, "--smoke", "--set", f"storage_path={storage}"]) == 0
    captured = capsys.readouterr()
    assert "analyze: skipped, cached" in captured.err
    printed = captured.out
    assert "Misclassification detection (paper Table 1)" in printed and "Recall < 0.3" in printed
    assert "Error detection without thresholds" in printed and "max_softmax" in printed
    assert "bootstrap 95 % intervals" in printed and "learned detector fitted on val" in printed

    study = load_study(study_file, [f"storage_path={storage}"], smoke=True)
    results = study.results_uri
    train_plain, train_all = load_features(results, "train"), load_features(results, "train", views="all")
    assert (train_plain.view == 0).all() and len(train_all) == study.cfe.views * len(train_plain)
    assert np.array_equal(train_plain.image_index, np.arange(len(train_plain)))

    # The Parquet is plain pandas/pyarrow: read it in a process that never imports ray.
    completed = subprocess.run([sys.executable, "-c", READ_WITHOUT_RAY, results], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    read = json.loads(completed.stdout)
    assert read["ray_imported"] is False
    test_features = load_features(results, "test")
    assert read["masks_rows"] == len(test_features) and read["mask_width"] == 64 and read["mask_dtype"] == "bool"
    assert {"image_id", "split", "label", "pred", "confidence", "mc_mask", "topk_mc_masks", "masked_pred", "empty_pred"} <= set(read["masks_columns"])
    every_row = read["detection"]
    rows = [row for row in every_row if row["control"] == ""]  # the rules; then Table 1's controls
    assert {row["split"] for row in rows} == {"test", "val"} and len(rows) == 2 * (len(study.analysis.settings) + 1)
    for row in every_row:
        assert row["errors_detected"] + row["new_errors"] == row["flagged"] <= row["images"]
    assert [row["total_errors"] for row in rows if row["split"] == "test"] == [read["errors"]] * 4
    # per split: one skip gate (every rule here gates at 0.9 or not at all), and max softmax flagging as many as each of the 4 rules
    controls = [row for row in every_row if row["split"] == "test" and row["control"] != ""]
    assert [row["control"] for row in controls] == ["skip gate"] + ["max softmax"] * 4
    assert [row["flagged"] for row in controls[1:]] == [row["flagged"] for row in rows if row["split"] == "test"]
    assert {"max_softmax", "f1", "recall", "max_softmax_x_f1"} <= {row["score"] for row in read["scores"]}
    assert read["global_rows"] == 10 * 64 and {"class", "filter", "count", "magnitude", "in_global"} <= set(read["global_columns"])
    # Bootstrap intervals (the study's analysis.bootstrap resamples) bracket each score's AUROC.
    for row in read["scores"]:
        assert row["bootstrap"] == study.analysis.bootstrap and row["baseline"] == "max_softmax"
        assert row["auroc_lo"] <= row["auroc_hi"] and row["auroc_diff_lo"] <= row["auroc_diff_hi"]
    # The learned detector: both rows, fitted on val, scored on test, every CFE signal of the digits study present.
    learned = {row["detector"]: row for row in read["learned"]}
    assert set(learned) == {"confidence", "confidence+cfe"} and learned["confidence+cfe"]["missing_features"] == ""
    assert learned["confidence+cfe"]["features"].split(",")[-3:] == ["mc_size", "masked_confidence", "mi_size"]
    if learned["confidence"]["reason"] == "":  # a smoke base model has validation errors, but say so if not
        assert 0 <= learned["confidence+cfe"]["auroc"] <= 1 and learned["confidence+cfe"]["auroc_diff_lo"] <= learned["confidence+cfe"]["auroc_diff_hi"]
        assert read["summary"]["test_learned_confidence_cfe_auroc"] == pytest.approx(learned["confidence+cfe"]["auroc"], abs=1e-6)
    assert learned["confidence"]["errors"] == read["errors"]

    # The Ray Data pipeline wrote exactly what the bank computes, in image order.
    bank = load_bank(results)
    masks = load_masks(results, "test")
    expected = compute_masks(bank, torch.from_numpy(test_features.a), torch.from_numpy(test_features.logits), study.masks.topk)
    assert np.array_equal(masks["mc_mask"], expected["mc_mask"]) and np.array_equal(masks["pred"], expected["pred"])
    assert np.array_equal(masks["image_id"], test_features.image_id)

    # The functions the search calls agree with the stage's files.
    sets = global_mc_sets(results, study.analysis.tau, study.analysis.freq_threshold)
    assert sets.reshape(-1).tolist() == read["in_global"]
    summary = detection_quality(load_study_data(results, splits=("val",), with_head=False), study.analysis.tau, study.analysis.freq_threshold, split="val")
    val_f1 = next(row for row in read["scores"] if row["split"] == "val" and row["score"] == "f1")
    assert summary["det_auroc"] == pytest.approx(val_f1["auroc"], nan_ok=True)
    assert 0.5 < summary["maxsoftmax_auroc"] <= 1.0
