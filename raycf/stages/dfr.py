"""The final stage's DFR baseline (``final.dfr``): the base model's head refit on group-balanced validation features, scored on test.

DFR (:mod:`raycf.method.dfr`) reads the features stage's pooled activations
``a`` of the validation and test images (the base model's one read of each
split; no image is read again) and the image store's groups.  The refit
head scores the test images; ``final/dfr.parquet`` holds one row per model
(``base``, ``dfr`` and the final stage's other models, from its test
predictions): test accuracy, worst-group and mean-group accuracy, and the
paired bootstrap 95 % intervals of each model's value minus the base
model's over the test images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycf.method.dfr import DfrFit, fit_dfr, group_accuracies, paired_group_bootstrap
from raycf.method.groups import group_accuracy
from raycf.results import storage
from raycf.results.artefacts import FeatureSet, class_names, load_features

if TYPE_CHECKING:
    from raycf.stages.stage import StageRun

DFR_FILE = "dfr.parquet"
RESAMPLES = 2000
METRICS = ("acc", "worst_group_acc", "mean_group_acc")


def dfr_frame(val: FeatureSet, test: FeatureSet, groups_of: dict[str, np.ndarray], predictions: pd.DataFrame, num_classes: int, seed: int, resamples: int = RESAMPLES) -> tuple[pd.DataFrame, DfrFit]:
    """``final/dfr.parquet``'s rows and the fitted head.

    ``predictions``: the final stage's per-image rows (``model``, ``split``,
    ``image_index``, ``label``, ``pred``); its test rows give every model but
    DFR.  One row per model, ``base`` first and ``dfr`` last: ``test_acc``,
    ``test_worst_group_acc``, ``test_mean_group_acc``, ``worst_group`` and,
    for each metric, ``<metric>_minus_base`` with its interval ``_lo``,
    ``_hi``; the DFR row also has the chosen ``c`` and the images it was fit
    on (``fit_images``) and chose C on (``tune_images``).
    """
    fit = fit_dfr(val.a, val.label, np.asarray(groups_of["val"], dtype=object)[val.image_index], num_classes, seed)
    index = test.image_index.astype(np.int64)
    groups = np.asarray(groups_of["test"], dtype=object)[index]
    correct = {"base": test.pred == test.label}
    tests = predictions[predictions["split"] == "test"]
    for model, rows in tests.groupby("model", sort=False):
        if model == "base":
            continue
        by_image = rows.set_index("image_index").reindex(index)
        if by_image["pred"].isna().any():
            raise RuntimeError(f"final: the {model} model's test predictions miss images of features/test")
        correct[str(model)] = by_image["pred"].to_numpy(dtype=np.int64) == test.label
    correct["dfr"] = fit.head.predict(test.a) == test.label
    rows = []
    for model, right in correct.items():
        row = {"model": model, **{f"test_{name}": value for name, value in group_accuracies(right, groups).items()}}
        table = group_accuracy(groups, right, np.ones(len(right), dtype=bool))
        row["worst_group"] = str(table.sort_values(["acc", "group"]).iloc[0]["group"])
        intervals = paired_group_bootstrap(right, correct["base"], groups, resamples, seed) if model != "base" else {}
        base = group_accuracies(correct["base"], groups)
        for name in METRICS:
            row[f"{name}_minus_base"] = row[f"test_{name}"] - base[name] if model != "base" else np.nan
            row[f"{name}_minus_base_lo"], row[f"{name}_minus_base_hi"] = intervals.get(name, (np.nan, np.nan))
        dfr = model == "dfr"
        row.update({"c": fit.c if dfr else np.nan, "fit_images": fit.fit_images if dfr else 0, "tune_images": fit.tune_images if dfr else 0})
        rows.append(row)
    return pd.DataFrame(rows), fit


def summary_line(frame: pd.DataFrame) -> str:
    """One line: DFR's test accuracy and worst-group accuracy against the base model's, with the worst-group difference's interval."""
    rows = frame.set_index("model")
    dfr, base = rows.loc["dfr"], rows.loc["base"]
    return (
        f"final: DFR (C = {dfr['c']:g}, fit on {int(dfr['fit_images'])} group-balanced validation images): test accuracy {100 * dfr['test_acc']:.1f} % "
        f"(base {100 * base['test_acc']:.1f} %), worst-group {100 * dfr['test_worst_group_acc']:.1f} % (base {100 * base['test_worst_group_acc']:.1f} %; "
        f"DFR − base {100 * dfr['worst_group_acc_minus_base']:+.1f} points, 95 % interval [{100 * dfr['worst_group_acc_minus_base_lo']:+.1f}, "
        f"{100 * dfr['worst_group_acc_minus_base_hi']:+.1f}])"
    )


def run_dfr(run: "StageRun", predictions: pd.DataFrame, groups_of: dict[str, np.ndarray]) -> dict:
    """Fit DFR on the base model's validation features, score test, write ``final/dfr.parquet`` and print one line; the summary's DFR entries."""
    results = run.results
    frame, _ = dfr_frame(load_features(results, "val"), load_features(results, "test"), groups_of, predictions, len(class_names(results)), run.study.seed)
    storage.write_frame(frame, run.path(DFR_FILE))
    print(summary_line(frame), flush=True)
    dfr = frame.set_index("model").loc["dfr"]
    return {"dfr_c": float(dfr["c"]), **{f"dfr_test_{name}": round(float(dfr[f"test_{name}"]), 6) for name in METRICS}}
