"""A loaded model folder and the engine that runs it: `load_classifier`, `Classifier`, `Prediction`.

predict, evaluate and serve all load a model folder through `load_classifier` and turn
probabilities into predictions with `Classifier.label`, and every image goes through
`images.preprocess`, so they agree on the same file. Engines: the LiteRT interpreter on
model.tflite (it starts in a fraction of TensorFlow's import time), Keras in safe mode
on model.keras, or an export by its format's name (litert-int8, onnx, openvino,
saved-model: inference/engines.py).

Engines return the network's raw probabilities and its features from one call;
`Classifier.infer` applies the temperature of calibration.json on top of every engine, in
this one place, and scores the features' novelty (inference/novelty.py, novelty.json), so
predict, serve and evaluate give the same numbers. With `tta` it averages the calibrated
probabilities of the image and its mirror image, where prepare allowed flips, each
tempered by calibration.json's `tta_temperature` (fitted on that mean) where it has one;
the novelty is the image's own (its threshold was set on images as they are).

`Classifier.label` answers UNKNOWN above the novelty threshold, before and apart from
UNSURE below the confidence threshold.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths, progress
from pipeline.core.errors import PipelineError
from pipeline.core.settings import EXPORT_FORMATS, INFERENCE_BATCH
from pipeline.data.images import channels, preprocess
from pipeline.inference.calibration import apply_temperature, threshold_for
from pipeline.inference.engines import Runner, keras_runner, litert_runner, load_export_runner
from pipeline.inference.model_folder import (
    check_model_fits,
    keras_model_io,
    load_calibration,
    load_keras_model,
    load_model_classes,
    load_preprocess,
    load_train_settings,
)
from pipeline.inference.novelty import UNKNOWN, Novelty, load_novelty

UNSURE = "unsure"  # the label of a prediction below --threshold (or the --target-accuracy threshold)


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top_k: list[dict]
    novelty: float | None = None  # higher: less like the training images; None: the model has no novelty score

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inference:
    """What one pass over some images gives: the network's probabilities, the calibrated ones,
    and each image's novelty (None where the model has no novelty score)."""

    raw: np.ndarray
    probabilities: np.ndarray
    novelty: np.ndarray | None


@dataclass
class Classifier:
    """A loaded model folder: what it expects, what it knows, and the function that runs it."""

    classes: list[str]
    size: int
    color: str
    engine: str  # "litert", "keras" or an export format (settings.EXPORT_FORMATS)
    run: Runner  # uint8 batch (N, size, size, channels) -> float64 probabilities, features (or None)
    calibration: dict | None = None  # calibration.json: temperature, thresholds; None: uncalibrated
    flips: bool = False  # prepare mirrored training images left-right: --tta may average over the flip
    keras: object = None  # the Keras model that `run` calls, for the keras engine; None for the others
    novelty: Novelty | None = None  # novelty.json and its training features; None: no "unknown"
    novelty_note: str | None = None  # why there is no novelty score, when there is none

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
        found = self.infer(X, progress_label, tta)
        return found.raw, found.probabilities

    def infer(self, X, progress_label: str | None = None, tta: bool = False) -> Inference:
        """Probabilities before and after calibration and the novelty of uint8 rows (an array,
        or a list of rows), INFERENCE_BATCH at a time, each batch one call of the model."""
        starts = range(0, len(X), INFERENCE_BATCH)
        if progress_label:
            starts = progress.track(starts, len(starts), progress_label)
        parts = [self._batch(np.asarray(X[i : i + INFERENCE_BATCH]), tta) for i in starts]
        if not parts:
            empty = np.zeros((0, len(self.classes)))
            return Inference(empty, empty, None if self.novelty is None else np.zeros(0))
        scored = self.novelty is not None and all(part.novelty is not None for part in parts)
        novelty = np.concatenate([part.novelty for part in parts]) if scored else None
        return Inference(
            np.concatenate([part.raw for part in parts]),
            np.concatenate([part.probabilities for part in parts]),
            novelty,
        )

    def _batch(self, batch: np.ndarray, tta: bool) -> Inference:
        views = [batch, batch[:, :, ::-1]] if tta and self.flips else [batch]
        outputs = [self.run(np.ascontiguousarray(view)) for view in views]
        raw = [probabilities for probabilities, _ in outputs]
        temperature = self.temperature
        if len(views) > 1 and (self.calibration or {}).get("tta_temperature"):  # fitted for the mean of two
            temperature = float(self.calibration["tta_temperature"])
        calibrated = [apply_temperature(p, temperature) for p in raw]
        features = outputs[0][1]
        if self.novelty is not None and features is None:  # an export written before it had features
            self.novelty = None
            self.novelty_note = (
                f"the {self.engine} model file gives no features (written before novelty scores): export again"
            )
            progress.say(f"note: {self.novelty_note}; no picture is answered 'unknown'")
        novelty = self.novelty.scores(features) if self.novelty is not None else None
        return Inference(np.mean(raw, axis=0), np.mean(calibrated, axis=0), novelty)

    def novelty_threshold(self, given: float | None = None) -> float:
        """The novelty above which a label is UNKNOWN: `given` (0: never), or the one train set
        on the validation split. Asking for one of a model without novelty is an error."""
        if given is None:
            return self.novelty.threshold if self.novelty is not None else 0.0
        if given > 0 and self.novelty is None:
            raise PipelineError(f"--novelty-threshold needs a novelty score: {self.novelty_note}")
        return float(given)

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

    def label(
        self,
        name: str,
        p: np.ndarray,
        top_k: int = 1,
        threshold: float = 0.0,
        novelty: float | None = None,
        novelty_threshold: float = 0.0,
    ) -> Prediction:
        """The prediction for one row of probabilities: above `novelty_threshold` (when above 0)
        the label is UNKNOWN, a picture unlike the training images; else below `threshold` it
        is UNSURE. Its confidence and top_k still say what the model leaned towards."""
        order = np.argsort(-p, kind="stable")[: min(top_k, len(self.classes))]
        top = [{"label": self.classes[i], "probability": float(p[i])} for i in order]
        if novelty is not None and novelty_threshold > 0 and novelty > novelty_threshold:
            label = UNKNOWN
        else:
            label = top[0]["label"] if top[0]["probability"] >= threshold else UNSURE
        return Prediction(
            name, label, top[0]["probability"], top, None if novelty is None else round(float(novelty), 6)
        )


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
        classes, size, color, "keras", keras_runner(model), **_calibration_and_flips(model_dir), keras=model
    )


def _calibration_and_flips(model_dir: Path) -> dict:
    """What every engine's Classifier carries besides its runner: calibration.json, whether
    prepare mirrored images (settings.json's prepare settings; unknown: no flip), and the
    novelty score (novelty.json; None, with the reason, for a folder without one)."""
    prepare = load_train_settings(model_dir).get("prepare") or {}
    novelty, note = load_novelty(model_dir)
    return {
        "calibration": load_calibration(model_dir),
        "flips": bool(prepare.get("flip", False)),
        "novelty": novelty,
        "novelty_note": note,
    }
