"""A study's findings as Markdown, read from its own files: the README's "Measured on Fashion-MNIST" section.

    python scripts/findings.py results/fashion > findings.md

Every number comes from the results folder: the stage markers
(``<stage>/_stage.json``), ``images/<split>.parquet``,
``analysis/detection.parquet``, ``analysis/error_scores.parquet``,
``analysis/learned_detector.parquet``, ``final/table2.parquet``,
``final/seed_summary.parquet``, ``final/group_recall.parquet`` and
``report/search_noise.json``.  Nothing is typed by hand; a missing file is
named instead of its section.  Reads no images and needs no Ray.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

STAGES = ("images", "base", "features", "cfe", "masks", "analyze", "prefix", "search", "final", "report")
FOLDERS = {"analyze": "analysis"}
DETECTOR_SCORES = ("recall", "precision", "f1", "magnitude", "head_weight", "max_softmax", "max_softmax_x_f1")


def bounds(low: float, high: float, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """``[low, high]``, scaled (100 for points), with a sign when asked."""
    sign = "+" if signed else ""
    return f"[{scale * low:{sign}.{digits}f}, {scale * high:{sign}.{digits}f}]"


def interval(value: float, low: float, high: float, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """``value [low, high]``, scaled, with a sign when asked."""
    sign = "+" if signed else ""
    return f"{scale * value:{sign}.{digits}f} {bounds(low, high, scale, digits, signed)}"


def shown(value: float | None, digits: int = 4) -> str:
    """A number of a JSON file, or "–" where it is undefined (null: e.g. the sd of one trial)."""
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (no index)."""
    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def read(results: Path, *parts: str) -> pd.DataFrame | None:
    path = results.joinpath(*parts)
    return pd.read_parquet(path) if path.exists() else None


def missing(*parts: str) -> str:
    return f"_{'/'.join(parts)} is missing: the study has not written it._"


def stage_times(results: Path) -> str:
    """Each stage's wall time from its marker, and the sum."""
    rows = []
    for stage in STAGES:
        marker = results / FOLDERS.get(stage, stage) / "_stage.json"
        if marker.exists():
            rows.append((stage, float(json.loads(marker.read_text())["duration_s"])))
    if not rows:
        return missing("<stage>", "_stage.json")
    frame = pd.DataFrame(rows, columns=["stage", "seconds"])
    total = frame["seconds"].sum()
    frame["minutes"] = (frame["seconds"] / 60).round(1)
    frame["seconds"] = frame["seconds"].round(1)
    return markdown_table(frame) + f"\n\nAll stages: {total / 60:.1f} minutes ({total:.0f} s)."


def split_sizes(results: Path) -> str:
    sizes = {split: len(frame) for split in ("train", "val", "test") if (frame := read(results, "images", f"{split}.parquet")) is not None}
    return ", ".join(f"{split} {count:,}" for split, count in sizes.items()) + " images"


def base_accuracy(results: Path) -> str:
    table2 = read(results, "final", "table2.parquet")
    if table2 is None:
        return missing("final", "table2.parquet")
    base = table2.set_index("model").loc["base"]
    return f"base model: train {100 * base['train_acc']:.2f} %, val {100 * base['val_acc']:.2f} %, test {100 * base['test_acc']:.2f} %"


def detection(results: Path) -> str:
    """Table 1 on test, then AUROC and AUPR of every score with bootstrap intervals and the paired difference to max softmax."""
    table1, scores = read(results, "analysis", "detection.parquet"), read(results, "analysis", "error_scores.parquet")
    if table1 is None or scores is None:
        return missing("analysis", "detection.parquet")
    test = table1[table1["split"] == "test"]
    rows = pd.DataFrame(
        {
            "setting": test["setting"],
            "skip thr.": test["skip_threshold"],
            "freq. thr.": test["freq_threshold"],
            "flagged": test["flagged"],
            "errors detected": [f"{n} of {t} ({p:.1f} %)" for n, t, p in zip(test["errors_detected"], test["total_errors"], test["errors_detected_pct"])],
            "new errors": test["new_errors"],
            "accuracy → altered": [f"{100 * a:.2f} → {100 * b:.2f} %" for a, b in zip(test["accuracy"], test["altered_accuracy"])],
        }
    )
    quality = scores[scores["split"] == "test"].set_index("score").loc[[s for s in DETECTOR_SCORES if s in set(scores["score"])]]
    auroc = pd.DataFrame(
        {
            "score": quality.index,
            "AUROC [95 % CI]": [interval(r.auroc, r.auroc_lo, r.auroc_hi) for r in quality.itertuples()],
            "AUPR [95 % CI]": [interval(r.aupr, r.aupr_lo, r.aupr_hi) for r in quality.itertuples()],
            "AUROC − max softmax [paired 95 % CI]": [interval(r.auroc_diff, r.auroc_diff_lo, r.auroc_diff_hi, signed=True) for r in quality.itertuples()],
        }
    )
    first = quality.iloc[0]
    return (
        f"Table 1 on the {int(first['images']):,} test images ({int(first['errors']):,} errors):\n\n{markdown_table(rows)}\n\n"
        f"Each score as a threshold-free detector of 'the prediction is wrong' on test ({int(first['bootstrap_defined'])} bootstrap resamples):\n\n"
        f"{markdown_table(auroc)}"
    )


