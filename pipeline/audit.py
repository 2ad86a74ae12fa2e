"""audit: the images whose label looks wrong, and the ones unfit to train on.

Reads the data folder prepare wrote (every split's arrays, classes.json, manifest.csv,
health.csv, report.json); never the model folder, never the images folder. Writes,
atomically, the audit folder: audit.json (everything found), pred_probs.npy (the
out-of-fold probabilities, a row per audit.json image), audit.csv (one row per
flagged file with an `action` the user edits: keep, relabel:CLASS, exclude; `prepare
--fixes` reads it) and audit.html (the page: counts, the suspects as thumbnails, the
health issues by kind). A reviewed.csv `pipeline review` wrote there is carried into the new folder.

The steps, in `audit_dataset`'s order: gather every source image of every split once and
the augmented copies of the training ones (`_fold_rows`); assign folds, stratified, a
near-duplicate group within one fold (`splits.audit_folds`); train one CNN per fold on the
others, predict the held-out fold and then the doubted images it trained on
(`training.out_of_fold`; with --backbone, a logistic head per fold on the pretrained
network's cached features, `training.feature_folds`); rank the label issues and estimate each class's noise with cleanlab (`data.label_issues`); flag the health issues
from prepare's measurements (`data.health`); list the duplicates across classes; write.
The audit's models are thrown away.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core import paths
from pipeline.core.artifacts import atomic_dir, atomic_write_text, check_out_dir, csv_cell, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.settings import CNN, AuditSettings
from pipeline.data import health
from pipeline.data.data_folder import load_classes, load_prepare_report, load_split, read_health, read_manifest
from pipeline.data.label_issues import LEARNED_ANYWAY, NO_CLASS, WRONG_CLASS, doubted_rows, find_suspects, noise_shares
from pipeline.data.splits import audit_folds

CSV_COLUMNS = ["path", "class", "split", "issues", "suggested", "score", "action"]
# audit.csv suggests leaving out a picture with only health issues when it is flat as the
# model sees it (every channel's pixels within a few levels of their mean: a black, white
# or single-colour frame); the rest are kept for the user to judge: cleanvision's own
# thresholds call plain letters on a page low-information (a sixth of the letters folder,
# entropy under 2 bits for 4 % of it), and those train well.
FLAT_STD = 3.0  # of 255


def audit_dataset(data_dir: Path, out_dir: Path, settings: AuditSettings) -> dict:
    """Run the whole audit; returns what is also written as audit.json."""
    settings.check()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_out_dir(out_dir, {"data folder": data_dir}, carried=(paths.AUDIT_REVIEWED,))
    classes = load_classes(data_dir)
    report = load_prepare_report(data_dir)
    sources, fold_rows = _fold_rows(data_dir, classes)
    groups = _group_ids(sources["path"], report)
    fold_of = audit_folds(fold_rows.labels, groups, settings.folds, settings.seed)
    started = time.perf_counter()
    labels = fold_rows.labels
    if settings.backbone != CNN:  # logistic heads on the frozen network's cached features
        from pipeline.training.feature_folds import out_of_fold_heads

        trained = out_of_fold_heads(
            fold_rows, fold_of, classes, settings, data_dir, report.get("settings", {}), partial(doubted_rows, labels)
        )
    else:
        from pipeline.training.out_of_fold import out_of_fold_probabilities

        trained = out_of_fold_probabilities(fold_rows, fold_of, classes, settings, partial(doubted_rows, labels))
    probabilities, plan = trained.probabilities, trained.plan
    seconds = time.perf_counter() - started
    findings = {
        "version": __version__,
        "data_dir": str(data_dir.resolve()),
        "classes": classes,
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "folds": trained.folds,
        # side by side in worker processes of `threads` each, or (1 worker) one after the other in this one
        "fold_processes": {"workers": plan.workers, "threads": plan.threads or None},
        "out_of_fold_agreement": round(float(np.mean(probabilities.argmax(1) == labels)), 4),
        **_suspects(sources, find_suspects(labels, probabilities, trained.in_sample), classes),
        "label_noise": noise_shares(labels, probabilities, classes),
        "health": _health_issues(data_dir, sources, _flat(fold_rows.X), fold_rows.X.shape[-1] == 3),
        "exact_duplicates_across_classes": report.get("label_conflicts", []),
        "near_duplicates_across_classes": _near_duplicates_across(report, sources, classes),
        "images": _verdicts(sources, labels, probabilities, trained.in_sample, fold_of, classes),
    }
    findings["counts"] = _counts(findings, len(labels))
    with atomic_dir(out_dir, carried=(paths.AUDIT_REVIEWED,)) as tmp:
        if (out_dir / paths.AUDIT_REVIEWED).is_file():  # `pipeline review`'s decisions are the user's: kept
            shutil.copy2(out_dir / paths.AUDIT_REVIEWED, tmp / paths.AUDIT_REVIEWED)
        write_json(tmp / paths.AUDIT_JSON, findings)
        np.save(tmp / paths.AUDIT_PROBABILITIES, probabilities)
        atomic_write_text(tmp / paths.AUDIT_CSV, audit_csv(findings))
        from pipeline.report.audit_page import write_audit_page

        write_audit_page(tmp / paths.AUDIT_HTML, findings, fold_rows.X, sources["path"])
    return findings


def _fold_rows(data_dir: Path, classes: list[str]):
    """({"split", "index", "path"} per source, FoldRows): every split's source rows once, in
    split order, and the training split's augmented copies with their source's position."""
    from pipeline.training.out_of_fold import FoldRows

    manifest = read_manifest(data_dir)
    sources = {"split": [], "index": [], "path": []}
    X_parts, y_parts, copies, copy_paths = [], [], [], []
    for split in paths.SPLITS:
        X, y = load_split(data_dir, split, len(classes))
        rows = [r for r in manifest if r["split"] == split and r["index"] < len(X)]
        originals = [r["index"] for r in rows if not r["augmented"]]
        for r in rows:
            if r["augmented"]:
                copies.append(np.asarray(X[r["index"]]))
                copy_paths.append(r["path"])
            else:
                sources["split"].append(split)
                sources["index"].append(r["index"])
                sources["path"].append(r["path"])
        X_parts.append(np.asarray(X[originals]) if originals else np.asarray(X[:0]))
        y_parts.append(y[originals] if originals else y[:0])
    if not sources["path"]:
        raise PipelineError(f"{data_dir}/{paths.MANIFEST_FILE} lists no source image: prepare again")
    position = {path: i for i, path in enumerate(sources["path"])}
    X_all = np.concatenate(X_parts)
    X_augmented = np.stack(copies) if copies else X_all[:0]
    augmented_source = np.array([position[p] for p in copy_paths], dtype=np.int64)
    labels = np.concatenate(y_parts).astype(np.int64)
    sources["class"] = [classes[label] for label in labels.tolist()]
    return sources, FoldRows(X_all, labels, X_augmented, augmented_source)


def _verdicts(sources: dict, labels: np.ndarray, probabilities, in_sample, fold_of, classes) -> list[dict]:
    """Every source's out-of-fold verdict, in pred_probs.npy's row order, for a closer look;
    learned_probability: the given label's, from the models that trained on it (asked of the
    doubted labels only; null for the rest)."""
    return [
        {
            "path": path,
            "split": split,
            "given": classes[given],
            "predicted": classes[int(p.argmax())],
            "given_probability": round(float(p[given]), 4),
            "learned_probability": None if np.isnan(q[given]) else round(float(q[given]), 4),  # doubted ones
            "fold": int(fold) + 1,
        }
        for path, split, given, p, q, fold in zip(
            sources["path"], sources["split"], labels.tolist(), probabilities, in_sample, fold_of
        )
    ]


def _group_ids(source_paths: list[str], report: dict) -> np.ndarray:
    """One id per source: its near-duplicate group's (report.json), else its own."""
    group_of = {}
    for g, group in enumerate(report.get("near_duplicate_groups", [])):
        for path in group["paths"]:
            group_of[path] = g
    offset = len(report.get("near_duplicate_groups", []))
    return np.array([group_of.get(p, offset + i) for i, p in enumerate(source_paths)], dtype=np.int64)


