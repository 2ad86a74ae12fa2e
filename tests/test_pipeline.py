"""train, evaluate and predict through the CLI, on the session's tiny trained model."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import run_cli


def test_train_writes_the_model_folder(trained):
    model = trained["model"]
    for name in (
        "model.keras",
        "model.tflite",
        "classes.json",
        "preprocess.json",
        "history.csv",
        "settings.json",
    ):
        assert (model / name).is_file(), name
    preprocess = json.loads((model / "preprocess.json").read_text())
    assert preprocess["size"] == 16 and preprocess["color"] == "rgb"
    history = (model / "history.csv").read_text().splitlines()
    assert history[0].split(",")[:1] == ["epoch"] and len(history) - 1 == 3  # --epochs 3, patience 5
    settings = json.loads((model / "settings.json").read_text())
    assert settings["train"]["epochs"] == 3 and settings["prepare"]["size"] == 16
    assert settings["summary"]["best_epoch"] >= 1


def test_evaluate_writes_metrics_and_json(trained, tmp_path):
    out = tmp_path / "reports"
    result = run_cli(
        "evaluate",
        "--data",
        trained["data"],
        "--model",
        trained["model"],
        "--out",
        out,
        "--json",
        "--quiet",
    )
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "loss", "classes", "confusion_matrix", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]["cat"]) == {"precision", "recall", "f1", "support"}
    matrix = np.array(metrics["confusion_matrix"])
    y_test = np.load(trained["data"] / "y_test.npy")
    assert matrix.shape == (3, 3) and matrix.sum(axis=1).tolist() == np.bincount(y_test, minlength=3).tolist()
    assert metrics["accuracy"] > 0.6  # colour classes are easy even after 3 epochs
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    human = run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out", out)
    assert "test accuracy" in human.stdout and "Confusion matrix" in human.stdout


def test_predict_agrees_with_evaluate(trained, tmp_path):
    out = tmp_path / "reports"
    run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out", out, "--quiet")
    with open(out / "predictions.csv", newline="") as f:
        expected = {row["path"]: row for row in csv.DictReader(f)}
    files = [trained["images"] / p for p in expected]
    for engine in ("litert", "keras"):
        result = run_cli("predict", *files, "--model", trained["model"], "--json", "--engine", engine, "--quiet")
        predictions = json.loads(result.stdout)
        assert len(predictions) == len(files)
        for p in predictions:
            row = expected[str(Path(p["file"]).relative_to(trained["images"]))]
            assert p["top_k"][0]["label"] == row["predicted"], engine  # "unknown" aside
            assert abs(p["confidence"] - float(row["confidence"])) < 1e-3, engine


def test_predict_top_k_and_a_bad_file(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    good = sorted((trained["images"] / "dog").iterdir())[0]
    result = run_cli("predict", good, bad, "--model", trained["model"], "--top-k", "3", "--json", expect=1)
    predictions = json.loads(result.stdout)
    assert [p["file"] for p in predictions] == [str(good)]
    assert set(predictions[0]) == {"file", "label", "confidence", "top_k", "novelty"}
    top = predictions[0]["top_k"]
    assert [set(t) for t in top] == [{"label", "probability"}] * 3
    assert top[0]["label"] == predictions[0]["label"]
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-3
    assert f"error: {bad}" in result.stderr
    text = run_cli("predict", good, "--model", trained["model"], "--quiet")
    assert str(good) in text.stdout and "%" in text.stdout


def test_stage_errors_without_artifacts(tmp_path):
    for args, message in [
        (["train", "--data", tmp_path / "none"], "run `pipeline prepare"),
        (["evaluate", "--model", tmp_path / "none"], "run `pipeline train"),
        (["predict", tmp_path / "x.png", "--model", tmp_path / "none"], "run `pipeline train"),
    ]:
        result = run_cli(*args, expect=1)
        assert message in result.output and "Traceback" not in result.output


def test_installed_entry_point_runs(tmp_path):
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "pipeline"), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "prepare" in done.stdout
    done = subprocess.run(
        [str(bin_dir / "pipeline"), "inspect", str(tmp_path / "none")],  # a user error, without TensorFlow's start-up
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in done.stderr
