"""A study's findings as Markdown, read from its own files: the generated block of docs/measured.md ("Measured on Fashion-MNIST").

    python scripts/findings.py results/fashion > findings.md
    python scripts/findings.py --base-models results/fashion   # only the comparison over base models

Every number, and every sentence that reads one, comes from the results
folder: the stage markers (``<folder>/_stage.json``, :data:`raycf.stages.STAGES`),
``images/<split>.parquet``, ``analysis/detection.parquet``,
``analysis/error_scores.parquet``, ``analysis/learned_detector.parquet``,
``final/table2.parquet``, ``final/seed_summary.parquet``,
``final/group_recall.parquet``, ``final/base_seed_summary.parquet``, ``report/search_noise.json`` and the
resolved ``config.yaml``; a planted study (``data.plant``) adds ``analysis/plant_effect.parquet``,
``analysis/plant.parquet``, ``final/dfr.parquet`` and ``final/groups.parquet``.  Nothing is typed by hand; a missing file is named
instead of its section.  Reads no images and needs no Ray.

Intervals are read by :func:`reading`: "no difference detected" where an
interval includes zero; "negligible" (with the interval) where it excludes
zero but lies within the quantity's margin (:data:`NEGLIGIBLE`); "higher" or
"lower" otherwise.  Two intervals without a paired difference (the rankings
of ``plant.parquet``) are read by :func:`overlap`: "higher"/"lower" only
where they do not overlap.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

USAGE = (
    "usage: python scripts/findings.py [--base-models] RESULTS (a study's results folder, with its config.yaml; "
    "--base-models: only its stage times and the comparison over base models)"
)


def arguments(argv: list[str]) -> tuple[str, bool] | None:
    """(results folder, whether only the comparison over base models is asked for), or None for bad arguments."""
    only_base_models = argv[:1] == ["--base-models"]
    rest = argv[1:] if only_base_models else argv
    if len(rest) != 1 or not Path(rest[0], "config.yaml").is_file():
        return None
    return rest[0], only_base_models


if __name__ == "__main__" and arguments(sys.argv[1:]) is None:
    print(USAGE, file=sys.stderr)  # bad input is refused before raycf's (torch's) imports
    sys.exit(2)

from raycf.results import storage  # noqa: E402
from raycf.results.artefacts import load_results_study, read_frame, read_marker  # noqa: E402
from raycf.method.multiple import ALPHA, survives  # noqa: E402
from raycf.stages import STAGES  # noqa: E402

DETECTOR_SCORES = (
    "recall", "precision", "f1", "magnitude", "head_weight",
    "recall_centred", "precision_centred", "f1_centred", "magnitude_centred", "head_weight_centred",
    "mc_size", "max_softmax", "max_softmax_x_f1",
)  # fmt: skip
# A difference inside ± this is too small to matter, even when its interval excludes 0.
NEGLIGIBLE = {"auroc": 0.01, "accuracy": 0.001, "recall": 0.01, "worst_group": 0.01}  # worst group: a group of a few hundred images


MAX_EXTRA_DIGITS = 4  # how many more decimals a number may get so that it does not print as zero


def enough_digits(values: tuple[float, ...], scale: float = 1.0, digits: int = 3) -> int:
    """The fewest decimals, ``digits`` or more, at which no nonzero value prints as zero.

    A bound of 0.0004 printed at three decimals reads "+0.000" and hides
    that the interval excludes zero; it gets four.  A value that is zero
    (a score against itself) stays "0.000"; past ``MAX_EXTRA_DIGITS`` more
    decimals, a tinier one does too.
    """
    for more in range(MAX_EXTRA_DIGITS + 1):
        if all(value == 0 or math.isnan(value) or round(scale * value, digits + more) != 0 for value in values):
            return digits + more
    return digits + MAX_EXTRA_DIGITS


def bounds(low: float, high: float, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """``[low, high]``, scaled (100 for points), with a sign when asked; more decimals where a nonzero bound would print as zero."""
    sign, digits = "+" if signed else "", enough_digits((low, high), scale, digits)
    return f"[{scale * low:{sign}.{digits}f}, {scale * high:{sign}.{digits}f}]"


def interval(value: float, low: float, high: float, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    """``value [low, high]``, scaled, with a sign when asked; the three at one precision, enough that no nonzero one prints as zero."""
    sign, digits = "+" if signed else "", enough_digits((value, low, high), scale, digits)
    return f"{scale * value:{sign}.{digits}f} {bounds(low, high, scale, digits, signed)}"


def reading(value: float, low: float, high: float, margin: float, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """What an interval of a difference says: no difference detected, negligible, higher or lower, with the interval."""
    shown = interval(value, low, high, scale, digits, signed=True) + unit
    if any(math.isnan(v) for v in (value, low, high)):
        return f"undefined ({shown})"
    if low <= 0 <= high:
        return f"no difference detected ({shown}: the interval includes zero)"
    if max(abs(low), abs(high)) < margin:
        return f"negligible ({shown}: the interval excludes zero but lies within ±{scale * margin:g}{unit})"
    return f"{'higher' if low > 0 else 'lower'} ({shown})"


def mean_sd(mean: float, sd: float, scale: float = 100, digits: int = 2) -> str:
    """``+0.02 ± 0.11`` in points: a mean difference and its sd, with decimals enough that a nonzero mean does not print as zero."""
    digits = enough_digits((mean,), scale, digits)
    return f"{scale * mean:+.{digits}f}" + ("" if math.isnan(sd) else f" ± {scale * sd:.{digits}f}")  # no sd from one seed


def shown(value: float | None, digits: int = 4) -> str:
    """A number of a JSON file, or "–" where it is undefined (null: e.g. the sd of one trial)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def p_value(value: float, floor: float = 0.0) -> str:
    """A p-value; a bootstrap p of 0 as "< floor" (no resample crossed zero: the p is below the resolution, times Holm's factor)."""
    if pd.isna(value):
        return "–"
    return f"< {floor:.2g}" if value == 0 and floor else f"{value:.3g}"


