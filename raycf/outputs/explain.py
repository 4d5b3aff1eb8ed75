"""``raycf explain RESULTS IMAGE ...``: why the study's base model predicts what it does, per image.

IMAGE is an image file (anything Pillow opens: converted to RGB and put
through the study's evaluation transform, as the study's own images are), or
the id of an image of the study's dataset as the Parquet files store it in
``image_id`` (``digits-0042``, ``cub-17``, ``test/cat/0.jpg``); a dataset
image gets its true class too, and its numbers are those of its row in
``masks/<split>/``.  Runs on the CPU, in this process, with no Ray cluster.

Per image, a bundle folder ``<out>/<name>/``:

* ``explanation.json``: every number (prediction, top-k, MC filters with
  their activations, agreement with the global MC filters, the verdict of
  each detection setting and its top-k re-ranking, the MI filters towards the
  runner-up class, and the debugged model's prediction when the study has
  one);
* ``explanation.md``: the same in a few sentences;
* ``explanation.png``: the image, Grad-CAM of the prediction, and the
  feature maps of the top MC filters over the image;
* ``manifest.json``: versions, the checkpoint's and the study's config
  hashes, the input (and a file's SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycf.results import storage
from raycf.results.artefacts import debugged_model_bytes, load_bank, load_results_study, load_study_data, store_ref
from raycf.models.checkpoint import load_classifier_checkpoint, parse_classifier_checkpoint
from raycf.config import DataConfig, StudyConfig
from raycf.data.datasets import SPLITS, open_image, stored_side
from raycf.data.preprocess import preprocess_image
from raycf.errors import UserError
from raycf.data.image_store import ImageStore, open_store
from raycf.results.manifest import versions
from raycf.method.detection import (
    LOWER_AGREES,
    agreement_scores,
    class_thresholds,
    detection_settings,
    flag_images,
    reference_for,
    rerank,
    setting_label,
)
from raycf.method.masks import compute_masks
from raycf.models.build import classifier_from_checkpoint
from raycf.data.views import model_inputs

HEATMAP_FILTERS = 4  # top MC filters (by contribution to the predicted logit) drawn over the image
BUNDLE_FILES = ("explanation.json", "explanation.md", "explanation.png", "manifest.json")


@dataclass
class ImageInput:
    """One IMAGE argument, resolved: where it comes from and the model input it gives."""

    argument: str
    kind: str  # "file" or "dataset"
    tensor: torch.Tensor  # 3×H×W, the evaluation transform applied
    path: str | None = None
    sha256: str | None = None
    image_id: str | None = None
    split: str | None = None
    image_index: int | None = None
    label: int | None = None

    @property
    def name(self) -> str:
        """The bundle folder's name: the file's stem or the image id, made filesystem-safe."""
        raw = Path(self.argument).stem if self.kind == "file" else str(self.image_id)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._") or "image"


# ------------------------------------------------------------------ inputs


class DatasetIndex:
    """The study's image store, opened on first use, to look IMAGE arguments up as image ids."""

    def __init__(self, results: str):
        self.results = results
        self._store = None
        self._where: dict[str, tuple[str, int]] = {}

    def find(self, image_id: str) -> tuple[ImageStore, str, int] | None:
        if self._store is None:
            self._store = open_store(store_ref(self.results))
            self._where = {item: (split, index) for split in SPLITS for index, item in enumerate(self._store.ids(split))}
        if image_id not in self._where:
            return None
        split, index = self._where[image_id]
        return self._store, split, index

    def example_id(self) -> str:
        return next(iter(self._where), "digits-0042")


def most_suspicious(results: str, count: int) -> list[str]:
    """The image ids of the ``count`` first rows of ``analysis/flagged.parquet`` (the most suspicious test images)."""
    from raycf.results import storage
    from raycf.results.artefacts import read_frame

    flagged = read_frame(storage.normalise_root(results), "analysis", "flagged.parquet")
    if flagged is None:
        raise UserError(f"{results}: no analysis/flagged.parquet (expected a study whose analyze stage ran)")
    return [str(image_id) for image_id in flagged.sort_values("rank")["image_id"].head(count)]


def model_input(pixels: np.ndarray, data: DataConfig) -> torch.Tensor:
    """A stored-side uint8 H×W×3 image as the model's 3×H×W input (the evaluation transform)."""
    return model_inputs(torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None], data.image_size, preprocess=data.preprocess)[0]


