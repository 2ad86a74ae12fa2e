"""The model folder that train writes and evaluate, predict and serve read: written and read here.

model.keras (float32, best weights), model.tflite (the same network for LiteRT, as its
inference model: probabilities and features from one call), classes.json, preprocess.json
(the preprocessing contract: its version, size, colour mode and resize), calibration.json
(the temperature and thresholds fitted on the validation split; absent without one),
novelty.json and novelty_features.npy (inference/novelty.py), history.csv, settings.json
(with model_folder_version) and training_curves.png. The Keras model loads in safe mode; a
folder whose preprocessing version is not this pipeline's is refused with one line, so an
old model is never served with a different resize. A folder of model_folder_version 1 (no
version written) has no features and no novelty: it predicts as before, never "unknown".
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from pipeline.core import paths
from pipeline.core.artifacts import read_json, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.settings import CNN, COLOR_MODES
from pipeline.data.data_folder import load_classes
from pipeline.data.images import PREPROCESS_VERSION, RESIZE_METHOD

FEATURES_LAYER = "features"  # the layer every classifier names for the novelty score (CNN and backbone)
FEATURE_GRID = 3  # a feature map is averaged over this grid (3 x 3 cells) into the features vector
FEATURES_DESCRIPTION = (  # novelty.json's words for them
    f"the layer named '{FEATURES_LAYER}', a feature map averaged over a {FEATURE_GRID} x {FEATURE_GRID} grid, "
    "L2-normalised"
)
MODEL_FOLDER_VERSION = 2  # settings.json's model_folder_version; 2: the engines give features, novelty.json

# What preprocess.json said before it carried a version: its resize text names the version.
_RESIZE_OF_VERSION = {
    2: RESIZE_METHOD,
}


def write_model_folder(
    folder: Path, model, classes: list[str], data_dir: Path, prepare_report: dict, settings, summary: dict
) -> None:
    """Everything but the curves and history: model.keras, model.tflite, classes.json,
    preprocess.json and settings.json, into `folder` (a temporary one, swapped in later)."""
    folder = Path(folder)
    model.save(folder / paths.MODEL_FILE)
    export_tflite(model, folder / paths.TFLITE_FILE)
    shutil.copyfile(Path(data_dir) / paths.CLASSES_FILE, folder / paths.CLASSES_FILE)
    size, _, channels = model.input_shape[1:]
    write_json(
        folder / paths.PREPROCESS_FILE,
        {
            "version": PREPROCESS_VERSION,
            "size": int(size),
            "color": "grayscale" if channels == 1 else "rgb",
            "channels": int(channels),
            "resize": RESIZE_METHOD,
            "input": "uint8 pixels 0-255; standardizing them is inside the model",
            "scaling": _scaling(model),
            "network": summary.get("backbone", {}).get("name", CNN),
        },
    )
    write_json(
        folder / paths.TRAIN_SETTINGS_FILE,
        {
            "model_folder_version": MODEL_FOLDER_VERSION,
            "train": asdict(settings),
            "summary": summary,
            "data_dir": str(Path(data_dir).resolve()),
            "prepare": prepare_report.get("settings", {}),
            "classes": classes,
        },
    )


def _scaling(model) -> str:
    """What the model's first layer does to the pixels, in words (the model card's and a reader's)."""
    names = {layer.name for layer in model.layers[:3]}
    if "scale_pixels" in names:
        return "scales them as its ImageNet weights expect, (x - 127) / 128"
    if "standardize" in names:
        return "standardizes them with the training split's per-channel mean and variance"
    return "scales them to 0-1"


def write_calibration(folder: Path, calibration: dict | None, seconds: float | None = None) -> dict:
    """calibration.json (none without a validation split; the same bytes for the same model
    and data) and settings.json's `calibration` line with the `seconds` it took, into the
    model folder train is writing (measured on its exported model); returns that line."""
    folder = Path(folder)
    if calibration is not None:
        write_json(folder / paths.CALIBRATION_FILE, calibration)
    return add_to_settings(folder, "calibration", calibration_record(calibration, seconds))


def add_to_settings(folder: Path, key: str, record: dict) -> dict:
    """settings.json's `key` line, added to the model folder train is writing; returns it."""
    settings = read_json(Path(folder) / paths.TRAIN_SETTINGS_FILE, paths.TRAIN_HINT)
    write_json(Path(folder) / paths.TRAIN_SETTINGS_FILE, {**settings, key: record})
    return record


def calibration_record(calibration: dict | None, seconds: float | None = None) -> dict:
    """settings.json's line on calibration: the temperature, validation ECE and NLL before and after."""
    if calibration is None:
        return {"temperature": None, "note": "no validation split: probabilities are not calibrated"}
    before, after = calibration["before"], calibration["after"]
    return {
        "temperature": calibration["temperature"],
        "val_ece_before": before["ece"],
        "val_ece_after": after["ece"],
        "val_nll_before": before["nll"],
        "val_nll_after": after["nll"],
        "temperature_kept": calibration["temperature_check"]["kept"],
        "seconds": seconds,
    }


def load_calibration(model_dir: Path) -> dict | None:
    """calibration.json, or None for a model trained without a validation split (or before
    calibration existed): its probabilities are used as the network gives them."""
    where = Path(model_dir) / paths.CALIBRATION_FILE
    if not where.is_file():
        return None
    info = read_json(where, paths.TRAIN_HINT)
    temperature = info.get("temperature") if isinstance(info, dict) else None
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise PipelineError(f"{where} must give a temperature above 0: train again")
    return info


