"""Where a training loop runs: a Ray Train worker, a Ray Tune trial, or this process.

raycf's training loops (:mod:`raycf.training.base`, ``.debug``, ``.cfe``) are
plain functions of a job and a :class:`Session`.  The session says which rank
the loop is and on which device it computes, hands it the checkpoint to
resume from, and takes its per-epoch reports:

* :class:`RayTrainSession`: a worker of a ``TorchTrainer`` (DDP when there
  are several); reports go to ``ray.train.report``;
* :class:`TuneSession`: the loop runs inside its Ray Tune trial, with no
  worker group to start; reports go to ``ray.tune.report``, and Tune keeps the
  checkpoints, retries a failed trial from the latest one and stops weak
  trials (ASHA);
* :class:`LocalSession`: this process, no Ray at all (``raycf rerun``, unit
  tests, benchmarks); it keeps checkpoints in a folder the way Ray does.

A checkpoint is a folder of files: rank 0 attaches it to a report.  Which
reported checkpoint is the best is decided by the reported
:data:`~raycf.method.selection.SCORE_KEY` (see
:func:`raycf.method.selection.checkpoint_scores`), the latest one is always
kept for resuming.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from raycf.method.selection import SCORE_KEY
from raycf.models.device import device_for

TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    """What a training run needs to resume besides its weights: next epoch, history, phase, optimiser state."""

    next_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    phase: str = ""
    optimizer: dict[str, Any] | None = None  # the optimiser's state_dict at the checkpoint, None before any

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"next_epoch": self.next_epoch, "history": self.history, "phase": self.phase, "optimizer": self.optimizer}, buffer)
        return buffer.getvalue()

    @classmethod
    def read(cls, folder: str | Path) -> "TrainState":
        """The ``train_state.pt`` of a checkpoint folder (weights-only load: never runs code)."""
        payload = torch.load(Path(folder, TRAIN_STATE_FILE), map_location="cpu", weights_only=True)
        return cls(next_epoch=payload["next_epoch"], history=list(payload["history"]), phase=payload["phase"], optimizer=payload["optimizer"])


class Session:
    """The interface a training loop sees (see the module docstring)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on this session's device (wrapped in DDP when the session has several ranks)."""
        return model.to(self.device)

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A context giving the folder of the checkpoint to resume from, or None."""
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """Report one epoch's metrics; ``files`` (rank 0 only) form its checkpoint folder."""
        raise NotImplementedError


def _folder_with(files: dict[str, bytes], folder: str) -> str:
    for name, data in files.items():
        Path(folder, name).write_bytes(data)
    return folder


class _RaySession(Session):
    """Checkpoints and reports through a Ray library's API: ``ray.train`` or ``ray.tune`` (the same three calls)."""

    def __init__(self, api) -> None:
        self.api = api

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        checkpoint = self.api.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        if not files:
            self.api.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(_folder_with(files, folder)))


class RayTrainSession(_RaySession):
    """A Ray Train worker (``TorchTrainer``)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        super().__init__(ray.train)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        quiet_train_worker_logs()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


class TuneSession(_RaySession):
    """The loop inside its Ray Tune trial: one rank, the trial's own resources."""

    def __init__(self, use_gpu: bool) -> None:
        import ray.tune

        super().__init__(ray.tune)
        self.device = device_for(use_gpu)


class LocalSession(Session):
    """This process, no Ray: keeps the reports, the latest checkpoint and the best one in ``folder``."""

    def __init__(self, folder: str | Path, use_gpu: bool = False) -> None:
        self.folder = Path(folder)
        self.device = device_for(use_gpu)
        self.reports: list[dict[str, Any]] = []
        self.latest: Path | None = None
        self.best: Path | None = None
        self._best_score = float("-inf")

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield self.latest

    def report(self, metrics: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        self.reports.append(dict(metrics))
        if not files:
            return
        folder = self.folder / f"checkpoint_{len(self.reports):06d}"
        folder.mkdir(parents=True)
        _folder_with(files, str(folder))
        previous = {self.latest, self.best}
        self.latest = folder
        score = float(metrics.get(SCORE_KEY, len(self.reports)))
        if score >= self._best_score:
            self.best, self._best_score = folder, score
        for old in previous - {self.latest, self.best, None}:
            shutil.rmtree(old)


def quiet_train_worker_logs() -> None:
    """Inside a Ray Train worker: Train's per-report INFO lines off (raycf's epoch line says it)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray 2.60 logs each report on a logger named after the module's file path.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