def _suspects(sources: dict, suspects: list[dict], classes: list[str]) -> dict[str, list[dict]]:
    """audit.json's three lists of doubted labels, each most severe first: label_issues (the
    models put the image in another class), fits_no_class (they doubt its label but favour
    no other class: a guess is no suggestion) and learned_anyway (doubted out of fold, but the
    models that trained on it learned its label: listed for a look, no action suggested)."""
    lists = {WRONG_CLASS: "label_issues", NO_CLASS: "fits_no_class", LEARNED_ANYWAY: "learned_anyway"}
    found = {name: [] for name in lists.values()}
    for s in suspects:
        item = {**_who(sources, s["position"]), "suggested": classes[s["suggested"]], **_rest(s)}
        found[lists[s["kind"]]].append(item)
    return found


def _who(sources: dict, i: int) -> dict:
    return {"path": sources["path"][i], "split": sources["split"][i], "given": sources["class"][i]}


def _rest(suspect: dict) -> dict:
    keys = ("score", "suggested_probability", "learned_probability")  # the kind is the list it is in
    return {k: suspect[k] for k in keys if suspect.get(k) is not None}


def _flat(X: np.ndarray) -> np.ndarray:
    """Per row: is every channel within FLAT_STD of its mean (a picture with nothing in it)?"""
    flat = np.zeros(len(X), dtype=bool)
    for start in range(0, len(X), 1024):  # a float copy of 1024 rows at a time
        rows = X[start : start + 1024].astype(np.float32)
        flat[start : start + 1024] = rows.std(axis=(1, 2)).max(axis=1) < FLAT_STD
    return flat


