"""The filter atlas (issue 24, item 4): per class, the filters a user needs to see a bug, each as a card.

``raycf atlas RESULTS --class NAME [--out DIR]`` writes one class's cards;
the report's *Filter atlas* section draws every class's (studies with at
most :data:`REPORT_MAX_CLASSES` classes).  The rankings are
:mod:`raycf.method.atlas`'s: a class's top global-MC filters by frequency (at
``analysis.tau``) and by mean contribution ``W[c, j] · a_j`` over its correct
training images, and its error-specific filters (frequent in the MC sets of
the validation errors predicted as the class, rare in its correct
predictions).  A card shows the filter's top-activating training images
with the filter's feature map over each (the base model's last conv layer,
upsampled, :func:`raycf.outputs.gradcam.filter_heatmaps_over`).

The class's folder ``<out>/<class>/`` holds ``atlas.png`` (the cards),
``atlas.json`` (every number) and ``atlas.md`` (the same in a few lines).
Runs on the CPU, in this process, with no Ray cluster.

Planted studies: :func:`planted_mask` and :func:`planted_versions` are the
hooks that give each card the share of its images carrying the planted
feature and the filter's response to it (None here until a study's image
store records them).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from raycf.config import StudyConfig
from raycf.errors import UserError
from raycf.method.atlas import RANKINGS, TOP_FILTERS, TOP_IMAGES, ClassAtlas, class_atlas, planted_response
from raycf.method.global_mc import global_mc_of
from raycf.results import storage

REPORT_MAX_CLASSES = 20
REPORT_TOP_FILTERS = 2  # per ranking, in the report
REPORT_TOP_IMAGES = 5
RANKING_TITLES = {
    "frequency": "top global-MC filters by frequency",
    "contribution": "top filters by contribution W·a",
    "error": "error-specific filters (in the MC sets of validation errors predicted as the class, rare in its correct predictions)",
}
ATLAS_FILES = ("atlas.png", "atlas.json", "atlas.md")


def planted_mask(results: str) -> np.ndarray | None:
    """One boolean per training image (masks/train order) saying whether it carries the planted feature; None: not a planted study."""
    from raycf.data.image_store import open_store, read_planted
    from raycf.results.artefacts import load_results_study, store_ref

    if load_results_study(results).data.plant is None:
        return None
    flags = read_planted(open_store(store_ref(results)), "train")
    image_index = storage.read_table(storage.join_uri(results, "masks", "train"), columns=["image_index"]).column("image_index").to_numpy()
    return flags[image_index]


def planted_versions(results: str, image_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Training images ``image_indices`` with and without the planted feature (two N×H×W×3 uint8 arrays, stored side, the same
    images); None: not a planted study.  A card's planted response is the filter's mean ``a_j`` on the first minus on the second.

    "Without" is the image as stored where it is clean; an image stored with the feature has no clean copy, so it is left out of both.
    """
    from raycf.data.image_store import open_store, read_planted
    from raycf.method.plant import apply_feature
    from raycf.results.artefacts import load_results_study, store_ref

    plant = load_results_study(results).data.plant
    if plant is None:
        return None
    store = open_store(store_ref(results))
    indices = np.asarray(image_indices, dtype=np.int64)
    clean = indices[~read_planted(store, "train")[indices]]
    if not len(clean):
        return None
    pixels = np.asarray(store.images("train")[clean])
    return apply_feature(pixels, plant), pixels


def check_class(name: str, class_names: list[str]) -> int:
    """The index of class ``name``; UserError (one line, the classes listed) for a class the study does not have."""
    if name not in class_names:
        raise UserError(f"--class {name}: unknown class {name!r} (the study's classes: {', '.join(class_names)})")
    return class_names.index(name)