def equals(shown_p: str) -> str:
    """``= 0.03`` or ``< 0.012``: a shown p-value after its relation."""
    return shown_p if shown_p.startswith("<") else f"= {shown_p}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (no index); a ``|`` inside a cell (a group's name, ``Coat | planted``) escaped."""
    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def missing(*parts: str) -> str:
    return f"_{'/'.join(parts)} is missing: the study has not written it._"


def stage_times(results: str) -> str:
    """Each stage's wall time from its marker, and the sum."""
    rows = [(stage.name, float(marker["duration_s"])) for stage in STAGES if (marker := read_marker(results, stage.folder)) is not None]
    if not rows:
        return missing("<stage>", "_stage.json")
    frame = pd.DataFrame(rows, columns=["stage", "seconds"])
    total = frame["seconds"].sum()
    frame["minutes"] = (frame["seconds"] / 60).round(1)
    frame["seconds"] = frame["seconds"].round(1)
    return markdown_table(frame) + f"\n\nAll stages: {total / 60:.1f} minutes ({total:.0f} s)."


def split_sizes(results: str) -> str:
    sizes = {split: len(frame) for split in ("train", "val", "test") if (frame := read_frame(results, "images", f"{split}.parquet")) is not None}
    return ", ".join(f"{split} {count:,}" for split, count in sizes.items()) + " images"


def base_accuracy(results: str) -> str:
    table2 = read_frame(results, "final", "table2.parquet")
    if table2 is None:
        return missing("final", "table2.parquet")
    base = table2.set_index("model").loc["base"]
    return f"base model: train {100 * base['train_acc']:.2f} %, val {100 * base['val_acc']:.2f} %, test {100 * base['test_acc']:.2f} %"


# ------------------------------------------------------------------ detection


