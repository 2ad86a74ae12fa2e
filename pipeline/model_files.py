"""Loading a trained model folder safely: the Keras model in safe mode, its classes and preprocessing."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.artifacts import read_json
from pipeline.dataset import load_classes
from pipeline.errors import PipelineError

TRAIN_HINT = "run `pipeline train` first"


def load_preprocess(model_dir: Path) -> dict:
    info = read_json(Path(model_dir) / paths.PREPROCESS_FILE, TRAIN_HINT)
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("size"), int)
        or info.get("color") not in ("rgb", "grayscale")
    ):
        raise PipelineError(
            f"{Path(model_dir) / paths.PREPROCESS_FILE} must give an integer size and a color of rgb or grayscale"
        )
    return info


def load_model_classes(model_dir: Path) -> list[str]:
    return load_classes(model_dir, TRAIN_HINT)


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
        raise PipelineError(f"{path} not found: {TRAIN_HINT}")
    from pipeline.native import import_keras

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