def learned_detector(results: Path) -> str:
    """The two logistic regressions fitted on validation, scored on test."""
    frame = read(results, "analysis", "learned_detector.parquet")
    if frame is None:
        return missing("analysis", "learned_detector.parquet")
    first = frame.iloc[0]
    rows = pd.DataFrame(
        {
            "detector": frame["detector"],
            "features": frame["features"].str.replace(",", ", "),
            "test AUROC [95 % CI]": [interval(r.auroc, r.auroc_lo, r.auroc_hi) for r in frame.itertuples()],
            "test AUPR [95 % CI]": [interval(r.aupr, r.aupr_lo, r.aupr_hi) for r in frame.itertuples()],
            "AUROC − confidence only [paired 95 % CI]": [interval(r.auroc_diff, r.auroc_diff_lo, r.auroc_diff_hi, signed=True) for r in frame.itertuples()],
        }
    )
    coefficients = frame.set_index("detector")[[c for c in frame.columns if c.startswith("coef_")]].T
    coefficients.index = [name.removeprefix("coef_") for name in coefficients.index]
    coefficients = coefficients.map(lambda value: "–" if pd.isna(value) else f"{value:+.3f}").reset_index(names="feature")
    return (
        f"Logistic regression (standardised features, class_weight {first['class_weight']}) fitted on validation "
        f"({int(first['fit_errors'])} errors in {int(first['fit_images']):,}), scored on test ({int(first['errors'])} errors in {int(first['images']):,}):\n\n"
        f"{markdown_table(rows)}\n\nFitted coefficients (log-odds per standard deviation):\n\n{markdown_table(coefficients)}"
    )


def retraining(results: Path) -> str:
    """Debugged − control over seeds (test and validation), and the class group's recall change."""
    summary, group = read(results, "final", "seed_summary.parquet"), read(results, "final", "group_recall.parquet")
    if summary is None:
        return missing("final", "seed_summary.parquet")
    rows = pd.DataFrame(
        {
            "comparison": summary["comparison"],
            "seeds": summary["seeds"],
            "test acc. (model / control)": [f"{100 * a:.2f} / {100 * b:.2f} %" for a, b in zip(summary["test_acc_mean"], summary["test_baseline_acc_mean"])],
            "test Δ mean ± sd (points)": [f"{100 * m:+.2f} ± {100 * s:.2f}" for m, s in zip(summary["test_diff_mean"], summary["test_diff_sd"])],
            "test Δ paired 95 % CI": [bounds(lo, hi, 100, 2, True) for lo, hi in zip(summary["test_diff_ci_low"], summary["test_diff_ci_high"])],
            "seeds won (test)": summary["test_wins"],
            "val Δ mean ± sd": [f"{100 * m:+.2f} ± {100 * s:.2f}" for m, s in zip(summary["val_diff_mean"], summary["val_diff_sd"])],
        }
    )
    text = f"Accuracy differences in points, paired by seed (t interval):\n\n{markdown_table(rows)}"
    if group is not None and len(group):
        recall = pd.DataFrame(
            {
                "comparison": group["comparison"],
                "class": group["class"],
                "test images": group["support"],
                "control recall": (100 * group["recall_control_mean"]).round(2),
                "model recall": (100 * group["recall_mean"]).round(2),
                "change (points) [95 % CI]": [interval(m, lo, hi, 100, 2, True) for m, lo, hi in zip(group["change_mean"], group["change_ci_low"], group["change_ci_high"])],
            }
        )
        text += f"\n\nTest recall of the confusable classes (mean over seeds; the group row pools their images):\n\n{markdown_table(recall)}"
    return text


def search(results: Path) -> str:
    """Spread of the trials' val_acc against the binomial standard error, and Optuna's importances."""
    path = results / "report" / "search_noise.json"
    if not path.exists():
        return missing("report", "search_noise.json")
    noise = json.loads(path.read_text())
    numbers = (
        f"{noise['trials']} searched trials ({noise['trials_stopped']} stopped by ASHA) on {noise['validation_images']:,} validation images: "
        f"{noise['metric']} mean {shown(noise['mean'])}, sd {shown(noise['sd'])}, range {shown(noise['min'])}–{shown(noise['max'])}; "
        f"binomial standard error at the mean {shown(noise['binomial_se'])} (sd / SE = {shown(noise['sd_over_se'], 2)})."
    )
    board, completed = read(results, "leaderboard.parquet"), ""
    if board is not None:
        done = board[~board["is_control"] & (board["status"] == "completed")][noise["metric"]]
        if len(done) > 1:
            completed = (
                f" Counting only the {len(done)} searched trials that ran every epoch (leaderboard.parquet): range "
                f"{done.min():.4f}–{done.max():.4f}, sd {done.std():.4f} ({done.std() / noise['binomial_se']:.2f} SE)."
            )
    importances = noise.get("importances") or {}
    ranked = ", ".join(f"{name} {value:.2f}" for name, value in sorted(importances.items(), key=lambda item: -item[1])) or "none"
    return f"{numbers} {noise['verdict']}{completed}\n\nOptuna's importances ({noise['importance_evaluator']}, seed {noise['importance_seed']}): {ranked}."


def findings(results: Path) -> str:
    """The whole section."""
    return "\n\n".join(
        [
            f"Study `{results.name}`: {split_sizes(results)}; {base_accuracy(results)}.",
            "### Time per stage (this machine)\n\n" + stage_times(results),
            "### Detection (paper Table 1, and AUROC against max softmax)\n\n" + detection(results),
            "### Do the CFE signals add anything to confidence?\n\n" + learned_detector(results),
            "### Debug retraining against the control\n\n" + retraining(results),
            "### The search\n\n" + search(results),
        ]
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0], "config.yaml").is_file():
        print("usage: python scripts/findings.py RESULTS (a study's results folder, with its config.yaml)", file=sys.stderr)
        return 2
    print(findings(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