def _health_issues(data_dir: Path, sources: dict, flat: np.ndarray, colour: bool) -> dict[str, list[dict]]:
    """Per kind, the flagged sources, worst first, from health.csv (empty before it existed)."""
    measured = read_health(data_dir)
    have = [i for i, p in enumerate(sources["path"]) if p in measured]
    found = {kind: [] for kind in health.ISSUE_KINDS}
    if not have:
        return found
    raw = np.stack([measured[sources["path"][i]] for i in have])
    scores, flags = health.issue_scores(raw), health.flagged(raw, colour)
    for kind in health.ISSUE_KINDS:
        hits = np.flatnonzero(flags[kind])
        for j in hits[np.argsort(scores[kind][hits], kind="stable")].tolist():
            i = have[j]
            found[kind].append(
                {
                    "path": sources["path"][i],
                    "split": sources["split"][i],
                    "class": sources["class"][i],
                    "score": round(float(scores[kind][j]), 4),
                    "flat": bool(flat[i]),
                }
            )
    return found


def _near_duplicates_across(report: dict, sources: dict, classes: list[str]) -> list[dict]:
    label_of = dict(zip(sources["path"], sources["class"]))
    found = []
    for group in report.get("near_duplicate_groups", []):
        names = sorted({label_of[p] for p in group["paths"] if p in label_of})
        if len(names) > 1:
            found.append(
                {
                    "paths": group["paths"],
                    "classes": names,
                    "split": group.get("split"),
                    "class_of": [label_of.get(p, "") for p in group["paths"]],
                }
            )
    return found


def _counts(findings: dict, n: int) -> dict:
    return {
        "source_images": n,
        "label_issues": len(findings["label_issues"]),
        "fits_no_class": len(findings["fits_no_class"]),
        "learned_anyway": len(findings.get("learned_anyway", [])),
        "health": {kind: len(items) for kind, items in findings["health"].items()},
        "exact_duplicates_across_classes": len(findings["exact_duplicates_across_classes"]),
        "near_duplicates_across_classes": len(findings["near_duplicates_across_classes"]),
    }


def audit_csv(findings: dict) -> str:
    """One row per flagged file, its action filled in with the suggestion (the user edits it)."""
    rows: dict[str, dict] = {}

    def row(path: str, cls: str, split: str) -> dict:
        return rows.setdefault(
            path, {"path": path, "class": cls, "split": split, "issues": [], "suggested": "", "score": ""}
        )

    for item in findings["label_issues"]:
        r = row(item["path"], item["given"], item["split"])
        r["suggested"], r["score"] = item["suggested"], item["score"]
        r["issues"].append("label")
        r["action"] = f"relabel:{item['suggested']}"
    for item in findings["fits_no_class"]:  # no other class is favoured: relabelling would be a guess
        r = row(item["path"], item["given"], item["split"])
        r["suggested"], r["score"] = item["suggested"], item["score"]
        r["issues"].append("fits no class")
        r["action"] = "exclude"
    for kind, items in findings["health"].items():
        for item in items:
            r = row(item["path"], item["class"], item["split"])
            r["issues"].append(kind)
            if item["flat"]:
                r["action"] = "exclude"  # nothing to learn from it, whatever its label
            r.setdefault("action", "keep")
    for group in findings["near_duplicates_across_classes"]:
        for path, cls in zip(group["paths"], group["class_of"]):
            r = row(path, cls, group.get("split") or "")
            r["issues"].append("near duplicate across classes")
            r.setdefault("action", "keep")
    for group in findings["exact_duplicates_across_classes"]:  # prepare leaves these out until they agree
        # class_of: each file's class after --fixes (data folders from before it: the folder's name)
        for path, cls in zip(group["paths"], group.get("class_of") or [p.split("/")[0] for p in group["paths"]]):
            r = row(path, cls, "")
            r["issues"].append("exact duplicate across classes")
            r.setdefault("action", "keep")
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows.values():
        row = {**r, "issues": "; ".join(r["issues"]), "action": r.get("action", "keep")}
        writer.writerow({key: csv_cell(value) for key, value in row.items()})
    return out.getvalue()
