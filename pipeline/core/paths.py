"""Every artifact path in one place; the stages' defaults chain through these names."""

from pathlib import Path

ARTIFACTS_DIR = Path("artifacts")
DATA_DIR = ARTIFACTS_DIR / "data"  # written by prepare, read by train and evaluate
MODEL_DIR = ARTIFACTS_DIR / "model"  # written by train, read by evaluate and predict
REPORTS_DIR = ARTIFACTS_DIR / "reports"  # written by evaluate
AUDIT_DIR = ARTIFACTS_DIR / "audit"  # written by audit, read by the user (and prepare --fixes)

SPLITS = ("train", "val", "test")

# prepare
CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.csv"
PREPARE_REPORT_FILE = "report.json"
# report.json's counts per class, in the order the prepare summary shows them
COUNT_COLUMNS = ("found", "skipped", "duplicates", "train", "val", "test", "train_augmented")
SAMPLES_PNG = "samples.png"
HEALTH_FILE = "health.csv"  # per source image: cleanvision's raw image properties (audit reads them)

# train
MODEL_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
PREPROCESS_FILE = "preprocess.json"
HISTORY_FILE = "history.csv"
TRAIN_SETTINGS_FILE = "settings.json"
CURVES_PNG = "training_curves.png"
CALIBRATION_FILE = "calibration.json"  # the temperature and thresholds fitted on the validation split
NOVELTY_FILE = "novelty.json"  # the novelty score's method and its threshold, set on the validation split
NOVELTY_FEATURES_FILE = "novelty_features.npy"  # the training features it measures against (float16)
TENSORBOARD_DIR = "logs"
LR_FIND_PNG = "lr_find.png"  # train --find-lr: beside the model folder, never in it
MODEL_CARD_FILE = "MODEL_CARD.md"  # train writes it; evaluate and export complete it

# export: each format beside model.keras, under a name that says what it is
EXPORT_PATHS = {
    "litert-int8": "model_int8.tflite",  # full-integer LiteRT, uint8 pixels in
    "onnx": "model.onnx",
    "openvino": "model_openvino",  # a folder: model.xml and model.bin
    "saved-model": "model_saved",  # a folder: TensorFlow SavedModel, endpoint `serve`
}
OPENVINO_XML = "model.xml"  # inside model_openvino/
EXPORTS_FILE = "exports.json"  # each export's check against Keras on the test split
EVALUATION_FILE = "evaluation.json"  # evaluate's test figures, kept with the model for its card

# evaluate
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
PREDICTIONS_FILE = "predictions.csv"
REPORT_HTML = "report.html"
RELIABILITY_PNG = "reliability.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
NOVELTY_PNG = "novelty.png"  # the novelty of test (and --foreign) pictures, and the threshold
MISCLASSIFIED_GRADCAM_PNG = "misclassified_gradcam.png"

# audit
AUDIT_JSON = "audit.json"
AUDIT_CSV = "audit.csv"
AUDIT_HTML = "audit.html"
AUDIT_PROBABILITIES = "pred_probs.npy"  # out-of-fold probabilities, rows as audit.json's images (cleanlab's pred_probs)
AUDIT_REVIEWED = "reviewed.csv"  # pipeline review's decisions, in audit.csv's columns; a new audit keeps it

# What to run when an input folder is missing: said the same way by every stage.
PREPARE_HINT = "run `pipeline prepare IMAGES_DIR` first"
TRAIN_HINT = "run `pipeline train` first"


def export_hint(fmt: str) -> str:
    return f"run `pipeline export --format {fmt}` first"


def images_file(split: str) -> str:
    return f"X_{split}.npy"


def labels_file(split: str) -> str:
    return f"y_{split}.npy"
