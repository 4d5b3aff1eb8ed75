"""The gallery (the paper's Figure 2): test images the debugged model fixed, broke or became surer of, with Grad-CAM before and after."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raycf.errors import UserError
from raycf.outputs.report.blocks import GALLERY_GROUPS, Figure, ReportContext, Section
from raycf.outputs.report.figures import GalleryImage, gallery_figure, pick_gallery
from raycf.results.artefacts import PREDICTIONS_FILE

if TYPE_CHECKING:
    pass

def gallery_section(context: ReportContext) -> Section:
    """Test images fixed, broken, or made more confident by the debugged model, with Grad-CAM before and after."""
    section = Section("gallery", "Gallery (as the paper's Figure 2)")
    final = context.final_frame("final.parquet")
    if final is None:
        section.note("final/final.parquet is missing: no debugged model to compare with.")
        return section
    try:
        groups = gallery_images(context)
    except UserError as error:  # e.g. the dataset's folder is not on this machine
        section.note(f"No gallery: {error}")
        return section
    section.paragraph(
        "Grad-CAM (captum, last conv layer) of each model's own prediction; the MC filters are the base model's, from masks/test."
    )
    for group, title in GALLERY_GROUPS.items():
        if groups[group]:
            section.add(Figure(f"gallery_{group}", title, gallery_figure(groups[group], title)))
        else:
            section.note(f"{title}: no such test image.")
    return section


def gallery_images(context: ReportContext) -> dict[str, list[GalleryImage]]:
    """The gallery's images per group, with their Grad-CAM maps before and after."""
    import torch

    from raycf.data.image_store import StoredImages, open_store
    from raycf.data.views import model_inputs
    from raycf.models.build import classifier_from_checkpoint
    from raycf.models.checkpoint import parse_classifier_checkpoint
    from raycf.outputs.gradcam import display_image, grad_cam
    from raycf.results.artefacts import (
        base_model_bytes,
        class_names,
        debugged_model_bytes,
        load_masks,
        store_ref,
    )

    study, results = context.study, context.results
    base_bytes = base_model_bytes(results)
    debugged = debugged_model_bytes(results, base_bytes)
    predictions = context.frame("final", PREDICTIONS_FILE)
    if debugged is None or predictions is None:
        raise UserError("the best trial's checkpoint or final/predictions.parquet is not in the results folder any more")
    test = {model: rows.sort_values("image_index") for model, rows in predictions[predictions["split"] == "test"].groupby("model")}
    before_rows, after_rows = test["base"], test["debugged"]
    store = open_store(store_ref(results))
    dataset = StoredImages(store, "test")
    if len(dataset) != len(before_rows):
        raise UserError(f"the test split has {len(dataset)} images but the study's predictions {len(before_rows)}: the dataset changed since the study ran")
    before = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(base_bytes, "base model"))
    after = classifier_from_checkpoint(study.model, parse_classifier_checkpoint(debugged[1], "debugged model"))
    masks = load_masks(results, "test", ["mc_mask", "a"])
    global_mc = context.frame("analysis", "global_mc.parquet")
    sets = None if global_mc is None else global_mc.pivot(index="class", columns="filter", values="in_global").sort_index().sort_index(axis=1).to_numpy(dtype=bool)
    labels = before_rows["label"].to_numpy()
    pred_before, confidence_before = before_rows["pred"].to_numpy(), before_rows["confidence"].to_numpy()
    pred_after, confidence_after = after_rows["pred"].to_numpy(), after_rows["confidence"].to_numpy()
    names = class_names(results)
    ids = store.ids("test")
    groups: dict[str, list[GalleryImage]] = {}
    for group, indices in pick_gallery(labels, pred_before, confidence_before, pred_after, confidence_after).items():
        if len(indices) == 0:
            groups[group] = []
            continue
        images = model_inputs(torch.stack([dataset[int(i)][0] for i in indices]), study.data.image_size, preprocess=study.data.preprocess)  # read only to draw them
        cams_before = grad_cam(before, images, pred_before[indices].tolist()).numpy()
        cams_after = grad_cam(after, images, pred_after[indices].tolist()).numpy()
        groups[group] = []
        for position, index in enumerate(indices):
            mask, activations = masks["mc_mask"][index], masks["a"][index]
            filters = [int(k) for k in np.flatnonzero(mask)[np.argsort(-activations[mask], kind="stable")]]
            groups[group].append(
                GalleryImage(
                    image_id=ids[index],
                    label=names[int(labels[index])],
                    image=display_image(images[position]),
                    cam_before=cams_before[position],
                    cam_after=cams_after[position],
                    pred_before=names[int(pred_before[index])],
                    confidence_before=float(confidence_before[index]),
                    pred_after=names[int(pred_after[index])],
                    confidence_after=float(confidence_after[index]),
                    mc_filters=filters,
                    mc_size=len(filters),
                    in_global=None if sets is None else int((sets[int(pred_before[index])] & mask).sum()),
                    global_size=None if sets is None else int(sets[int(pred_before[index])].sum()),
                )
            )
    return groups
