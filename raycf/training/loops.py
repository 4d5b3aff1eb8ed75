"""Plain PyTorch pieces every training loop shares: seeds, loaders, device batches, one epoch, evaluation.

No Ray here: a loop gets its rank, world size and device from its
:class:`~raycf.training.session.Session`.  Batches come from the uint8 image
store (or the frozen-prefix cache) through pinned memory and a non-blocking
copy; the inputs are made on the device.  Metrics are accumulated on the
device and read back once per epoch (no host sync per step), then summed over
ranks when a process group exists.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from raycf.models.precision import DTYPES, Precision
from raycf.training.throughput import ThroughputMeter, mfu, peak_flops, step_flops, step_precision

# loss_fn(logits, pooled vectors, labels) -> (loss, {part name: detached scalar tensor (batch mean)}).  A loss with
# ``for_epoch()`` gives train_one_epoch a per-epoch copy whose ``epoch_sums()`` adds parts summed over the epoch's images.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
# forward(model, inputs) -> (logits, pooled vectors)
Forward = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the random draws (dropout) of one (study seed, epoch, rank)."""
    return seed * 7919 + epoch * 104729 + rank


def train_loader(dataset: Dataset, global_batch_size: int, seed: int, rank: int, world_size: int, loader_workers: int = 0) -> tuple[DataLoader, DistributedSampler]:
    """A shuffled loader over this rank's shard; the order depends only on (seed, epoch).

    The sampler is built explicitly so the order is reproducible: the control
    and the debugged run see the same batches, and a resumed run sees what it
    would have seen.  Call ``sampler.set_epoch(epoch)`` before each epoch.
    A last batch of one image is merged into the batch before it
    (:class:`NoSingletonBatches`).
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(
        dataset,
        batch_sampler=NoSingletonBatches(sampler, max(1, global_batch_size // world_size)),
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=batched_collate(dataset),
    )
    return loader, sampler


class NoSingletonBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` indices in ``sampler``'s order; a last batch of one joins the batch before it.

    BatchNorm cannot train on a batch of one (one value per channel after
    global pooling), so such a batch is never formed.  It is merged rather
    than dropped: every training image is seen every epoch, and each rank of
    a DDP run (equal shards) takes the same number of steps.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        starts = list(range(0, len(indices), self.batch_size))
        if self.batch_size > 1 and len(starts) > 1 and len(indices) - starts[-1] == 1:
            starts.pop()
        ends = [*starts[1:], len(indices)]
        return iter([indices[start:end] for start, end in zip(starts, ends)])

    def __len__(self) -> int:
        count = len(self.sampler)
        batches = -(-count // self.batch_size)
        return batches - 1 if self.batch_size > 1 and batches > 1 and count % self.batch_size == 1 else batches


def batched_collate(dataset: Dataset) -> Callable | None:
    """The identity for a dataset that reads whole batches at once (``__getitems__``: one slice of the store per batch)."""
    return (lambda batch: batch) if callable(getattr(dataset, "__getitems__", None)) else None


def eval_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, loader_workers: int = 0) -> DataLoader:
    """A loader over this rank's contiguous-stride shard, with no padding duplicates."""
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=loader_workers, pin_memory=torch.cuda.is_available(), collate_fn=batched_collate(dataset)
    )


def on_device(value: Any, device: torch.device) -> Any:
    """A tensor (or a tuple of them) copied to ``device`` without blocking (from pinned memory)."""
    if isinstance(value, (tuple, list)):
        return type(value)(on_device(item, device) for item in value)
    return value.to(device, non_blocking=True)


def device_batches(loader: Iterable, device: torch.device, make_inputs: Callable[[Any, torch.Tensor], Any]) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(inputs, labels)`` on ``device`` from a loader of ``(data, label, index)``: ``make_inputs(data on device, indices)``."""
    for data, labels, indices in loader:
        yield make_inputs(on_device(data, device), indices), labels.to(device, non_blocking=True)


def all_reduce_sums(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Sum a dict of numbers over all ranks (identity without a process group); one host read."""
    keys = sorted(sums)
    device = next((value.device for value in sums.values() if isinstance(value, torch.Tensor)), torch.device("cpu"))
    tensor = torch.stack([torch.as_tensor(sums[key], dtype=torch.float64, device=device).reshape(()) for key in keys])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


def inner(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def set_train_mode(model: nn.Module, freeze_frozen_norms: bool = False) -> None:
    """``model.train()``; with ``freeze_frozen_norms``, BatchNorm layers whose
    parameters are all frozen stay in eval mode, so a frozen part of the network
    keeps its running statistics too (Keras' behaviour for non-trainable BatchNorm).
    """
    model.train()
    if freeze_frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pooled vector) through the model's own ``forward``.

    DDP only syncs gradients through its own forward(): call it, and take the
    pooled vector from a forward hook on the classifier's pooling block.
    """
    captured: list[torch.Tensor] = []
    handle = inner(model).pool.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, captured[-1]


def cross_entropy_loss(logits: torch.Tensor, _activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy, as a :data:`LossFn`."""
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"loss": loss.detach()}


