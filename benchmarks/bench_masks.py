"""Masks pipeline throughput vs plain batch inference, through the same Ray Data shape, on digits.

Three pipelines over the same images (every digits image, three views: 5,391
images, from the uint8 image store written beforehand), each ``records →
map_batches(actor pool, same size, same batch size) → write_parquet``, timed
end to end (actor start-up included):

* plain batch inference: the classifier on the images (logits, prediction,
  confidence, pooled vector): the features stage's actor;
* the masks stage's pipeline: cached vectors in (read into memory and handed
  to Ray Data one table per split, as the stage does), MC masks of the top-k
  classes and masked predictions out;
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
import pyarrow.compute as pc
import torch

from benchmarks import Ratio
from raycf.results.arrow import table_arrays
from raycf.models.checkpoint import ClassifierCheckpoint
from raycf.config import load_study
from raycf.data.datasets import SPLITS, load_splits
from raycf.data.image_store import StoreRef, write_store_here
from raycf.method.bank import CfeModel, bank_from_model
from raycf.method.masks import compute_masks
from raycf.models.build import build_model
from raycf.stages.features import FeatureExtractor
from raycf.stages.masks import INPUT_COLUMNS, MaskComputer, masks_table
from raycf.results.storage import read_table

STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"
VIEWS = 3
ACTORS = 2
BATCH_SIZE = 256
TOPK = 3


class ImageMaskComputer(FeatureExtractor):
    """Classifier and bank in one actor: images in, mask rows out."""

    def __init__(self, study, model_location: str, images: StoreRef, bank_location: str, topk: int):
        super().__init__(study, model_location, images, use_gpu=False)
        self.masks = MaskComputer(bank_location, topk, use_gpu=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        features = table_arrays(super().__call__(batch).select(INPUT_COLUMNS))
        computed = compute_masks(self.masks.bank, torch.from_numpy(features["a"]), torch.from_numpy(features["logits"]), self.masks.topk)
        return masks_table(features, computed)


def records(splits) -> list[dict]:
    rows = []
    for split in SPLITS:
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

    from raycf.runtime.cluster import ensure_ray
    from raycf.runtime.ray_data import data_context

    ensure_ray()
    data_context()
    study = load_study(STUDY)
    splits = load_splits(study.data, study.seed)
    items = records(splits)
    folder = Path(tempfile.mkdtemp(prefix="raycf-bench-masks-"))
    write_store_here(splits, str(folder / "images"))
    images = StoreRef(str(folder / "images"), "bench-masks-images")
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes)
    classifier = ClassifierCheckpoint(
        arch=study.model.arch, num_filters=model.num_filters, num_classes=splits.num_classes, class_names=splits.class_names,
        image_size=study.data.image_size, config_hash="bench", state_dict=model.state_dict(),
    )  # fmt: skip
    (folder / "model.pt").write_bytes(classifier.to_bytes())
    head = model.fc
    bank = bank_from_model(CfeModel(splits.num_classes, model.num_filters, train_mi=False, seed=0), head.weight, head.bias)
    (folder / "bank.pt").write_bytes(bank.to_bytes())
    pool = ray.data.ActorPoolStrategy(size=ACTORS)
    model_location, bank_location = str(folder / "model.pt"), str(folder / "bank.pt")

    def plain(run: int) -> None:
        ray.data.from_items(items).map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={"study": study, "model_location": model_location, "images": images, "use_gpu": False},
            compute=pool, batch_size=BATCH_SIZE, batch_format="pyarrow",
        ).write_parquet(str(folder / f"features-{run}"))  # fmt: skip

    def masks(run: int) -> None:
        vectors = read_table(str(folder / "features-0"), columns=INPUT_COLUMNS)
        tables = [vectors.filter(pc.equal(vectors.column("split"), split)) for split in SPLITS]  # one block per split, as the stage has them
        ray.data.from_arrow(tables).map_batches(
            MaskComputer,
            fn_constructor_kwargs={"bank_location": bank_location, "topk": TOPK, "use_gpu": False},
            compute=pool, batch_size=BATCH_SIZE, batch_format="pyarrow",
        ).write_parquet(str(folder / f"masks-{run}"))  # fmt: skip

    def from_images(run: int) -> None:
        ray.data.from_items(items).map_batches(
            ImageMaskComputer,
            fn_constructor_kwargs={"study": study, "model_location": model_location, "images": images, "bank_location": bank_location, "topk": TOPK},
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
