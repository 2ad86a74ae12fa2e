"""predict: new image files -> label and confidence, preprocessed exactly as training data was.

Reads the model folder: preprocess.json, classes.json, and model.tflite (run by the
LiteRT interpreter, which starts in a fraction of TensorFlow's import time) or
model.keras (Keras, safe mode) when LiteRT is not installed. Writes nothing, except the
--csv file the CLI asks `write_csv` for.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import paths, progress
from pipeline.artifacts import atomic_write_text
from pipeline.errors import PipelineError
from pipeline.images import UnreadableImage, channels, load_image
from pipeline.model_files import (
    check_model_fits,
    keras_model_io,
    load_keras_model,
    load_model_classes,
    load_preprocess,
)
from pipeline.native import quiet_native_stderr

ENGINES = ("auto", "litert", "keras")
UNKNOWN = "unknown"  # the label of a prediction below --threshold
BATCH = 256


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top_k: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


def predict_files(
    files: list[Path], model_dir: Path, top_k: int = 1, engine: str = "auto", threshold: float = 0.0
) -> tuple[list[Prediction], list[dict]]:
    """Predict every readable file; unreadable ones come back as {"file", "error"}.

    A prediction whose top probability is below `threshold` gets the label UNKNOWN (its
    confidence and top_k still say what the model leaned towards).
    """
    if top_k < 1:
        raise PipelineError(f"--top-k must be at least 1, got {top_k}")
    if not 0 <= threshold <= 1:
        raise PipelineError(f"--threshold must be between 0 and 1, got {threshold}")
    if engine not in ENGINES:
        raise PipelineError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    model_dir = Path(model_dir)
    preprocess = load_preprocess(model_dir)
    classes = load_model_classes(model_dir)
    size, color = preprocess["size"], preprocess["color"]
    predictor = load_predictor(model_dir, engine, (size, size, channels(color)), len(classes))

    arrays, names, errors = [], [], []
    for file in progress.track(files, len(files), "reading images") if len(files) > 1 else files:
        try:
            arrays.append(load_image(Path(file), size, color))
            names.append(str(file))
        except UnreadableImage as e:
            errors.append({"file": str(file), "error": str(e)})
    results = []
    starts = range(0, len(arrays), BATCH)
    for start in progress.track(starts, len(starts), "predicting") if len(starts) > 1 else starts:
        probabilities = predictor(np.stack(arrays[start : start + BATCH]))
        for name, p in zip(names[start : start + BATCH], probabilities):
            order = np.argsort(-p, kind="stable")[: min(top_k, len(classes))]
            top = [{"label": classes[i], "probability": float(p[i])} for i in order]
            label = top[0]["label"] if top[0]["probability"] >= threshold else UNKNOWN
            results.append(Prediction(name, label, top[0]["probability"], top))
    return results, errors


def load_predictor(model_dir: Path, engine: str, input_shape: tuple[int, int, int], num_classes: int):
    """A function uint8 batch -> float probabilities, through LiteRT when possible."""
    tflite = model_dir / paths.TFLITE_FILE
    if engine in ("auto", "litert") and tflite.is_file():
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            if engine == "litert":
                raise PipelineError(
                    "--engine litert needs the ai-edge-litert package: pip install ai-edge-litert"
                ) from None
        else:
            return _litert_predictor(Interpreter, tflite, input_shape, num_classes)
    elif engine == "litert":
        raise PipelineError(f"{tflite} not found: {'train again to export it'}")
    model = load_keras_model(model_dir)
    check_model_fits(
        keras_model_io(model),
        input_shape,
        num_classes,
        f"{model_dir / paths.PREPROCESS_FILE}",
        f"{model_dir / paths.CLASSES_FILE}",
    )
    return lambda batch: np.asarray(model.predict_on_batch(batch), dtype=np.float64)


def _litert_predictor(Interpreter, path: Path, input_shape, num_classes):
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
    except (ValueError, RuntimeError) as e:
        raise PipelineError(f"could not load {path}: {e}") from None
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    model_io = (tuple(int(n) for n in source["shape"][1:]), int(target["shape"][-1]))
    check_model_fits(
        model_io, input_shape, num_classes, paths.PREPROCESS_FILE, paths.CLASSES_FILE, model_name=str(path)
    )

    def run(batch: np.ndarray) -> np.ndarray:
        interpreter.resize_tensor_input(source["index"], batch.shape)
        with quiet_native_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], batch.astype(source["dtype"]))
        interpreter.invoke()
        return np.asarray(interpreter.get_tensor(target["index"]), dtype=np.float64)

    return run


def write_csv(path: Path, results: list[Prediction], errors: list[dict], top_k: int) -> None:
    """One row per file: file,label,confidence, then label_i,probability_i for the top k, and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = range(1, top_k + 1)
    writer.writerow(
        ["file", "label", "confidence", *(f"{c}_{i}" for i in ranks for c in ("label", "probability")), "error"]
    )
    for r in results:
        cells = [value for t in r.top_k for value in (t["label"], f"{t['probability']:.6f}")]
        cells += [""] * (2 * top_k - len(cells))
        writer.writerow([r.file, r.label, f"{r.confidence:.6f}", *cells, ""])
    for e in errors:
        writer.writerow([e["file"], "", "", *([""] * 2 * top_k), e["error"]])
    atomic_write_text(Path(path), buffer.getvalue())
