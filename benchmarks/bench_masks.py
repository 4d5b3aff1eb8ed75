"""Masks pipeline throughput vs plain batch inference, through the same Ray Data shape, on digits.

Three pipelines over the same images (every digits image, three views: 5,391
images), each ``records → map_batches(actor pool, same size, same batch size)
→ write_parquet``, timed end to end (actor start-up included):

* plain batch inference: the classifier on the images (logits, prediction,
  confidence, pooled vector): the features stage's actor;
* the masks stage's pipeline: cached vectors in (read as the stage reads
  them), MC masks of the top-k classes and masked predictions out;
* masks from images: classifier and bank in one actor (what it costs when
  nothing is cached).

The classifier is an untrained vgg_tiny and the bank a random one (timing does
not depend on the weights).  Each pipeline runs twice, alternating; the
faster run counts.  Ratios (images/s ÷ images/s, higher is better, target
≥ 0.8): ``masks_pipeline_vs_plain_inference`` and
``masks_from_images_vs_plain_inference``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from benchmarks import Ratio
from raycf.cfe import CfeModel, bank_from_model
from raycf.checkpoint import ClassifierCheckpoint
from raycf.config import load_study
from raycf.data import load_splits
from raycf.features import FeatureExtractor, table_arrays
from raycf.masks import INPUT_COLUMNS, MaskComputer, compute_masks, masks_table
from raycf.models import build_model
from raycf.storage import read_table

STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"
VIEWS = 3
ACTORS = 2
BATCH_SIZE = 256
TOPK = 3


class ImageMaskComputer(FeatureExtractor):
    """Classifier and bank in one actor: images in, mask rows out."""

    def __init__(self, study, model_location: str, bank_location: str, topk: int):
        super().__init__(study, model_location, use_gpu=False)
        self.masks = MaskComputer(bank_location, topk, use_gpu=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        features = table_arrays(super().__call__(batch).select(INPUT_COLUMNS))
        computed = compute_masks(self.masks.bank, torch.from_numpy(features["a"]), torch.from_numpy(features["logits"]), self.masks.topk)
        return masks_table(features, computed)


def records(splits) -> list[dict]:
    rows = []
    for split in ("train", "val", "test"):
        for index in range(len(getattr(splits, split))):
            for view in range(VIEWS):
                rows.append({"folder": split, "split": split, "image_index": index, "view": view})
    return rows


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure() -> list[Ratio]:
    import ray

    from raycf.features import data_context
    from raycf.pipeline import ensure_ray

    ensure_ray()
    data_context()
    study = load_study(STUDY)
    splits = load_splits(study.data, study.seed)
    items = records(splits)
    folder = Path(tempfile.mkdtemp(prefix="raycf-bench-masks-"))
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes)
    classifier = ClassifierCheckpoint(study.model.arch, model.num_filters, splits.num_classes, splits.class_names, study.data.image_size, "bench", model.state_dict())
    (folder / "model.pt").write_bytes(classifier.to_bytes())
    head = model.fc
    bank = bank_from_model(CfeModel(splits.num_classes, model.num_filters, train_mi=False, seed=0), head.weight, head.bias)
    (folder / "bank.pt").write_bytes(bank.to_bytes())
    pool = ray.data.ActorPoolStrategy(size=ACTORS)
    model_location, bank_location = str(folder / "model.pt"), str(folder / "bank.pt")

    def plain(run: int) -> None:
        ray.data.from_items(items).map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={"study": study, "model_location": model_location, "use_gpu": False},
            compute=pool, batch_size=BATCH_SIZE, batch_format="pyarrow",
        ).write_parquet(str(folder / f"features-{run}"))  # fmt: skip

    def masks(run: int) -> None:
        ray.data.from_arrow(read_table(str(folder / "features-0"), columns=INPUT_COLUMNS)).map_batches(
            MaskComputer,
            fn_constructor_kwargs={"bank_location": bank_location, "topk": TOPK, "use_gpu": False},
            compute=pool, batch_size=BATCH_SIZE, batch_format="pyarrow",
        ).write_parquet(str(folder / f"masks-{run}"))  # fmt: skip

    def from_images(run: int) -> None:
        ray.data.from_items(items).map_batches(
            ImageMaskComputer,
            fn_constructor_kwargs={"study": study, "model_location": model_location, "bank_location": bank_location, "topk": TOPK},
            compute=pool, batch_size=BATCH_SIZE, batch_format="pyarrow",
        ).write_parquet(str(folder / f"image-masks-{run}"))  # fmt: skip

    seconds = {"plain": [], "masks": [], "from_images": []}
    try:
        for run in range(2):
            seconds["plain"].append(timed(lambda run=run: plain(run)))
            seconds["masks"].append(timed(lambda run=run: masks(run)))
            seconds["from_images"].append(timed(lambda run=run: from_images(run)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    best = {name: min(values) for name, values in seconds.items()}
    count = len(items)
    print(
        f"[bench_masks] {count} images, {ACTORS} actors, batch {BATCH_SIZE}: plain inference {count / best['plain']:.0f} images/s, "
        f"masks pipeline {count / best['masks']:.0f} images/s, masks from images {count / best['from_images']:.0f} images/s "
        f"(runs: {', '.join(f'{name} ' + '/'.join(f'{s:.1f}' for s in values) + ' s' for name, values in seconds.items())})",
        flush=True,
    )
    return [
        Ratio("masks_pipeline_vs_plain_inference", best["plain"] / best["masks"], ">=", 0.8),
        Ratio("masks_from_images_vs_plain_inference", best["plain"] / best["from_images"], ">=", 0.8),
    ]