def folder_name(name: str) -> str:
    """A class name as a folder name (``T-shirt/top`` -> ``T-shirt_top``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


@dataclass
class AtlasSource:
    """What the atlas reads, once per results folder: the masks, the global-MC counts, the head's weights, the base model and the images."""

    results: str
    study: StudyConfig
    class_names: list[str]
    counts: np.ndarray  # C×K
    accepted: np.ndarray  # C
    head_weight: np.ndarray  # C×K
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    model: Any  # FilterClassifier
    store: Any  # ImageStore

    @classmethod
    def load(cls, results: str, study: StudyConfig | None = None) -> "AtlasSource":
        """Read ``results``'s masks (train, val), CFE bank head, base model and image store."""
        from raycf.data.image_store import open_store
        from raycf.models.build import classifier_from_checkpoint
        from raycf.models.checkpoint import load_classifier_checkpoint
        from raycf.results.artefacts import load_results_study, load_study_data, store_ref

        results = storage.normalise_root(results)
        study = study or load_results_study(results)
        for needed in ("masks/train", "masks/val", "cfe/bank.pt", "base/model.pt"):
            if not storage.exists(storage.join_uri(results, needed)):
                raise UserError(f"{results}: no {needed} (expected a study that ran its masks stage: `raycf masks STUDY`)")
        data = load_study_data(results, splits=("val",))
        global_mc = global_mc_of(data.train, data.num_classes, study.analysis.tau)
        checkpoint = load_classifier_checkpoint(storage.join_uri(results, "base", "model.pt"), expected_arch=study.model.arch)
        return cls(
            results=results,
            study=study,
            class_names=data.class_names,
            counts=global_mc.counts,
            accepted=global_mc.images,
            head_weight=data.head_weight,
            train=data.train,
            val=data.splits["val"],
            model=classifier_from_checkpoint(study.model, checkpoint).eval(),
            store=open_store(store_ref(results)),
        )

    def atlas(self, cls: int, top_filters: int = TOP_FILTERS, top_images: int = TOP_IMAGES) -> ClassAtlas:
        """Class ``cls``'s cards, with the planted numbers when the study plants a feature."""
        atlas = class_atlas(
            cls,
            self.class_names[cls],
            counts=self.counts,
            accepted=self.accepted,
            head_weight=self.head_weight,
            train=self.train,
            val=self.val,
            top_filters=top_filters,
            top_images=top_images,
            planted=planted_mask(self.results),
        )
        for card in atlas.cards:
            versions = planted_versions(self.results, self.train["image_index"][card.image_rows])
            if versions is not None:
                card.planted_response = planted_response(*(self.activations(images, card.filter) for images in versions))
        return atlas

    def inputs(self, rows: list[int]) -> torch.Tensor:
        """The model inputs (evaluation transform) of training rows ``rows`` (masks/train order)."""
        from raycf.outputs.explain import model_input

        pixels = self.store.images("train")
        return torch.stack([model_input(pixels[int(self.train["image_index"][row])], self.study.data) for row in rows])

    @torch.no_grad()
    def activations(self, images: np.ndarray, filter_index: int) -> np.ndarray:
        """The base model's pooled ``a_j`` on stored-side uint8 images."""
        from raycf.outputs.explain import model_input

        inputs = torch.stack([model_input(image, self.study.data) for image in images])
        return self.model.features(inputs)[:, filter_index].numpy()

    def image_ids(self, rows: list[int]) -> list[str]:
        ids = self.store.ids("train")
        return [str(ids[int(self.train["image_index"][row])]) for row in rows]


HEAT_ALPHA = 0.5


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """An H×W×3 image in [0, 1] blended with a [0, 1] heat map under matplotlib's inferno colour map."""
    from matplotlib import colormaps

    return (1 - alpha) * image + alpha * colormaps["inferno"](heat)[..., :3]


