"""The layout the README promises: the method importable without Ray, and the layout map in step with the tree."""

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
    assert done.stdout.strip().split(",") == ["atlas", "bank", "bootstrap", "class_centred", "debug_loss", "detection", "flagged", "global_mc", "learned_detector", "masks", "multiple", "replication", "search_noise", "selection", "suppress", "treatment"]


def layout_map() -> str:
    """The README's Development section's code block that starts with ``raycf/``."""
    readme = (REPO / "README.md").read_text()
    development = readme.split("## Development", 1)[1]
    block = re.search(r"```\nraycf/\n(.*?)```", development, re.S)
    assert block, "README's Development section has no layout map starting with raycf/"
    return block.group(1)


def test_the_readme_layout_map_names_every_module_and_only_real_ones():
    text = layout_map()
    named = set(re.findall(r"[a-z_]+\.py", text))
    on_disk = {path.name for path in (REPO / "raycf").rglob("*.py") if path.name not in {"__main__.py"}}
    on_disk -= {"__init__.py"}
    named -= {"__init__.py"}
    packages = {path.parent.name for path in (REPO / "raycf").rglob("__init__.py") if path.parent.name != "raycf"}
    assert on_disk - named == set(), f"modules missing from the README layout map: {sorted(on_disk - named)}"
    assert named - on_disk == set(), f"the README layout map names modules that do not exist: {sorted(named - on_disk)}"
    for package in packages:
        assert f"{package}/" in text, f"package {package}/ missing from the README layout map"