def resolve_inputs(arguments: list[str], study: StudyConfig, results: str) -> list[ImageInput]:
    """Open every IMAGE argument (files first, then dataset ids); any bad one is a UserError before work starts.

    A file is decoded and resized to the stored side as the images stage does
    for the study's own images, then put through the evaluation transform.
    """
    dataset = DatasetIndex(results)
    side = stored_side(study.data)
    inputs = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            raise UserError(f"{argument}: a folder (expected an image file or an image id of the study's dataset)")
        if path.is_file():
            content = path.read_bytes()
            image = open_image(path)  # UserError (one line) for a corrupt or non-image file
            tensor = model_input(preprocess_image(image, study.data, side), study.data)
            inputs.append(ImageInput(argument, "file", tensor, path=str(path.resolve()), sha256=hashlib.sha256(content).hexdigest()))
            continue
        try:
            found = dataset.find(argument)
        except UserError as error:
            raise UserError(f"{argument}: no such image file, and the study's image store cannot be read to look it up as an image id ({error})") from None
        if found is None:
            raise UserError(f"{argument}: no such image file, nor an image id of the study's dataset (ids look like {dataset.example_id()})")
        store, split, index = found
        tensor = model_input(store.images(split)[index], study.data)
        inputs.append(ImageInput(argument, "dataset", tensor, image_id=argument, split=split, image_index=index, label=int(store.labels(split)[index])))
    return inputs


# ------------------------------------------------------------------ the explainer


