"""MkDocs hook: the study file reference, generated from the pydantic models at build time.

The page ``study-file.md`` holds the line ``<!-- study-reference -->``; this hook
replaces it with :func:`raycf.config.study_reference_markdown`, so the published
reference is always the one of the code being built (nothing pasted, nothing stale).
A page without the placeholder, or a placeholder on another page, fails the build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the checkout's raycf, also when mkdocs runs outside its venv's editable install
    sys.path.insert(0, str(REPO))

PLACEHOLDER = "<!-- study-reference -->"
PAGE = "study-file.md"


def html_safe(markdown: str) -> str:
    """``markdown`` with ``<`` outside code spans escaped: ``<storage_path>`` is text, not an HTML tag."""
    parts = re.split(r"(`[^`]*`)", markdown)
    return "".join(part if part.startswith("`") else part.replace("<", "&lt;") for part in parts)


def reference() -> str:
    """The study file reference as Markdown, from :mod:`raycf.config`."""
    from raycf.config import study_reference_markdown

    return html_safe(study_reference_markdown())


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    """Insert the reference into its page; refuse a misplaced or missing placeholder."""
    path = page.file.src_uri
    if path != PAGE:
        if PLACEHOLDER in markdown:
            raise ValueError(f"{path}: {PLACEHOLDER} belongs in {PAGE} only")
        return markdown
    if markdown.count(PLACEHOLDER) != 1:
        raise ValueError(f"{PAGE}: expected exactly one {PLACEHOLDER} line")
    return markdown.replace(PLACEHOLDER, reference())
