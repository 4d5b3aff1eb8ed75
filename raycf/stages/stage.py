"""What a stage is, and what its run function is handed."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from raycf.results import storage
from raycf.config import StudyConfig


@dataclass
class StageRun:
    """What a stage's ``run`` function gets: the study, where to write, where upstream results live."""

    study: StudyConfig
    results: str  # the study's results folder
    output: str  # the staging folder this run writes into (moved into place when it finishes)
    stage_hash: str
    folders: dict[str, str]  # stage name -> its folder under ``results``
    resume: bool = False

    def path(self, *parts: str) -> str:
        """A location inside the stage's (staging) output folder."""
        return storage.join_uri(self.output, *parts)

    def upstream(self, stage: str, *parts: str) -> str:
        """A location inside a finished upstream stage's folder."""
        return storage.join_uri(self.results, self.folders[stage], *parts)

    def ray_storage(self) -> str:
        """Where Ray Train and Tune keep their run state for this study."""
        return storage.join_uri(self.results, "_ray")


@dataclass(frozen=True)
class Stage:
    """A step of the study: what it reads, what it builds on, how to run it, where it writes.

    ``reads`` names study sections (``debug``) or single fields
    (``analysis.tau``): the stage's identity is their hash plus its
    upstream stages' identities.  ``command`` is its ``raycf`` subcommand
    (empty: it runs only inside ``raycf study``); ``describe`` prints a
    finished stage's result.
    """

    name: str
    reads: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[StageRun], dict]
    folder: str
    command: str = ""
    summary: str = ""
    describe: Callable[[str], str] | None = field(default=None)


def entry(module: str, function: str) -> Callable[..., Any]:
    """``raycf.stages.<module>.<function>``, imported when first called."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"raycf.stages.{module}"), function)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"raycf.stages.{module}.{function}"
    return call