def card_strip(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Images of the same size side by side, ``gap`` white pixels apart (one axes per card instead of one per image: the report draws many)."""
    height, width = images[0].shape[:2]
    strip = np.ones((height, len(images) * (width + gap) - gap, 3))
    for position, image in enumerate(images):
        strip[:, position * (width + gap) : position * (width + gap) + width] = image
    return strip


def atlas_figure(source: AtlasSource, atlas: ClassAtlas) -> bytes:
    """One row per card: the filter's top-activating training images with its feature map over each (inferno, upsampled), and its numbers."""
    from raycf.outputs.gradcam import display_image, unit_heatmaps
    from raycf.outputs.report.blocks import new_figure, png_bytes

    cards = atlas.cards
    columns = max((len(card.image_rows) for card in cards), default=1)
    figure = new_figure(1.5 * columns + 2.6, 1.75 * max(len(cards), 1) + 0.4)
    if not cards:
        figure.text(0.5, 0.5, f"{atlas.name}: no filter to show (no accepted training image, no error)", ha="center", va="center")
        return png_bytes(figure)
    axes = figure.subplots(len(cards), 1, squeeze=False)[:, 0]
    names = source.class_names
    rows = sorted({row for card in cards for row in card.image_rows})  # one forward pass for every card's images
    inputs = source.inputs(rows)
    with torch.no_grad():
        maps = source.model.feature_maps(inputs)
    for panel, card in zip(axes, cards):
        at = [rows.index(row) for row in card.image_rows]
        heat = unit_heatmaps(maps[at, card.filter], tuple(inputs.shape[-2:])).numpy()
        strip = card_strip([overlay(display_image(inputs[position]), heat[index]) for index, position in enumerate(at)])
        panel.imshow(strip, extent=(0, len(card.image_rows), 1, 0), aspect="auto" if strip.shape[1] > 0 else "equal")
        panel.set_xlim(0, columns)
        panel.set_xticks([position + 0.5 for position in range(len(card.image_rows))])
        panel.set_xticklabels([f"{names[int(source.train['label'][row])]}  a={value:.2f}" for row, value in zip(card.image_rows, card.activations)], fontsize="x-small")
        panel.xaxis.tick_top()
        panel.set_yticks([])
        for side in panel.spines.values():
            side.set_visible(False)
        panel.set_ylabel(card_label(card), fontsize="x-small", rotation=0, ha="right", va="center", labelpad=6)
    figure.suptitle(f"Filter atlas of class {atlas.name}", fontsize="small")
    return png_bytes(figure)


def card_label(card) -> str:
    """A card's numbers, beside its images."""
    lines = [f"filter {card.filter} ({card.ranking})", f"MC in {card.count} accepted", f"W·a {card.contribution:+.2f}", f"errors {100 * card.error_share:.0f} % / correct {100 * card.correct_share:.0f} %"]
    if card.planted_share is not None:
        lines.append(f"planted {100 * card.planted_share:.0f} %")
    if card.planted_response is not None:
        lines.append(f"Δa planted {card.planted_response:+.2f}")
    return "\n".join(lines)


def atlas_record(source: AtlasSource, atlas: ClassAtlas) -> dict:
    """``atlas.json``: the class, its counts and every card with its images' ids."""
    cards = []
    for card in atlas.cards:
        record = asdict(card)
        record["image_ids"] = source.image_ids(card.image_rows)
        record["image_labels"] = [source.class_names[int(source.train["label"][row])] for row in card.image_rows]
        cards.append(record)
    return {
        "class": atlas.name,
        "class_index": atlas.cls,
        "tau": source.study.analysis.tau,
        "accepted_train_images": atlas.accepted,
        "val_errors_predicted_as_class": atlas.errors,
        "val_correct_predictions": atlas.correct,
        "cards": cards,
    }


def atlas_text(record: dict) -> str:
    """``atlas.md``: the cards in a few lines per ranking."""
    lines = [
        f"# Filter atlas of class {record['class']}",
        "",
        f"{record['accepted_train_images']} accepted training images (τ = {record['tau']}); on validation, "
        f"{record['val_errors_predicted_as_class']} errors predicted as {record['class']} and {record['val_correct_predictions']} correct predictions.",
    ]
    for ranking in RANKINGS:
        cards = [card for card in record["cards"] if card["ranking"] == ranking]
        title = RANKING_TITLES[ranking]
        lines += ["", f"## {title[0].upper()}{title[1:]}", ""]
        if not cards:
            lines.append("None.")
        for card in cards:
            planted = "" if card["planted_share"] is None else f", {100 * card['planted_share']:.0f} % of its images planted"
            lines.append(
                f"- filter {card['filter']}: MC in {card['count']} accepted images, mean W·a {card['contribution']:+.3f}, "
                f"in {100 * card['error_share']:.0f} % of the errors' MC sets and {100 * card['correct_share']:.0f} % of the correct ones{planted}; "
                f"top images {', '.join(f'{image} ({label})' for image, label in zip(card['image_ids'], card['image_labels']))}"
            )
    return "\n".join(lines) + "\n"


def write_class_atlas(results: str, class_name: str, out: str, top_filters: int = TOP_FILTERS, top_images: int = TOP_IMAGES) -> str:
    """``raycf atlas``: write ``<out>/<class>/atlas.{png,json,md}``; return the folder.  An unknown class fails before anything is read but the class list."""
    from raycf.results.artefacts import class_names

    results = storage.normalise_root(results)
    if not storage.exists(storage.join_uri(results, "cfe", "classes.parquet")):
        raise UserError(f"{results}: no cfe/classes.parquet (expected a study that ran its masks stage: `raycf masks STUDY`)")
    cls = check_class(class_name, class_names(results))
    source = AtlasSource.load(results)
    atlas = source.atlas(cls, top_filters, top_images)
    record = atlas_record(source, atlas)
    folder = storage.join_uri(storage.normalise_root(out), folder_name(class_name))
    storage.write_bytes(storage.join_uri(folder, "atlas.png"), atlas_figure(source, atlas))
    storage.write_text(storage.join_uri(folder, "atlas.json"), json.dumps(record, indent=2))
    storage.write_text(storage.join_uri(folder, "atlas.md"), atlas_text(record))
    return folder


def atlas_section(context):
    """The report's *Filter atlas*: every class's cards (at most :data:`REPORT_MAX_CLASSES` classes)."""
    from raycf.outputs.report.blocks import Figure, Section

    section = Section("atlas", "Filter atlas")
    results = context.results
    if not all(storage.exists(storage.join_uri(results, needed)) for needed in ("masks/train", "masks/val", "cfe/bank.pt", "base/model.pt")):
        section.note("masks/train, masks/val, cfe/bank.pt or base/model.pt is missing: run `raycf masks STUDY`.")
        return section
    try:
        source = AtlasSource.load(results, context.study)
    except UserError as error:  # e.g. the image store cannot be read here
        section.note(f"No atlas: {error}")
        return section
    if len(source.class_names) > REPORT_MAX_CLASSES:
        section.note(f"{len(source.class_names)} classes: too many to draw here; `raycf atlas {results} --class NAME` writes one class's cards.")
        return section
    section.paragraph(
        f"Per class, its {REPORT_TOP_FILTERS} {RANKING_TITLES['frequency']}, its {REPORT_TOP_FILTERS} {RANKING_TITLES['contribution']} and its "
        f"{REPORT_TOP_FILTERS} {RANKING_TITLES['error']}. Each row is a filter: its {REPORT_TOP_IMAGES} top-activating training images with the "
        f"filter's feature map over them. `raycf atlas {results} --class NAME` writes more of a class's cards, with every number."
    )
    for cls, name in enumerate(source.class_names):
        atlas = source.atlas(cls, REPORT_TOP_FILTERS, REPORT_TOP_IMAGES)
        section.add(Figure(f"atlas_{cls}", f"Class {name}: {len(atlas.cards)} cards; {atlas.errors} validation errors predicted as {name}.", atlas_figure(source, atlas)))
    return section
