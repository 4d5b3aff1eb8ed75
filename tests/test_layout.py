"""The layout docs/development.md promises: the method importable without Ray, and the layout map in step with the tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

IMPORT_METHOD_WITHOUT_RAY = """
import importlib, pkgutil, sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
import raycf.method
names = [info.name for info in pkgutil.iter_modules(raycf.method.__path__)]
for name in names:
    importlib.import_module(f"raycf.method.{name}")
print(",".join(sorted(names)))
"""


def test_the_method_package_imports_without_ray():
    done = subprocess.run([sys.executable, "-c", IMPORT_METHOD_WITHOUT_RAY], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == ["atlas", "bank", "base_models", "bootstrap", "class_centred", "debug_loss", "detection", "detection_tables", "dfr", "flagged", "global_mc", "groups", "learned_detector", "masks", "multiple", "plant", "plant_check", "replication", "search_noise", "selection", "suppress", "treatment"]


def layout_map() -> str:
    """docs/development.md's code block that starts with ``raycf/``."""
    development = (REPO / "docs" / "development.md").read_text()
    block = re.search(r"```\nraycf/\n(.*?)```", development, re.S)
    assert block, "docs/development.md has no layout map starting with raycf/"
    return block.group(1)


def mapped_paths(text: str) -> set[str]:
    """Full paths (``raycf/method/bank.py``) of the modules a layout map names, read by its indentation.

    Each two spaces of indentation go one folder down: a line starting with ``name/``
    opens a package at that depth (``method/``, ``outputs/report/``); a line's leading
    ``.py`` names are modules of the package above it (several may share one line).
    """
    paths, packages = set(), []
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        words = line.split()
        if not words or indent == 0:
            continue
        depth = indent // 2 - 1  # 0: raycf's own entries
        del packages[depth:]
        if words[0].endswith("/"):
            packages.append(words[0].rstrip("/"))
            continue
        folder = "/".join(["raycf", *packages])
        for word in words:
            if not word.endswith(".py"):
                break
            paths.add(f"{folder}/{word}")
    return paths


def test_mapped_paths_reads_packages_and_shared_lines():
    text = "  config.py  the study\n  method/  pure\n    bank.py  maths in bank.py\n    a.py b.py   two\n  errors.py cli.py  last\n"
    assert mapped_paths(text) == {"raycf/config.py", "raycf/method/bank.py", "raycf/method/a.py", "raycf/method/b.py", "raycf/errors.py", "raycf/cli.py"}
    nested = "  outputs/  out\n    report/  the report\n      page.py  the page\n    explain.py  back up one\n  cli.py\n"
    assert mapped_paths(nested) == {"raycf/outputs/report/page.py", "raycf/outputs/explain.py", "raycf/cli.py"}


def test_the_layout_map_names_every_module_and_only_real_ones():
    text = layout_map()
    named = {path for path in mapped_paths(text) if not path.endswith("/__init__.py")}
    on_disk = {path.relative_to(REPO).as_posix() for path in (REPO / "raycf").rglob("*.py") if path.name not in {"__main__.py", "__init__.py"}}
    packages = {path.parent.name for path in (REPO / "raycf").rglob("__init__.py") if path.parent.name != "raycf"}
    assert on_disk - named == set(), f"modules missing from the layout map (docs/development.md): {sorted(on_disk - named)}"
    assert named - on_disk == set(), f"the layout map (docs/development.md) names modules that do not exist: {sorted(named - on_disk)}"
    for package in packages:
        assert f"  {package}/" in text, f"package {package}/ missing from the layout map (docs/development.md)"
