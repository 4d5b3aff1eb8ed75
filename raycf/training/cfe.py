"""Training the CFE generator bank (METHOD §2) on the cached pooled vectors.

All C generators train together as one batched C×K×K module on the vectors
the features stage cached (every view of every training image), each with
its own class as the target of every vector.  The loop runs unchanged on Ray
Train workers and in this process.

With several workers the CLASSES are split across the ranks, not the
vectors: generator c's loss and gradient involve only its own weights, so
rank r trains the generators of classes ``r, r + W, r + 2W, …``
(:func:`rank_classes`) on every vector, in the single worker's batch order,
with no DDP and no collective per step.  Its slices start from the single
worker's seeded draw of the whole bank, and SGD with momentum is
per-parameter, so the bank the ranks train together is the single worker's
(up to float rounding).  On a reporting epoch the ranks gather the whole
bank, its optimiser state and the loss parts (three small rounds of
collectives), so every rank computes the class statistics and rank 0
checkpoints ``bank.pt`` and ``train_state.pt`` exactly as one worker would:
a checkpoint resumes with any number of workers.  Ranks beyond the number
of classes hold no generator and only join those collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raycf.results import storage
from raycf.results.artefacts import BANK_FILE, load_features
from raycf.config import StudyConfig
from raycf.runtime.console import log, spaced_epochs
from raycf.method.bank import (
    CfeBank,
    CfeModel,
    LossWeights,
    bank_from_model,
    bank_loss,
    class_statistics,
    parse_bank,
    summarise_statistics,
)
from raycf.method.selection import SCORE_KEY
from raycf.training.throughput import ThroughputMeter
from raycf.training.session import TRAIN_STATE_FILE, Session, TrainState


@dataclass(frozen=True)
class CfeJob:
    """What bank training needs: the study, where the features are, the frozen head, where the bank goes."""

    study: StudyConfig
    results: str  # the study's results folder, holding features/
    head_weight: torch.Tensor  # C×K
    head_bias: torch.Tensor  # C
    class_names: list[str]
    bank_location: str  # where rank 0 writes the final bank.pt


def epoch_order(num_vectors: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the vectors in an epoch: a permutation fixed by (seed, epoch), the same on every rank
    (the bank loop splits classes across ranks, not vectors)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_vectors, generator=generator)


def report_epochs(epochs: int, reports: int = 5) -> set[int]:
    """The (1-based) epochs that report and checkpoint: about ``reports`` of them, always the last.

    An epoch over cached vectors takes far less than a report's round trip
    to Ray Train's controller, so not every epoch reports.
    """
    return spaced_epochs(epochs, reports)


def rank_classes(num_classes: int, rank: int, world_size: int) -> torch.Tensor:
    """The classes whose generators ``rank`` trains: ``rank, rank + W, rank + 2W, …`` (all of them for one rank)."""
    return torch.arange(rank, num_classes, world_size)


def _class_part(model: CfeModel, classes: torch.Tensor) -> CfeModel:
    """A :class:`CfeModel` holding copies of ``model``'s generators of ``classes`` (same parameter order)."""
    part = CfeModel(0, model.mc.weight.shape[1], model.mi is not None, 0)
    for name in ("mc", "mi"):
        source, target = getattr(model, name), getattr(part, name)
        if source is not None:
            target.weight = nn.Parameter(source.weight.detach()[classes].clone())
            target.bias = nn.Parameter(source.bias.detach()[classes].clone())
    return part


def _optimizer_part(saved: dict[str, Any], classes: torch.Tensor | None, num_classes: int) -> dict[str, Any]:
    """The whole bank's optimiser state cut to ``classes`` (per-parameter tensors are C×…; None: all)."""
    if classes is None:
        return saved
    state = {
        index: {key: value[classes] if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_classes else value for key, value in entry.items()}
        for index, entry in saved["state"].items()
    }
    return {"state": state, "param_groups": saved["param_groups"]}


