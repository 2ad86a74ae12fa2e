"""What each command prints on stdout: rich tables and one-line results.

Results go to stdout (`out`); progress, notes and errors go to stderr (core.progress).
User-controlled text (paths, class names) is printed as plain text: `out` is a
progress.PlainConsole (no markup, control characters escaped), table cells included.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from pipeline.core import paths
from pipeline.core.progress import PlainConsole
from pipeline.core.settings import BACKBONE_SIZES

out = PlainConsole(soft_wrap=True)  # results go to stdout; progress and notes go to stderr


def print_prepare_summary(report: dict, out_dir: Path) -> None:
    table = Table(title=f"Prepared {out_dir}", title_justify="left")
    for column in ("class", "found", "skipped", "duplicates", "train", "val", "test", "+augmented"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, c in report["counts"].items():
        table.add_row(name, *(str(c[k]) for k in paths.COUNT_COLUMNS))
    out.print(table)
    totals = report["totals"]
    out.print(
        f"{totals['found']} image files, {totals['skipped']} skipped, {totals['ignored']} ignored, "
        f"{totals['duplicates_removed']} duplicates removed, {len(report['near_duplicate_groups'])} near-duplicate groups kept together"
    )
    if "split_shares" in report:
        print_split_shares(report["split_shares"])
    _print_skipped(report["skipped"], "skipped", f"see {out_dir / paths.PREPARE_REPORT_FILE}")
    _print_links_out(report.get("links_out", []), f"see {out_dir / paths.PREPARE_REPORT_FILE}")
    for warning in report["warnings"]:  # imbalance included: the one list --strict reads too
        out.print(f"warning: {warning}", markup=False)
    size = report.get("settings", {}).get("size")
    if isinstance(size, int):
        out.print(f"arrays of {size} px: {backbone_sizes(size)}")
    out.print(f"sample grid: {out_dir / paths.SAMPLES_PNG}")


def print_split_shares(shares: dict, near: float = 2.0, shown: int = 5) -> None:
    """One line when every class got the split asked for (within `near` points), else the
    classes that did not, with what each got."""
    asked = shares["asked"]
    pattern = "/".join(f"{asked[s] * 100:g}" for s in paths.SPLITS)
    classes = shares["classes"]
    worst = max((c["off_by"] for c in classes.values()), default=0.0)
    group = f"largest near-copy group: {shares['largest_group']} images"
    if worst <= near:
        out.print(f"split as asked ({pattern} %) within {worst:.1f} points for every class; {group}")
        return
    off = [(name, c) for name, c in classes.items() if c["off_by"] > near]
    out.print(f"split: {len(off)} of {len(classes)} classes more than {near:g} points from {pattern} %; {group}")
    for name, c in sorted(off, key=lambda item: -item[1]["off_by"])[:shown]:
        made = "/".join(f"{c['made'][s] * 100:.0f}" for s in paths.SPLITS)
        out.print(f"  {name}: {made} %")  # plain text: `out` reads no markup
    if len(off) > shown:
        out.print(f"  ... and {len(off) - shown} more (report.json's split_shares)")


def backbone_sizes(size: int | None = None) -> str:
    """Which --size each network of train --backbone wants, and what `size` would do to them."""
    wanted = ", ".join(f"{name} {side}" for name, side in BACKBONE_SIZES.items())
    if size is None:
        return f"the CNN was designed for --size 32; train --backbone wants the size it was pretrained at ({wanted})"
    small = [name for name, side in BACKBONE_SIZES.items() if size < side]
    if not small:
        return f"large enough for every --backbone ({wanted}); the CNN was designed for 32 and is slow at this size"
    fits = [name for name in BACKBONE_SIZES if name not in small]
    wants = ", ".join(f"{name} wants {BACKBONE_SIZES[name]}" for name in small)
    if fits:  # e.g. 224: right for lite0, small for lite1 and lite2
        return (
            f"the CNN's size is 32; {size} px suits train --backbone {', '.join(fits)}; {wants} "
            "(below its size a pretrained network sees less than it was trained on)"
        )
    return (
        f"the CNN's size is 32; for train --backbone prepare with --size {BACKBONE_SIZES[small[0]]} or more "
        f"({wanted}): below it a pretrained network sees less than it was trained on"
    )


def _print_skipped(items: list[dict], verb: str, more_hint: str, shown: int = 20) -> None:
    for item in items[:shown]:
        out.print(f"{verb} {item['path']}: {item['reason']}", markup=False)
    if len(items) > shown:
        out.print(f"... and {len(items) - shown} more: {more_hint}")


def _print_links_out(links: list[dict], more_hint: str, shown: int = 5) -> None:
    """Files and folders read through links that lead out of the images folder: the user should know."""
    if links:
        listed = ", ".join(f"{link['path']} -> {link['target']}" for link in links[:shown])
        more = f" and {len(links) - shown} more ({more_hint})" if len(links) > shown else ""
        out.print(f"read through links leaving the images folder: {listed}{more}")


def print_inspection(found: dict) -> None:
    table = Table(title=f"Inspected {found['images_dir']} (nothing written)", title_justify="left")
    for column in ("class", "files", "usable", "skipped", "formats", "modes"):
        table.add_column(column, justify="right" if column in ("files", "usable", "skipped") else "left")
    for name, c in found["counts"].items():
        table.add_row(
            name,
            str(c["files"]),
            str(c["usable"]),
            str(c["skipped"]),
            ", ".join(f"{k} {v}" for k, v in c["formats"].items()),
            ", ".join(f"{k} {v}" for k, v in c["modes"].items()),
        )
    out.print(table)
    t = found["totals"]
    out.print(
        f"{len(found['classes'])} classes, {t['files']} image files: {t['usable']} usable, {t['skipped']} would be skipped, {t['ignored']} ignored"
    )
    w, h = found["sizes"]["width"], found["sizes"]["height"]
    if w:
        out.print(
            f"width  min {w['min']}  median {w['median']:g}  max {w['max']}\n"
            f"height min {h['min']}  median {h['median']:g}  max {h['max']}"
        )
        if min(w["median"], h["median"]) < min(BACKBONE_SIZES.values()):
            out.print(
                f"note: the median picture is smaller than {min(BACKBONE_SIZES.values())} px: "
                "a pretrained --backbone would see it upscaled"
            )
    out.print(backbone_sizes())
    if found.get("split_shares"):
        print_split_shares(found["split_shares"])
    _print_skipped(found["skipped"], "would skip", "see --json")
    _print_links_out(found.get("links_out", []), "see --json")
    reasons: dict[str, list[str]] = {}
    for item in found["ignored"]:
        reasons.setdefault(item["reason"], []).append(item["path"])
    for reason, items in reasons.items():
        shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
        out.print(f"ignored ({reason}): {shown}", markup=False)
    for warning in found["warnings"]:
        out.print(f"warning: {warning}", markup=False)


def print_metrics(metrics: dict, out_dir: Path) -> None:
    classes = metrics["classes"]
    out.print(f"test accuracy {metrics['accuracy']:.2%}  loss {metrics['loss']:.4f}  ({metrics['n_test']} images)")
    table = Table(title="Per class", title_justify="left")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in classes:
        m = metrics["per_class"][name]
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(table)
    matrix = Table(title="Confusion matrix (rows: true, columns: predicted)", title_justify="left")
    matrix.add_column("")
    for name in classes:
        matrix.add_column(name, justify="right")
    for name, row in zip(classes, metrics["confusion_matrix"]):
        matrix.add_row(name, *(str(v) for v in row))
    out.print(matrix)
    if metrics["most_confused"]:
        pairs = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in metrics["most_confused"])
        out.print(f"most confused: {pairs}")
    calibration = metrics.get("calibration")
    if calibration:
        before, after, floor = calibration["before"], calibration["after"], calibration["ece_noise_floor"]
        temperature = calibration["temperature"]
        out.print(
            f"calibration: ECE {before['ece']:.2%} -> {after['ece']:.2%} "
            f"(a calibrated model shows {floor['p5']:.2%}-{floor['p95']:.2%} here), NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}, " + (f"temperature {temperature:.3f}" if temperature else "no temperature")
        )
        out.print(calibration["advice"], markup=False)
    _print_novelty(metrics.get("novelty") or {})
    out.print(f"reports written to {out_dir}; open {out_dir / paths.REPORT_HTML} in a browser")


def _print_novelty(novelty: dict) -> None:
    if not novelty.get("available"):
        if novelty.get("note"):
            out.print(f"unknown: {novelty['note']}", markup=False)
        return
    out.print(
        f"unknown: novelty above {novelty['threshold']:.4f} (keeps {novelty['keep']:.0%} of {novelty['set_on']}): "
        f"{novelty['test_refused']:.1%} of test pictures",
        markup=False,
    )
    foreign = novelty.get("foreign")
    if foreign:
        baseline = foreign["baseline"]
        out.print(
            f"foreign ({foreign['n_foreign']} in {foreign['folder']}): AUROC {foreign['auroc']:.4f} "
            f"(max softmax {baseline['auroc']:.4f}), FPR@95 {foreign['fpr_at_95_tpr']:.1%} "
            f"(max softmax {baseline['fpr_at_95_tpr']:.1%}); {foreign['foreign_accepted']:.1%} accepted at the threshold",
            markup=False,
        )


def print_train_summary(summary: dict, out_dir: Path) -> None:
    trained = (
        f"trained {summary['epochs_run']} epoch(s) in {summary['seconds']:.1f}s; best epoch {summary['best_epoch']} "
        f"({summary['monitor']} {summary['best']:.4f})"
    )
    in_sync = f"; weights sha256 {summary['weights_sha256']}" if "weights_sha256" in summary else ""
    if "role" in summary:  # a worker of a cluster other than the chief: the chief writes the model
        out.print(f"{summary['role']}: {trained}; the chief writes the model folder{in_sync}")
    else:
        calibration = summary.get("calibration") or {}
        if calibration.get("temperature_kept") is False:
            out.print(
                "calibrated on validation: no temperature kept (the one fitted would sharpen every answer, "
                "and fitted on part of the validation split it did not lower the NLL of the rest: too few mistakes)"
            )
        elif calibration.get("temperature") is not None:  # before the last line, which says where the model is
            out.print(
                f"calibrated on validation: temperature {calibration['temperature']:.3f}, "
                f"ECE {calibration['val_ece_before']:.2%} -> {calibration['val_ece_after']:.2%}, "
                f"NLL {calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f}"
            )
        novelty = summary.get("novelty") or {}
        if novelty.get("threshold") is not None:
            out.print(
                f"unknown above novelty {novelty['threshold']:.4f}: keeps {novelty['keep']:.0%} of the "
                f"{novelty['set_on']} pictures, measured against {novelty['bank_images']} training images"
            )
        out.print(f"{trained}; model written to {out_dir}, curves in {out_dir / paths.CURVES_PNG}{in_sync}")


def print_learning_rate_found(found: dict) -> None:
    if "role" in found:
        out.print(f"{found['role']}: the chief runs the learning-rate sweep (one process, global batch)")
        return
    out.print(
        f"suggested --learning-rate {found['suggestion']:.2g} (loss fell fastest near {found['steepest']:.2g}, "
        f"lowest at {found['min_loss_lr']:.2g}); plot in {found['plot']}"
    )


def print_predictions(results) -> None:
    """One line per file: file, label, confidence, novelty (where the model has a novelty score),
    and the other guesses of the top k."""
    for r in results:
        others = r.top_k[1:] if r.label == r.top_k[0]["label"] else r.top_k  # "unsure", "unknown": the guesses
        extra = "  ".join(f"{t['label']} {t['probability']:.1%}" for t in others)
        novelty = "" if r.novelty is None else f"\tnovelty {r.novelty:.3f}"
        out.print(f"{r.file}\t{r.label}\t{r.confidence:.1%}{novelty}" + (f"\t({extra})" if extra else ""), markup=False)


def print_export(record: dict, fmt: str, model_dir: Path) -> None:
    """The export and its check: agreement with Keras, the largest probability difference, accuracies."""
    out.print(
        f"exported {fmt} to {model_dir / record['path']} ({record['bytes'] / 1e6:.2f} MB); on {record['n_test']} "
        f"test images: top-1 agreement with Keras {record['agreement']:.2%}, largest probability difference "
        f"{record['max_difference']:.3g}, accuracy {record['accuracy']:.2%} (Keras {record['keras_accuracy']:.2%})"
        + (
            f", largest novelty difference {record['novelty_max_difference']:.3g} (same unknown answer on "
            f"{record['unknown_agreement']:.2%})"
            if record.get("novelty_max_difference") is not None
            else ""
        )
        + f"; recorded in {model_dir / paths.EXPORTS_FILE}",
        markup=False,
    )


def _other_doubts(counts: dict) -> str:
    n, learned = counts["fits_no_class"], counts.get("learned_anyway", 0)
    said = f" and {n} doubted but fitting no class (audit.csv suggests exclude)" if n else ""
    return said + (
        f" ({learned} more doubted but learned by the models that trained on them: likely right)" if learned else ""
    )


def print_audit_summary(findings: dict, out_dir: Path, shown: int = 10) -> None:
    """The audit in a few lines: the counts, the worst suspects, the noise per class, the page."""
    counts = findings["counts"]
    health = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in counts["health"].items() if n) or "none"
    out.print(
        f"Audited {counts['source_images']} source images in {len(findings['folds'])} folds "
        f"(out-of-fold agreement with the labels {findings['out_of_fold_agreement']:.1%}): "
        f"{counts['label_issues']} label issue(s){_other_doubts(counts)}; health: {health}; "
        f"{counts['exact_duplicates_across_classes']} exact and {counts['near_duplicates_across_classes']} "
        "near duplicate group(s) across classes"
    )
    if findings["label_issues"]:
        table = Table(title="Most likely wrong labels", title_justify="left")
        for column in ("file", "given", "suggested", "score"):
            table.add_column(column, justify="right" if column == "score" else "left")
        for item in findings["label_issues"][:shown]:  # plain text: `out` reads no markup in a cell
            table.add_row(item["path"], item["given"], item["suggested"], f"{item['score']:.3f}")
        out.print(table)
    for noise in findings["label_noise"][:shown]:
        out.print(noise["text"], markup=False)
    out.print(f"page: {out_dir / paths.AUDIT_HTML}", markup=False)
    out.print(
        f"edit the action column of {out_dir / paths.AUDIT_CSV}, then: pipeline prepare IMAGES --fixes "
        f"{out_dir / paths.AUDIT_CSV}",
        markup=False,
    )
