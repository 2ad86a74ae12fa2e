"""`prepare --fixes audit.csv`: the user's decisions on audit's suspects, applied to the scan.

Reads the CSV audit writes (a `path` column, relative to the images folder, and an
`action` column: `keep`, `relabel:CLASS` or `exclude`; other columns are ignored) and
returns a new `FolderScan` with those files relabelled or left out, before anything is
decoded, and the list of fixes applied that report.json records. Every row is checked
first: a file that is not in the folder, a class that does not exist or an action it
cannot read is one error naming the row. Nothing is written, the user's folder least of all.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from pipeline.core.artifacts import csv_read_row
from pipeline.core.errors import PipelineError
from pipeline.data.image_folder import FolderScan

ACTIONS = ("keep", "relabel:CLASS", "exclude")


@dataclasses.dataclass
class Fix:
    path: str
    action: str  # keep | relabel | exclude
    to_class: str | None = None


def read_fixes(csv_path: Path, scan: FolderScan) -> list[Fix]:
    """Every row of the CSV as a Fix, checked against the scan; raises PipelineError naming the first bad row."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise PipelineError(f"--fixes {csv_path}: no such file (audit writes one: artifacts/audit/audit.csv)")
    known = {path for path, _ in scan.files}
    fixes: list[Fix] = []
    seen: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"path", "action"} - set(reader.fieldnames or [])
            if missing:
                raise PipelineError(f"--fixes {csv_path}: no {' or '.join(sorted(missing))} column in its header line")
            for row in map(csv_read_row, reader):
                where = f"--fixes {csv_path} line {reader.line_num}"
                fix = _parse_row(row, where, known, scan.class_names)
                if fix.path in seen:
                    raise PipelineError(f"{where}: {fix.path!r} is listed again (first on line {seen[fix.path]})")
                seen[fix.path] = reader.line_num
                fixes.append(fix)
    except (UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"--fixes {csv_path}: not a readable CSV file ({e})") from None
    return fixes


def _parse_row(row: dict, where: str, known: set[str], class_names: list[str]) -> Fix:
    path = (row.get("path") or "").strip()
    if not path:
        raise PipelineError(f"{where}: the path is empty")
    if path not in known:
        raise PipelineError(f"{where}: {path!r} is not an image file in the images folder")
    try:
        action, to_class = parse_action((row.get("action") or "").strip(), class_names)
    except PipelineError as e:
        raise PipelineError(f"{where}: {e}") from None
    return Fix(path, action, to_class)


def parse_action(action: str, class_names: list[str]) -> tuple[str, str | None]:
    """("keep" | "exclude" | "relabel", the class relabelled to) of an action cell; PipelineError
    saying what is wrong with it (`pipeline review` checks each decision with it too)."""
    if action in ("keep", "exclude"):
        return action, None
    if action.startswith("relabel:"):
        to_class = action.removeprefix("relabel:").strip()
        if to_class not in class_names:
            raise PipelineError(
                f"class {to_class!r} does not exist (the classes: {', '.join(class_names[:20])}"
                + (", ..." if len(class_names) > 20 else "")
                + ")"
            )
        return "relabel", to_class
    raise PipelineError(f"cannot read the action {action!r}; write one of {', '.join(ACTIONS)}")


def apply_fixes(scan: FolderScan, fixes: list[Fix]) -> tuple[FolderScan, list[dict]]:
    """The scan with the files relabelled or left out, and each applied fix as report.json lists it."""
    by_path = {fix.path: fix for fix in fixes}
    files: list[tuple[str, int]] = []
    applied: list[dict] = []
    for path, label in scan.files:
        fix = by_path.get(path)
        if fix is None or fix.action == "keep":
            files.append((path, label))
        elif fix.action == "exclude":
            applied.append({"path": path, "action": "exclude", "class": scan.class_names[label]})
        else:
            new_label = scan.class_names.index(fix.to_class)
            files.append((path, new_label))
            if new_label != label:
                applied.append({"path": path, "action": "relabel", "from": scan.class_names[label], "to": fix.to_class})
    return dataclasses.replace(scan, files=files), applied
