"""A loaded model folder and the engine that runs it: `load_classifier`, `Classifier`, `Prediction`.

predict, evaluate and serve all load a model folder through `load_classifier` and turn
probabilities into predictions with `Classifier.label`, and every image goes through
`images.preprocess`, so they agree on the same file. Engines: the LiteRT interpreter on
model.tflite (it starts in a fraction of TensorFlow's import time), Keras in safe mode
on model.keras, or an export by its format's name (litert-int8, onnx, openvino,
saved-model: inference/engines.py).

Engines return the network's raw probabilities; `Classifier.probabilities` applies the
temperature of calibration.json on top of every engine, in this one place, so predict,
serve and evaluate give the same calibrated numbers. With `tta` it averages the calibrated
probabilities of the image and its mirror image, where prepare allowed flips, each
tempered by calibration.json's `tta_temperature` (fitted on that mean) where it has one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths, progress
from pipeline.core.errors import PipelineError
from pipeline.core.settings import EXPORT_FORMATS, INFERENCE_BATCH
from pipeline.data.images import channels, preprocess
from pipeline.inference.calibration import apply_temperature, threshold_for
from pipeline.inference.engines import litert_runner, load_export_runner
from pipeline.inference.model_folder import (
    check_model_fits,
    keras_model_io,
    load_calibration,
    load_keras_model,
    load_model_classes,
    load_preprocess,
    load_train_settings,
)

UNSURE = "unsure"  # the label of a prediction below --threshold (or the --target-accuracy threshold)


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top_k: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Classifier:
    """A loaded model folder: what it expects, what it knows, and the function that runs it."""

    classes: list[str]
    size: int
    color: str
    engine: str  # "litert", "keras" or an export format (settings.EXPORT_FORMATS)
    run: Callable[[np.ndarray], np.ndarray]  # uint8 batch (N, size, size, channels) -> float64 probabilities
    calibration: dict | None = None  # calibration.json: temperature, thresholds; None: uncalibrated
    flips: bool = False  # prepare mirrored training images left-right: --tta may average over the flip
    keras: object = None  # the Keras model that `run` calls, for the keras engine; None for the others

    def keras_model(self, model_dir: Path):
        """The model folder's Keras model (Grad-CAM needs one whatever the engine): the one
        loaded already for the keras engine, else loaded now."""
        return self.keras if self.keras is not None else load_keras_model(model_dir)

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    def preprocess(self, source: Path | str | bytes) -> np.ndarray:
        """One file (path or bytes) as this model sees it. Raises UnreadableImage."""
        return preprocess(source, self.size, self.color).pixels

    def probabilities(self, X, progress_label: str | None = None, tta: bool = False) -> np.ndarray:
        """Calibrated probabilities (the temperature applied) for uint8 rows (an array, or a
        list of rows), INFERENCE_BATCH at a time; with `tta` the mean over the image and its
        mirror image when prepare allowed flips."""
        return self.probabilities_before_and_after(X, progress_label, tta)[1]

    def probabilities_before_and_after(
        self, X, progress_label: str | None = None, tta: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(the network's probabilities, calibrated ones) from one pass over the rows."""
        starts = range(0, len(X), INFERENCE_BATCH)
        if progress_label:
            starts = progress.track(starts, len(starts), progress_label)
        pairs = [self._batch(np.asarray(X[i : i + INFERENCE_BATCH]), tta) for i in starts]
        if not pairs:
            return np.zeros((0, len(self.classes))), np.zeros((0, len(self.classes)))
        return np.concatenate([raw for raw, _ in pairs]), np.concatenate([calibrated for _, calibrated in pairs])

    def _batch(self, batch: np.ndarray, tta: bool) -> tuple[np.ndarray, np.ndarray]:
        views = [batch, batch[:, :, ::-1]] if tta and self.flips else [batch]
        raw = [self.run(np.ascontiguousarray(view)) for view in views]
        temperature = self.temperature
        if len(views) > 1 and (self.calibration or {}).get("tta_temperature"):  # fitted for the mean of two
            temperature = float(self.calibration["tta_temperature"])
        calibrated = [apply_temperature(p, temperature) for p in raw]
        return np.mean(raw, axis=0), np.mean(calibrated, axis=0)

    def threshold(self, threshold: float = 0.0, target_accuracy: float | None = None) -> float:
        """The confidence below which a label is UNSURE: `threshold`, or the lowest one that
        reached `target_accuracy` on the validation split (recorded by train)."""
        if target_accuracy is None:
            return threshold
        if self.calibration is None:
            raise PipelineError(
                "--target-accuracy needs the thresholds train records on the validation split, and this model "
                "has none (trained without a validation split, or before calibration): use --threshold"
            )
        found = threshold_for(self.calibration, target_accuracy)
        if found is None:
            raise PipelineError(
                f"no confidence threshold reached an accuracy of {target_accuracy:g} on the validation split: "
                "choose a lower --target-accuracy, or a --threshold"
            )
        return float(found["threshold"])

    def label(self, name: str, p: np.ndarray, top_k: int = 1, threshold: float = 0.0) -> Prediction:
        """The prediction for one row of probabilities: below `threshold` the label is UNSURE
        (its confidence and top_k still say what the model leaned towards)."""
        order = np.argsort(-p, kind="stable")[: min(top_k, len(self.classes))]
        top = [{"label": self.classes[i], "probability": float(p[i])} for i in order]
        label = top[0]["label"] if top[0]["probability"] >= threshold else UNSURE
        return Prediction(name, label, top[0]["probability"], top)


