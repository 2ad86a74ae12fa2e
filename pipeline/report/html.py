"""report.html: one self-contained page with everything a person wants to look at.

Reads what the stages already wrote: the data folder's report.json and samples.png, the
model folder's settings.json and training_curves.png, and evaluate's own metrics and
figures. Figures are embedded as base64 data URIs and the CSS is inline, so the single
file opens anywhere, offline. Every piece of user-controlled text (class names, paths,
folder names) goes through html.escape.
"""

from __future__ import annotations

import base64
import datetime
import json
from html import escape
from pathlib import Path

from pipeline import __version__
from pipeline.core import paths
from pipeline.core.artifacts import read_json_optional

MAX_SKIPPED_ROWS = 50

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2933;
       background: #f5f7fa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { margin: 0 0 4px; font-size: 28px; }
h2 { margin-top: 36px; border-bottom: 2px solid #d9e2ec; padding-bottom: 4px; }
.muted { color: #627d98; font-size: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 20px 0; }
.card { background: #fff; border-radius: 8px; padding: 12px 18px; box-shadow: 0 1px 3px rgba(0,0,0,.12); min-width: 130px; }
.card b { display: block; font-size: 26px; color: #1d4ed8; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 16px; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e4e7eb; text-align: right; }
th { background: #eef2f7; }
td:first-child, th:first-child { text-align: left; }
.settings { display: flex; flex-wrap: wrap; gap: 24px; }
.settings table td { text-align: left; }
figure { margin: 12px 0; background: #fff; padding: 12px; border-radius: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: #627d98; font-size: 13px; margin-top: 6px; }
.warning { background: #fff4e5; border-left: 4px solid #f59e0b; padding: 8px 12px; margin: 8px 0; }
.low { color: #b91c1c; font-weight: 600; }
code { background: #eef2f7; padding: 1px 4px; border-radius: 3px; }
"""


def write_report(path: Path, metrics: dict, data_dir: Path, model_dir: Path, figures_dir: Path) -> None:
    """Write report.html to `path`; the figures come from their stages' folders and `figures_dir`."""
    data_dir, model_dir, figures_dir = Path(data_dir), Path(model_dir), Path(figures_dir)
    prepare = read_json_optional(data_dir / paths.PREPARE_REPORT_FILE)
    train = read_json_optional(model_dir / paths.TRAIN_SETTINGS_FILE)
    body = [  # results first, then how they came about
        _header(metrics, data_dir, model_dir),
        _metrics_section(metrics),
        _section(
            "Confusion matrix",
            _figure(
                figures_dir / paths.CONFUSION_PNG,
                "Rows: true class, columns: predicted. Each cell: count and share of its true class.",
            ),
        ),
        _calibration_section(metrics.get("calibration"), figures_dir),
        _novelty_section(metrics.get("novelty"), figures_dir),
        _section(
            "Misclassified test images",
            _figure(
                figures_dir / paths.MISCLASSIFIED_PNG,
                "Most confident mistakes first, as the model sees them (resized).",
            )
            + _gradcam_figure(figures_dir / paths.MISCLASSIFIED_GRADCAM_PNG),
        ),
        _section(
            "Training",
            _training_summary(train) + _figure(model_dir / paths.CURVES_PNG, "Loss and accuracy per epoch"),
        ),
        _dataset_section(prepare, data_dir / paths.SAMPLES_PNG),
        _settings_section(prepare, train),
    ]
    html = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Classifier report: {metrics['accuracy']:.1%} test accuracy</title>\n<style>{CSS}</style>\n"
        "</head>\n<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n"
    )
    Path(path).write_text(html, encoding="utf-8")


def _section(title: str, content: str) -> str:
    return f"<section>\n<h2>{escape(title)}</h2>\n{content}\n</section>"


def _figure(png: Path, caption: str) -> str:
    if not png.is_file():
        return f'<p class="muted">{escape(png.name)} is not available ({escape(str(png))}).</p>'
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(png.stem.replace("_", " "))}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list], classes: str = "") -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value) -> str:
    if isinstance(value, tuple):  # (text, css class)
        return f'<td class="{value[1]}">{escape(str(value[0]))}</td>'
    return f"<td>{escape(str(value))}</td>"


def _header(metrics: dict, data_dir: Path, model_dir: Path) -> str:
    calibration = metrics.get("calibration") or {}
    cards = [
        ("test accuracy", f"{metrics['accuracy']:.1%}"),
        *((("ECE (calibrated)", f"{calibration['after']['ece']:.2%}"),) if calibration else ()),
        ("macro F1", f"{metrics.get('macro_f1', 0):.3f}"),
        ("test loss", f"{metrics['loss']:.4f}"),
        ("test images", str(metrics["n_test"])),
        ("classes", str(len(metrics["classes"]))),
    ]
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<h1>Image classifier report</h1>\n"
        f'<p class="muted">pipeline {escape(__version__)} · {escape(when)} · data <code>{escape(str(data_dir.resolve()))}</code>'
        f" · model <code>{escape(str(model_dir.resolve()))}</code></p>\n"
        '<div class="cards">'
        + "".join(f"<div class=card><b>{escape(v)}</b>{escape(k)}</div>" for k, v in cards)
        + "</div>"
    )


def _gradcam_figure(png: Path) -> str:
    if not png.is_file():  # no mistakes: nothing to explain
        return ""
    return _figure(
        png,
        "The same mistakes with their Grad-CAM heatmaps: red is where the model found the class it wrongly gave.",
    )


def _calibration_section(calibration: dict | None, figures_dir: Path) -> str:
    """Can the confidence be believed: ECE and NLL before and after the temperature, the
    noise floor, the sentence on thresholds, and the two figures."""
    if not calibration:
        return ""
    before, after, floor = calibration["before"], calibration["after"], calibration["ece_noise_floor"]
    temperature = calibration.get("temperature")
    rows = [
        ["ECE (15 bins)", f"{before['ece']:.2%}", f"{after['ece']:.2%}"],
        ["NLL", f"{before['nll']:.4f}", f"{after['nll']:.4f}"],
        ["mean confidence", f"{before['mean_confidence']:.1%}", f"{after['mean_confidence']:.1%}"],
        ["accuracy", f"{before['accuracy']:.1%}", f"{after['accuracy']:.1%}"],
    ]
    told = (
        f"One temperature, {temperature:.3f}, fitted on the validation split, divides the network's logits."
        if temperature
        else "This model has no temperature (trained without a validation split): its probabilities are as the network gives them."
    )
    verdict = (
        f"A perfectly calibrated model with these confidences shows an ECE of {floor['p5']:.2%}-{floor['p95']:.2%} "
        f"on {sum(b['count'] for b in calibration['reliability'])} test images "
        f"(mean {floor['mean']:.2%}): this one is "
        + ("within that noise." if calibration.get("within_noise_floor") else "above it.")
    )
    parts = [
        f"<p><b>{escape(calibration['advice'])}</b></p>",
        f"<p>{escape(told)} {escape(verdict)}</p>",
        _table(["on the test split", "before", "after"], rows),
        _figure(
            figures_dir / paths.RELIABILITY_PNG, "Accuracy against confidence: a calibrated model follows the diagonal."
        ),
        _figure(
            figures_dir / paths.RISK_COVERAGE_PNG,
            "Accuracy of the images answered against the share answered, as the threshold rises.",
        ),
    ]
    return _section("Calibration: how far to trust the confidence", "\n".join(parts))


def _novelty_section(novelty: dict | None, figures_dir: Path) -> str:
    """Unknown pictures: the threshold, the test pictures it refuses and, with --foreign, how well
    the novelty tells the foreign folder apart, against the max-softmax baseline."""
    if not novelty:
        return ""
    if not novelty.get("available"):
        return _section("Unknown pictures", f"<p>{escape(novelty.get('note') or 'No novelty score.')}</p>")
    told = (
        f"Novelty: the {escape(novelty['method'])}. Above {novelty['threshold']:.4f} (set to keep "
        f"{novelty['keep']:.0%} of the {escape(str(novelty['set_on']))} pictures) a picture is answered "
        f"&ldquo;unknown&rdquo;: here {novelty['test_refused']:.1%} (&plusmn;{novelty['test_refused_se']:.1%}) of the "
        "test pictures."
    )
    parts = [f"<p>{told}</p>"]
    foreign = novelty.get("foreign")
    if foreign:
        baseline = foreign["baseline"]
        parts += [
            f"<p>Against {foreign['n_foreign']} pictures of none of the classes "
            f"(<code>{escape(str(foreign['folder']))}</code>): {foreign['foreign_accepted']:.1%} "
            f"(&plusmn;{foreign['foreign_accepted_se']:.1%}) accepted as one of the classes at the threshold.</p>",
            _table(
                ["score", "AUROC", "foreign kept at 95 % of test kept (FPR@95)"],
                [
                    [
                        "novelty",
                        f"{foreign['auroc']:.4f} ± {foreign['auroc_se']:.4f}",
                        f"{foreign['fpr_at_95_tpr']:.1%} ± {foreign['fpr_at_95_tpr_se']:.1%}",
                    ],
                    [
                        baseline["score"],
                        f"{baseline['auroc']:.4f} ± {baseline['auroc_se']:.4f}",
                        f"{baseline['fpr_at_95_tpr']:.1%} ± {baseline['fpr_at_95_tpr_se']:.1%}",
                    ],
                ],
            ),  # fmt: skip
        ]
    else:
        parts.append("<p>No foreign folder was given: <code>pipeline evaluate --foreign DIR</code> measures one.</p>")
    parts.append(
        _figure(
            figures_dir / paths.NOVELTY_PNG, "Novelty of the test pictures (and the foreign ones) and the threshold."
        )
    )
    return _section("Unknown pictures: novelty", "\n".join(parts))


def _dataset_section(prepare: dict | None, samples: Path) -> str:
    if prepare is None:
        return _section("Dataset", '<p class="muted">The data folder has no readable report.json.</p>')
    parts = [f"<p>Images from <code>{escape(str(prepare.get('images_dir', '?')))}</code>.</p>"]
    columns = ["found", "skipped", "duplicates", "train", "val", "test", "train_augmented"]
    rows = [[name, *(c.get(k, 0) for k in columns)] for name, c in prepare.get("counts", {}).items()]
    parts.append(_table(["class", *[c.replace("_", " ") for c in columns]], rows))
    totals = prepare.get("totals", {})
    parts.append(
        f"<p>{totals.get('found', 0)} image files, {totals.get('skipped', 0)} skipped, "
        f"{totals.get('ignored', 0)} ignored, {totals.get('duplicates_removed', 0)} duplicates removed, "
        f"{len(prepare.get('near_duplicate_groups', []))} near-duplicate groups kept in one split.</p>"
    )
    warnings = prepare.get("warnings", [])  # every warning prepare had, imbalance included
    parts.extend(f'<div class="warning">{escape(w)}</div>' for w in warnings)
    skipped = prepare.get("skipped", [])
    if skipped:
        rows = [[s.get("path", ""), s.get("reason", "")] for s in skipped[:MAX_SKIPPED_ROWS]]
        parts.append("<h3>Skipped files</h3>" + _table(["file", "reason"], rows, "skipped"))
        if len(skipped) > MAX_SKIPPED_ROWS:
            parts.append(f'<p class="muted">... and {len(skipped) - MAX_SKIPPED_ROWS} more in report.json.</p>')
    parts.append(
        _figure(
            samples,
            "Training images as the model sees them; blue frames are augmented copies of the original before them.",
        )
    )
    return _section("Dataset", "\n".join(parts))


def _settings_table(title: str, settings: dict | None) -> str:
    if not settings:
        return f'<div><h3>{escape(title)}</h3><p class="muted">not available</p></div>'
    rows = [[key, json.dumps(value) if isinstance(value, (list, dict)) else value] for key, value in settings.items()]
    return f"<div><h3>{escape(title)}</h3>{_table(['setting', 'value'], rows)}</div>"


def _settings_section(prepare: dict | None, train: dict | None) -> str:
    return _section(
        "Settings",
        '<div class="settings">'
        + _settings_table("prepare", (prepare or {}).get("settings"))
        + _settings_table("train", (train or {}).get("train"))
        + "</div>",
    )


def _training_summary(train: dict | None) -> str:
    summary = (train or {}).get("summary")
    if not summary:
        return ""
    best = summary.get("best")
    return (
        f"<p>{summary.get('epochs_run', '?')} epoch(s) in {summary.get('seconds', 0):.1f}s; "
        f"kept epoch {summary.get('best_epoch', '?')} ({escape(str(summary.get('monitor', '')))} "
        f"{best if best is None else f'{best:.4f}'})"
        + ("; training was interrupted" if summary.get("interrupted") else "")
        + ".</p>"
    )


def _metrics_section(metrics: dict) -> str:
    rows = []
    for name in metrics["classes"]:
        m = metrics["per_class"][name]
        rows.append(
            [
                name,
                *((f"{m[k]:.3f}", "low") if m[k] < 0.5 else f"{m[k]:.3f}" for k in ("precision", "recall", "f1")),
                m["support"],
            ]
        )
    parts = [_table(["class", "precision", "recall", "F1", "support"], rows, "metrics")]
    confused = metrics.get("most_confused") or []
    if confused:
        parts.append(
            "<h3>Most confused pairs</h3>"
            + _table(["true", "predicted as", "count"], [[p["true"], p["predicted"], p["count"]] for p in confused])
        )
    return _section("Metrics on the test split", "\n".join(parts))