def table1(results: str) -> tuple[str, list[str]]:
    """Table 1 on test with its two controls, and a sentence per CFE rule: what it catches beyond the gate and max softmax."""
    detection = read_frame(results, "analysis", "detection.parquet")
    if detection is None:
        return missing("analysis", "detection.parquet"), []
    test = detection[detection["split"] == "test"].copy()
    if "control" not in test:
        test["control"] = ""
    rows = pd.DataFrame(
        {
            "setting": test["setting"],
            "skip thr.": test["skip_threshold"],
            "freq. thr.": ["–" if pd.isna(v) else v for v in test["freq_threshold"]],
            "flagged": test["flagged"],
            "errors detected": [f"{n} of {t} ({p:.1f} %)" for n, t, p in zip(test["errors_detected"], test["total_errors"], test["errors_detected_pct"])],
            "new errors": test["new_errors"],
            "accuracy → altered": [f"{100 * a:.2f} → {100 * b:.2f} %" for a, b in zip(test["accuracy"], test["altered_accuracy"])],
        }
    )
    sentences = []
    rules = test[test["control"] == ""]
    gates = test[test["control"] == "skip gate"].set_index("skip_threshold")
    softmax = test[test["control"] == "max softmax"].set_index("setting")
    for rule in rules.to_dict("records"):
        text = f"{rule['setting']} flags {rule['flagged']} test images and catches {rule['errors_detected']} of {rule['total_errors']} errors ({rule['errors_detected_pct']:.1f} %)"
        if rule["skip_threshold"] in gates.index:
            gate = gates.loc[rule["skip_threshold"]]
            text += f"; the skip gate alone (confidence ≤ {rule['skip_threshold']:g}) flags {gate['flagged']} and catches {gate['errors_detected']} ({gate['errors_detected_pct']:.1f} %)"
        control = softmax.loc[f"control: max softmax, as many as {rule['setting']}"] if f"control: max softmax, as many as {rule['setting']}" in softmax.index else None
        if control is not None:
            gained = int(rule["errors_detected"]) - int(control["errors_detected"])
            versus = f"{abs(gained)} {'more' if gained > 0 else 'fewer'} errors than it" if gained else "as many errors as it"
            text += (
                f"; max softmax flagging the same {rule['flagged']} catches {control['errors_detected']} ({control['errors_detected_pct']:.1f} %), "
                f"so at the same count the filters catch {versus}"
            )
        sentences.append(text + ".")
    return markdown_table(rows), sentences


def error_scores(results: str) -> tuple[str, list[str]]:
    """AUROC, AUPR and within-class AUROC of every score with intervals, the difference to max softmax with its Holm p, and their readings."""
    scores = read_frame(results, "analysis", "error_scores.parquet")
    if scores is None:
        return missing("analysis", "error_scores.parquet"), []
    quality = scores[scores["split"] == "test"].set_index("score")
    quality = quality.loc[[s for s in DETECTOR_SCORES if s in quality.index]]
    has_within = "auroc_within" in quality
    floor = (len(quality) - 1) / max(1, int(quality["bootstrap_defined"].min()))  # Holm's largest factor over the resamples
    table = pd.DataFrame(
        {
            "score": quality.index,
            "AUROC [95 % CI]": [interval(r.auroc, r.auroc_lo, r.auroc_hi) for r in quality.itertuples()],
            "AUPR [95 % CI]": [interval(r.aupr, r.aupr_lo, r.aupr_hi) for r in quality.itertuples()],
            "AUROC − max softmax [paired 95 % CI]": [interval(r.auroc_diff, r.auroc_diff_lo, r.auroc_diff_hi, signed=True) for r in quality.itertuples()],
            "Holm p": [p_value(v, floor) for v in quality.get("auroc_diff_p_holm", pd.Series(math.nan, index=quality.index))],
        }
    )
    if has_within:
        table["within-class AUROC [95 % CI]"] = [interval(r.auroc_within, r.auroc_within_lo, r.auroc_within_hi) for r in quality.itertuples()]
    first = quality.iloc[0]
    header = (
        f"Each score as a threshold-free detector of 'the prediction is wrong' on the {int(first['images']):,} test images "
        f"({int(first['errors']):,} errors; {int(first['bootstrap_defined'])} bootstrap resamples; `_centred`: minus the predicted class's "
        "mean on its accepted training images, over that class's sd; within-class: the AUROC among the images of each predicted class, "
        f"averaged weighted by their errors; Holm p: over the {len(quality) - 1} differences with max softmax):"
    )
    sentences = [
        f"{name} − max softmax, AUROC: {reading(r['auroc_diff'], r['auroc_diff_lo'], r['auroc_diff_hi'], NEGLIGIBLE['auroc'])}"
        + (f"; Holm p {equals(p_value(r['auroc_diff_p_holm'], floor))} ({'survives' if survives(r['auroc_diff_p_holm']) else 'does not survive'} at α = {ALPHA:g})" if "auroc_diff_p_holm" in r else "")
        + "."
        for name, r in quality.drop(index="max_softmax", errors="ignore").iterrows()
    ]
    for name in ("f1", "recall"):
        if has_within and name in quality.index and f"{name}_centred" in quality.index:
            raw, centred = quality.loc[name], quality.loc[f"{name}_centred"]
            sentences.append(
                f"{name} agreement, pooled over classes: AUROC {interval(raw['auroc'], raw['auroc_lo'], raw['auroc_hi'])}; class-centred "
                f"{interval(centred['auroc'], centred['auroc_lo'], centred['auroc_hi'])}; within each predicted class "
                f"{interval(raw['auroc_within'], raw['auroc_within_lo'], raw['auroc_within_hi'])} (max softmax within class "
                f"{interval(quality.loc['max_softmax', 'auroc_within'], quality.loc['max_softmax', 'auroc_within_lo'], quality.loc['max_softmax', 'auroc_within_hi'])})."
            )
    if "mc_size" in quality.index:
        size = quality.loc["mc_size"]
        side = "larger" if size["auroc_lo"] > 0.5 else "smaller" if size["auroc_hi"] < 0.5 else "neither larger nor smaller (the interval includes 0.5)"
        sentences.append(f"MC-set size alone (larger = more suspicious): AUROC {interval(size['auroc'], size['auroc_lo'], size['auroc_hi'])}: errors have {side} MC sets.")
    return header + "\n\n" + markdown_table(table), sentences


