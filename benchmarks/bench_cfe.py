"""CFE bank training on cached vectors vs the reference's way, on digits.

The reference trains one generator per class, one class after another, and
runs the frozen trunk on every (augmented) batch of every step.  raycf runs
the trunk once per image and view, caches the pooled vectors, and trains all
C generators together as one C×K×K bank on them.  Both sides here use the
digits study's data, classifier shape (an untrained vgg_tiny: timing does not
depend on the weights), batch size, views and loss, for the same classes (all
10) and the same number of epochs (10, the reference's CUB setting), in this
process on the CPU.

Ratios (higher is better):
* ``cfe_bank_training_speedup``: reference time ÷ bank training time on the
  cached vectors (target ≥ 20);
* ``cfe_cache_and_bank_speedup``: reference time ÷ (caching the vectors +
  bank training): the whole cost, caching included (target ≥ 1: never slower).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks import Ratio
from raycf.cfe import CfeModel, LossWeights, bank_loss, epoch_order, mc_soft_masks
from raycf.config import load_study
from raycf.data import load_splits
from raycf.models import build_model

EPOCHS = 10
STUDY = Path(__file__).resolve().parent.parent / "studies" / "digits.yaml"


def reference_way(model, dataset, num_classes: int, epochs: int, batch_size: int, weights: LossWeights, lr: float, momentum: float) -> None:
    """One generator per class, trained alone; the frozen trunk runs on every augmented batch."""
    head_weight, head_bias = model.fc.weight.detach(), model.fc.bias.detach()
    for target in range(num_classes):
        generator = torch.nn.Linear(model.num_filters, model.num_filters)
        optimizer = torch.optim.SGD(generator.parameters(), lr=lr, momentum=momentum)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(target))
        for _ in range(epochs):
            for images, _labels in loader:
                with torch.no_grad():
                    activations = model.features(images)
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


@torch.no_grad()
def cache_vectors(model, splits, views: int, seed: int) -> torch.Tensor:
    """The features stage's work, in process: every training image, view 0 plain, the others augmented."""
    from raycf.features import view_seed

    train = splits.train
    images = []
    for index in range(len(train)):
        raw = train.raw(index)
        images.append(splits.eval_transform(raw))
        for view in range(1, views):
            torch.manual_seed(view_seed(seed, "train", index, view))
            images.append(splits.train_transform(raw))
    batches = torch.stack(images).split(256)
    return torch.cat([model.features(batch) for batch in batches])


def bank_way(vectors: torch.Tensor, head_weight, head_bias, num_classes: int, epochs: int, batch_size: int, weights: LossWeights, lr: float, momentum: float) -> None:
    """All generators at once on the cached vectors (what the cfe stage's training loop does)."""
    model = CfeModel(num_classes, vectors.shape[1], train_mi=False, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for epoch in range(epochs):
        order = epoch_order(len(vectors), 0, epoch, 0, 1)
        for start in range(0, len(order), batch_size):
            loss, _ = bank_loss(model, vectors[order[start : start + batch_size]], head_weight, head_bias, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def measure() -> list[Ratio]:
    study = load_study(STUDY)
    config = study.cfe
    splits = load_splits(study.data, study.seed)
    torch.manual_seed(0)
    model = build_model(study.model, splits.num_classes).eval()
    head_weight, head_bias = model.fc.weight.detach(), model.fc.bias.detach()
    weights = LossWeights.from_config(config)
    train_views = splits.split("train", augment=True)

    started = time.perf_counter()
    reference_way(model, train_views, splits.num_classes, EPOCHS, config.batch_size, weights, config.lr, config.momentum)
    reference = time.perf_counter() - started

    started = time.perf_counter()
    vectors = cache_vectors(model, splits, config.views, study.seed)
    caching = time.perf_counter() - started
    started = time.perf_counter()
    bank_way(vectors, head_weight, head_bias, splits.num_classes, EPOCHS, config.batch_size, weights, config.lr, config.momentum)
    bank = time.perf_counter() - started

    print(
        f"[bench_cfe] digits, {splits.num_classes} classes, {EPOCHS} epochs, {len(splits.train)} training images: "
        f"reference {reference:.1f} s; caching {len(vectors)} vectors ({config.views} views) {caching:.1f} s; bank training {bank:.2f} s",
        flush=True,
    )
    return [
        Ratio("cfe_bank_training_speedup", reference / bank, ">=", 20),
        Ratio("cfe_cache_and_bank_speedup", reference / (caching + bank), ">=", 1),
    ]
