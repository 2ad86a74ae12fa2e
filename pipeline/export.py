"""export: the trained model in another format, checked against Keras before it is kept.

Reads the model folder (model.keras in safe mode, classes.json, preprocess.json) and the
data folder (up to --calibration-images evenly spaced training images to calibrate int8,
and the test split for the check). Writes into the model folder, beside what is there and
each atomically: the export under the name that says what it is (paths.EXPORT_PATHS:
model_int8.tflite, model.onnx, model_openvino/, model_saved/), exports.json (each
format's check) and MODEL_CARD.md, rewritten with it.

The check: the export, loaded back through the runner `--engine <format>` uses
(inference/engines.py), and the Keras model both run on the test split: top-1 agreement,
the largest probability difference and the accuracy of each are printed and recorded. An
int8 file with Select TF ("Flex") ops, an agreement below --min-agreement, or a float
export whose probabilities move more than the bound, is refused with one line and nothing
is written. Reading the test split here checks the export; it chooses nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from pathlib import Path

import numpy as np

from pipeline.core import paths, progress
from pipeline.core.artifacts import atomic_dir, atomic_file, read_json_optional, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.settings import FLOAT_EXPORT_DIFFERENCE, ExportSettings
from pipeline.data.data_folder import load_classes, load_prepare_report, load_split
from pipeline.data.images import channels
from pipeline.inference.classifier import Classifier
from pipeline.inference.engines import export_path, flex_ops, keras_runner, runner_for
from pipeline.inference.model_folder import (
    check_model_fits,
    inference_model,
    keras_model_io,
    load_keras_model,
    load_model_classes,
    load_preprocess,
)
from pipeline.inference.novelty import load_novelty
from pipeline.report.model_card import write_model_card

FOLDER_FORMATS = ("openvino", "saved-model")  # written as a folder; the others as one file
# What wrote each format, for exports.json: (converter package, runtime package)
TOOLS = {
    "litert-int8": ("tensorflow-cpu", "ai-edge-litert"),
    "onnx": ("tf2onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "saved-model": ("tensorflow-cpu", "tensorflow-cpu"),
}


# --engine saved-model loads with tf.saved_model.load, which Keras' safe mode does not cover:
# a SavedModel is a TensorFlow graph, and whoever wrote it chose every op it runs.
SAVED_MODEL_TRUST = (
    "tf.saved_model.load is not covered by Keras' safe mode: run --engine saved-model only on a model folder you made"
)


def export_model(model_dir: Path, data_dir: Path, settings: ExportSettings) -> dict:
    """`pipeline export`: write and check one export; returns its record in exports.json."""
    settings.check()
    from pipeline.inference.converters import convert, require_tools

    require_tools(settings.format)  # a missing package is said before anything is read
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    classes, info, input_shape, X_test, y_test = _model_and_test_split(model_dir, data_dir)
    fmt, target = settings.format, export_path(model_dir, settings.format)
    calibration = (
        calibration_rows(data_dir, len(classes), settings.calibration_images) if fmt == "litert-int8" else None
    )
    model = load_keras_model(model_dir)
    check_model_fits(keras_model_io(model), input_shape, len(classes), str(model_dir / paths.PREPROCESS_FILE))

    # Raw probabilities on both sides, through the same batching: a calibration temperature, which
    # the Classifier of load_classifier may apply, would be the same on both and is no part of the check.
    # The export is of the inference model: the features (and so the novelty) come from the same call.
    novelty, _ = load_novelty(model_dir)
    shape = (classes, info["size"], info["color"])
    reference = Classifier(*shape, "keras", keras_runner(model), novelty=novelty).infer(X_test)

    progress.say(f"exporting {fmt} to {target} and checking it on {len(X_test)} test images...")
    with _staged(target, fmt in FOLDER_FORMATS) as where:
        convert(fmt, inference_model(model) or model, where, calibration)
        if fmt == "litert-int8":
            _refuse_flex(where.read_bytes(), fmt)
        run = runner_for(fmt, where, input_shape, len(classes), os.cpu_count() or 1)
        exported = Classifier(*shape, fmt, run, novelty=novelty).infer(X_test)
        record = compare(exported.raw, reference.raw, y_test)
        record.update(compare_novelty(exported.novelty, reference.novelty, novelty))
        _refuse_disagreement(record, settings, fmt)
        record.update(_describe(fmt, target, where, settings, 0 if calibration is None else len(calibration)))
    _record(model_dir, fmt, record)
    if "note" in record:
        progress.say(f"note: {record['note']}")
    try:
        prepare_report = load_prepare_report(data_dir)
    except PipelineError:  # a data folder without report.json: the card says less
        prepare_report = {}
    write_model_card(model_dir, prepare_report)
    return record


def _model_and_test_split(model_dir: Path, data_dir: Path):
    """The model folder's classes and preprocessing, and a test split that fits them."""
    classes = load_model_classes(model_dir)
    info = load_preprocess(model_dir)
    input_shape = (info["size"], info["size"], channels(info["color"]))
    if load_classes(data_dir) != classes:
        raise PipelineError(f"the model was trained on classes {classes} but {data_dir} has others: pass its --data")
    X_test, y_test = load_split(data_dir, "test", len(classes))
    if len(X_test) == 0:
        raise PipelineError(f"{data_dir} has an empty test split: the export cannot be checked on it")
    check_model_fits((input_shape, len(classes)), X_test.shape[1:], len(classes), f"{data_dir}/X_test.npy")
    return classes, info, input_shape, X_test, y_test