def load_classifier(model_dir: Path, engine: str = "auto", threads: int | None = None) -> Classifier:
    """Load a model folder once: LiteRT when possible (auto, litert), else Keras in safe mode;
    an export format's name runs that export.

    `threads`: the LiteRT interpreter's threads (default: one per core); serve loads one
    single-threaded copy per worker, since an interpreter must not be shared between threads."""
    model_dir = Path(model_dir)
    preprocess_info = load_preprocess(model_dir)
    classes = load_model_classes(model_dir)
    size, color = preprocess_info["size"], preprocess_info["color"]
    input_shape = (size, size, channels(color))
    if engine in EXPORT_FORMATS:  # an export `pipeline export` wrote, run by its own runtime
        run = load_export_runner(engine, model_dir, input_shape, len(classes), threads or os.cpu_count() or 1)
        return Classifier(classes, size, color, engine, run, **_calibration_and_flips(model_dir))
    tflite = model_dir / paths.TFLITE_FILE
    if engine in ("auto", "litert") and tflite.is_file():
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            if engine == "litert":
                raise PipelineError(
                    "--engine litert needs the ai-edge-litert package: pip install ai-edge-litert"
                ) from None
        else:
            run = litert_runner(tflite, input_shape, len(classes), threads or os.cpu_count() or 1)
            return Classifier(classes, size, color, "litert", run, **_calibration_and_flips(model_dir))
    elif engine == "litert":
        raise PipelineError(f"{tflite} not found: train again to export it")
    model = load_keras_model(model_dir)
    check_model_fits(
        keras_model_io(model),
        input_shape,
        len(classes),
        f"{model_dir / paths.PREPROCESS_FILE}",
        f"{model_dir / paths.CLASSES_FILE}",
    )
    return Classifier(
        classes,
        size,
        color,
        "keras",
        lambda batch: np.asarray(model.predict_on_batch(batch), dtype=np.float64),
        **_calibration_and_flips(model_dir),
        keras=model,
    )


def _calibration_and_flips(model_dir: Path) -> dict:
    """What every engine's Classifier carries besides its runner: calibration.json, and
    whether prepare mirrored images (settings.json's prepare settings; unknown: no flip)."""
    prepare = load_train_settings(model_dir).get("prepare") or {}
    return {"calibration": load_calibration(model_dir), "flips": bool(prepare.get("flip", False))}
