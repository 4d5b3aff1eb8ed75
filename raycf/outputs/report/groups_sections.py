"""The report's sections for studies with groups (``data.plant``, ``data.groups``).

* ``planted_section`` (planted studies, the page's first section): how the
  base model depends on the planted feature (the planted class's recall and
  the other classes' share predicted as it, on clean images with and without
  the feature), its accuracy per group, and whether the filters each
  ranking puts first are those the feature drives (``analysis/plant.parquet``).
* ``groups_section``: per-group, worst-group and mean-group accuracy of every
  model of the final evaluation, the seed grid and the search's trials.

Each returns None for a study without groups (the page leaves it out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from raycf.results import storage
from raycf.search.leaderboard import LEADERBOARD_FILE

if TYPE_CHECKING:
    from raycf.outputs.report.blocks import ReportContext, Section

RANKING_NAMES = {
    "cfe_frequency": "CFE global-MC frequency",
    "cfe_specificity": "CFE class-specificity",
    "attribution": "plain attribution a·W",
    "random": "random filters (expected)",
    "oracle": "oracle: the filters the feature drives most (ceiling)",
}


def _percent(value: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:.1f} %"


def planted_section(context: "ReportContext") -> "Section | None":
    """How the base model depends on the planted feature, and whether the method's filters point at it."""
    from raycf.outputs.report.blocks import Section

    plant = context.study.data.plant
    if plant is None:
        return None
    where = f"a {plant.size}×{plant.size} patch of value {plant.value:g} in the {plant.corner.replace('_', ' ')} corner" if plant.kind == "patch" else f"a tint towards RGB {list(plant.colour)} of weight {plant.value:g}"
    section = Section("planted", f"The planted bug: {plant.kind} on {plant.class_name}")
    section.paragraph(
        f"data.plant adds {where} to {_percent(plant.train_rate)} of the {plant.class_name} training images and {_percent(plant.other_rate)} of the others'; "
        f"validation and test carry it on {_percent(plant.eval_rate)} of every class. A model that learned the shortcut predicts {plant.class_name} "
        "when the feature is there and misses it when it is not."
    )
    effect = context.frame("analysis", "plant_effect.parquet")
    if effect is None:
        section.note("analysis/plant_effect.parquet is missing (run raycf analyze).")
    else:
        shown = pd.DataFrame(
            {
                "": effect["description"],
                "images": effect["images"],
                "clean": [_percent(v) for v in effect["clean"]],
                "with the feature": [_percent(v) for v in effect["planted"]],
                "change": [f"{100 * v:+.1f} points" for v in effect["change"]],
            }
        )
        section.table(shown, f"The base model on the clean validation and test images, as they are and with the {plant.kind} planted (each image its own control)")
    base_groups = _base_groups(context)
    if base_groups is not None:
        section.table(base_groups, "The base model's accuracy per group (class × planted)")
    sensitivity = context.frame("analysis", "plant.parquet")
    if sensitivity is None:
        section.note("analysis/plant.parquet is missing (run raycf analyze).")
    else:
        section.table(sensitivity_pivot(sensitivity), f"Does the method point at the bug? Mean planted-feature sensitivity (activation with − without the {plant.kind}) of the top k {plant.class_name} filters of each ranking, 95 % bootstrap interval over images")
    return section


def sensitivity_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """``plant.parquet`` as one row per ranking, one column per k: ``value [lo, hi]``."""
    cells = table.assign(cell=[f"{row.sensitivity:+.4f} [{row.lo:+.4f}, {row.hi:+.4f}]" for row in table.itertuples()])
    wide = cells.pivot(index="ranking", columns="k", values="cell")
    wide = wide.reindex([name for name in RANKING_NAMES if name in wide.index])
    wide.index = [RANKING_NAMES[name] for name in wide.index]
    wide.columns = [f"top {k}" for k in wide.columns]
    return wide.reset_index(names="ranking")


def _base_groups(context: "ReportContext") -> pd.DataFrame | None:
    """The base model's per-group accuracy on val (base stage) and test (final stage) side by side."""
    frames = []
    base = context.frame("base", "groups.parquet")
    if base is not None:
        frames.append(base[base["split"] == "val"])
    final = context.final_frame("groups.parquet")
    if final is not None:
        frames.append(final[(final["model"] == "base") & (final["split"] == "test")])
    if not frames:
        return None
    both = pd.concat(frames, ignore_index=True)
    both["cell"] = [f"{_percent(row.acc)} ({row.correct}/{row.images})" for row in both.itertuples()]
    wide = both.pivot(index="group", columns="split", values="cell").rename_axis(columns=None)
    return wide[[split for split in ("val", "test") if split in wide.columns]].reset_index()


def groups_section(context: "ReportContext") -> "Section | None":
    """Per-group, worst-group and mean-group accuracy of the final models, the seed grid and the search's trials."""
    from raycf.outputs.report.blocks import Section

    data = context.study.data
    if data.plant is None and not data.groups:
        return None
    section = Section("groups", "Group accuracy")
    table = context.final_frame("groups.parquet")
    if table is None:
        section.note("final/groups.parquet is missing (run the final stage).")
    else:
        summary = table.drop_duplicates(["model", "split"])[["model", "split", "worst_group_acc", "mean_group_acc"]]
        summary = summary.assign(worst_group=[_worst(table, row.model, row.split) for row in summary.itertuples()])
        section.table(_percent_columns(summary, ["worst_group_acc", "mean_group_acc"]), "Worst-group and mean-group accuracy of each model (the mean is unweighted over groups)")
        test = table[table["split"] == "test"]
        per_group = test.pivot(index="group", columns="model", values="acc").rename_axis(columns=None)
        section.table(_percent_columns(per_group.reset_index(), list(per_group.columns)), "Test accuracy per group and model")
    seeds = context.final_frame("seeds.parquet")
    if seeds is not None and "test_worst_group_acc" in seeds.columns:
        grid = seeds.groupby("model", sort=False)[["test_acc", "test_worst_group_acc", "test_mean_group_acc"]].agg(["mean", "std"])
        grid.columns = [f"{name} {stat}" for name, stat in grid.columns]
        section.table(grid.reset_index(), "The seed grid: test accuracy, worst-group and mean-group accuracy over retraining seeds (mean, standard deviation)")
    board_location = storage.join_uri(context.results, LEADERBOARD_FILE)
    if storage.exists(board_location):
        board = storage.read_table(board_location).to_pandas()
        if "val_worst_group_acc" in board.columns:
            shown = board[["trial_id", "is_control", "val_acc", "val_worst_group_acc", "val_mean_group_acc"]].sort_values("val_worst_group_acc", ascending=False)
            section.table(_percent_columns(shown, ["val_acc", "val_worst_group_acc", "val_mean_group_acc"]), f"The search's trials by validation worst-group accuracy (search.metric: {context.study.search.metric})")
    return section


def _worst(table: pd.DataFrame, model: str, split: str) -> str:
    rows = table[(table["model"] == model) & (table["split"] == split)]
    return str(rows.sort_values(["acc", "group"]).iloc[0]["group"]) if len(rows) else ""


def _percent_columns(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return frame.assign(**{column: [_percent(value) for value in frame[column]] for column in columns})