def _number(value: float) -> float | None:
    """A float for JSON (NaN and infinities become null)."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


@dataclass
class Explainer:
    """What explanations need, loaded once from a results folder (CPU, no Ray)."""

    results: str
    study: StudyConfig
    model: Any  # FilterClassifier
    checkpoint: Any  # ClassifierCheckpoint
    bank: Any  # CfeBank
    data: Any  # method.detection.StudyData (training masks, head weights, class names)
    debugged: tuple[str, Any] | None  # (trial id, FilterClassifier) of the study's best trial

    @classmethod
    def load(cls, results: str, study: StudyConfig | None = None) -> "Explainer":
        """Read the base model, the CFE bank and the training masks of ``results`` (and its study, unless given)."""
        results = storage.normalise_root(results)
        study = study or load_results_study(results)
        for needed in ("masks/train", "cfe/bank.pt", "base/model.pt"):
            if not storage.exists(storage.join_uri(results, needed)):
                raise UserError(f"{results}: no {needed} (expected a study that ran its masks stage: `raycf masks STUDY`)")
        checkpoint = load_classifier_checkpoint(storage.join_uri(results, "base", "model.pt"), expected_arch=study.model.arch)
        data = load_study_data(results, splits=())
        return cls(
            results=results,
            study=study,
            model=classifier_from_checkpoint(study.model, checkpoint),
            checkpoint=checkpoint,
            bank=load_bank(results),
            data=data,
            debugged=_debugged_model(results, study),
        )

    @property
    def class_names(self) -> list[str]:
        return self.checkpoint.class_names

    def explain(self, item: ImageInput) -> tuple[dict, dict[str, np.ndarray]]:
        """The explanation of one image (JSON-ready dict) and the arrays its figure draws."""
        study, names = self.study, self.class_names
        with torch.no_grad():
            maps = self.model.feature_maps(item.tensor[None])
            activations = self.model.pool_maps(maps)
            logits = self.model.head(activations)
        row = {key: value[0] for key, value in compute_masks(self.bank, activations, logits, study.masks.topk).items()}
        a = activations[0].numpy().astype(np.float64)
        probabilities = torch.softmax(logits[0].float(), dim=0).numpy()
        pred, confidence = int(row["pred"]), float(row["confidence"])
        weights = self.bank.head_weight.double().numpy()
        mc_filters = np.flatnonzero(row["mc_mask"])
        contributions = weights[pred, mc_filters] * a[mc_filters]
        order = mc_filters[np.argsort(-contributions, kind="stable")]
        reference, _ = reference_for(self.data, study.analysis.tau, study.analysis.freq_threshold)
        global_set = reference.sets[pred]
        scores = agreement_scores(row["mc_mask"][None], a[None], np.array([pred]), reference)
        topk_classes = np.asarray(row["topk_classes"])

        settings = []
        for setting, label in detection_settings(study.analysis):
            setting_reference, _ = reference_for(self.data, study.analysis.tau, setting.freq_threshold)
            metric = setting.metric
            score = agreement_scores(row["mc_mask"][None], a[None], np.array([pred]), setting_reference, (metric,))[metric]
            threshold = class_thresholds(self.data, setting_reference, setting, study.analysis.tau)[pred]
            flagged = flag_images(metric, score, np.array([threshold]), np.array([confidence]), setting.skip_threshold)
            candidates = agreement_scores(row["topk_mc_masks"][None], a[None], topk_classes[None], setting_reference, (metric,))[metric]
            chosen = int(rerank(flagged, topk_classes[None], candidates, metric)[0])
            settings.append(
                {
                    "setting": label or setting_label(setting),
                    "metric": metric,
                    "freq_threshold": setting.freq_threshold,
                    "skip_threshold": setting.skip_threshold,
                    "threshold_kind": "avg" if setting.threshold == "avg" else "absolute",
                    "threshold": _number(threshold),
                    "score": _number(score[0]),
                    "skipped": bool(setting.skip_threshold > 0 and confidence > setting.skip_threshold),
                    "flagged": bool(flagged[0]),
                    "candidate_scores": [_number(v) for v in candidates[0]],
                    "reranked_class": chosen,
                    "reranked_class_name": names[chosen],
                }
            )
        own = settings[-1]  # the study's own row (analysis.skip_threshold, analysis.freq_threshold)

        explanation: dict[str, Any] = {
            "input": _input_record(item, names),
            "model": {"checkpoint": storage.join_uri(self.results, "base", "model.pt"), "arch": self.checkpoint.arch, "config_hash": self.checkpoint.config_hash},
            "prediction": {
                "class": pred,
                "class_name": names[pred],
                "confidence": confidence,
                "correct": None if item.label is None else pred == item.label,
            },
            "probabilities": [float(p) for p in probabilities],
            "mc_filters": [
                {
                    "filter": int(k),
                    "activation": float(a[k]),
                    "weight": float(weights[pred, k]),
                    "contribution": float(weights[pred, k] * a[k]),
                    "in_global": bool(global_set[k]),
                }
                for k in order
            ],
            "mc_size": int(row["mc_size"]),
            "num_filters": int(a.shape[0]),
            "masked_prediction": {"class": int(row["masked_pred"]), "class_name": names[int(row["masked_pred"])], "confidence": float(row["masked_confidence"])},
            "global_filters": {
                "class": pred,
                "filters": [int(k) for k in np.flatnonzero(global_set)],
                "size": int(global_set.sum()),
                "tau": study.analysis.tau,
                "freq_threshold": study.analysis.freq_threshold,
            },
            "agreement": {metric: _number(values[0]) for metric, values in scores.items()},
            "flagged": own["flagged"],
            "detection": settings,
            "topk": [
                {
                    "class": int(c),
                    "class_name": names[int(c)],
                    "probability": float(p),
                    "mc_filters": [int(k) for k in np.flatnonzero(mask)],
                    "mc_size": int(size),
                    "masked_pred": int(masked),
                    "score": own["candidate_scores"][position],
                }
                for position, (c, p, mask, size, masked) in enumerate(
                    zip(topk_classes, row["topk_probs"], row["topk_mc_masks"], row["topk_mc_sizes"], row["topk_masked_preds"])
                )
            ],
            "reranking": {"setting": own["setting"], "metric": own["metric"], "flagged": own["flagged"], "class": own["reranked_class"], "class_name": own["reranked_class_name"]},
            "runner_up": self._runner_up(activations, probabilities),
            "debugged": self._debugged_prediction(item),
        }
        from raycf.outputs.gradcam import display_image, filter_heatmaps, grad_cam

        top = [int(k) for k in order[:HEATMAP_FILTERS]]
        arrays = {
            "image": display_image(item.tensor),
            "grad_cam": grad_cam(self.model, item.tensor[None], pred)[0].numpy(),
            "filter_maps": filter_heatmaps(self.model, item.tensor, top).numpy(),
            "filters": np.array(top, dtype=np.int64),
        }
        return explanation, arrays

    def _runner_up(self, activations: torch.Tensor, probabilities: np.ndarray) -> dict | None:
        """The MI filters that would move the prediction to the second most probable class."""
        if len(probabilities) < 2:
            return None
        names = self.class_names
        runner = int(np.argsort(-probabilities, kind="stable")[1])
        record: dict[str, Any] = {"class": runner, "class_name": names[runner], "probability": float(probabilities[runner])}
        if not self.bank.has_mi:
            record["mi_filters"] = None
            record["note"] = "the CFE bank has no MI generators (cfe.train_mi: false)"
            return record
        deltas = self.bank.mi_deltas(activations, torch.tensor([runner]))[0]
        moved = torch.softmax(self.bank.logits(activations[0] + deltas), dim=0)
        filters = torch.nonzero(deltas > 0)[:, 0]
        filters = filters[torch.argsort(-deltas[filters], stable=True)]
        record["mi_filters"] = [{"filter": int(k), "activation": float(activations[0, k]), "delta": float(deltas[k])} for k in filters]
        record["prediction_with_mi"] = {"class": int(moved.argmax()), "class_name": names[int(moved.argmax())], "confidence": float(moved.max())}
        return record

    def _debugged_prediction(self, item: ImageInput) -> dict | None:
        if self.debugged is None:
            return None
        trial_id, model = self.debugged
        with torch.no_grad():
            probabilities = torch.softmax(model(item.tensor[None])[0].float(), dim=0)
        pred = int(probabilities.argmax())
        return {"trial_id": trial_id, "class": pred, "class_name": self.class_names[pred], "confidence": float(probabilities[pred])}




def _input_record(item: ImageInput, names: list[str]) -> dict:
    record: dict[str, Any] = {"argument": item.argument, "kind": item.kind}
    if item.kind == "file":
        record.update(path=item.path, sha256=item.sha256)
    else:
        record.update(image_id=item.image_id, split=item.split, image_index=item.image_index, label=item.label, label_name=names[item.label])
    return record


def _debugged_model(results: str, study: StudyConfig) -> tuple[str, Any] | None:
    """The study's best trial (final.parquet's debugged row) as a classifier, when its checkpoint is there."""
    found = debugged_model_bytes(results)
    if found is None:
        return None
    trial_id, model_bytes = found
    return trial_id, classifier_from_checkpoint(study.model, parse_classifier_checkpoint(model_bytes, f"trial {trial_id}"))


# ------------------------------------------------------------------ the bundle


def explanation_figure(explanation: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The image, Grad-CAM of the prediction, and the top MC filters' feature maps over the image."""
    from raycf.outputs.report.blocks import new_figure, png_bytes

    filters = [int(k) for k in arrays["filters"]]
    by_filter = {entry["filter"]: entry for entry in explanation["mc_filters"]}
    panels = 2 + len(filters)
    figure = new_figure(2.4 * panels, 2.9)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    prediction = explanation["prediction"]
    truth = explanation["input"].get("label_name")
    axes[0].imshow(arrays["image"])
    axes[0].set_title("input" + (f" (true: {truth})" if truth is not None else ""), fontsize="small")
    axes[1].imshow(arrays["image"])
    axes[1].imshow(arrays["grad_cam"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM: {prediction['class_name']} ({100 * prediction['confidence']:.1f} %)", fontsize="small")
    for position, (k, heat) in enumerate(zip(filters, arrays["filter_maps"]), start=2):
        entry = by_filter[k]
        axes[position].imshow(arrays["image"])
        axes[position].imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        axes[position].set_title(f"MC filter {k}: a={entry['activation']:.2f}, W·a={entry['contribution']:.2f}", fontsize="small")
    for panel in axes:
        panel.set_axis_off()
    return png_bytes(figure)


def explanation_text(explanation: dict) -> str:
    """``explanation.md``: the explanation in a few sentences."""
    prediction, source = explanation["prediction"], explanation["input"]
    name = source.get("image_id") or Path(source["argument"]).name
    verdict = ""
    if prediction["correct"] is not None:
        verdict = f", true class **{source['label_name']}** ({'right' if prediction['correct'] else 'wrong'})"
    filters = explanation["mc_filters"]
    shown = ", ".join(f"{f['filter']} (a={f['activation']:.2f})" for f in filters[:8]) + (f" and {len(filters) - 8} more" if len(filters) > 8 else "")
    masked = explanation["masked_prediction"]
    agreement, global_filters = explanation["agreement"], explanation["global_filters"]
    lines = [
        f"# {name}: predicted **{prediction['class_name']}** at {100 * prediction['confidence']:.1f} %{verdict}",
        "",
        f"- **MC filters**: the prediction rests on {explanation['mc_size']} of {explanation['num_filters']} filters "
        f"(largest contribution to the logit first, a = activation): {shown or 'none'}. "
        f"With only those filters the model predicts {masked['class_name']} ({100 * masked['confidence']:.1f} %).",
    ]
    if global_filters["size"]:
        lines.append(
            f"- **Agreement** with class {prediction['class_name']}'s {global_filters['size']} global MC filters: "
            f"F1 {agreement['f1']:.2f}, recall {agreement['recall']:.2f}, precision {agreement['precision']:.2f}."
        )
    else:
        lines.append(f"- **Agreement**: class {prediction['class_name']} has no global MC filters (no training image passed τ = {global_filters['tau']:g}), so nothing to compare with.")
    own = explanation["detection"][-1]
    if own["skipped"]:
        reason = f"confidence above the skip threshold {own['skip_threshold']:g}"
    elif own["threshold"] is None:
        reason = "the class has no average to compare with"
    else:

        disagrees, agrees = (">", "≤") if own["metric"] in LOWER_AGREES else ("<", "≥")
        against = "the class average" if own["threshold_kind"] == "avg" else "the threshold"
        reason = f"{own['metric']} {own['score']:.3f} {disagrees if own['flagged'] else agrees} {against} {own['threshold']:.3f}"
    flag = "**Flagged** as a possible misclassification" if own["flagged"] else "Not flagged"
    rerank = f"; re-ranking picks **{own['reranked_class_name']}**" if own["flagged"] else ""
    lines.append(f"- {flag} ({own['setting']}: {reason}){rerank}.")
    topk = ", ".join(f"{c['class_name']} {100 * c['probability']:.1f} % ({own['metric']} {c['score']:.2f})" for c in explanation["topk"] if c["score"] is not None)
    lines.append(f"- **Top-{len(explanation['topk'])}**: {topk}.")
    runner = explanation["runner_up"]
    if runner and runner.get("mi_filters") is not None:
        grow = ", ".join(f"{f['filter']} (+{f['delta']:.2f})" for f in runner["mi_filters"][:8]) or "none"
        moved = runner["prediction_with_mi"]
        lines.append(
            f"- **To become {runner['class_name']}** (runner-up, {100 * runner['probability']:.1f} %) these MI filters would have to grow: {grow}; "
            f"with them the model predicts {moved['class_name']} ({100 * moved['confidence']:.1f} %)."
        )
    debugged = explanation["debugged"]
    if debugged:
        lines.append(f"- The **debugged model** (trial {debugged['trial_id']}) predicts {debugged['class_name']} at {100 * debugged['confidence']:.1f} %.")
    lines += ["", "![image, Grad-CAM of the prediction, feature maps of the top MC filters](explanation.png)", ""]
    return "\n".join(lines)


def bundle_manifest(explainer: Explainer, item: ImageInput, command: str) -> dict:
    return {
        "results": explainer.results,
        "study": explainer.study.name,
        "study_config_hash": explainer.study.config_hash(),
        "checkpoint": storage.join_uri(explainer.results, "base", "model.pt"),
        "checkpoint_config_hash": explainer.checkpoint.config_hash,
        "input": _input_record(item, explainer.class_names),
        "versions": versions(),
        "command": command,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_bundle(folder: str, explanation: dict, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """The four files of a bundle (see the module docstring)."""
    explanation = {**explanation, "files": list(BUNDLE_FILES)}
    storage.write_text(storage.join_uri(folder, "explanation.json"), json.dumps(explanation, indent=2))
    storage.write_text(storage.join_uri(folder, "explanation.md"), explanation_text(explanation))
    storage.write_bytes(storage.join_uri(folder, "explanation.png"), explanation_figure(explanation, arrays))
    storage.write_text(storage.join_uri(folder, "manifest.json"), json.dumps(manifest, indent=2))


def explain_images(results: str, arguments: list[str], out: str, command: str = "") -> list[str]:
    """Write one bundle per IMAGE argument under ``out``; return the bundles' folders."""
    from tqdm.auto import tqdm

    results = storage.normalise_root(results)
    study = load_results_study(results)
    inputs = resolve_inputs(arguments, study, results)  # bad input fails here, before anything is loaded or written
    explainer = Explainer.load(results, study)
    out = storage.normalise_root(out)
    folders, taken = [], set()
    for item in tqdm(inputs, desc="explain", unit="image", disable=None if len(inputs) > 1 else True):
        name, suffix = item.name, 1
        while name in taken:
            suffix += 1
            name = f"{item.name}-{suffix}"
        taken.add(name)
        folder = storage.join_uri(out, name)
        explanation, arrays = explainer.explain(item)
        write_bundle(folder, explanation, arrays, bundle_manifest(explainer, item, command))
        folders.append(folder)
    return folders


def summary_line(folder: str) -> str:
    """One line per bundle for the terminal."""
    explanation = json.loads(storage.read_text(storage.join_uri(folder, "explanation.json")))
    prediction = explanation["prediction"]
    own = explanation["detection"][-1]
    return (
        f"{folder}: {prediction['class_name']} at {100 * prediction['confidence']:.1f} %, "
        f"{explanation['mc_size']} MC filters, {own['metric']} agreement {own['score']:.2f}, {'FLAGGED' if own['flagged'] else 'not flagged'}"
    )
