"""Run every benchmark module (or those named on the command line) and print one line per ratio."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main(names: list[str]) -> int:
    folder = Path(__file__).parent
    modules = sorted(info.name for info in pkgutil.iter_modules([str(folder)]) if info.name.startswith("bench_"))
    chosen = [m for m in modules if not names or any(n in m for n in names)]
    for module_name in chosen:
        module = importlib.import_module(f"benchmarks.{module_name}")
        for ratio in module.measure():
            print(ratio.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
