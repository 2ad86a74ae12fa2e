"""predict: new image files -> label, confidence and novelty, preprocessed exactly as training data was.

Reads the model folder through `inference.classifier.load_classifier`: preprocess.json,
classes.json, calibration.json (the temperature and the --target-accuracy thresholds),
novelty.json and novelty_features.npy (the label "unknown" above its threshold), and
model.tflite (the LiteRT interpreter) or model.keras (Keras, safe mode) when LiteRT is not
installed, or with --engine <format> an export (inference/engines.py). Writes nothing,
except the --csv file the CLI asks `write_csv` for and, with --explain DIR, one Grad-CAM
overlay PNG per image (inference.gradcam; model.keras, which gradients need).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.artifacts import atomic_write_text, csv_row
from pipeline.core.errors import PipelineError
from pipeline.core.settings import INFERENCE_BATCH, PredictSettings
from pipeline.data.image_folder import collect_images, shown
from pipeline.data.images import UnreadableImage
from pipeline.inference.classifier import Classifier, Prediction, load_classifier


def predict_paths(
    paths: list[Path], model_dir: Path, settings: PredictSettings | None = None
) -> tuple[list[Prediction], list[dict]]:
    """`pipeline predict FILE...`: files, or the images inside folders, each predicted;
    notes on what was passed over go to stderr."""
    settings = settings or PredictSettings()
    settings.check()  # before any file is read
    files, notes = collect_images(paths)
    for note in notes:
        progress.say(f"note: {note}")
    if not files:
        raise PipelineError("no image files to predict")
    return predict_files(files, model_dir, settings)


def predict_files(
    files: list[Path], model_dir: Path, settings: PredictSettings | None = None
) -> tuple[list[Prediction], list[dict]]:
    """Predict every readable file; unreadable ones come back as {"file", "error"}."""
    settings = settings or PredictSettings()
    settings.check()
    classifier = load_classifier(model_dir, settings.engine)
    threshold = classifier.threshold(settings.threshold, settings.target_accuracy)  # before any file is read
    novelty_threshold = classifier.novelty_threshold(settings.novelty_threshold)
    note_tta(classifier, settings.tta)
    note_novelty(classifier, settings.novelty_threshold)
    arrays, names, errors = [], [], []
    for file in progress.track(files, len(files), "reading images") if len(files) > 1 else files:
        try:
            arrays.append(classifier.preprocess(Path(file)))
            names.append(shown(str(file)))  # a name that is not UTF-8, as text every output takes
        except UnreadableImage as e:
            errors.append({"file": shown(str(file)), "error": str(e)})
    if not arrays:
        return [], errors
    several_batches = len(arrays) > INFERENCE_BATCH
    found = classifier.infer(arrays, progress_label="predicting" if several_batches else None, tta=settings.tta)
    probabilities = found.probabilities
    novelty = found.novelty if found.novelty is not None else [None] * len(names)
    results = [
        classifier.label(name, p, settings.top_k, threshold, n, novelty_threshold)
        for name, p, n in zip(names, probabilities, novelty)
    ]
    if settings.explain:
        explain(
            classifier.keras_model(Path(model_dir)), Path(settings.explain), names, arrays, probabilities.argmax(axis=1)
        )
    return results, errors


def note_tta(classifier: Classifier, tta: bool) -> None:
    if tta and not classifier.flips:
        progress.say("note: prepare was run with --no-flip, so --tta has no mirror image to average over")


def note_novelty(classifier: Classifier, asked: float | None) -> None:
    """A model folder without a novelty score answers as before, never "unknown": said once."""
    if classifier.novelty is None and asked is None:
        progress.say(f"note: {classifier.novelty_note}")


def explain(model, folder: Path, names: list[str], arrays: list, predicted) -> None:
    """--explain DIR: a Grad-CAM overlay of each image's predicted class (by the Keras `model`), one PNG each."""
    from pipeline.inference.gradcam import heatmaps, write_overlays

    pixels = np.stack(arrays)
    written = write_overlays(folder, names, pixels, heatmaps(model, pixels, predicted))
    progress.say(f"{len(written)} Grad-CAM heatmap(s) written to {folder}")


def write_csv(path: Path, results: list[Prediction], errors: list[dict], top_k: int) -> None:
    """One row per file: file,label,confidence,novelty (empty without a novelty score), then
    label_i,probability_i for the top k, and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = range(1, top_k + 1)
    writer.writerow(
        [
            "file",
            "label",
            "confidence",
            "novelty",
            *(f"{c}_{i}" for i in ranks for c in ("label", "probability")),
            "error",
        ]
    )
    for r in results:
        cells = [value for t in r.top_k for value in (t["label"], f"{t['probability']:.6f}")]
        cells += [""] * (2 * top_k - len(cells))
        novelty = "" if r.novelty is None else f"{r.novelty:.6f}"
        writer.writerow(csv_row([r.file, r.label, f"{r.confidence:.6f}", novelty, *cells, ""]))
    for e in errors:
        writer.writerow(csv_row([e["file"], "", "", "", *([""] * 2 * top_k), e["error"]]))
    atomic_write_text(Path(path), buffer.getvalue())
