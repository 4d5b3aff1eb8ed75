"""Training the CFE generator bank (METHOD §2) on the cached pooled vectors.

All C generators train together as one batched C×K×K module on the vectors
the features stage cached (every view of every training image), each with
its own class as the target of every vector.  The loop runs unchanged on Ray
Train workers (DDP) and in this process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycf import storage
from raycf.artefacts import BANK_FILE, load_features
from raycf.config import StudyConfig
from raycf.console import log
from raycf.method.bank import CfeModel, LossWeights, bank_from_model, bank_loss, class_statistics, parse_bank, summarise_statistics
from raycf.method.selection import SCORE_KEY
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


def epoch_order(num_vectors: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's vectors for an epoch: a permutation fixed by (seed, epoch), padded to equal shards."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_vectors, generator=generator)
    per_rank = math.ceil(num_vectors / world_size)
    padded = torch.cat([order, order[: per_rank * world_size - num_vectors]])
    return padded[rank::world_size]


def report_epochs(epochs: int, reports: int = 5) -> set[int]:
    """The (1-based) epochs that report and checkpoint: about ``reports`` of them, always the last.

    An epoch over cached vectors takes far less than a report's round trip
    to Ray Train's controller, so not every epoch reports.
    """
    every = max(1, epochs // reports)
    return {epoch for epoch in range(1, epochs + 1) if epoch % every == 0 or epoch == epochs}


def _restore(session: Session, model: CfeModel, optimizer: torch.optim.Optimizer) -> TrainState:
    """Resume from the checkpoint the session hands a restarted run, if any."""
    with session.checkpoint() as folder:
        if folder is None:
            return TrainState()
        bank = parse_bank(Path(folder, BANK_FILE).read_bytes(), "cfe checkpoint")
        state = TrainState.read(folder)
    device = model.mc.weight.device
    with torch.no_grad():
        model.mc.weight.copy_(bank.mc_weight.to(device))
        model.mc.bias.copy_(bank.mc_bias.to(device))
        if model.mi is not None and bank.has_mi:
            model.mi.weight.copy_(bank.mi_weight.to(device))
            model.mi.bias.copy_(bank.mi_bias.to(device))
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
    return state


def cfe_train_loop(job: CfeJob, session: Session) -> dict[str, Any]:
    """Train the bank of ``job.study`` on cached vectors.

    On the epochs of :func:`report_epochs` every rank reports epoch, loss
    parts, mean and minimum MC agreement over classes and mean MC size (and
    MI values); rank 0 attaches ``bank.pt`` and ``train_state.pt``.  Returns
    ``{"history": [...], "classes": {statistic: per-class list}}``
    (statistics of the final bank on the plain training vectors).
    """
    study, config = job.study, job.study.cfe
    rank, world_size, device = session.rank, session.world_size, session.device
    train = load_features(job.results, "train", views="all")
    vectors = torch.from_numpy(train.a.copy()).float().to(device)
    plain = vectors[torch.from_numpy(train.view == 0).to(device)]
    head_weight, head_bias = job.head_weight.float().to(device), job.head_bias.float().to(device)
    weights = LossWeights.from_config(config)

    model = CfeModel(head_weight.shape[0], head_weight.shape[1], config.train_mi, study.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    state = _restore(session, model, optimizer)
    wrapped = session.prepare_model(model)
    step = max(1, config.batch_size // world_size)
    reporting = report_epochs(config.epochs)
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    for epoch in range(state.next_epoch, config.epochs):
        wrapped.train()
        order = epoch_order(len(vectors), study.seed, epoch, rank, world_size).to(device)
        for start in range(0, len(order), step):
            loss, parts = bank_loss(wrapped, vectors[order[start : start + step]], head_weight, head_bias, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batches += 1
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
        if epoch + 1 not in reporting:
            continue
        statistics = class_statistics(bank_from_model(model, head_weight, head_bias).to(device), plain)
        means = {f"train_{key}": float(value) / max(batches, 1) for key, value in sums.items()}
        metrics = {"epoch": epoch + 1, **means, **summarise_statistics(statistics)}
        sums, batches = {}, 0
        state = TrainState(next_epoch=epoch + 1, history=[*state.history, metrics], optimizer=optimizer.state_dict())
        _report(session, metrics, model, state, head_weight, head_bias, job.class_names)
        if rank == 0:
            shown = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "epoch")
            log(f"cfe epoch {epoch + 1}/{config.epochs}  {shown}")
    final = bank_from_model(model, head_weight, head_bias, job.class_names)
    if rank == 0:
        storage.write_bytes(job.bank_location, final.to_bytes())
    statistics = class_statistics(final.to(device), plain)
    return {"history": state.history, "classes": {key: value.tolist() for key, value in statistics.items()}}


def _report(session: Session, metrics: dict[str, float], model: CfeModel, state: TrainState, head_weight, head_bias, class_names) -> None:
    """Every rank reports; rank 0 attaches the bank and the train state (the latest is the one kept)."""
    metrics = {**metrics, SCORE_KEY: float(metrics["epoch"])}
    if session.rank != 0:
        session.report(metrics)
        return
    bank = bank_from_model(model, head_weight, head_bias, class_names)
    session.report(metrics, {BANK_FILE: bank.to_bytes(), TRAIN_STATE_FILE: state.to_bytes()})


def cfe_summary(classes: dict[str, list[float]]) -> dict[str, float]:
    """The summary of the final bank's per-class statistics."""
    return summarise_statistics({key: np.asarray(value) for key, value in classes.items()})
