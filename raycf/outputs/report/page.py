"""The page: the sections in order, rendered as one self-contained HTML file with its figures beside it."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from raycf.config import StudyConfig
from raycf.outputs.report.analysis_sections import (
    detection_section,
    global_mc_section,
    learned_detector_section,
    study_section,
)
from raycf.outputs.report.blocks import (
    INDEX_FILE,
    REPORT_FOLDER,
    Figure,
    ReportContext,
    Section,
)
from raycf.outputs.report.dfr_section import dfr_section
from raycf.outputs.report.final_sections import final_section
from raycf.outputs.atlas import atlas_section  # the filter atlas (issue 24 item 4)
from raycf.outputs.report.gallery import gallery_section
from raycf.outputs.report.groups_sections import groups_section, planted_section
from raycf.outputs.report.search_sections import search_noise_section, search_section
from raycf.results import storage
from raycf.runtime.console import log, progress

if TYPE_CHECKING:
    pass

SECTIONS: tuple[Callable[[ReportContext], Section | None], ...] = (
    planted_section,  # planted studies only (None otherwise), as groups_section
    study_section,
    groups_section,
    detection_section,
    learned_detector_section,
    final_section,
    dfr_section,  # final.dfr only (None otherwise)
    search_section,
    search_noise_section,
    global_mc_section,
    atlas_section,
    gallery_section,
)



# ------------------------------------------------------------------ the page


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 24px 48px; color: #1d232b; }
header { border-bottom: 1px solid #d8dde3; margin-bottom: 8px; }
nav a { margin-right: 14px; }
h2 { margin-top: 36px; border-bottom: 1px solid #eef0f3; }
table.data { border-collapse: collapse; margin: 12px 0; font-variant-numeric: tabular-nums; }
table.data caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
table.data th, table.data td { border: 1px solid #d8dde3; padding: 3px 8px; text-align: left; }
table.data th { background: #f3f5f7; }
figure { margin: 16px 0; }
figure img { max-width: 100%; border: 1px solid #eef0f3; }
div.table { overflow-x: auto; }
figcaption { color: #4a5563; font-size: 13px; }
p.note { color: #8a5300; background: #fff7e6; padding: 4px 8px; }
pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
"""

# Records, once the page has loaded, how many figures decoded; a figure that
# did not decode is a console error (the report's browser test looks for both).
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (image) { return !(image.complete && image.naturalWidth > 0); });
  document.body.setAttribute("data-figures", String(images.length));
  document.body.setAttribute("data-broken-figures", String(broken.length));
  if (broken.length) { console.error("raycf report: " + broken.length + " figure(s) did not decode"); }
});
"""


def figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    caption = html.escape(figure.caption)
    return f'<figure id="fig-{figure.name}"><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption} ({figure.name}.png)</figcaption></figure>'


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    """The self-contained HTML page."""
    navigation = " ".join(f'<a href="#{section.anchor}">{html.escape(section.title)}</a>' for section in sections)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>",
        '<body data-figures="pending">',
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{navigation}</nav></header>",
    ]
    for section in sections:
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        parts.extend(figure_html(block) if isinstance(block, Figure) else block for block in section.blocks)
        parts.append("</section>")
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def build_report(results: str, output: str, study: StudyConfig) -> dict:
    """Write ``index.html`` and the figures' PNG files into ``output``; return a summary."""
    context = ReportContext(results=results, study=study)
    sections = []
    for build in progress(SECTIONS, "report: sections"):
        if (section := build(context)) is not None:
            sections.append(section)
    figures = [figure for section in sections for figure in section.figures]
    for figure in figures:
        storage.write_bytes(storage.join_uri(output, f"{figure.name}.png"), figure.png)
    for name, text in (item for section in sections for item in section.files.items()):
        storage.write_text(storage.join_uri(output, name), text)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = render_page(f"raycf study report: {study.name}", f"Results {results} · config hash {study.config_hash()} · generated {generated}", sections)
    storage.write_text(storage.join_uri(output, INDEX_FILE), page)
    notes = sum(1 for section in sections for block in section.blocks if isinstance(block, str) and block.startswith('<p class="note">'))
    log(f"report: {len(figures)} figures, {len(sections)} sections, {notes} notes on missing parts")
    return {"figures": [figure.name for figure in figures], "sections": [section.anchor for section in sections], "notes": notes}


# ------------------------------------------------------------------ stage and command


def write_report(results: str) -> str:
    """``raycf report RESULTS``: (re)build ``<results>/report/`` from the results folder alone; return index.html's location.

    The folder is written elsewhere and moved into place (atomic), with the
    stage's marker, exactly as when ``raycf study`` runs the report stage.
    """
    from raycf.pipeline import run_stage
    from raycf.results.artefacts import load_results_study

    results = storage.normalise_root(results)
    study = load_results_study(results)
    run_stage(study, "report", results=results)
    return storage.join_uri(results, REPORT_FOLDER, INDEX_FILE)
