"""audit.html: the audit on one self-contained page.

Reads the audit's findings (audit.json's content) and the prepared rows of the source
images (the pixels the model saw, so the user's folder is not read again). Writes one
file: the counts on top, the label suspects as thumbnails sorted by severity (given ->
suggested class, score), the health issues by kind, the duplicates across classes.
Thumbnails are base64 PNG data URIs and the CSS is inline; every user string (paths,
class names) goes through html.escape.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import __version__
from pipeline.core.artifacts import atomic_write_text
from pipeline.report.html import CSS

MAX_SUSPECTS_SHOWN = 300  # beyond these, audit.csv and audit.json have them all
MAX_PER_KIND_SHOWN = 60

AUDIT_CSS = """
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { background: #fff; border-radius: 6px; padding: 6px; width: 150px; box-shadow: 0 1px 3px rgba(0,0,0,.12);
        font-size: 12px; overflow-wrap: anywhere; }
.tile img { width: 96px; height: 96px; image-rendering: pixelated; display: block; margin: 0 auto 4px; }
.arrow { font-weight: 600; }
"""

KIND_TITLES = {
    "dark": "Dark",
    "light": "Light (overexposed)",
    "blurry": "Blurry",
    "low_information": "Low information (near constant)",
    "odd_aspect_ratio": "Odd aspect ratio",
    "odd_size": "Odd size",
    "grayscale": "Grey in a colour folder",
}


def write_audit_page(path: Path, findings: dict, X: np.ndarray, source_paths: list[str]) -> None:
    row_of = {p: i for i, p in enumerate(source_paths)}
    thumb = lambda p: _thumbnail(X[row_of[p]]) if p in row_of else ""  # noqa: E731
    counts = findings["counts"]
    cards = [("source images", counts["source_images"]), ("label issues", counts["label_issues"])]
    if counts["fits_no_class"]:
        cards += [("doubted, fitting no class", counts["fits_no_class"])]
    cards += [(KIND_TITLES[k].lower(), n) for k, n in counts["health"].items() if n]
    cards += [("exact duplicates across classes", counts["exact_duplicates_across_classes"])]
    cards += [("near duplicates across classes", counts["near_duplicates_across_classes"])]
    body = [
        "<h1>Dataset audit</h1>",
        f'<p class="muted">{escape(findings["data_dir"])} &middot; {len(findings["classes"])} classes &middot; '
        f"{len(findings['folds'])} folds &middot; pipeline {escape(__version__)}</p>",
        '<div class="cards">' + "".join(f"<div class=card><b>{n}</b>{escape(t)}</div>" for t, n in cards) + "</div>",
        "<p>Edit the <code>action</code> column of <code>audit.csv</code> (keep, relabel:CLASS, exclude), then run "
        "<code>pipeline prepare IMAGES --fixes audit.csv</code>: your image folder is never changed.</p>",
    ]
    if findings["label_noise"]:
        body.append("<h2>Labels that belong elsewhere</h2><ul>")
        body += [f"<li>{escape(n['text'])}</li>" for n in findings["label_noise"]]
        body.append("</ul>")
    body.append(f"<h2>Suspected wrong labels ({counts['label_issues']}), most severe first</h2>")
    body.append(_tiles(findings["label_issues"][:MAX_SUSPECTS_SHOWN], thumb, _label_issue_caption))
    if counts["label_issues"] > MAX_SUSPECTS_SHOWN:
        body.append(f'<p class="muted">and {counts["label_issues"] - MAX_SUSPECTS_SHOWN} more in audit.csv</p>')
    if findings["fits_no_class"]:
        body.append(
            f"<h2>Doubted, fitting no class ({counts['fits_no_class']})</h2><p>The models doubt the label "
            "but favour no other class: a picture unlike the classes, or an odd one. audit.csv suggests "
            "leaving them out.</p>"
        )
        body.append(_tiles(findings["fits_no_class"][:MAX_SUSPECTS_SHOWN], thumb, _no_class_caption))
    learned = findings.get("learned_anyway", [])  # audit folders from before it have none
    if learned:
        body.append(
            f"<h2>Doubted, but learned ({len(learned)})</h2><p>The model that never saw these put them in "
            "another class, but the models that trained on them learned their labels, as they learn a hard "
            "picture that is labelled like others of its kind and rarely a wrong label. Most likely right; "
            "audit.csv does not list them.</p>"
        )
        body.append(_tiles(learned[:MAX_SUSPECTS_SHOWN], thumb, _learned_caption))
    body.append("<h2>Health</h2>")
    for kind, items in findings["health"].items():
        if items:
            body.append(f"<h3>{escape(KIND_TITLES[kind])} ({len(items)})</h3>")
            body.append(_tiles(items[:MAX_PER_KIND_SHOWN], thumb, _health_caption))
    body.append(_duplicates(findings))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Dataset audit</title>'
        f"<style>{CSS}{AUDIT_CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n"
    )
    atomic_write_text(path, page)


def _tiles(items: list[dict], thumb, caption) -> str:
    if not items:
        return '<p class="muted">none found</p>'
    tiles = []
    for item in items:
        src = thumb(item["path"])
        image = f'<img alt="" src="{src}">' if src else ""
        tiles.append(f'<div class="tile">{image}{caption(item)}<br>{escape(item["path"])}</div>')
    return '<div class="grid">' + "".join(tiles) + "</div>"


def _label_issue_caption(item: dict) -> str:
    return _suspect_caption(item, f"{escape(item['given'])} &rarr; {escape(item['suggested'])}</span>")


def _no_class_caption(item: dict) -> str:  # the likeliest other class is only a guess
    return _suspect_caption(
        item, f"{escape(item['given'])}? fits no class</span><br>(best guess {escape(item['suggested'])})"
    )


def _learned_caption(item: dict) -> str:
    return _suspect_caption(
        item,
        f"{escape(item['given'])} (read as {escape(item['suggested'])})</span><br>"
        f"learned at {item['learned_probability']:.2f}",
    )


def _suspect_caption(item: dict, verdict: str) -> str:
    return f'<span class="arrow">{verdict}<br>score {item["score"]:.3f} ({escape(item["split"])})'


def _health_caption(item: dict) -> str:
    return f"{escape(item['class'])}: score {item['score']:.3f} ({escape(item['split'])})"


def _duplicates(findings: dict) -> str:
    parts = ["<h2>Duplicates across classes</h2>"]
    exact, near = findings["exact_duplicates_across_classes"], findings["near_duplicates_across_classes"]
    if not exact and not near:
        return parts[0] + '<p class="muted">none found</p>'
    for title, groups in (("identical (left out by prepare)", exact), ("near-identical", near)):
        if groups:
            parts.append(f"<h3>{title} ({len(groups)})</h3><ul>")
            parts += [f"<li>{escape(', '.join(g['classes']))}: {escape(' | '.join(g['paths']))}</li>" for g in groups]
            parts.append("</ul>")
    return "".join(parts)


def _thumbnail(row: np.ndarray) -> str:
    pixels = row[..., 0] if row.shape[-1] == 1 else row
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
