"""One error style: every bad option is one line on stderr and exit 1; and the defects found
while reshaping the package, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline.data.image_folder import class_imbalance
from tests.conftest import run_cli, write_image_folder

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(result, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "Usage" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    "args, words",
    [
        (["prepare", "IMAGES", "--color", "purple"], ["--color", "purple"]),
        (["prepare", "IMAGES", "--size", "big"], ["--size", "big"]),
        (["prepare", "IMAGES", "--size", "4"], ["--size"]),
        (["prepare", "IMAGES", "--no-such-option"], ["--no-such-option"]),
        (["train", "--epochs", "0"], ["--epochs", "0"]),
        (["train", "--batch-size", "0"], ["--batch-size"]),
        (["train", "--learning-rate", "0"], ["--learning-rate"]),
        (["train", "--precision", "bfloat8"], ["--precision", "bfloat8"]),
        (["train", "--class-weight", "inverse"], ["--class-weight", "inverse"]),
        (["train", "--schedule", "step"], ["--schedule", "step"]),
        (["train", "--learning-rate", "-1"], ["--learning-rate"]),
        (["train", "--learning-rate", "fast"], ["--learning-rate", "fast"]),
        (["train", "--find-lr", "--batch-size", "0"], ["--batch-size"]),
        (["predict", "x.png", "--top-k", "0"], ["--top-k", "0"]),
        (["predict", "x.png", "--threshold", "2"], ["--threshold", "2"]),
        (["predict", "x.png", "--engine", "tpu"], ["--engine", "tpu"]),
        (["predict"], ["Missing argument"]),
        (["inspect", "IMAGES", "--workers", "-1"], ["--workers"]),
        (["prepare", "IMAGES", "--fixes", "no-such-audit.csv"], ["--fixes", "no-such-audit.csv"]),
        (["audit", "--folds", "1"], ["--folds"]),
        (["audit", "--epochs", "0"], ["--epochs"]),
        (["audit", "--precision", "bfloat8"], ["--precision", "bfloat8"]),
        (["no-such-command"], ["no-such-command"]),
    ],
)
def test_every_bad_option_is_one_line_and_exit_1(images, tmp_path, args, words):
    args = [str(images) if a == "IMAGES" else a for a in args]
    if args[0] in ("train", "prepare", "audit"):
        args += ["--out", str(tmp_path / "out")]
    one_line_error(run_cli(*args, expect=None), *words)
    assert not (tmp_path / "out").exists()


def test_choices_are_listed_in_the_help():
    assert "rgb" in run_cli("prepare", "--help").stdout and "grayscale" in run_cli("prepare", "--help").stdout
    help_text = run_cli("predict", "--help").stdout
    assert "litert" in help_text and "keras" in help_text
    help_text = run_cli("train", "--help").stdout
    assert "--learning-rate" in help_text and "--precision" in help_text and "bfloat16" in help_text
    assert "balanced" in help_text and "one-cycle" in help_text and "--find-lr" in help_text


def test_pipeline_alone_prints_the_help():
    result = run_cli(expect=0)
    assert "prepare" in result.output and "train" in result.output


def test_a_loss_that_becomes_nan_is_one_line_and_writes_no_model(trained, tmp_path):
    """A learning rate far too high: the loss is NaN from the first batches. It used to crash
    with a traceback (formatting a None best loss) after writing a model of NaN weights."""
    out = tmp_path / "model"
    result = run_cli(
        "train", "--data", trained["data"], "--out", out, "--learning-rate", "1e30", "--epochs", "3", "-q", expect=None
    )
    one_line_error(result, "diverged", "--learning-rate")
    assert not out.exists()


def test_strict_counts_the_imbalance_warning(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=5, classes=("cat", "dog"))
    write_image_folder(images, per_class=20, classes=("fox",), seed=2)
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--workers", "1", "--strict", expect=None)
    one_line_error(result, "--strict", "imbalanced")
    assert not out.exists()
    run_cli("prepare", images, "--out", out, "--size", "16", "--workers", "1", "-q")
    report = json.loads((out / "report.json").read_text())
    assert any("imbalanced" in w for w in report["warnings"])  # the one list of warnings


def test_class_imbalance_uses_its_ratio_and_ignores_empty_classes():
    assert class_imbalance({"a": 10, "b": 6}, ratio=2) is None
    warning = class_imbalance({"a": 10, "b": 4}, ratio=2)
    assert "2.5x the smallest" in warning and "under 1/2 of it: 'b' (4)" in warning
    assert "under a third" not in class_imbalance({"a": 10, "b": 3})
    assert class_imbalance({"cats": 60, "empty_class": 0, "dogs": 50}) is None
    assert "inf" not in class_imbalance({"cats": 60, "empty_class": 0, "dogs": 10})


def test_inspect_leaves_an_empty_class_out_of_the_ratio(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6, classes=("cat", "dog"))
    (images / "empty_class").mkdir()
    found = json.loads(run_cli("inspect", images, "--json").stdout)
    assert "class folder 'empty_class' has no image files" in found["warnings"]
    assert not any("imbalanced" in w or "inf" in w for w in found["warnings"]), found["warnings"]


def test_a_model_folder_from_another_preprocessing_version_is_refused(trained, tmp_path):
    image = sorted((trained["images"] / "cat").iterdir())[0]
    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    info = json.loads((model / "preprocess.json").read_text())
    assert info["version"] == 2
    del info["version"]  # as written before the version field: the resize text still says 2
    (model / "preprocess.json").write_text(json.dumps(info))
    run_cli("predict", image, "--model", model, "--quiet")
    info["resize"] = "squash to square, LANCZOS"  # the resize of version 1
    (model / "preprocess.json").write_text(json.dumps(info))
    for engine in ("litert", "keras"):
        one_line_error(
            run_cli("predict", image, "--model", model, "--engine", engine, expect=None), "version 1", "train again"
        )


def test_python_and_keras_bounds_are_true():
    """model.export(format="litert") first came with Keras 3.13, which needs Python 3.11."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python_floor = re.search(r">=\s*3\.(\d+)", project["requires-python"])
    assert python_floor and int(python_floor.group(1)) >= 11
    keras = next(d for d in project["dependencies"] if re.match(r"keras\b", d))
    floor = tuple(int(n) for n in re.search(r">=\s*([\d.]+)", keras).group(1).split(".")[:2])
    assert floor >= (3, 13), keras
    assert tuple(int(n) for n in version("keras").split(".")[:2]) >= floor