def learned_detector(results: str) -> tuple[str, list[str]]:
    """The two logistic regressions fitted on validation, scored on test; the interval is conditional on the fit."""
    frame = read_frame(results, "analysis", "learned_detector.parquet")
    if frame is None:
        return missing("analysis", "learned_detector.parquet"), []
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
    text = (
        f"Logistic regression (standardised features, class_weight {first['class_weight']}) fitted on validation "
        f"({int(first['fit_errors'])} errors in {int(first['fit_images']):,}), scored on test ({int(first['errors'])} errors in {int(first['images']):,}); "
        "the intervals resample the test images for the fitted coefficients: they are conditional on that fit, whose own variance they leave out:\n\n"
        f"{markdown_table(rows)}\n\nFitted coefficients (log-odds per standard deviation):\n\n{markdown_table(coefficients)}"
    )
    last = frame.iloc[-1]
    sentences = [f"{last['detector']} − {last['baseline']}, test AUROC, given the fit: {reading(last['auroc_diff'], last['auroc_diff_lo'], last['auroc_diff_hi'], NEGLIGIBLE['auroc'])}."]
    return text, sentences


# ------------------------------------------------------------------ retraining


def retraining(results: str) -> tuple[str, list[str]]:
    """Debugged − control over seeds on test, and the class group's recall changes with Holm's adjustment."""
    summary, group = read_frame(results, "final", "seed_summary.parquet"), read_frame(results, "final", "group_recall.parquet")
    if summary is None:
        return missing("final", "seed_summary.parquet"), []
    rows = pd.DataFrame(
        {
            "comparison": summary["comparison"],
            "seeds": summary["seeds"],
            "test acc. (model / control)": [f"{100 * a:.2f} / {100 * b:.2f} %" for a, b in zip(summary["test_acc_mean"], summary["test_baseline_acc_mean"])],
            "test Δ mean ± sd (points)": [mean_sd(m, s) for m, s in zip(summary["test_diff_mean"], summary["test_diff_sd"])],
            "test Δ paired 95 % CI": [bounds(lo, hi, 100, 2, True) for lo, hi in zip(summary["test_diff_ci_low"], summary["test_diff_ci_high"])],
            "seeds won (test)": summary["test_wins"],
        }
    )
    text = (
        "Accuracy differences in points, paired by seed (t interval). Validation chose the base epoch, the search's best trial and each "
        f"seed's epoch, so a validation difference is optimistic and is not shown:\n\n{markdown_table(rows)}"
    )
    sentences = [
        f"{r['comparison']} over {r['seeds']} seeds, test accuracy: "
        f"{reading(r['test_diff_mean'], r['test_diff_ci_low'], r['test_diff_ci_high'], NEGLIGIBLE['accuracy'], scale=100, digits=2, unit=' points')}; "
        f"{r['test_wins']} of {r['seeds']} seeds won."
        for r in summary.to_dict("records")
    ]
    if group is not None and len(group):
        has_p = "change_p_holm" in group
        recall = pd.DataFrame(
            {
                "comparison": group["comparison"],
                "class": group["class"],
                "test images": group["support"],
                "control recall": (100 * group["recall_control_mean"]).round(2),
                "model recall": (100 * group["recall_mean"]).round(2),
                "change (points) [95 % CI]": [interval(m, lo, hi, 100, 2, True) for m, lo, hi in zip(group["change_mean"], group["change_ci_low"], group["change_ci_high"])],
                "p": [p_value(v) for v in group.get("change_p", pd.Series(math.nan, index=group.index))],
                "Holm p": [p_value(v) for v in group.get("change_p_holm", pd.Series(math.nan, index=group.index))],
            }
        )
        text += (
            "\n\nTest recall of the confusable classes (mean over seeds; the group row pools their images; p: paired t test; "
            f"Holm p: over each comparison's class rows, the group row unadjusted):\n\n{markdown_table(recall)}"
        )
        for comparison, rows_ in group.groupby("comparison", sort=False):
            classes = rows_[rows_["class"] != "(group)"]
            kept = [str(name) for name, p in zip(classes["class"], classes["change_p_holm"]) if survives(p)] if has_p else []
            uncorrected = [str(name) for name, lo, hi in zip(classes["class"], classes["change_ci_low"], classes["change_ci_high"]) if not lo <= 0 <= hi]
            pooled = rows_[rows_["class"] == "(group)"]
            sentence = f"{comparison}, per-class recall: {len(uncorrected)} of {len(classes)} class intervals exclude zero ({', '.join(uncorrected) or 'none'})"
            sentence += f"; after Holm's adjustment {len(kept)} survive{'s' if len(kept) == 1 else ''} at α = {ALPHA:g} ({', '.join(kept) or 'none'})" if has_p else ""
            if len(pooled):
                g = pooled.iloc[0]
                sentence += f"; the group as a whole: {reading(g['change_mean'], g['change_ci_low'], g['change_ci_high'], NEGLIGIBLE['recall'], scale=100, digits=2, unit=' points')}"
            sentences.append(sentence + ".")
    return text, sentences


