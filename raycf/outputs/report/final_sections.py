"""Sections on debug retraining: Tables 2 and 3, the per-class recall change, the comparison over seeds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from raycf.outputs.report.blocks import Figure, ReportContext, Section, percent
from raycf.outputs.report.figures import recall_change_figure

if TYPE_CHECKING:
    pass

def final_section(context: ReportContext) -> Section:
    """Paper Tables 2 and 3 and the per-class recall change."""
    section = Section("final", "Debug retraining (paper Tables 2 and 3)")
    frames = context.required(section, "final/table2.parquet", remedy="the study's final stage has not run (`raycf study STUDY`)")
    if frames is None:
        return section
    (table2,) = frames
    table3 = context.frame("final", "table3.parquet")
    class_recall = context.final_frame("class_recall.parquet")
    shown = pd.DataFrame(
        {
            "model": table2["model"],
            "lambda1": table2["lambda1"],
            "lambda2": table2["lambda2"],
            "best epoch": ["–" if pd.isna(v) else str(int(v)) for v in table2["best_epoch"]],
            "train %": percent(table2["train_acc"]),
            "val %": percent(table2["val_acc"]),
            "test %": percent(table2["test_acc"]),
        }
    )
    section.table(shown, "Table 2: accuracy of the base model, plain fine-tuning (control) and debug retraining (best trial)")
    rows = table2.set_index("model")
    if {"debugged", "control"} <= set(rows.index):
        change = 100 * (rows.loc["debugged", "test_acc"] - rows.loc["control", "test_acc"])
        section.paragraph(f"Debugged − control test accuracy: {change:+.2f} points.")
    final = context.final_frame("final.parquet")
    if final is not None and "verdict" in final and str(final["verdict"].iloc[0]):
        section.paragraph(str(final["verdict"].iloc[0]))
    if table3 is not None:
        if table3.empty:
            section.note("Table 3 is empty: no class changed its test recall.")
        else:
            section.table(table3.drop(columns=["class_index"], errors="ignore"), "Table 3: classes whose test recall changed most (debugged vs base)")
    if class_recall is not None and len(class_recall):
        section.add(Figure("class_recall", "Per-class test recall change from the base model.", recall_change_figure(class_recall)))
    add_seed_comparison(section, context)
    return section


def add_seed_comparison(section: Section, context: ReportContext) -> None:
    """With ``final.seeds`` > 1: the control, the study's λ and the best trial over retraining seeds (paired intervals, the class group)."""
    from raycf.method.replication import format_interval

    summary = context.frame("final", "seed_summary.parquet")
    seeds = context.frame("final", "seeds.parquet")
    if summary is None or seeds is None:
        return  # final.seeds is 1: Tables 2 and 3 are the whole comparison
    section.add("<h3>Over retraining seeds (final.seeds)</h3>")
    count = int(seeds["seed"].nunique())
    section.paragraph(
        f"The control (λ1 = λ2 = 0), the study's own λ (reference) and the best searched trial's parameters (best) were each retrained "
        f"{count} times from the base model; a seed changes the data order, the view drawn per epoch and dropout, the same for the three. "
        f"Each run keeps its best validation epoch and is run once over every split. Seed 0 is the search's own draw: the best trial "
        f"was chosen on its seed-0 validation accuracy, so that one value is optimistic; the other seeds and the test split are not."
    )
    per_model = seeds.groupby("model", sort=False).agg(
        runs=("seed", "size"), test_mean=("test_acc", "mean"), test_sd=("test_acc", "std"), val_mean=("val_acc", "mean"), val_sd=("val_acc", "std"), best_epoch=("best_epoch", "mean")
    ).reset_index()
    for column in ("test_mean", "test_sd", "val_mean", "val_sd"):
        per_model[column] = percent(per_model[column])
    section.table(per_model.rename(columns={"test_mean": "test %", "test_sd": "test sd", "val_mean": "val %", "val_sd": "val sd", "best_epoch": "mean best epoch"}), "Accuracy over the seeds (mean and sample sd, %)")
    level = int(round(100 * float(summary["confidence"].iloc[0])))
    shown = pd.DataFrame(
        {
            "comparison": summary["comparison"],
            "seeds": summary["seeds"],
            f"test difference [{level} % t interval], points": [format_interval(r.test_diff_mean, r.test_diff_ci_low, r.test_diff_ci_high) for r in summary.itertuples()],
            "test sd": [f"{100 * v:.2f}" for v in summary["test_diff_sd"]],
            "seeds better": summary["test_wins"],
            f"val difference [{level} % t interval], points": [format_interval(r.val_diff_mean, r.val_diff_ci_low, r.val_diff_ci_high) for r in summary.itertuples()],
        }
    )
    if "worst_group_diff_mean" in summary:  # the study's images have groups (planted studies)
        shown[f"worst-group test difference [{level} % t interval], points"] = [format_interval(r.worst_group_diff_mean, r.worst_group_diff_ci_low, r.worst_group_diff_ci_high) for r in summary.itertuples()]
    section.table(shown, "Accuracy difference from the control of the same seed (paired t interval; an interval holding 0 is no evidence of a difference)")
    group = context.frame("final", "group_recall.parquet")
    if group is not None and len(group):
        rows = pd.DataFrame(
            {
                "comparison": group["comparison"],
                "class": group["class"],
                "images": group["support"],
                "base %": percent(group["recall_base"]),
                "control %": percent(group["recall_control_mean"]),
                "model %": percent(group["recall_mean"]),
                f"change [{level} % t interval], points": [format_interval(r.change_mean, r.change_ci_low, r.change_ci_high) for r in group.itertuples()],
            }
        )
        section.table(rows, "Test recall of the class group (final.class_group) over the seeds; (group): all its images together")
