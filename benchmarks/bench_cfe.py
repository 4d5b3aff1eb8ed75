"""CFE bank training on cached vectors vs the reference's way, on digits.

The reference trains one generator per class, one class after another, and
runs the frozen trunk on every (augmented) batch of every step.  raycf runs
the trunk once per image and view, caches the pooled vectors (the features
stage), and trains all C generators together as one C×K×K bank on them (the
cfe stage's loop, :func:`raycf.training.cfe.cfe_train_loop`).  Both sides here
use the digits study's data (the uint8 image store), classifier shape (an
untrained vgg_tiny: timing does not depend on the weights), batch size, views,
augmentation and loss, for the same classes (all 10) and the same number of
epochs (10, the reference's CUB setting), in this process on the CPU.

* reference: per class, a shuffled loader over the stored training images,
  each batch augmented afresh (:func:`raycf.data.views.model_inputs`), the trunk
  run on it, one SGD step of that class's generator;
* caching: the features stage's actor (:class:`~raycf.stages.features.FeatureExtractor`)
  called in this process on every training record (``cfe.views`` views per
  image), its vectors written where the cfe stage reads them;
* bank training: :func:`~raycf.training.cfe.cfe_train_loop` on a
  :class:`~raycf.training.session.LocalSession` (its reports, class
  statistics and checkpoints included).

Ratios (higher is better):
* ``cfe_bank_training_speedup``: reference time ÷ bank training time on the
  cached vectors (target ≥ 20);
* ``cfe_cache_and_bank_speedup``: reference time ÷ (caching the vectors +
  bank training): the whole cost, caching included (target ≥ 1: never slower).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from benchmarks import Ratio
from raycf.results.artefacts import AUGMENTED_FOLDER
from raycf.models.checkpoint import ClassifierCheckpoint
from raycf.config import load_study
from raycf.data.datasets import load_splits
from raycf.data.image_store import StoredImages, StoreRef, open_store, write_store_here
from raycf.training.loops import batched_collate
from raycf.method.bank import LossWeights, mc_soft_masks
from raycf.models.build import build_model
from raycf.stages.features import FeatureExtractor, feature_records
from raycf.training.cfe import CfeJob, cfe_train_loop
from raycf.training.session import LocalSession
from raycf.data.views import epoch_seeds, model_inputs

EPOCHS = 10
STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"


def reference_way(model, study, store, num_classes: int, epochs: int, weights: LossWeights) -> None:
    """One generator per class, trained alone; the frozen trunk runs on every freshly augmented batch."""
    config, data = study.cfe, study.data
    head_weight, head_bias = model.fc.weight.detach(), model.fc.bias.detach()
    train = StoredImages(store, "train")
    for target in range(num_classes):
        generator = torch.nn.Linear(model.num_filters, model.num_filters)
        optimizer = torch.optim.SGD(generator.parameters(), lr=config.lr, momentum=config.momentum)
        loader = DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(target), collate_fn=batched_collate(train))
        for epoch in range(epochs):
            for images, _labels, indices in loader:
                with torch.no_grad():
                    inputs = model_inputs(images, data.image_size, data.augment, epoch_seeds(study.seed, target * epochs + epoch, indices))
                    activations = model.features(inputs)
                masks = mc_soft_masks(generator(activations))
                loss = single_generator_loss(masks, activations, head_weight, head_bias, target, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def single_generator_loss(masks, activations, head_weight, head_bias, target: int, weights: LossWeights) -> torch.Tensor:
    """The bank's per-sample MC loss terms for one generator whose target is ``target``."""
    logits = (activations * masks) @ head_weight.T + head_bias
    targets = torch.full((len(masks),), target)
    cross_entropy = torch.nn.functional.cross_entropy(logits, targets)
    return cross_entropy + weights.mc_sparsity * masks.sum(1).mean() - weights.mc_logits * logits[:, target].mean()


def cache_vectors(study, model_location: str, images: StoreRef, num_train: int, results: Path) -> int:
    """The features stage's work, in this process: every training image, view 0 plain, the others augmented.

    Writes ``results/features/{train,train_augmented}/`` as the stage does
    (what :func:`raycf.results.artefacts.load_features` reads); returns the vector count.
    """
    extractor = FeatureExtractor(study, model_location, images, use_gpu=False)
    records = feature_records({"train": num_train, "val": 0, "test": 0}, study.cfe.views)
    batch_size = study.features.batch_size
    table = pa.concat_tables([extractor(pa.Table.from_pylist(records[start : start + batch_size])) for start in range(0, len(records), batch_size)])
    for folder in ("train", AUGMENTED_FOLDER):
        part = table.filter(pc.equal(table.column("folder"), folder)).drop_columns(["folder"])
        (results / "features" / folder).mkdir(parents=True)
        pq.write_table(part, results / "features" / folder / "part-0.parquet")
    return table.num_rows


def measure() -> list[Ratio]:
    study = load_study(STUDY, [f"cfe.epochs={EPOCHS}", "cfe.train_mi=false"])  # the reference trains MC generators only
    splits = load_splits(study.data, study.seed)
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes).eval()
    head_weight, head_bias = model.fc.weight.detach(), model.fc.bias.detach()
    weights = LossWeights.from_config(study.cfe)
    with tempfile.TemporaryDirectory(prefix="raycf-bench-cfe-") as scratch:
        folder = Path(scratch)
        write_store_here(splits, str(folder / "images"))
        images = StoreRef(str(folder / "images"), "bench-cfe-images")
        checkpoint = ClassifierCheckpoint(
            arch=model.arch, num_filters=model.num_filters, num_classes=splits.num_classes, class_names=splits.class_names,
            image_size=study.data.image_size, config_hash="bench", state_dict=model.state_dict(),
        )  # fmt: skip
        (folder / "model.pt").write_bytes(checkpoint.to_bytes())

        started = time.perf_counter()
        reference_way(model, study, open_store(images), splits.num_classes, EPOCHS, weights)
        reference = time.perf_counter() - started

        started = time.perf_counter()
        vectors = cache_vectors(study, str(folder / "model.pt"), images, len(splits.train), folder)
        caching = time.perf_counter() - started

        job = CfeJob(
            study=study, results=str(folder), head_weight=head_weight, head_bias=head_bias,
            class_names=splits.class_names, bank_location=str(folder / "bank.pt"),
        )  # fmt: skip
        started = time.perf_counter()
        cfe_train_loop(job, LocalSession(folder / "cfe-run"))
        bank = time.perf_counter() - started

    print(
        f"[bench_cfe] digits, {splits.num_classes} classes, {EPOCHS} epochs, {len(splits.train)} training images: "
        f"reference {reference:.1f} s; caching {vectors} vectors ({study.cfe.views} views) {caching:.1f} s; bank training {bank:.2f} s",
        flush=True,
    )
    return [
        Ratio("cfe_bank_training_speedup", reference / bank, ">=", 20),
        Ratio("cfe_cache_and_bank_speedup", reference / (caching + bank), ">=", 1),
    ]
