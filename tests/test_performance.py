"""What keeps the tool fast, checked by behaviour (never by timing): light start-up imports,
a light predict path, the same hashes as imagehash without scipy, both training input paths,
and float32 artifacts that agree with each other whatever precision trained them."""

import json
import subprocess
import sys
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from pipeline import dedup
from pipeline.images import decode_image, to_array
from pipeline.model_files import load_keras_model
from pipeline.prediction import load_predictor
from pipeline.training import TrainSettings, train_model
from tests.conftest import run_cli

HEAVY = ("tensorflow", "keras", "sklearn", "scipy", "albumentations", "matplotlib", "imagehash")


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


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["evaluate"], ["predict"]])
def test_help_imports_no_heavy_module(command):
    modules = imported_modules(*command, "--help")
    assert "pipeline" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


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
    X = np.load(trained["data"] / "X_test.npy")
    shape, classes = X.shape[1:], len(json.loads((trained["model"] / "classes.json").read_text()))
    litert = load_predictor(trained["model"], "litert", shape, classes)(X)
    keras_ = load_predictor(trained["model"], "keras", shape, classes)(X)
    assert litert.shape == keras_.shape == (len(X), classes)
    assert np.abs(litert - keras_).max() < 1e-4
    assert (litert.argmax(1) == keras_.argmax(1)).all()


def test_trained_model_is_float32_whatever_the_precision(trained):
    summary = json.loads((trained["model"] / "settings.json").read_text())["summary"]
    assert summary["precision"] in ("float32", "bfloat16") and summary["input"] == "memory (tf.data)"
    model = load_keras_model(trained["model"])
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}


def test_memory_mapped_path_trains_the_same_network(trained, tmp_path: Path):
    """Arrays above the in-memory limit stream from their memory maps; bfloat16 training (asked for
    explicitly, so the float32 rebuild runs on any CPU) still saves a float32 model."""
    out = tmp_path / "model"
    settings = TrainSettings(epochs=2, batch_size=16, precision="bfloat16", in_memory_mb=0)
    summary = train_model(trained["data"], out, settings)
    assert summary["input"] == "memory-mapped batches" and summary["precision"] == "bfloat16"
    assert {layer.dtype_policy.name for layer in load_keras_model(out).layers} == {"float32"}
    assert summary["epochs_run"] == 2 and summary["train_images_per_s"] > 0
    saved = json.loads((out / "settings.json").read_text())
    assert saved["train"]["in_memory_mb"] == 0 and saved["summary"]["precision"] == "bfloat16"
    result = run_cli("evaluate", "--data", trained["data"], "--model", out, "--out", tmp_path / "r", "--json", "-q")
    assert json.loads(result.stdout)["accuracy"] > 0.5  # three colour classes