def base_models(results: str) -> tuple[str, list[str]]:
    """Best − control over base models (final.base_seeds > 1): per base model, then the t interval between them, and its reading."""
    summary = read_frame(results, "final", "base_seed_summary.parquet")
    if summary is None:
        if load_results_study(results).final.base_seeds == 1:
            return "_One base model (final.base_seeds: 1): every comparison above rests on the study's own base model._", []
        return missing("final", "base_seed_summary.parquet"), []
    per_model, between = summary[summary["level"] == "base model"], summary[summary["level"] != "base model"].iloc[0]
    rows = pd.DataFrame(
        {
            "base seed": per_model["base_seed"].astype(int),
            "retraining seeds": per_model["seeds"],
            "test acc. (best / control)": [f"{100 * a:.2f} / {100 * b:.2f} %" for a, b in zip(per_model["test_acc_mean"], per_model["test_baseline_acc_mean"])],
            "test Δ mean ± sd over its seeds (points)": [mean_sd(m, s) for m, s in zip(per_model["test_diff_mean"], per_model["test_diff_sd"])],
        }
    )
    n = int(between["base_seeds"])
    text = (
        f"Best − control, test accuracy, on {n} base models (each trained with its own seed on the same split, with its own CFE bank, "
        "masks and global sets; the best trial's parameters are the study's search's). Each base model's retraining seeds are "
        f"averaged first, so each base model counts once:\n\n{markdown_table(rows)}\n\n"
        f"Between base models: mean {mean_sd(between['test_diff_mean'], between['test_diff_sd'])} points (sd between base models), "
        f"{100 * between['confidence']:.0f} % t interval {bounds(between['test_diff_ci_low'], between['test_diff_ci_high'], 100, 2, True)} ({n - 1} df)."
    )
    sentences = [
        f"best - control over {n} base models, test accuracy: "
        f"{reading(between['test_diff_mean'], between['test_diff_ci_low'], between['test_diff_ci_high'], NEGLIGIBLE['accuracy'], scale=100, digits=2, unit=' points')}; "
        f"best better on {int(between['test_wins'])} of {n} base models; between-base-model sd {100 * between['test_diff_sd']:.2f} points."
    ]
    return text, sentences


# ------------------------------------------------------------------ search


