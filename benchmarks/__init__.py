"""Benchmarks: ratios measured side by side in one run (``make bench``).

Each ``bench_*.py`` module defines ``measure() -> list[Ratio]``.  Numbers
come from here, never from timed tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    """One measured ratio and its target, printed as ``<name>: <value> (target <op> <target>)``."""

    name: str
    value: float
    op: str  # ">=" or "<="
    target: float

    def met(self) -> bool:
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def line(self) -> str:
        return f"{self.name}: {self.value:.3f} (target {self.op} {self.target:g})"
