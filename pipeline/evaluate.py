"""evaluate: the trained model on the test split, the only stage that reads it.

Reads X_test/y_test and manifest.csv from the data folder and the model folder. Writes,
atomically, into the reports folder: metrics.json (accuracy, loss, per-class precision,
recall, F1 and support, confusion matrix [true][predicted], and calibration: ECE and NLL
before and after the model folder's temperature, the ECE's noise floor, reliability bins,
risk-coverage curve, one sentence on the thresholds), predictions.csv (one row per test
image, the calibrated confidence as predict gives it), confusion_matrix.png,
misclassified.png, misclassified_gradcam.png (Grad-CAM of the same mistakes),
reliability.png, risk_coverage.png, novelty.png (the novelty of the test pictures and, with
`foreign`, of a folder of pictures of none of the classes: AUROC, the share accepted and
refused at the threshold, against the max-softmax baseline, in metrics.json's `novelty`) and
report.html (one self-contained page with the dataset summary, every stage's settings, the
curves, metrics and figures). With `tta` the model is averaged over each image and its
mirror image, where prepare allowed flips.
Into the model folder, atomically: evaluation.json (the test figures the model card names)
and MODEL_CARD.md, rewritten with them. `--engine` runs an export instead of model.keras.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.core import paths, progress
from pipeline.core.artifacts import atomic_dir, check_out_dir, csv_row, write_json
from pipeline.core.errors import PipelineError
from pipeline.data.data_folder import load_classes, load_prepare_report, load_split, read_split_paths
from pipeline.data.image_folder import collect_images
from pipeline.data.images import UnreadableImage, channels
from pipeline.inference.calibration import evaluation_report
from pipeline.inference.classifier import load_classifier
from pipeline.inference.model_folder import check_model_fits, load_model_classes
from pipeline.inference.novelty import novelty_report
from pipeline.report import calibration_plots, plots
from pipeline.report.html import write_report
from pipeline.report.model_card import write_model_card


def evaluate_model(
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    engine: str = "keras",
    tta: bool = False,
    foreign: Path | None = None,
) -> dict:
    data_dir, model_dir, out_dir = Path(data_dir), Path(model_dir), Path(out_dir)
    check_out_dir(out_dir, {"data folder": data_dir, "model folder": model_dir})
    if foreign is not None and not Path(foreign).is_dir():
        raise PipelineError(f"--foreign {foreign} is not a folder: give a folder of pictures of none of the classes")
    classes = load_model_classes(model_dir)
    data_classes = load_classes(data_dir)
    if data_classes != classes:
        raise PipelineError(
            f"the model was trained on classes {classes} but {data_dir} has {data_classes}: train again on this data"
        )
    X, y = load_split(data_dir, "test", len(classes))
    if len(X) == 0:
        raise PipelineError(f"{data_dir} has an empty test split: prepare again with --test-size above 0")
    classifier = load_classifier(model_dir, engine)  # keras: the saved model itself, not an export
    check_model_fits(
        ((classifier.size, classifier.size, channels(classifier.color)), len(classifier.classes)),
        X.shape[1:],
        len(classes),
        f"{data_dir}/{paths.images_file('test')}",
        f"{model_dir}/{paths.CLASSES_FILE}",
    )
    if tta and not classifier.flips:
        progress.say("note: prepare was run with --no-flip, so --tta has no mirror image to average over")
    found = classifier.infer(X, progress_label="evaluating", tta=tta)
    raw, probabilities = found.raw, found.probabilities
    metrics = compute_metrics(y, probabilities, classes)
    metrics["engine"] = classifier.engine
    metrics["tta"] = bool(tta and classifier.flips)
    metrics["calibration"] = evaluation_report(y, raw, probabilities, classifier.calibration)
    metrics["novelty"] = _novelty(classifier, found, foreign, tta)
    test_paths = read_split_paths(data_dir, "test", len(X))
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / paths.METRICS_FILE, metrics)
        _write_predictions(tmp / paths.PREDICTIONS_FILE, test_paths, y, probabilities, classes)
        plots.save_confusion_matrix(np.array(metrics["confusion_matrix"]), classes, tmp / paths.CONFUSION_PNG)
        plots.save_misclassified(X, y, probabilities, classes, test_paths, tmp / paths.MISCLASSIFIED_PNG)
        _save_misclassified_gradcam(classifier, model_dir, X, y, probabilities, classes, test_paths, tmp)
        calibration_plots.save_reliability(metrics["calibration"], tmp / paths.RELIABILITY_PNG)
        calibration_plots.save_risk_coverage(metrics["calibration"], tmp / paths.RISK_COVERAGE_PNG)
        if metrics["novelty"]["available"]:
            calibration_plots.save_novelty_histogram(metrics["novelty"], tmp / paths.NOVELTY_PNG)
        write_report(tmp / paths.REPORT_HTML, metrics, data_dir, model_dir, tmp)
    _complete_model_card(model_dir, data_dir, metrics)
    return metrics


def _novelty(classifier, found, foreign: Path | None, tta: bool) -> dict:
    """metrics.json's novelty block: the test pictures the threshold refuses and, with --foreign,
    how well the novelty tells that folder's pictures from the test ones."""
    if classifier.novelty is None or found.novelty is None:
        if foreign is not None:
            progress.say(f"note: --foreign is not measured: {classifier.novelty_note}")
        return novelty_report(None, 0.0, None, found.probabilities.max(axis=1), note=classifier.novelty_note)
    threshold = classifier.novelty_threshold()
    scores = confidence = None
    if foreign is not None:
        files, notes = collect_images([Path(foreign)])
        rows, skipped = [], 0
        for file in progress.track(files, len(files), "reading the foreign pictures") if len(files) > 1 else files:
            try:
                rows.append(classifier.preprocess(file))
            except UnreadableImage:
                skipped += 1
        if not rows:
            raise PipelineError(f"--foreign {foreign} holds no readable image")
        if skipped or notes:
            progress.say(
                f"note: {skipped} unreadable file(s) in {foreign} left out"
                + (f"; {len(notes)} note(s)" if notes else "")
            )
        other = classifier.infer(rows, tta=tta)
        scores, confidence = other.novelty, other.probabilities.max(axis=1)
    return novelty_report(
        classifier.novelty,
        threshold,
        found.novelty,
        found.probabilities.max(axis=1),
        scores,
        confidence,
        None if foreign is None else str(foreign),
    )


