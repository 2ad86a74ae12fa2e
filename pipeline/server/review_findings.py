"""`pipeline review`'s state: the audit's findings, one per file, and the decisions taken on them.

Reads audit.json's lists (and the rows audit.csv is made of, for the columns reviewed.csv
repeats) and the audit folder's reviewed.csv when an earlier review left one. Writes
reviewed.csv, the whole file, atomically (temporary name, fsync, os.replace) after every
decision and under one lock, so two decisions posted at once both land and a server killed
at any moment leaves the file as it was after the last decision it answered. reviewed.csv
has audit.csv's columns with the user's `action`, one row per decided file and none for the
rest (nothing undecided is applied): `prepare --fixes reviewed.csv` reads it as it is.
"""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path

from pipeline.core.artifacts import atomic_write_text, csv_cell, csv_read_row
from pipeline.core.errors import PipelineError
from pipeline.data.fixes import parse_action
from pipeline.data.health import ISSUE_KINDS

CSV_COLUMNS = ["path", "class", "split", "issues", "suggested", "score", "action"]  # audit.csv's
# The order of the page: wrong labels first, then what fits no class, the same picture
# under several classes, the pictures' health, and last the doubted labels the models
# learned anyway (audit.csv suggests nothing for them). A file in several lists is shown
# once, under the first; `issues` names them all.
KINDS = ("label_issue", "fits_no_class", "label_conflict", "near_copy", *ISSUE_KINDS, "learned_anyway")