def load_train_settings(model_dir: Path) -> dict:
    """settings.json, or {} when it is missing or unreadable (only informative fields are read from it)."""
    try:
        info = read_json(Path(model_dir) / paths.TRAIN_SETTINGS_FILE, paths.TRAIN_HINT)
    except PipelineError:
        return {}
    return info if isinstance(info, dict) else {}


def read_history(path: Path) -> list[dict]:
    """history.csv (Keras' CSVLogger: an `epoch` column, then the metrics) as one dict per
    epoch; empty when no epoch finished. CSVLogger writes NA for a metric an epoch lacks
    (without a validation split): NaN here."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return []
    header = lines[0].split(",")
    return [
        dict(zip(header, (float("nan") if v in ("NA", "") else float(v) for v in line.split(","))))
        for line in lines[1:]
    ]


def export_tflite(model, path: Path) -> None:
    """The same network for the LiteRT interpreter, which predicts without importing TensorFlow:
    its inference model, probabilities and features from one call."""
    (inference_model(model) or model).export(str(path), format="litert", verbose=False)


def inference_model(model):
    """The classifier with a second output, its features, computed in the same call: what
    every engine runs (model.tflite and each export). None for a model without a layer named
    FEATURES_LAYER (trained before novelty): it runs as it is, probabilities only.

    A feature map (the CNN's last convolutional block) is averaged over a FEATURE_GRID x
    FEATURE_GRID grid, so the vector keeps where things are at any input size; a vector (a
    backbone's pooled features) is taken as it is."""
    from pipeline.core.native_stderr import import_keras

    keras = import_keras()
    try:
        layer = model.get_layer(FEATURES_LAYER)
    except ValueError:
        return None
    # a layer shared with another view of the network (a backbone's training views) has one
    # output per call: the one this model's graph reaches from its input
    for node in getattr(layer, "_inbound_nodes", None) or [None]:
        features = layer.output if node is None else node.output_tensors[0]
        if len(features.shape) == 4:
            side = max(1, min(int(features.shape[1]), int(features.shape[2])) // FEATURE_GRID)
            features = keras.layers.AveragePooling2D(side, name="features_grid")(features)
        if len(features.shape) != 2:
            features = keras.layers.Flatten(name="features_vector")(features)
        try:
            return keras.Model(model.inputs[0], [model.outputs[0], features], name=f"{model.name}_inference")
        except ValueError:  # another view's call, not reached from this model's input
            continue
    return None


def load_preprocess(model_dir: Path) -> dict:
    """preprocess.json, checked: the size and colour mode, and a version this pipeline speaks."""
    where = Path(model_dir) / paths.PREPROCESS_FILE
    info = read_json(where, paths.TRAIN_HINT)
    if not isinstance(info, dict) or not isinstance(info.get("size"), int) or info.get("color") not in COLOR_MODES:
        raise PipelineError(f"{where} must give an integer size and a color of {' or '.join(COLOR_MODES)}")
    version = info.get("version")
    if version is None:  # written before preprocess.json had a version: its resize says which
        version = next((v for v, text in _RESIZE_OF_VERSION.items() if text == info.get("resize")), 1)
    if version != PREPROCESS_VERSION:
        raise PipelineError(
            f"{where}: this model was trained with preprocessing version {version} "
            f"(resize: {info.get('resize', 'unknown')}), but this pipeline preprocesses with version "
            f"{PREPROCESS_VERSION} ({RESIZE_METHOD}); its predictions would be skewed: prepare and train again"
        )
    return info


def load_model_classes(model_dir: Path) -> list[str]:
    return load_classes(model_dir, paths.TRAIN_HINT)


def load_keras_model(model_dir: Path):
    """Load model.keras with Keras' safe mode: a model that carries code (a Lambda layer) is refused."""
    model_dir = Path(model_dir)
    path = model_dir / paths.MODEL_FILE
    if not path.is_file():
        legacy = sorted(model_dir.glob("*.h5")) if model_dir.is_dir() else []
        if legacy:
            raise PipelineError(
                f"refusing {legacy[0]}: legacy HDF5 models are not loaded; train again to get {paths.MODEL_FILE}"
            )
        raise PipelineError(f"{path} not found: {paths.TRAIN_HINT}")
    from pipeline.core.native_stderr import import_keras

    keras = import_keras()
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises ValueError, TypeError, zipfile errors... for bad files
        message = str(e)
        if "lambda" in message.lower() or "safe_mode" in message:
            raise PipelineError(
                f"refusing {path}: it contains Python code (a Lambda layer), which safe mode does not load"
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        raise PipelineError(f"could not load the model {path}: {first_line}") from None


def check_model_fits(
    model_io: tuple[tuple[int, ...], int],
    input_shape: tuple[int, ...],
    num_classes: int,
    where: str,
    classes_where: str = paths.CLASSES_FILE,
    model_name: str = "the model",
) -> None:
    """The model, the arrays and classes.json must agree on image shape and class count.

    `model_io` is (image shape, class count) as the model declares them; `where` names what
    gave `input_shape`, `classes_where` what gave `num_classes`.
    """
    model_input, model_classes = tuple(model_io[0]), int(model_io[1])
    if model_input != tuple(input_shape):
        raise PipelineError(
            f"{model_name} expects images of shape {model_input} but {where} holds {tuple(input_shape)}: "
            "prepare and train again with the same --size and --color"
        )
    if model_classes != num_classes:
        raise PipelineError(
            f"{model_name} predicts {model_classes} classes but {classes_where} lists {num_classes}: train again on this data"
        )


def keras_model_io(model) -> tuple[tuple[int, ...], int]:
    return tuple(model.input_shape[1:]), model.output_shape[-1]