def step_flops_per_image(model: nn.Module, inputs: Any, labels: torch.Tensor, loss_fn: LossFn, forward: Forward, precision: Precision) -> float:
    """FLOPs of one training step per image, counted (forward and backward) on a real batch, without side effects:
    the random draws (dropout), the BatchNorm statistics and the gradients are as they were."""
    def step() -> None:
        with _autocast(precision):
            logits, activations = forward(model, inputs)
            loss, _parts = loss_fn(logits, activations, labels)
        loss.backward()

    buffers = [buffer.clone() for buffer in model.buffers()]
    devices = [precision.device] if precision.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        flops = step_flops(step)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    for parameter in model.parameters():
        parameter.grad = None
    return flops / max(len(labels), 1)


@dataclass
class FlopCount:
    """A training step's FLOPs per image, counted on the first CUDA batch of a run (or of a phase that changes the
    trainable layers) and kept: the count depends only on shapes and on what is trained."""

    per_image: float | None = None


def utilisation(flops_per_image: float | None, images_per_s: float, precision: Precision) -> dict[str, float]:
    """``{"mfu": …}`` on a CUDA device of known peak (the peak of the precision the step runs in); ``{}`` elsewhere."""
    if precision.device.type != "cuda" or flops_per_image is None:
        return {}
    peak = peak_flops(torch.cuda.get_device_name(precision.device), step_precision(DTYPES[precision.name]))
    value = mfu(flops_per_image, images_per_s, peak)
    return {} if value is None else {"mfu": value}


def _autocast(precision: Precision | None) -> contextlib.AbstractContextManager:
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    precision: Precision | None = None,
    freeze_frozen_norms: bool = False,
    forward: Forward = logits_and_features,
    flops: FlopCount | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of ``(inputs, labels)`` on the model's device.

    Returns the mean loss parts, the accuracy (over all ranks), this rank's
    ``images_per_s`` and, on a CUDA device with ``flops``, its ``mfu``
    (FLOPs counted on the first batch when ``flops`` holds none yet).  ``forward(model, inputs)`` gives
    (logits, pooled vectors): the whole classifier by default, or its
    trainable part on cached inputs.  ``freeze_frozen_norms``: see
    :func:`set_train_mode`.
    """
    set_train_mode(model, freeze_frozen_norms)
    scaler = precision.grad_scaler() if precision is not None else None
    meter = ThroughputMeter(precision.device if precision is not None else None).start()
    sums: dict[str, torch.Tensor | float] = {"correct": 0.0, "count": 0.0}
    part_names: list[str] = []
    part_sums: torch.Tensor | None = None  # the loss parts of every step, summed as one vector (one op a step, not one per part)
    step_loss = loss_fn.for_epoch() if hasattr(loss_fn, "for_epoch") else loss_fn  # a loss that sums some parts over the epoch itself
    for inputs, labels in batches:
        if flops is not None and flops.per_image is None and precision is not None and precision.device.type == "cuda":
            flops.per_image = step_flops_per_image(model, inputs, labels, loss_fn, forward, precision)
        with _autocast(precision):
            logits, activations = forward(model, inputs)
            loss, parts = step_loss(logits, activations, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        batch = len(labels)
        meter.add(batch)
        sums["correct"] = sums["correct"] + (logits.detach().argmax(1) == labels).sum()
        sums["count"] = sums["count"] + batch
        weighted = torch.stack(list(parts.values())).float() * batch
        part_names, part_sums = list(parts), weighted if part_sums is None else part_sums + weighted
    if part_sums is not None:
        sums.update(zip(part_names, part_sums.unbind()))
    if hasattr(step_loss, "epoch_sums"):
        sums.update(step_loss.epoch_sums())
    totals = all_reduce_sums(sums)
    meter.stop()
    count = max(totals.pop("count"), 1.0)
    correct = totals.pop("correct")
    speed = {"images_per_s": meter.images_per_second, **(utilisation(flops.per_image, meter.images_per_second, precision) if precision and flops else {})}
    return {"train_acc": correct / count, **{f"train_{key}": value / count for key, value in totals.items()}, **speed}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    *,
    precision: Precision | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    predictions: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` over ``batches`` of ``(inputs, labels)``, summed over all ranks.

    ``forward(model, inputs)`` gives logits (default: ``model(inputs)``).
    ``predictions``: a list this rank's predicted classes are appended to, one
    tensor per batch, left on the device (no host sync per batch).
    Runs the module inside a DDP wrapper (DDP's forward is a collective that
    would wait forever for a rank whose shard is empty), after giving every
    rank rank 0's buffers, as DDP's forward would: the BatchNorm statistics
    the checkpoint keeps.
    """
    model = inner(model)
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    model.eval()
    sums: dict[str, torch.Tensor | float] = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for inputs, labels in batches:
        with _autocast(precision):
            logits = model(inputs) if forward is None else forward(model, inputs)
        sums["loss"] = sums["loss"] + F.cross_entropy(logits.float(), labels, reduction="sum")
        predicted = logits.argmax(1)
        if predictions is not None:
            predictions.append(predicted)
        sums["correct"] = sums["correct"] + (predicted == labels).sum()
        sums["count"] = sums["count"] + len(labels)
    totals = all_reduce_sums(sums)
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "acc": totals["correct"] / count, "count": totals["count"]}