def search(results: str) -> tuple[str, list[str]]:
    """McNemar's comparison of the trials with the best, the seed-to-seed noise, whether the stops reproduce, and Optuna's importances."""
    location = storage.join_uri(results, "report", "search_noise.json")
    if not storage.exists(location):
        return missing("report", "search_noise.json"), []
    noise = json.loads(storage.read_text(location))
    numbers = (
        f"{noise['trials']} searched trials ({noise['trials_stopped']} stopped by ASHA) on {noise['validation_images']:,} validation images: "
        f"{noise['metric']} mean {shown(noise['mean'])}, sd {shown(noise['sd'])}, range {shown(noise['min'])}–{shown(noise['max'])} "
        f"({shown(noise['range_images'], 0)} images)."
    )
    if "indistinguishable" not in noise:
        return numbers + " _This search_noise.json predates McNemar's comparison: rebuild the report (`raycf report RESULTS`)._", []
    study = load_results_study(results)
    asha, deterministic = study.search.scheduler.asha, getattr(study.search, "deterministic", False)
    if asha is None:
        schedule = "No early stopping: every trial ran its whole schedule."
    elif deterministic:
        schedule = "The search ran one trial at a time (search.deterministic): ASHA's stop decisions and TPE's proposals follow trial order and reproduce on a rerun."
    else:
        schedule = (
            f"ASHA decided asynchronously with {study.search.max_concurrent} trials at once: which trials it stops depends on timing and machine load, "
            "so a rerun can stop others and move the spread (search.deterministic: true reproduces them)."
        )
    importances = noise.get("importances") or {}
    ranked = ", ".join(f"{name} {value:.2f}" for name, value in sorted(importances.items(), key=lambda item: -item[1])) or "none"
    text = f"{numbers} {noise['verdict']}\n\n{schedule}\n\nOptuna's importances ({noise['importance_evaluator']}, seed {noise['importance_seed']}): {ranked}."
    sentences = []
    if noise["compared"]:
        sentences.append(
            f"On the validation images they disagree on, {noise['indistinguishable']} of the {noise['compared']} searched trials compared are not "
            f"distinguishable from the best by McNemar's test ({noise['indistinguishable_holm']} after Holm): the search's choice among them is the split's noise as much as the parameters'."
        )
    spread = {model: sd for model, sd in (noise.get("seed_sd") or {}).items() if sd is not None}
    if noise.get("seeds", 0) > 1 and spread:
        sentences.append(f"Retraining one configuration over {noise['seeds']} seeds moves val_acc by an sd of " + ", ".join(f"{m} {sd:.4f}" for m, sd in spread.items()) + ".")
    return text, sentences


# ------------------------------------------------------------------ planted bug


def overlap(value: float, low: float, high: float, other_low: float, other_high: float, digits: int = 4) -> str:
    """One interval against another's (no paired difference): higher or lower only where they do not overlap; else no difference detected."""
    shown_ = interval(value, low, high, digits=digits, signed=True)
    if any(math.isnan(v) for v in (low, high, other_low, other_high)):
        return f"undefined ({shown_})"
    if low > other_high or high < other_low:
        return f"{'higher' if low > other_high else 'lower'} ({shown_} against {bounds(other_low, other_high, digits=digits, signed=True)}: the intervals do not overlap)"
    return f"no difference detected ({shown_} against {bounds(other_low, other_high, digits=digits, signed=True)}: the intervals overlap)"


def plant_effect(results: str) -> tuple[str, list[str]]:
    """The base model on the clean images with and without the feature, and what the change says (the file has no interval)."""
    effect = read_frame(results, "analysis", "plant_effect.parquet")
    if effect is None:
        return missing("analysis", "plant_effect.parquet"), []
    rows = pd.DataFrame(
        {
            "measure": effect["description"],
            "images": effect["images"],
            "clean": [f"{100 * v:.2f} %" for v in effect["clean"]],
            "feature planted": [f"{100 * v:.2f} %" for v in effect["planted"]],
            "change (points)": [f"{100 * v:+.2f}" for v in effect["change"]],
        }
    )
    text = (
        "The base model on the clean validation and test images, as they are and with the feature planted on the fly "
        f"(each image its own control; no interval in the file):\n\n{markdown_table(rows)}"
    )
    sentences = [f"With the feature planted, {r['description']}: {100 * r['clean']:.2f} % → {100 * r['planted']:.2f} % ({100 * r['change']:+.2f} points, {r['images']} images)." for r in effect.to_dict("records")]
    return text, sentences


def plant_rankings(results: str) -> tuple[str, list[str]]:
    """The planted-feature sensitivity of each ranking's top k filters, and CFE's rankings against random and attribution by their intervals, per k."""
    plant = read_frame(results, "analysis", "plant.parquet")
    if plant is None:
        return missing("analysis", "plant.parquet"), []
    wide = plant.pivot_table(index="k", columns="ranking", values="sensitivity", aggfunc="first")
    cells = {(r.k, r.ranking): interval(r.sensitivity, r.lo, r.hi, digits=4, signed=True) for r in plant.itertuples()}
    rankings = [name for name in ("cfe_frequency", "cfe_specificity", "attribution", "random", "oracle") if name in set(plant["ranking"])]
    table = pd.DataFrame({"k": wide.index, **{name: [cells[(k, name)] for k in wide.index] for name in rankings}})
    first = plant.iloc[0]
    text = (
        f"Mean planted-feature sensitivity (pooled activation with − without the feature) of the top k filters of each ranking of {first['class']}'s "
        f"filters, on its {int(first['images'])} clean images, with 95 % bootstrap intervals over images (random: the expectation; oracle: the filters "
        f"the feature drives most, in-sample):\n\n{markdown_table(table)}"
    )
    by = plant.set_index(["k", "ranking"])
    sentences = []
    for k in wide.index:
        for cfe in ("cfe_frequency", "cfe_specificity"):
            if (k, cfe) not in by.index:
                continue
            row = by.loc[(k, cfe)]
            against = [
                f"against {other}: {overlap(row['sensitivity'], row['lo'], row['hi'], by.loc[(k, other), 'lo'], by.loc[(k, other), 'hi'])}"
                for other in ("random", "attribution")
                if (k, other) in by.index
            ]
            sentences.append(f"Top {k} by {cfe}, " + "; ".join(against) + ".")
    return text, sentences


