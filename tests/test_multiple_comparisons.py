"""Per-class recall changes get paired t p-values and Holm's adjustment within each comparison (raycf.method.replication)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raycf.method.replication import GROUP_ROW, group_recall, paired_p_value


def test_paired_p_value_is_the_t_test():
    # 0.1, 0.2: mean 0.15, sd 0.0707, t = 0.15 / (0.0707 / √2) = 3 on 1 df (a Cauchy law): p = 1 − 2·atan(3)/π
    assert paired_p_value([0.1, 0.2]) == pytest.approx(1 - 2 * math.atan(3) / math.pi)
    assert paired_p_value([0.0, 0.0, 0.0]) == 1.0 and paired_p_value([0.1, 0.1]) == 0.0
    assert math.isnan(paired_p_value([0.1]))


def test_group_recall_adjusts_the_class_rows_of_each_comparison_by_holm():
    rows = []
    changes = {"Shirt": (0.1, 0.2), "Coat": (0.0, 0.0), "Pullover": (0.1, 0.3)}  # best − control per seed
    for seed in range(2):
        for name, index in (("Shirt", 6), ("Coat", 4), ("Pullover", 2)):
            rows.append({"model": "control", "seed": seed, "class": name, "class_index": index, "support": 100, "recall": 0.5})
            rows.append({"model": "reference", "seed": seed, "class": name, "class_index": index, "support": 100, "recall": 0.5})
            rows.append({"model": "best", "seed": seed, "class": name, "class_index": index, "support": 100, "recall": 0.5 + changes[name][seed]})
    table = group_recall(pd.DataFrame(rows), ["Shirt", "Coat", "Pullover"])
    best = table[table["model"] == "best"].set_index("class")
    shirt = 1 - 2 * math.atan(3) / math.pi  # t = 3 on 1 df
    pullover = 1 - 2 * math.atan(2) / math.pi  # mean 0.2, sd 0.1414: t = 2
    assert best.loc["Shirt", "change_p"] == pytest.approx(shirt) and best.loc["Pullover", "change_p"] == pytest.approx(pullover)
    assert best.loc["Coat", "change_p"] == 1.0
    # Holm over three: Shirt (smallest) × 3, Pullover × 2 (at least Shirt's), Coat × 1 capped at 1
    assert best.loc["Shirt", "change_p_holm"] == pytest.approx(3 * shirt)
    assert best.loc["Pullover", "change_p_holm"] == pytest.approx(max(3 * shirt, 2 * pullover))
    assert best.loc["Coat", "change_p_holm"] == 1.0
    assert best.loc[GROUP_ROW, "change_p_holm"] == best.loc[GROUP_ROW, "change_p"]  # the group is its own question
    reference = table[table["model"] == "reference"]
    assert (reference["change_p_holm"] == 1.0).all()  # no change at all
