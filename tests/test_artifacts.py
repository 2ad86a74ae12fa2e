"""Artifacts that are never half-written, and loading that runs no code.

Kills prepare mid-run (SIGKILL and SIGTERM), interrupts train with Ctrl-C (SIGINT), plants
pickled arrays, Lambda-layer and HDF5 models, and mismatched data/model folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import artifacts
from tests.conftest import run_cli, snapshot, write_image_folder


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_what_a_test_started():
    """A test that fails or times out must not leave a training run busy on both cores."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(*args, **kwargs) -> subprocess.Popen:
    """`python -m pipeline ...` in its own process group, so its workers can be killed with it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    _started.append(process)
    return process


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the moment to stop it: {process.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """Enough images that prepare takes a couple of seconds on two cores."""
    return write_image_folder(
        tmp_path_factory.mktemp("big") / "images", per_class=500, size=48
    )  # long enough to be killed mid-run


def prepare_args(images: Path, out: Path) -> list:
    return ["prepare", images, "--out", out, "--size", "32", "--augment", "2", "--workers", "2"]


def prepare_over_previous_artifacts(big_folder: Path, tmp_path: Path):
    """Earlier complete artifacts in tmp_path/data, then a big prepare over them, caught decoding."""
    out = tmp_path / "data"
    small = write_image_folder(tmp_path / "small", per_class=6)
    run_cli("prepare", small, "--out", out, "--size", "16", "--quiet")
    before = snapshot(out)
    process = start(*prepare_args(big_folder, out))
    wait_for(lambda: any(tmp_path.glob(".data.tmp-*/_decoded.npy")), process)
    assert process.poll() is None, "prepare finished before it could be stopped: give it more images"
    return out, small, before, process


def test_prepare_killed_mid_run_leaves_the_previous_artifacts_byte_for_byte(big_folder, tmp_path):
    out, small, before, process = prepare_over_previous_artifacts(big_folder, tmp_path)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    assert snapshot(out) == before
    assert json.loads((out / "report.json").read_text())["settings"]["size"] == 16
    assert leftovers(tmp_path), "a killed run cannot clean up: its temporary folder is expected here"

    run_cli("prepare", small, "--out", out, "--size", "20", "--quiet")  # the next run sweeps it away
    assert leftovers(tmp_path) == []
    assert np.load(out / "X_train.npy").shape[1:] == (20, 20, 3)


def test_prepare_terminated_mid_run_cleans_up_and_keeps_the_previous_artifacts(big_folder, tmp_path):
    out, _, before, process = prepare_over_previous_artifacts(big_folder, tmp_path)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr  # nor from the decoding workers
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker outlives it
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a decoding worker outlived prepare")


def test_a_signal_that_comes_out_of_c_code_as_another_error_is_still_an_interruption(monkeypatch):
    """On CI a SIGTERM landed inside numpy's fromfile, which turned the handler's
    KeyboardInterrupt into a TypeError: that must still end as an interruption, not a traceback."""
    import typer

    from pipeline.cli import base as cli

    monkeypatch.setattr(cli, "_signalled", False)
    previous = signal.signal(signal.SIGTERM, cli._interrupt)
    try:

        @cli.user_errors
        def a_stage_reading_a_file():
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                raise TypeError("expected str, bytes or os.PathLike object, not BufferedReader") from None

        with pytest.raises(typer.Exit) as stopped:
            a_stage_reading_a_file()
        assert stopped.value.exit_code == 130

        monkeypatch.setattr(cli, "_signalled", False)  # the same error with no signal is a bug: it surfaces

        @cli.user_errors
        def a_stage_with_a_bug():
            raise TypeError("a bug")

        with pytest.raises(TypeError, match="a bug"):
            a_stage_with_a_bug()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_run_killed_between_its_two_renames_is_restored(tmp_path):
    target = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".data.old-{dead.pid}"
    old.mkdir()
    (old / "classes.json").write_text('["a", "b"]')
    stale = tmp_path / f".data.tmp-{dead.pid}-xyz"
    stale.mkdir()
    artifacts.clean_stale(target)
    assert (target / "classes.json").read_text() == '["a", "b"]'
    assert leftovers(tmp_path) == []


def test_failed_prepare_leaves_nothing_behind(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)
    out = tmp_path / "data"
    run_cli("prepare", images, "--out", out, "--size", "16", "--quiet")
    before = snapshot(out)
    write_image_folder(images, per_class=1, classes=("owl",), seed=5)  # too few: fails after decoding
    run_cli("prepare", images, "--out", out, "--size", "16", expect=1)
    assert snapshot(out) == before and leftovers(tmp_path) == []


# --- loading that runs no code ------------------------------------------------------------


def copy_data(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["data"], tmp_path / "data"))


def copy_model(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["model"], tmp_path / "model"))


def assert_one_line_error(result, *words: str) -> None:
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])


class Sentinel:
    """Unpickling this would run code; the tests check it never does."""

    def __reduce__(self):
        return (os.system, ("touch PICKLE_RAN",))


@pytest.mark.parametrize("name", ["X_train.npy", "y_train.npy", "X_val.npy"])
def test_a_pickled_array_is_refused_by_train(trained, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = copy_data(trained, tmp_path)
    planted = np.empty(4, dtype=object)
    planted[:] = [Sentinel(), {"a": 1}, "text", None]
    np.save(data / name, planted, allow_pickle=True)
    result = run_cli("train", "--data", data, "--out", tmp_path / "model", "--epochs", "1", expect=1)
    assert_one_line_error(result, "refusing to load", name, "pickled Python objects")
    assert not (tmp_path / "PICKLE_RAN").exists()
    assert not (tmp_path / "model").exists()


def test_a_pickled_test_array_is_refused_by_evaluate(trained, tmp_path):
    data = copy_data(trained, tmp_path)
    np.save(data / "X_test.npy", np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    result = run_cli("evaluate", "--data", data, "--model", trained["model"], "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "refusing to load", "X_test.npy")


def lambda_model(input_shape, classes: int):
    import keras

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Lambda(lambda x: x / 255.0),
            keras.layers.Flatten(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def test_a_model_with_a_lambda_layer_is_refused(trained, tmp_path):
    model = copy_model(trained, tmp_path)
    lambda_model((16, 16, 3), 3).save(model / "model.keras")
    result = run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "refusing", "Lambda")
    assert not (tmp_path / "r").exists()
    image = sorted((trained["images"] / "cat").iterdir())[0]
    result = run_cli("predict", image, "--model", model, "--engine", "keras", expect=1)
    assert_one_line_error(result, "refusing", "Lambda")


def test_an_h5_model_is_refused(trained, tmp_path):
    import keras

    model = copy_model(trained, tmp_path)
    real = keras.saving.load_model(model / "model.keras")
    (model / "model.keras").unlink()
    real.save(model / "model.h5")
    assert (model / "model.h5").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    result = run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "refusing", "model.h5", "HDF5")
    image = sorted((trained["images"] / "cat").iterdir())[0]
    result = run_cli("predict", image, "--model", model, "--engine", "keras", expect=1)
    assert_one_line_error(result, "refusing", "model.h5")
    # an HDF5 file given the .keras name is not loaded either
    shutil.move(model / "model.h5", model / "model.keras")
    result = run_cli("evaluate", "--data", trained["data"], "--model", model, "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "could not load the model")


# --- arrays, classes.json and the model must agree ----------------------------------------


def test_evaluate_refuses_data_prepared_at_another_size_or_with_other_classes(trained, tmp_path):
    other_size = tmp_path / "size12"
    run_cli("prepare", trained["images"], "--out", other_size, "--size", "12", "--quiet")
    result = run_cli("evaluate", "--data", other_size, "--model", trained["model"], "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "(16, 16, 3)", "(12, 12, 3)", "--size")

    gray = tmp_path / "gray"
    run_cli("prepare", trained["images"], "--out", gray, "--size", "16", "--color", "grayscale", "--quiet")
    result = run_cli("evaluate", "--data", gray, "--model", trained["model"], "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "(16, 16, 1)", "--color")

    two = tmp_path / "two_classes"
    shutil.copytree(trained["images"], two / "images", ignore=shutil.ignore_patterns("fox*"))
    run_cli("prepare", two / "images", "--out", two / "data", "--size", "16", "--quiet")
    result = run_cli("evaluate", "--data", two / "data", "--model", trained["model"], "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "trained on classes")

    model = copy_model(trained, tmp_path)
    data = copy_data(trained, tmp_path)
    for folder in (model, data):  # both classes.json files agree, but the model has 3 outputs
        (folder / "classes.json").write_text(json.dumps(["cat", "dog", "fox", "owl"]))
    result = run_cli("evaluate", "--data", data, "--model", model, "--out", tmp_path / "r", expect=1)
    assert_one_line_error(result, "predicts 3 classes", "classes.json lists 4")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("engine", ["keras", "litert"])
def test_predict_refuses_a_model_folder_that_disagrees_with_itself(trained, tmp_path, engine):
    image = sorted((trained["images"] / "dog").iterdir())[0]
    model = copy_model(trained, tmp_path)
    preprocess = json.loads((model / "preprocess.json").read_text())
    (model / "preprocess.json").write_text(json.dumps({**preprocess, "size": 12}))
    result = run_cli("predict", image, "--model", model, "--engine", engine, expect=1)
    assert_one_line_error(result, "(16, 16, 3)", "(12, 12, 3)", "preprocess.json")

    model = Path(shutil.copytree(trained["model"], tmp_path / "model2"))
    (model / "classes.json").write_text(json.dumps(["cat", "dog"]))
    result = run_cli("predict", image, "--model", model, "--engine", engine, expect=1)
    assert_one_line_error(result, "predicts 3 classes", "classes.json lists 2")


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: (d / "classes.json").write_text('["cat", "dog"]'), ["labels outside the 2 classes"]),
        (
            lambda d: np.save(d / "X_val.npy", np.zeros((len(np.load(d / "y_val.npy")), 12, 12, 3), np.uint8)),
            ["differ in shape"],
        ),
        (lambda d: np.save(d / "y_train.npy", np.zeros(5, np.int64)), ["y_train.npy", "does not match"]),
        (lambda d: np.save(d / "X_train.npy", np.zeros((4, 16, 16, 3), np.float32)), ["not a prepared image array"]),
        (lambda d: (d / "X_train.npy").write_bytes(b"\x93NUMPY garbage"), ["X_train.npy", "not a valid .npy"]),
        (lambda d: (d / "classes.json").write_text("{not json"), ["classes.json", "not valid JSON"]),
    ],
    ids=["classes", "val-size", "label-count", "float-pixels", "garbage", "bad-json"],
)
def test_train_refuses_data_that_disagrees_with_itself(trained, tmp_path, damage, words):
    data = copy_data(trained, tmp_path)
    damage(data)
    result = run_cli("train", "--data", data, "--out", tmp_path / "model", "--epochs", "1", expect=1)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


# --- Ctrl-C during train ------------------------------------------------------------------


def test_ctrl_c_during_train_keeps_the_best_model_as_a_complete_folder(trained, tmp_path):
    out = copy_model(trained, tmp_path)  # a previous model is replaced only by a complete one
    process = start(
        "train", "--data", trained["data"], "--out", out, "--epochs", "500", "--patience", "500", "--batch-size", "16"
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    wait_for(lambda: any(line.startswith("epoch 2/") for line in lines), process, timeout=300)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=300)
    reader.join(timeout=10)
    assert process.returncode == 130, "".join(lines)
    stderr = "".join(lines)
    assert "Traceback" not in stderr
    assert "error: training interrupted after" in stderr and "best model so far" in stderr
    assert leftovers(tmp_path) == []

    settings = json.loads((out / "settings.json").read_text())
    assert settings["summary"]["interrupted"] is True
    assert settings["train"]["epochs"] == 500
    epochs_run = settings["summary"]["epochs_run"]
    assert 2 <= epochs_run < 500 and 1 <= settings["summary"]["best_epoch"] <= epochs_run
    assert sum(line.startswith("epoch ") for line in lines) == epochs_run  # one line per finished epoch
    assert len((out / "history.csv").read_text().splitlines()) == epochs_run + 1
    for name in ("model.keras", "model.tflite", "classes.json", "preprocess.json"):
        assert (out / name).is_file(), name
    from pipeline.inference.model_folder import load_keras_model

    model = load_keras_model(out)
    assert model.output_shape[-1] == 3
    reports = tmp_path / "reports"
    run_cli("evaluate", "--data", trained["data"], "--model", out, "--out", reports, "--quiet")
    assert (reports / "metrics.json").is_file()


# --- an --out that would swallow something else ------------------------------------------


def test_prepare_refuses_an_out_folder_that_would_replace_the_images_or_other_files(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)
    before = snapshot(images)
    for out, words in [
        (images / "data", "overlaps the images folder"),
        (images, "overlaps the images folder"),
        (tmp_path, "overlaps the images folder"),
    ]:
        result = run_cli("prepare", images, "--out", out, expect=1)
        assert_one_line_error(result, words)
    assert snapshot(images) == before and leftovers(tmp_path) == [] and leftovers(images) == []
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.txt").write_text("years of work")
    result = run_cli("prepare", images, "--out", documents, expect=1)
    assert_one_line_error(result, "did not write", "new or empty folder")
    assert (documents / "thesis.txt").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    run_cli("prepare", images, "--out", tmp_path / "empty", "--size", "16", "--quiet")  # empty is fine
    run_cli("prepare", images, "--out", tmp_path / "empty", "--size", "16", "--quiet")  # and so is its own


def test_train_and_evaluate_refuse_to_write_over_their_inputs(trained, tmp_path):
    data, model = copy_data(trained, tmp_path), copy_model(trained, tmp_path)
    before = snapshot(tmp_path)
    result = run_cli("train", "--data", data, "--out", data, "--epochs", "1", expect=1)
    assert_one_line_error(result, "overlaps the data folder")
    result = run_cli("train", "--data", data, "--out", model / "..", "--epochs", "1", expect=1)
    assert_one_line_error(result, "overlaps the data folder")
    result = run_cli("evaluate", "--data", data, "--model", model, "--out", model, expect=1)
    assert_one_line_error(result, "overlaps the model folder")
    result = run_cli("evaluate", "--data", data, "--model", model, "--out", data, expect=1)
    assert_one_line_error(result, "overlaps the data folder")
    result = run_cli("evaluate", "--data", data, "--model", model, "--out", tmp_path / "data" / "reports", expect=1)
    assert_one_line_error(result, "overlaps the data folder")
    assert snapshot(tmp_path) == before


def test_ctrl_c_before_the_first_epoch_ends_writes_nothing(trained, tmp_path):
    out = copy_model(trained, tmp_path)
    before = snapshot(out)
    process = start("train", "--data", trained["data"], "--out", out, "--epochs", "500", "--batch-size", "4")
    wait_for(lambda: any(tmp_path.glob(".model.tmp-*")), process, timeout=300)  # made just before fit
    process.send_signal(signal.SIGINT)  # lands while TensorFlow builds its first graph
    _, stderr = process.communicate(timeout=300)
    assert "epoch 1/" not in stderr, "the first epoch ended before Ctrl-C arrived"
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: nothing was written, earlier artifacts are untouched"
    assert "Traceback" not in stderr