def _restore(session: Session, model: CfeModel, optimizer: torch.optim.Optimizer, classes: torch.Tensor | None = None) -> TrainState:
    """Resume from the checkpoint the session hands a restarted run, if any.

    The checkpoint holds the whole bank and its optimiser state (whatever
    the number of workers that wrote it); a rank holding ``classes`` takes
    their slices.
    """
    with session.checkpoint() as folder:
        if folder is None:
            return TrainState()
        bank = parse_bank(Path(folder, BANK_FILE).read_bytes(), "cfe checkpoint")
        state = TrainState.read(folder)
    device = model.mc.weight.device

    def part(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor if classes is None else tensor[classes]).to(device)

    with torch.no_grad():
        model.mc.weight.copy_(part(bank.mc_weight))
        model.mc.bias.copy_(part(bank.mc_bias))
        if model.mi is not None and bank.has_mi:
            model.mi.weight.copy_(part(bank.mi_weight))
            model.mi.bias.copy_(part(bank.mi_bias))
    if state.optimizer:
        optimizer.load_state_dict(_optimizer_part(state.optimizer, classes, bank.num_classes))
    return state


class _ClassSplit:
    """The collectives of a class-split bank: once per reporting epoch, never per step."""

    def __init__(self, num_classes: int, rank: int, world_size: int, device: torch.device):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"cfe: {world_size} ranks but no torch.distributed process group to gather the bank with")
        self.num_classes, self.rank, self.world_size, self.device = num_classes, rank, world_size, device
        self.classes = rank_classes(num_classes, rank, world_size)
        self.per_rank = math.ceil(num_classes / world_size)

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole C×… tensor from every rank's slice (on every rank, CPU)."""
        padded = part.detach().new_zeros((self.per_rank, *part.shape[1:]))
        padded[: len(part)] = part.detach()
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        whole = torch.empty((self.num_classes, *part.shape[1:]), dtype=part.dtype)
        for rank, piece in enumerate(pieces):
            whole[rank :: self.world_size] = piece[: len(range(rank, self.num_classes, self.world_size))].cpu()
        return whole

    def bank(self, model: CfeModel, head_weight: torch.Tensor, head_bias: torch.Tensor, class_names: list[str] | None) -> CfeBank:
        """The whole bank, as one worker's :func:`bank_from_model` would give it."""
        return CfeBank(
            mc_weight=self.gather(model.mc.weight),
            mc_bias=self.gather(model.mc.bias),
            head_weight=head_weight.detach().cpu().clone(),
            head_bias=head_bias.detach().cpu().clone(),
            mi_weight=self.gather(model.mi.weight) if model.mi is not None else None,
            mi_bias=self.gather(model.mi.bias) if model.mi is not None else None,
            class_names=class_names,
        )

    def layout(self, sums: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[list[str], dict[int, list[str]]]:
        """Rank 0's loss-part names and per-parameter optimiser tensors (rank 0 holds class 0, so it has them all)."""
        local = optimizer.state_dict()["state"]
        params = [param for group in optimizer.param_groups for param in group["params"]]
        state = {index: sorted(key for key, value in entry.items() if torch.is_tensor(value) and value.shape == params[index].shape) for index, entry in local.items()}
        holder: list[Any] = [(list(sums), state)]
        dist.broadcast_object_list(holder, src=0, device=self.device)
        return holder[0]

    def optimizer_state(self, optimizer: torch.optim.Optimizer, tensors: dict[int, list[str]]) -> dict[str, Any]:
        """The whole bank's optimiser state, as one worker's ``state_dict()`` (rank 0's copy is the one written)."""
        local = optimizer.state_dict()
        params = [param for group in optimizer.param_groups for param in group["params"]]
        state: dict[int, dict[str, Any]] = {}
        for index in sorted(tensors):
            entry = dict(local["state"].get(index, {}))
            for key in tensors[index]:
                value = entry.get(key)
                entry[key] = self.gather(value if value is not None else torch.zeros_like(params[index]))
            state[index] = entry
        return {"state": state, "param_groups": local["param_groups"]}

    def part_sums(self, sums: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
        """Each loss part summed over every rank's generators, then made a mean over the C generators."""
        local = torch.stack([sums[name].double() if name in sums else torch.zeros((), dtype=torch.float64, device=self.device) for name in names]) if names else None
        if local is None:
            return {}
        dist.all_reduce(local)
        return {name: float(value) / self.num_classes for name, value in zip(names, local.cpu().tolist())}


def cfe_train_loop(job: CfeJob, session: Session) -> dict[str, Any]:
    """Train the bank of ``job.study`` on cached vectors.

    On the epochs of :func:`report_epochs` every rank reports epoch, loss
    parts, mean and minimum MC agreement over classes and mean MC size (and
    MI values); rank 0 attaches ``bank.pt`` and ``train_state.pt``.  Returns
    ``{"history": [...], "classes": {statistic: per-class list}}``
    (statistics of the final bank on the plain training vectors).  With
    several ranks each trains its classes' generators (see the module
    docstring); one rank trains the whole bank.
    """
    study, config = job.study, job.study.cfe
    rank, world_size, device = session.rank, session.world_size, session.device
    train = load_features(job.results, "train", views="all")
    vectors = torch.from_numpy(train.a.copy()).float().to(device)
    plain = vectors[torch.from_numpy(train.view == 0).to(device)]
    head_weight, head_bias = job.head_weight.float().to(device), job.head_bias.float().to(device)
    weights = LossWeights.from_config(config)

    num_classes, num_filters = head_weight.shape
    model = CfeModel(num_classes, num_filters, config.train_mi, study.seed)  # the whole draw, on the CPU
    split = _ClassSplit(num_classes, rank, world_size, device) if world_size > 1 else None
    classes = split.classes if split is not None else None
    if split is not None:
        model = _class_part(model, split.classes)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    state = _restore(session, model, optimizer, classes)
    # One rank: the whole bank (Ray Train's prepare_model moves it, no DDP with one worker).
    # Several: independent generators, nothing to all-reduce, so no DDP.
    wrapped = session.prepare_model(model) if split is None else model
    targets = classes.to(device) if classes is not None else None
    trains = classes is None or len(classes) > 0  # a rank beyond the number of classes holds nothing
    reporting = report_epochs(config.epochs)
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    bank: CfeBank | None = None
    meter = ThroughputMeter(device).start()  # vectors (image views) per second between reports
    for epoch in range(state.next_epoch, config.epochs):
        wrapped.train()
        bank = None
        order = epoch_order(len(vectors), study.seed, epoch).to(device)
        for start in range(0, len(order), config.batch_size):
            batches += 1
            if not trains:
                continue
            loss, parts = bank_loss(wrapped, vectors[order[start : start + config.batch_size]], head_weight, head_bias, weights, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(min(config.batch_size, len(order) - start))
            for key, value in parts.items():  # with a class split: sums over this rank's generators
                sums[key] = sums.get(key, 0.0) + (value if split is None else value.double() * len(classes))
        if epoch + 1 not in reporting:
            continue
        if split is None:
            bank = bank_from_model(model, head_weight, head_bias, job.class_names)
            totals = {key: float(value) for key, value in sums.items()}
            optimizer_state = optimizer.state_dict()
        else:
            names, tensors = split.layout(sums, optimizer)
            bank = split.bank(model, head_weight, head_bias, job.class_names)
            optimizer_state = split.optimizer_state(optimizer, tensors)
            totals = split.part_sums(sums, names)
        statistics = class_statistics(bank.to(device), plain)
        means = {f"train_{key}": value / max(batches, 1) for key, value in totals.items()}
        metrics = {"epoch": epoch + 1, **means, **summarise_statistics(statistics), "images_per_s": meter.stop().images_per_second}
        meter = ThroughputMeter(device).start()
        sums, batches = {}, 0
        state = TrainState(next_epoch=epoch + 1, history=[*state.history, metrics], optimizer=optimizer_state)
        _report(session, metrics, bank, state)
        if rank == 0:
            shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "epoch")
            log(f"cfe epoch {epoch + 1}/{config.epochs}  {shown}")
    if bank is None:  # nothing trained since the last report (a resumed run with no epoch left)
        bank = bank_from_model(model, head_weight, head_bias, job.class_names) if split is None else split.bank(model, head_weight, head_bias, job.class_names)
    if rank == 0:
        storage.write_bytes(job.bank_location, bank.to_bytes())
    statistics = class_statistics(bank.to(device), plain)
    return {"history": state.history, "classes": {key: value.tolist() for key, value in statistics.items()}}


def _report(session: Session, metrics: dict[str, float], bank: CfeBank, state: TrainState) -> None:
    """Every rank reports; rank 0 attaches the bank and the train state (the latest is the one kept)."""
    metrics = {**metrics, SCORE_KEY: float(metrics["epoch"])}
    if session.rank != 0:
        session.report(metrics)
        return
    session.report(metrics, {BANK_FILE: bank.to_bytes(), TRAIN_STATE_FILE: state.to_bytes()})


def cfe_summary(classes: dict[str, list[float]]) -> dict[str, float]:
    """The summary of the final bank's per-class statistics."""
    return summarise_statistics({key: np.asarray(value) for key, value in classes.items()})