class ReviewError(Exception):
    """A decision that cannot be taken: `status` (404 unknown file, 422 unreadable action) and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def review_items(findings: dict, csv_rows: list[dict]) -> list[dict]:
    """One item per flagged file, in the page's order: path (as in the manifest), kind, issues,
    label (the class prepare gave it), split, suggestion (the class the models suggest, null
    for a picture's health or a duplicate) with its probability, suggested_action (audit.csv's
    action: what taking the suggestion does), score, and for a duplicate its copies."""
    items: dict[str, dict] = {}

    def item(kind: str, path: str, label: str, split: str | None) -> dict:
        found = items.setdefault(
            path,
            {
                "path": path,
                "kind": kind,
                "issues": [],
                "label": label,
                "split": split or "",
                "suggestion": None,
                "probability": None,
                "score": None,
                "learned_probability": None,
                "copies": [],
            },
        )
        if kind not in found["issues"]:
            found["issues"].append(kind)
        if _rank(kind) < _rank(found["kind"]):  # shown under the list that comes first
            found["kind"] = kind
        return found

    doubted = (
        ("label_issue", "label_issues"),
        ("fits_no_class", "fits_no_class"),
        ("learned_anyway", "learned_anyway"),
    )
    for kind, name in doubted:
        for suspect in findings.get(name, []):
            found = item(kind, suspect["path"], suspect["given"], suspect.get("split"))
            if found["suggestion"] is None:  # the first list a file is in says it
                found.update(
                    suggestion=suspect.get("suggested"),
                    probability=suspect.get("suggested_probability"),
                    score=suspect.get("score"),
                    learned_probability=suspect.get("learned_probability"),
                )
    for kind, groups in (("label_conflict", _label_conflicts(findings)), ("near_copy", _near_copies(findings))):
        for group in groups:
            class_of = group.get("class_of") or [p.split("/")[0] for p in group["paths"]]
            for path, cls in zip(group["paths"], class_of):
                found = item(kind, path, cls, group.get("split"))
                others = [{"path": p, "class": c} for p, c in zip(group["paths"], class_of) if p != path]
                found["copies"] += [o for o in others if o not in found["copies"]]
    for kind, flagged in findings.get("health", {}).items():
        for picture in flagged:
            found = item(kind, picture["path"], picture["class"], picture.get("split"))
            if found["score"] is None:
                found["score"] = picture.get("score")
    rows = {row["path"]: row for row in csv_rows}
    ordered = sorted(items.values(), key=lambda found: _rank(found["kind"]))  # stable: severity within a kind
    for found in ordered:
        found["suggested_action"] = rows.get(found["path"], {}).get("action") or "keep"
    return ordered


def _rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _label_conflicts(findings: dict) -> list[dict]:
    """Identical files in several classes (prepare left them out)."""
    return findings.get("exact_duplicates_across_classes") or findings.get("label_conflicts") or []


def _near_copies(findings: dict) -> list[dict]:
    """Near-copies whose members sit in different classes, under either key an audit wrote
    (cross_class_near_copies, near_duplicates_across_classes), each group once."""
    groups, seen = [], set()
    for key in ("cross_class_near_copies", "near_duplicates_across_classes"):
        for group in findings.get(key) or []:
            members = frozenset(group["paths"])
            if members not in seen:
                seen.add(members)
                groups.append(group)
    return groups


class Decisions:
    """The decisions taken so far, kept in `csv_path` (reviewed.csv) after every change."""

    def __init__(self, csv_path: Path, items: list[dict], csv_rows: list[dict], classes: list[str]):
        self.path = Path(csv_path)
        self.classes = classes
        self._items = {found["path"]: found for found in items}
        self._order = [found["path"] for found in items]
        self._rows = {row["path"]: row for row in csv_rows}
        self._lock = threading.Lock()
        self.taken: dict[str, str] = {}
        self.kept_aside: list[dict] = []  # an earlier review's rows this audit does not list, kept as they are
        self._load()

    def _load(self) -> None:
        """An earlier review's decisions; rows this audit does not list are kept as they are
        (a decision is the user's, whatever a later audit says). An unreadable file stops the
        server before it could be overwritten."""
        if not self.path.exists():
            return
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not {"path", "action"} <= set(reader.fieldnames or []):
                    raise PipelineError(f"{self.path} has no path and action columns")
                rows = [csv_read_row(row) for row in reader]  # the cells csv_cell escaped, as they were
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise PipelineError(f"{self.path} cannot be read ({e}): move it aside to start the review afresh") from None
        aside: dict[str, dict] = {}
        for row in rows:  # a file listed twice (an edit by hand): its last row holds
            path, action = (row.get("path") or "").strip(), (row.get("action") or "").strip()
            if path in self._items and self._readable(action):
                self.taken[path] = action
                aside.pop(path, None)
            else:
                self.taken.pop(path, None)
                aside[path] = {column: row.get(column) or "" for column in CSV_COLUMNS}
        self.kept_aside = list(aside.values())

    def _readable(self, action: str) -> bool:
        try:
            parse_action(action, self.classes)
        except PipelineError:
            return False
        return True

    def decide(self, path: object, action: object) -> str | None:
        """Record `action` (keep, exclude, relabel:CLASS or a bare class name, read as relabel to
        it; None clears it) for `path` and rewrite reviewed.csv before returning: a decision
        answered is a decision on disk."""
        if not isinstance(path, str) or path not in self._items:
            raise ReviewError(404, f"{path!r} is not among the audit's findings")
        if action is not None:
            if not isinstance(action, str):
                raise ReviewError(422, "action must be keep, exclude, relabel:CLASS or null (undecided)")
            if action not in ("keep", "exclude") and action in self.classes:
                action = f"relabel:{action}"  # the suggestion as /api/suspects gives it: a class
            try:
                kind, to_class = parse_action(action.strip(), self.classes)
            except PipelineError as e:
                raise ReviewError(422, str(e)) from None
            action = kind if to_class is None else f"relabel:{to_class}"
        with self._lock:  # one rewrite at a time, each with every decision taken before it
            before = self.taken.get(path)
            self.kept_aside = [row for row in self.kept_aside if row["path"] != path]  # replaced, never doubled
            if action is None:
                self.taken.pop(path, None)
            else:
                self.taken[path] = action
            try:
                atomic_write_text(self.path, self.csv_text(), durable=True)
            except OSError as e:
                self._undo(path, before)
                raise ReviewError(
                    507, f"could not write {self.path}: {e.strerror or e}; the decision is not kept"
                ) from None
        return action

    def _undo(self, path: str, before: str | None) -> None:
        if before is None:
            self.taken.pop(path, None)
        else:
            self.taken[path] = before

    def csv_text(self) -> str:
        """reviewed.csv: audit.csv's columns, the decided files in the page's order, then the
        rows kept from an earlier review."""
        out = io.StringIO()
        writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for path in self._order:
            if path in self.taken:
                writer.writerow(_escaped({**self._row(path), "action": self.taken[path]}))
        writer.writerows(map(_escaped, self.kept_aside))
        return out.getvalue()

    def _row(self, path: str) -> dict:
        if path in self._rows:
            return {column: self._rows[path].get(column, "") for column in CSV_COLUMNS}
        found = self._items[path]  # a finding audit.csv has no row for (an audit from before its kind)
        return {
            "path": path,
            "class": found["label"],
            "split": found["split"],
            "issues": "; ".join(found["issues"]),
            "suggested": found["suggestion"] or "",
            "score": "" if found["score"] is None else found["score"],
        }

    def left(self) -> int:
        return sum(path not in self.taken for path in self._order)


def _escaped(row: dict) -> dict:
    """A reviewed.csv row as written: every cell through csv_cell (no live formula in a spreadsheet)."""
    return {column: csv_cell(value) for column, value in row.items()}
