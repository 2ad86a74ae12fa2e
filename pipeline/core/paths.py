"""Every artifact path in one place; the stages' defaults chain through these names."""

from pathlib import Path

ARTIFACTS_DIR = Path("artifacts")
DATA_DIR = ARTIFACTS_DIR / "data"  # written by prepare, read by train and evaluate
MODEL_DIR = ARTIFACTS_DIR / "model"  # written by train, read by evaluate and predict
REPORTS_DIR = ARTIFACTS_DIR / "reports"  # written by evaluate

SPLITS = ("train", "val", "test")

# prepare
CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.csv"
PREPARE_REPORT_FILE = "report.json"
SAMPLES_PNG = "samples.png"

# train
MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
PREPROCESS_FILE = "preprocess.json"
HISTORY_FILE = "history.csv"
TRAIN_SETTINGS_FILE = "settings.json"
CURVES_PNG = "training_curves.png"
CALIBRATION_FILE = "calibration.json"  # the temperature and thresholds fitted on the validation split
TENSORBOARD_DIR = "logs"
LR_FIND_PNG = "lr_find.png"  # train --find-lr: beside the model folder, never in it

# evaluate
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
PREDICTIONS_FILE = "predictions.csv"
REPORT_HTML = "report.html"
RELIABILITY_PNG = "reliability.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
MISCLASSIFIED_GRADCAM_PNG = "misclassified_gradcam.png"

# What to run when an input folder is missing: said the same way by every stage.
PREPARE_HINT = "run `pipeline prepare IMAGES_DIR` first"
TRAIN_HINT = "run `pipeline train` first"


def images_file(split: str) -> str:
    return f"X_{split}.npy"


def labels_file(split: str) -> str:
    return f"y_{split}.npy"