def _repair_rows(results: str) -> tuple[list[dict], list[str]]:
    """Every treatment's worst-group and accuracy change with its interval: DFR's file against the base model, the seed comparisons against the control."""
    rows, notes = [], []
    dfr = read_frame(results, "final", "dfr.parquet")
    if dfr is None:
        notes.append(missing("final", "dfr.parquet"))
    else:
        for r in dfr[dfr["model"] != "base"].to_dict("records"):
            rows.append(
                {"treatment": r["model"], "baseline": "base", "interval": "paired bootstrap over test images, one run",
                 "worst": (r["worst_group_acc_minus_base"], r["worst_group_acc_minus_base_lo"], r["worst_group_acc_minus_base_hi"]),
                 "mean": (r["acc_minus_base"], r["acc_minus_base_lo"], r["acc_minus_base_hi"])}
            )  # fmt: skip
    summary = read_frame(results, "final", "seed_summary.parquet")
    if summary is None:
        notes.append(missing("final", "seed_summary.parquet"))
    elif "worst_group_diff_mean" not in summary:
        notes.append("_final/seed_summary.parquet has no worst-group columns: the study's images have no groups._")
    else:
        for r in summary.to_dict("records"):
            rows.append(
                {"treatment": r["model"], "baseline": r["baseline"], "interval": f"t interval over {r['seeds']} seeds",
                 "worst": (r["worst_group_diff_mean"], r["worst_group_diff_ci_low"], r["worst_group_diff_ci_high"]),
                 "mean": (r["test_diff_mean"], r["test_diff_ci_low"], r["test_diff_ci_high"])}
            )  # fmt: skip
    return rows, notes


def repair_sentences(rows: list[dict]) -> list[str]:
    """Per treatment its worst-group and accuracy change by the rules; then the best repair (the largest worst-group gain whose interval excludes zero upward; the control is never one), or that none is shown."""
    points = {"scale": 100, "digits": 2, "unit": " points"}
    sentences = [
        f"{r['treatment']} − {r['baseline']} ({r['interval']}): test worst-group accuracy {reading(*r['worst'], NEGLIGIBLE['worst_group'], **points)}; "
        f"test accuracy {reading(*r['mean'], NEGLIGIBLE['accuracy'], **points)}."
        for r in rows
    ]
    repaired = [r for r in rows if r["worst"][1] > 0 and r["treatment"] != "control"]  # the control is retraining alone: the treatments' baseline, not a repair
    if repaired:
        best = max(repaired, key=lambda r: r["worst"][0])
        low, high = best["mean"][1], best["mean"][2]
        cost = "so it costs no accuracy" if low > 0 else "so it costs accuracy" if high < 0 else "no cost in accuracy detected"
        sentences.append(
            f"The best repair shown: {best['treatment']}, worst-group accuracy {interval(*best['worst'], 100, 2, True)} points against {best['baseline']}; "
            f"its test accuracy {reading(*best['mean'], NEGLIGIBLE['accuracy'], **points)}: {cost}."
        )
    elif rows:
        sentences.append("No treatment is shown to repair worst-group accuracy: no interval of its change excludes zero upward.")
    return sentences