def calibration_rows(data_dir: Path, num_classes: int, count: int) -> np.ndarray:
    """Up to `count` training images, evenly spaced over the split (augmented rows included):
    the same rows every run, and a memory-mapped split is not read whole."""
    X, _ = load_split(data_dir, "train", num_classes)
    if len(X) == 0:
        raise PipelineError(f"{data_dir} has no training images to calibrate on")
    rows = np.unique(np.linspace(0, len(X) - 1, min(count, len(X))).astype(np.int64))
    return np.asarray(X[rows])


def compare(exported: np.ndarray, reference: np.ndarray, y: np.ndarray) -> dict:
    """The export against Keras on the same images: top-1 agreement, the largest probability
    difference, and the test accuracy of each."""
    top_export, top_keras = exported.argmax(axis=1), reference.argmax(axis=1)
    return {
        "n_test": int(len(y)),
        "agreement": float(np.mean(top_export == top_keras)),
        "max_difference": float(np.abs(exported - reference).max()),
        "accuracy": float(np.mean(top_export == y)),
        "keras_accuracy": float(np.mean(top_keras == y)),
    }


def compare_novelty(exported: np.ndarray | None, reference: np.ndarray | None, novelty) -> dict:
    """The export's novelty against Keras' on the same images: the largest difference, and the
    share of images on the same side of the threshold (both None for a model without novelty)."""
    if exported is None or reference is None or novelty is None:
        return {"novelty_max_difference": None, "unknown_agreement": None}
    same_side = (exported > novelty.threshold) == (reference > novelty.threshold)
    return {
        "novelty_max_difference": float(np.abs(exported - reference).max()) if len(reference) else 0.0,
        "unknown_agreement": float(np.mean(same_side)) if len(reference) else 1.0,
    }


def _refuse_flex(tflite: bytes, fmt: str) -> None:
    found = flex_ops(tflite)
    if found:
        raise PipelineError(
            f"refused: the {fmt} export holds Select TF (Flex) ops ({', '.join(found)}), which the LiteRT "
            "interpreter cannot run; nothing was written"
        )


def _refuse_disagreement(record: dict, settings: ExportSettings, fmt: str) -> None:
    bound = settings.difference_bound()
    failed = []
    if record["agreement"] < settings.min_agreement:
        failed.append(
            f"its top-1 agrees with Keras on {record['agreement']:.2%} (--min-agreement {settings.min_agreement:.2%})"
        )
    if record["max_difference"] > bound:
        failed.append(f"a probability differs from Keras' by {record['max_difference']:.3g} (bound {bound:g})")
    moved = record.get("novelty_max_difference")
    if fmt != "litert-int8" and moved is not None and moved > FLOAT_EXPORT_DIFFERENCE:  # int8 moves it by design
        failed.append(f"a novelty differs from Keras' by {moved:.3g} (bound {FLOAT_EXPORT_DIFFERENCE:g})")
    if failed:
        # int8 rounds every activation of a deep network (a backbone on Fashion-MNIST: 98.3 %,
        # docs/export.md): the two ways on
        choice = (
            "; --min-agreement lower writes it knowingly, and --format onnx or openvino keeps float"
            if fmt == "litert-int8" and record["agreement"] < settings.min_agreement
            else ""
        )
        raise PipelineError(
            f"refused: on {record['n_test']} test images the {fmt} export disagrees with Keras: "
            f"{' and '.join(failed)}; nothing was written{choice}"
        )


def _describe(fmt: str, target: Path, where: Path, settings: ExportSettings, calibrated: int) -> dict:
    converter, runtime = TOOLS[fmt]
    size = sum(f.stat().st_size for f in where.rglob("*") if f.is_file()) if where.is_dir() else where.stat().st_size
    described = {
        "path": target.name,
        "bytes": int(size),
        "min_agreement": settings.min_agreement,
        "max_difference_bound": settings.difference_bound(),
        "converter": f"{converter} {_version(converter)}",
        "runtime": f"{runtime} {_version(runtime)}",
    }
    if fmt == "saved-model":
        described["note"] = SAVED_MODEL_TRUST
    if fmt == "litert-int8":
        from ai_edge_litert.interpreter import Interpreter

        scale, zero_point = Interpreter(model_path=str(where)).get_input_details()[0]["quantization"]
        described["calibration_images"] = calibrated
        described["input_quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return described


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _staged(target: Path, folder: bool):
    """Where to write the export: a temporary sibling that replaces `target` only when the
    block ends without error (a refused export leaves the folder as it was)."""
    with atomic_dir(target) if folder else atomic_file(target) as where:
        yield where


def _record(model_dir: Path, fmt: str, record: dict) -> None:
    """exports.json, one entry per format, rewritten atomically."""
    path = model_dir / paths.EXPORTS_FILE
    records = read_json_optional(path) or {}  # unreadable: start again rather than refuse a checked export
    records[fmt] = record
    write_json(path, dict(sorted(records.items())))
