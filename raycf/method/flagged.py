"""``analysis/flagged.parquet``: one row per test image, what the analysis says about it, most suspicious first.

Columns: ``rank`` (1 = most suspicious: flagged by the study's own setting
first, then by its metric's suspicion, then the less confident), ``image_index``,
``image_id``, ``label``, ``pred`` (and their class names), ``confidence``,
every agreement score of the image's MC set against the predicted class's
global set (``recall`` … ``head_weight``), ``suspicion`` (the study's own
metric turned so that higher is more suspicious), one boolean column per
Table 1 setting (``flag: <setting>``), and ``missing_filters`` /
``extra_filters``: the predicted class's global filters the MC set lacks,
and the MC set's filters outside that global set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycf.config import AnalysisConfig
from raycf.method.detection import METRICS, StudyData, agreement_scores, detection_settings, reference_for, setting_flags, setting_label, suspicion


def flagged_frame(data: StudyData, analysis: AnalysisConfig, image_ids: list[str], split: str = "test") -> pd.DataFrame:
    """The per-image table of ``split`` (see the module docstring); ``image_ids`` in image_index order."""
    images = data.splits[split]
    reference, _ = reference_for(data, analysis.tau, analysis.freq_threshold)
    metrics = METRICS if data.head_weight is not None else tuple(m for m in METRICS if m != "head_weight")
    scores = agreement_scores(images["mc_mask"], images["a"], images["pred"], reference, metrics)
    settings = detection_settings(analysis)
    own_setting = settings[-1][0]
    frame = pd.DataFrame(
        {
            "image_index": np.arange(len(images["pred"]), dtype=np.int64),
            "image_id": list(image_ids),
            "label": images["label"].astype(np.int64),
            "label_name": [data.class_names[i] for i in images["label"]],
            "pred": images["pred"].astype(np.int64),
            "pred_name": [data.class_names[i] for i in images["pred"]],
            "correct": images["pred"] == images["label"],
            "confidence": images["confidence"].astype(np.float64),
            **{metric: values.astype(np.float64) for metric, values in scores.items()},
            "suspicion": suspicion(own_setting.metric, scores[own_setting.metric]),
        }
    )
    for setting, label in settings:
        frame[f"flag: {label or setting_label(setting)}"] = setting_flags(data, split, setting, analysis.tau)
    local = np.asarray(images["mc_mask"], dtype=bool)
    global_sets = reference.sets[images["pred"]]
    frame["missing_filters"] = [np.flatnonzero(row).astype(np.int64) for row in global_sets & ~local]
    frame["extra_filters"] = [np.flatnonzero(row).astype(np.int64) for row in local & ~global_sets]
    own_flag = frame[f"flag: {settings[-1][1]}"]
    order = np.lexsort((frame["image_index"], frame["confidence"], -frame["suspicion"], ~own_flag.to_numpy()))
    frame = frame.iloc[order].reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1, dtype=np.int64))
    return frame