def _complete_model_card(model_dir: Path, data_dir: Path, metrics: dict) -> None:
    """evaluation.json beside the model (what its card names), then the card rewritten."""
    kept = ("engine", "accuracy", "macro_f1", "loss", "n_test", "per_class", "most_confused", "novelty")
    try:
        prepare_report = load_prepare_report(data_dir)
    except PipelineError:  # a data folder without report.json: the card says less
        prepare_report = {}
    try:
        evaluation = {k: metrics[k] for k in kept}
        if evaluation["novelty"].get("available"):  # the card names the figures, not the histogram
            evaluation["novelty"] = {k: v for k, v in evaluation["novelty"].items() if k != "histogram"}
        write_json(model_dir / paths.EVALUATION_FILE, evaluation)
        write_model_card(model_dir, prepare_report)
    except OSError as e:  # a read-only model folder: the reports are written, only the card is not
        progress.say(f"note: {model_dir / paths.MODEL_CARD_FILE} not updated: {e.strerror or e}")


def _save_misclassified_gradcam(
    classifier, model_dir: Path, X, y, probabilities, classes, test_paths, folder: Path
) -> None:
    """The gallery of mistakes again, each image overlaid with the Grad-CAM of the class it was taken for."""
    from pipeline.inference.gradcam import heatmaps, overlay

    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y)
    shown = wrong[np.argsort(-probabilities.max(axis=1)[wrong], kind="stable")][: plots.MAX_GALLERY]
    if len(shown) == 0:
        return
    pixels = np.asarray(X[np.sort(shown)])
    heat = heatmaps(classifier.keras_model(model_dir), pixels, predicted[np.sort(shown)])
    overlays = {int(i): overlay(image, h) for i, image, h in zip(np.sort(shown), pixels, heat)}
    plots.save_misclassified(overlays, y, probabilities, classes, test_paths, folder / paths.MISCLASSIFIED_GRADCAM_PNG)


def compute_metrics(y: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    predicted = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    matrix = confusion_matrix(y, predicted, labels=labels)
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1.0))))
    return {
        "accuracy": float(np.mean(predicted == y)),
        "loss": loss,
        "n_test": int(len(y)),
        "classes": classes,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "macro_f1": float(np.mean(f1)),
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, classes),
    }


def most_confused(matrix: np.ndarray, classes: list[str], top: int = 5) -> list[dict]:
    off = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off, 0)
    pairs = [(int(off[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if off[i, j]]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": n} for n, i, j in pairs[:top]]


def _write_predictions(
    path: Path, test_paths: list[str], y: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "path", "true", "predicted", "confidence"])
        for i, (p, t) in enumerate(zip(probabilities, y)):
            writer.writerow(csv_row([i, test_paths[i], classes[t], classes[int(p.argmax())], f"{p.max():.6f}"]))