def repairs(results: str) -> tuple[str, list[str]]:
    """Each model's test worst group (``final/groups.parquet``), DFR's table, and which treatment repairs worst-group accuracy at what cost."""
    parts = []
    groups = read_frame(results, "final", "groups.parquet")
    if groups is None:
        parts.append(missing("final", "groups.parquet"))
    else:
        test = groups[groups["split"] == "test"]
        worst = test.loc[test.groupby("model", sort=False)["acc"].idxmin()]
        parts.append(
            "Test accuracy per group of the final models (`final/groups.parquet`): each model's worst group:\n\n"
            + markdown_table(
                pd.DataFrame(
                    {
                        "model": worst["model"],
                        "worst group": worst["group"],
                        "its images": worst["images"],
                        "worst-group acc.": [f"{100 * v:.2f} %" for v in worst["acc"]],
                        "mean-group acc.": [f"{100 * v:.2f} %" for v in worst["mean_group_acc"]],
                    }
                )
            )
        )
    rows, notes = _repair_rows(results)
    if rows:
        parts.append(
            "Each treatment against its baseline, in points (DFR's file: against the base model; the seed comparisons: against the control):\n\n"
            + markdown_table(
                pd.DataFrame(
                    {
                        "treatment": [f"{r['treatment']} − {r['baseline']}" for r in rows],
                        "interval": [r["interval"] for r in rows],
                        "worst-group Δ [95 % CI]": [interval(*r["worst"], 100, 2, True) for r in rows],
                        "accuracy Δ [95 % CI]": [interval(*r["mean"], 100, 2, True) for r in rows],
                    }
                )
            )
        )
    return "\n\n".join(parts + notes), repair_sentences(rows)


def planted(results: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """A planted study's sections and readings; none without ``data.plant``."""
    plant = load_results_study(results).data.plant
    if plant is None:
        return [], []
    effect_text, effect_sentences = plant_effect(results)
    rankings_text, rankings_sentences = plant_rankings(results)
    repairs_text, repairs_sentences = repairs(results)
    sections = [
        f"### The planted bug ({plant.kind} on {plant.class_name}): its effect on the base model\n\n" + effect_text,
        "### Does the method point at the planted feature?\n\n" + rankings_text,
        "### Which treatment repairs worst-group accuracy, at what cost in accuracy?\n\n" + repairs_text,
    ]
    readings = [("Planted bug", effect_sentences), ("Pointing at the bug", rankings_sentences), ("Repair", repairs_sentences)]
    return sections, readings


def findings(results: str) -> str:
    """The whole section: the measured tables, then every reading as a bullet."""
    name = results.rstrip("/").rsplit("/", 1)[-1]
    table1_text, table1_sentences = table1(results)
    scores_text, scores_sentences = error_scores(results)
    learned_text, learned_sentences = learned_detector(results)
    retraining_text, retraining_sentences = retraining(results)
    base_text, base_sentences = base_models(results)
    search_text, search_sentences = search(results)
    planted_sections, planted_readings = planted(results)
    readings = [
        ("Detection", table1_sentences + scores_sentences),
        ("Learned detector", learned_sentences),
        ("Debug retraining", retraining_sentences),
        ("Over base models", base_sentences),
        ("Search", search_sentences),
        *planted_readings,
    ]
    bullets = "\n".join(f"- **{title}.** {' '.join(sentences)}" for title, sentences in readings if sentences)
    return "\n\n".join(
        [
            f"Study `{name}`: {split_sizes(results)}; {base_accuracy(results)}.",
            "### Time per stage (this machine)\n\n" + stage_times(results),
            "### Detection (paper Table 1 with its controls, and AUROC against max softmax)\n\n"
            + "Table 1 on test; the two control rows flag without the filters: every image the skip gate lets through, and the least "
            + f"confident images, as many as each CFE rule flags:\n\n{table1_text}\n\n{scores_text}",
            "### Do the CFE signals add anything to confidence?\n\n" + learned_text,
            "### Debug retraining against the control\n\n" + retraining_text,
            "### Over base models\n\n" + base_text,
            "### The search\n\n" + search_text,
            *planted_sections,
            "### What these numbers say (generated from the intervals)\n\n" + (bullets or "_No reading: the study's files are missing._"),
        ]
    )


def base_models_findings(results: str) -> str:
    """The stage times and the comparison over base models alone, with its reading (a ``final.base_seeds`` run of a measured study)."""
    name = results.rstrip("/").rsplit("/", 1)[-1]
    text, sentences = base_models(results)
    reading_line = f"- **Over base models.** {' '.join(sentences)}" if sentences else "_No reading: the study's files are missing._"
    return "\n\n".join(
        [
            f"Study `{name}` with final.base_seeds = {load_results_study(results).final.base_seeds}: {split_sizes(results)}.",
            "### Time per stage (this machine)\n\n" + stage_times(results),
            "### Over base models\n\n" + text,
            reading_line,
        ]
    )


def main(argv: list[str]) -> int:
    parsed = arguments(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    results, only_base_models = parsed
    print(base_models_findings(results) if only_base_models else findings(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
