"""The data folder that prepare writes and train, evaluate and audit read: its writers and readers.

X_{split}.npy are uint8 rows (N x size x size x channels), y_{split}.npy int64 labels,
classes.json the class names (index = label), manifest.csv one row per array row
(split,index,path,label,augmented), health.csv one row per source image (split, path,
label and health.RAW_COLUMNS). Rows are written and read with plain file I/O or
short-lived memory maps, so no process holds a whole array it does not need; arrays load
without pickle.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.artifacts import csv_read_row, csv_row, load_array, read_json, write_json
from pipeline.core.errors import PipelineError

MANIFEST_COLUMNS = ["split", "index", "path", "label", "augmented"]


def create_rows_file(path: Path, shape: tuple[int, ...]) -> int:
    """Create a zero-filled uint8 .npy of `shape` (sparse on disk); return where its rows start."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        offset = f.tell()
        f.truncate(offset + math.prod(shape))
    return offset


def write_rows(path: Path, offset: int, start: int, rows: np.ndarray) -> None:
    """Write consecutive rows from `start` with plain file I/O: the pages go to the OS cache,
    not into this process's resident memory as a memory map's would."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.size:
        with open(path, "r+b") as f:
            f.seek(offset + start * (rows.size // len(rows)))
            f.write(rows.data)


def read_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The given rows of a .npy, copied out of a memory map that is closed again at once."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        return np.asarray(array[rows])
    finally:
        del array


def write_manifest(path: Path, rows: list[tuple[str, int, str, str, int]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(csv_row(row) for row in rows)


def read_manifest(data_dir: Path) -> list[dict]:
    """Every row of manifest.csv: split, index (int), path, label, augmented (bool)."""
    manifest = Path(data_dir) / paths.MANIFEST_FILE
    if not manifest.is_file():
        raise PipelineError(f"{manifest} is missing: {paths.PREPARE_HINT}")
    with open(manifest, newline="", encoding="utf-8") as f:
        return [
            {**row, "index": int(row["index"]), "augmented": row["augmented"] == "1"}
            for row in map(csv_read_row, csv.DictReader(f))
        ]


def write_health(path: Path, scan, sources, split_of: np.ndarray, values: list[list[str] | None]) -> None:
    """health.csv: the kept source images' health values (`data.health.RAW_COLUMNS`, as the
    fields decoding made of them: `health.as_fields`), in split order."""
    from pipeline.data.health import RAW_COLUMNS

    rows = [["split", "path", "label", *RAW_COLUMNS]]
    for split in paths.SPLITS:
        members = np.flatnonzero(split_of == split)
        for row, label in zip(sources.rows[members].tolist(), sources.labels[members].tolist()):
            rows.append([split, scan.files[row][0], sources.class_names[label], *values[row]])
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(csv_row(row) for row in rows)


def read_health(data_dir: Path) -> dict[str, np.ndarray]:
    """health.csv as {path: values}; empty for a data folder prepared before it existed."""
    from pipeline.data.health import RAW_COLUMNS

    file = Path(data_dir) / paths.HEALTH_FILE
    if not file.is_file():
        return {}
    with open(file, newline="", encoding="utf-8") as f:
        return {
            row["path"]: np.array([float(row[c]) for c in RAW_COLUMNS]) for row in map(csv_read_row, csv.DictReader(f))
        }


def read_split_paths(data_dir: Path, split: str, n: int) -> list[str]:
    """The source path of each of a split's first `n` rows ("" where the manifest is missing)."""
    manifest = Path(data_dir) / paths.MANIFEST_FILE
    found = [""] * n
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as f:
            for row in map(csv_read_row, csv.DictReader(f)):
                if row["split"] == split and int(row["index"]) < n:
                    found[int(row["index"])] = row["path"]
    return found


def write_classes(folder: Path, classes: list[str]) -> None:
    write_json(Path(folder) / paths.CLASSES_FILE, classes)


def load_classes(folder: Path, missing_hint: str = paths.PREPARE_HINT) -> list[str]:
    classes = read_json(Path(folder) / paths.CLASSES_FILE, missing_hint)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise PipelineError(f"{Path(folder) / paths.CLASSES_FILE} must be a list of at least 2 class names")
    return classes


def load_split(data_dir: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One split as prepare wrote it (memory-mapped, no pickle), checked for consistency."""
    X = load_array(Path(data_dir) / paths.images_file(split), paths.PREPARE_HINT)
    y = np.asarray(load_array(Path(data_dir) / paths.labels_file(split), paths.PREPARE_HINT))
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != X.shape[2] or X.shape[3] not in (1, 3):
        raise PipelineError(
            f"{data_dir}/{paths.images_file(split)} is not a prepared image array (uint8 N x size x size x 1|3), got {X.dtype} {X.shape}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(X):
        raise PipelineError(
            f"{data_dir}/{paths.labels_file(split)} does not match {paths.images_file(split)} ({len(y)} labels for {len(X)} images)"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise PipelineError(
            f"{data_dir}/{paths.labels_file(split)} has labels outside the {num_classes} classes of classes.json"
        )
    return X, y.astype(np.int64)


def load_prepare_report(data_dir: Path) -> dict:
    return read_json(Path(data_dir) / paths.PREPARE_REPORT_FILE, paths.PREPARE_HINT)


@dataclass
class TrainingData:
    """What train reads of the data folder: the train and val splits and the classes."""

    classes: list[str]
    X_train: np.ndarray  # memory-mapped uint8 rows
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    prepare_report: dict


def load_training_data(data_dir: Path) -> TrainingData:
    """The train and val splits (memory-mapped) and the classes, checked before TensorFlow loads."""
    classes = load_classes(data_dir)
    X_train, y_train = load_split(data_dir, "train", len(classes))
    X_val, y_val = load_split(data_dir, "val", len(classes))
    if len(X_train) == 0:
        raise PipelineError(f"{data_dir} has no training images: prepare again with more images")
    if X_val.shape[1:] != X_train.shape[1:]:
        raise PipelineError(
            f"{data_dir}: train and val images differ in shape ({X_train.shape[1:]} vs {X_val.shape[1:]})"
        )
    return TrainingData(classes, X_train, y_train, X_val, y_val, load_prepare_report(data_dir))
