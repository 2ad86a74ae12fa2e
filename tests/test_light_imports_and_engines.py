"""Light imports and the engines behind them, checked by behaviour (never by timing): light
start-up imports, a light predict path, the same hashes as imagehash without scipy, both
training input paths, and float32 artifacts that agree with each other whatever precision
trained them."""

import json
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipeline.core.settings import TrainSettings
from pipeline.data import dedup
from pipeline.data.images import decode_image, to_array
from pipeline.inference.classifier import load_classifier
from pipeline.inference.model_folder import load_keras_model
from pipeline.train import train_model
from pipeline.training.precision import resolve_precision
from tests.conftest import run_cli

# pydantic: typer 0.29 imports it to coerce every option (+0.1 s a command), hence typer<0.29;
# fastapi, starlette, uvicorn: only `pipeline serve` needs them; dask: only `prepare --scheduler`
HEAVY = (
    "tensorflow",
    "keras",
    "sklearn",
    "scipy",
    "albumentations",
    "matplotlib",
    "imagehash",
    "pydantic",
    "fastapi",
    "starlette",
    "uvicorn",
    "python_multipart",
    "dask",
    "distributed",
    "cleanlab",  # only `pipeline audit` needs it
)


# Runs the CLI in a fresh interpreter and lists sys.modules at the end: not -X importtime,
# which misses imports made while native stderr is pointed away (TensorFlow's are).
_RUN_AND_LIST_MODULES = """
import json, sys
from typer.testing import CliRunner
from pipeline.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit_code": result.exit_code, "output": result.output,
                  "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def imported_modules(*args: str, expect: int = 0) -> set[str]:
    """Top-level modules a fresh interpreter has imported after running `pipeline ARGS`."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["exit_code"] == expect, found["output"][-2000:]
    return set(found["modules"])


@pytest.mark.parametrize(
    "command", [[], ["prepare"], ["train"], ["evaluate"], ["predict"], ["serve"], ["audit"], ["export"], ["inspect"]]
)
def test_help_imports_no_heavy_module(command):
    modules = imported_modules(*command, "--help")
    assert "pipeline" in modules
    assert not modules & {*HEAVY, "numpy"}, sorted(modules & {*HEAVY, "numpy"})  # numpy: 50 ms a start


def test_train_without_prepared_data_fails_before_loading_tensorflow(tmp_path):
    modules = imported_modules("train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"), expect=1)
    assert "pipeline" in modules and not modules & {"tensorflow", "keras"}
    assert not (tmp_path / "m").exists()


def test_predict_through_litert_imports_no_heavy_module(trained):
    image = sorted((trained["images"] / "cat").iterdir())[0]
    modules = imported_modules("predict", str(image), "--model", str(trained["model"]), "--quiet")
    assert "ai_edge_litert" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_phash_matches_imagehash(images):
    decoded = [decode_image(path, "rgb") for path in sorted(images.rglob("*.*"))]
    for image in decoded:
        assert dedup.perceptual_hash(image) == int(str(imagehash.phash(image)), 16)
    for size in (32, 40, 64):  # a batch of RGB rows, as prepare hashes them
        rows = np.stack([to_array(image, size) for image in decoded])
        expected = [int(str(imagehash.phash(Image.fromarray(row))), 16) for row in rows]
        assert dedup.perceptual_hashes(rows).tolist() == expected, size


def test_litert_agrees_with_keras_on_a_batch(trained):
    """Probabilities and features from one call of each engine, and the same novelty."""
    X = np.load(trained["data"] / "X_test.npy")
    classes = len(json.loads((trained["model"] / "classes.json").read_text()))
    on_litert, on_keras = load_classifier(trained["model"], "litert"), load_classifier(trained["model"], "keras")
    (litert, litert_features), (keras_, keras_features) = on_litert.run(X), on_keras.run(X)
    assert litert.shape == keras_.shape == (len(X), classes)
    assert np.abs(litert - keras_).max() < 1e-4
    assert (litert.argmax(1) == keras_.argmax(1)).all()
    assert litert_features.shape == keras_features.shape == (len(X), on_keras.novelty.dimensions)
    assert np.abs(litert_features - keras_features).max() < 1e-4 * max(1.0, np.abs(keras_features).max())
    assert np.abs(on_litert.infer(X).novelty - on_keras.infer(X).novelty).max() < 1e-4


def test_precision_auto_follows_the_cpu_and_float32_is_kept_when_asked(trained, tmp_path):
    summary = json.loads((trained["model"] / "settings.json").read_text())["summary"]
    assert summary["precision"] == "float32" and summary["input"] == "memory (tf.data)"  # --precision float32
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto") == ("bfloat16" if native_bf16 else "float32")
    assert resolve_precision("float32") == "float32" and resolve_precision("bfloat16") == "bfloat16"


def test_bfloat16_training_saves_float32_artifacts_that_agree(trained, tmp_path: Path):
    """bfloat16 asked for explicitly, so the float32 rebuild runs on any CPU: model.keras and
    model.tflite are float32 and agree with each other."""
    out = tmp_path / "model"
    run_cli("train", "--data", trained["data"], "--out", out, "--epochs", "1", "--precision", "bfloat16", "--quiet")
    saved = json.loads((out / "settings.json").read_text())
    assert saved["train"]["precision"] == saved["summary"]["precision"] == "bfloat16"
    assert {layer.dtype_policy.name for layer in load_keras_model(out).layers} == {"float32"}
    X = np.load(trained["data"] / "X_test.npy")
    litert, keras_ = load_classifier(out, "litert").run(X)[0], load_classifier(out, "keras").run(X)[0]
    assert np.abs(litert - keras_).max() < 1e-4


def test_memory_mapped_path_trains_the_same_network(trained, tmp_path: Path):
    """Arrays above the in-memory limit stream from their memory maps, a batch at a time."""
    out = tmp_path / "model"
    settings = TrainSettings(epochs=2, batch_size=16, precision="float32", in_memory_mb=0)
    summary = train_model(trained["data"], out, settings)
    assert summary["input"] == "memory-mapped batches" and summary["precision"] == "float32"
    assert summary["epochs_run"] == 2 and summary["train_images_per_s"] > 0
    saved = json.loads((out / "settings.json").read_text())
    assert saved["train"]["in_memory_mb"] == 0
    result = run_cli("evaluate", "--data", trained["data"], "--model", out, "--out", tmp_path / "r", "--json", "-q")
    assert json.loads(result.stdout)["accuracy"] > 0.5  # three colour classes
