"""The README and the documentation site (docs/, mkdocs.yml).

The site builds with ``mkdocs build --strict`` (a broken link or anchor fails it),
its generated pages are their generators' output, the README stays short and its
links resolve, and every measured number lives in one block of one page.
"""

from __future__ import annotations

import html
import importlib.util
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


hook = _load("study_reference_hook", DOCS / "hooks" / "study_reference.py")
generated_blocks = _load("generated_blocks", REPO / "scripts" / "generated_blocks.py")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(command, cwd=config.parent, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as ``make test`` builds it: ``mkdocs build --strict``."""
    folder = tmp_path_factory.mktemp("site")
    done = mkdocs_build(REPO / "mkdocs.yml", folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def text_of(page: str) -> str:
    """A page's text: tags dropped, entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page)))


# ------------------------------------------------------------------ the site


def test_the_study_reference_page_is_the_generator_s_table(site):
    from raycf.config import study_reference_markdown

    rows = [line for line in study_reference_markdown().splitlines()[2:] if line.startswith("| `")]
    fields = [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows]
    assert "debug.lambda1" in fields and "search.space" in fields and len(fields) > 100
    page = (site / "study-file" / "index.html").read_text()
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert re.findall(r"<tr>\s*<td><code>([^<]+)</code></td>", body) == fields
    assert "<!-- study-reference -->" not in page
    assert "results go to &lt;storage_path&gt;/&lt;name&gt;/" in page  # text, not a swallowed HTML tag


def test_the_api_page_documents_every_method_module(site):
    import raycf.method

    modules = sorted(info.name for info in pkgutil.iter_modules(raycf.method.__path__))
    page = (site / "api" / "method" / "index.html").read_text()
    documented = sorted(set(re.findall(r'<h2 id="raycf\.method\.([a-z_]+)"', page)))
    assert documented == modules
    functions = re.findall(r'id="raycf\.method\.selection\.([a-z_]+)"', page)
    assert functions == ["as_number", "selection_key", "best_epoch", "checkpoint_scores", "rank_trials"]
    from raycf.method.selection import best_epoch

    first_line = best_epoch.__doc__.strip().splitlines()[0].replace("``", "")
    assert first_line in text_of(page)


def test_the_site_fetches_nothing(site):
    external = set()
    for path in site.rglob("*.html"):
        external |= set(re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', path.read_text()))
    assert external == set()


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    config = (tmp_path / "mkdocs.yml").read_text().replace("paths: [.]", f"paths: [{REPO}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    page = tmp_path / "docs" / "commands.md"
    page.write_text(page.read_text() + "\nSee [the method](method.md#no-such-heading).\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-heading" in done.stderr


# ------------------------------------------------------------------ the study-reference hook


def test_the_hook_escapes_angle_brackets_outside_code_only():
    assert hook.html_safe("| `a<b>` | <storage_path>/x |") == "| `a<b>` | &lt;storage_path>/x |"


class _Page:
    def __init__(self, path: str):
        self.file = type("File", (), {"src_uri": path})()


def test_the_hook_fills_its_page_and_refuses_a_misplaced_placeholder():
    filled = hook.on_page_markdown("# Study\n\n<!-- study-reference -->\n", _Page("study-file.md"), None, None)
    assert "| `debug.lambda1` |" in filled and "<!-- study-reference -->" not in filled
    assert hook.on_page_markdown("# Other\n", _Page("index.md"), None, None) == "# Other\n"
    with pytest.raises(ValueError, match="belongs in study-file.md only"):
        hook.on_page_markdown("<!-- study-reference -->\n", _Page("index.md"), None, None)
    with pytest.raises(ValueError, match="expected exactly one"):
        hook.on_page_markdown("# Study, no table\n", _Page("study-file.md"), None, None)


# ------------------------------------------------------------------ the README


def slug(heading: str) -> str:
    """A heading's anchor as MkDocs' toc (and GitHub, for these headings) makes it."""
    text = unicodedata.normalize("NFKD", heading).replace("`", "")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def readme_links() -> list[str]:
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


def test_the_readme_is_short_and_says_what_the_commands_need():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    text = "\n".join(lines)
    for needed in ("make demo", "make test", "python3.11", ".venv/bin/raycf", "source .venv/bin/activate", "make docs"):
        assert needed in text, needed


def test_the_readme_links_resolve_to_files_and_headings():
    links = readme_links()
    assert len(links) >= 10
    for target in links:
        path, _, anchor = target.partition("#")
        assert (REPO / path).exists(), target
        if anchor:
            assert anchor in anchors(REPO / path), target


def test_slug_matches_the_built_anchors(site):
    heading = "Cost growth with the dataset (`make bench-scaling`)"
    assert slug(heading) in (site / "benchmarks" / "index.html").read_text()


def test_the_readme_quotes_measured_numbers_only_from_the_pages_it_links():
    section = README.read_text().split("\n## Headline measurements\n", 1)[1].split("\n## ")[0]
    bullets = [bullet for bullet in section.split("\n- ")[1:]]
    assert len(bullets) == 4
    for bullet in bullets:
        pages = {REPO / target.partition("#")[0] for target in re.findall(r"\]\((docs/[^)#]+)", bullet)}
        assert pages, bullet
        prose = re.sub(r"\[[^\]]*\]\([^)]*\)", "", bullet)
        numbers = re.findall(r"(?<![\w.])[−+-]?\d[\d,]*(?:\.\d+)?", prose)
        assert numbers, bullet
        linked = "".join(page.read_text() for page in pages)
        for number in numbers:
            assert number in linked, f"{number} (README's headline) is not on {sorted(p.name for p in pages)}"



def readme_command_lines() -> list[str]:
    """The lines of the README's bash blocks, comments and continuations dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip(" \\").strip()
            if line:
                lines.append(line)
    return lines


def test_the_readme_commands_parse_as_written():
    from raycf.cli import build_parser

    makefile = (REPO / "Makefile").read_text()
    raycf_lines = 0
    for line in readme_command_lines():
        words = shlex.split(line)
        if words[0] == "make":
            assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), line
        if words[0] in (".venv/bin/raycf", "raycf") and words[1:] != ["--help"]:
            build_parser().parse_args(words[1:])  # argparse exits (failing the test) on a wrong command or option
            raycf_lines += 1
        for word in words:
            if word.startswith("studies/"):
                assert (REPO / word).is_file(), line
    assert raycf_lines >= 10


def test_the_readme_study_file_validates():
    import yaml

    from raycf.config import study_from_mapping

    (text,) = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    study = study_from_mapping(yaml.safe_load(text))
    assert (study.name, study.model.arch, study.data.preprocess.mode, study.base.train) == ("pets", "resnet50", "weights", False)

# ------------------------------------------------------------------ measured blocks


def test_every_measured_block_names_a_command_that_exists():
    makefile = (REPO / "Makefile").read_text()
    found = []
    for page in DOCS.glob("*.md"):
        for block in generated_blocks.blocks(page.read_text()):
            found.append(block.command)
            words = block.command.split()
            if words[0] == "make":
                assert re.search(rf"^{re.escape(words[1])}:", makefile, re.M), block.command
            elif words[:2] == ["python", "-m"]:
                assert (REPO / Path(*words[2].split("."))).with_suffix(".py").is_file(), block.command
            else:
                assert words[0] == "python" and (REPO / words[1]).is_file(), block.command
            assert block.body.strip(), block.command
    assert "python scripts/findings.py results/fashion" in found and "make bench" in found


def test_the_numbers_the_issue_found_disagreeing_have_one_home():
    """Issue 25: the demo's time (128 s vs 104 s) and bench-scaling's (15 vs 12 minutes) were typed twice."""
    pages = {path: path.read_text() for path in [README, REPO / "Makefile", *DOCS.glob("*.md")]}
    for number in ("128", "104 s", "12 minutes", "15 minutes"):
        standalone = re.compile(rf"(?<![\d.]){re.escape(number)}(?![\d])")  # 128 seconds, not the digits of +0.8128
        homes = [path.name for path, text in pages.items() if standalone.search(text)]
        assert len(homes) <= 1, f"{number} in {homes}"


def test_regenerating_a_page_reruns_its_generated_blocks_only(tmp_path):
    page = tmp_path / "page.md"
    text = (
        "intro\n<!-- generated by: python -c \"print('| a | 1 |')\" -->\nstale\n<!-- end generated -->\n"
        "<!-- measured by: make bench -->\nx: 1.5\n<!-- end measured -->\n"
    )
    page.write_text(text)
    assert generated_blocks.main(["--check", str(page)]) == 1
    assert page.read_text() == text
    assert generated_blocks.main([str(page)]) == 0
    assert page.read_text() == text.replace("stale\n", "| a | 1 |\n")
    assert generated_blocks.main(["--check", str(page)]) == 0
    with pytest.raises(ValueError, match="no matching end line"):
        generated_blocks.blocks("<!-- generated by: python x.py -->\nbody\n")
