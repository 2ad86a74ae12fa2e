"""The pictures, through the CLI: written, valid PNGs of sensible size, different for different data."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.report import plots
from tests.conftest import run_cli, write_image_folder


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the whole file decodes, not just its header
        return image.size


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "reports"
    run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out", out, "--quiet")
    return out


def test_prepare_draws_samples_that_follow_the_data(tmp_path):
    pictures = []
    for seed, augment in ((0, 1), (1, 1), (0, 0)):
        images = write_image_folder(tmp_path / f"images{seed}", per_class=8, seed=seed)
        out = tmp_path / f"data{seed}-{augment}"
        result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", augment, "--workers", "1")
        assert "samples.png" in result.stdout
        width, height = png_size(out / "samples.png")
        pictures.append((out / "samples.png").read_bytes())
        # 3 classes in rows; 3 originals per row, each followed by its augmented copy when augmenting
        assert 300 <= width <= 2000 and 250 <= height <= 1500, (width, height)
        if augment:
            assert width > height
    assert len(set(pictures)) == 3


def test_train_draws_curves_and_writes_tensorboard_logs(trained, tmp_path, monkeypatch):
    width, height = png_size(trained["model"] / "training_curves.png")
    assert 800 <= width <= 1600 and 300 <= height <= 800
    model = tmp_path / "model"
    monkeypatch.setenv("PIPELINE_PROGRESS", "always")  # the rich epoch bars, as on a terminal
    result = run_cli(
        "train", "--data", trained["data"], "--out", model, "--epochs", "2", "--batch-size", "16", "--tensorboard"
    )
    assert "epoch 2/2" in result.stderr and "val_loss" in result.stderr
    assert "training_curves.png" in result.stdout
    assert png_size(model / "training_curves.png") == (width, height)
    assert (model / "training_curves.png").read_bytes() != (trained["model"] / "training_curves.png").read_bytes()
    events = list((model / "logs").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} >= {"train", "validation"}, events
    assert all(p.stat().st_size > 0 for p in events)


def test_evaluate_draws_confusion_matrix_and_gallery(trained, evaluated, tmp_path):
    for name in ("confusion_matrix.png", "misclassified.png"):
        width, height = png_size(evaluated / name)
        assert 300 <= width <= 3000 and 150 <= height <= 3000, (name, width, height)
    # the same model on other images of the same classes: other numbers, other pictures
    other = tmp_path / "other"
    images = write_image_folder(tmp_path / "images", per_class=15, seed=7)
    run_cli("prepare", images, "--out", other, "--size", "16", "--quiet", "--workers", "1")
    reports = tmp_path / "reports"
    run_cli("evaluate", "--data", other, "--model", trained["model"], "--out", reports, "--quiet")
    assert (reports / "confusion_matrix.png").read_bytes() != (evaluated / "confusion_matrix.png").read_bytes()


def test_misclassified_gallery_worst_first_and_when_all_are_right(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    right = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert plots.save_misclassified(X, y, right, ["a", "b", "c"], [""] * 12, tmp_path / "none.png") == 0
    wrong = np.eye(3)[(y + 1) % 3] * 0.6 + 0.4 / 3
    names = [f"img{i}.png" for i in range(12)]
    assert plots.save_misclassified(X, y, wrong, ["a", "b", "c"], names, tmp_path / "all.png") == 12
    assert png_size(tmp_path / "none.png") != png_size(tmp_path / "all.png")
    assert png_size(tmp_path / "all.png")[0] >= 800  # 8 columns


def test_confusion_matrix_stays_readable_with_many_classes(tmp_path):
    names = [f"class_{i:02d}_with_a_long_name" for i in range(25)]
    matrix = np.diag(np.full(25, 20)) + np.eye(25, k=1, dtype=int) * 3
    plots.save_confusion_matrix(matrix, names, tmp_path / "cm.png")
    width, height = png_size(tmp_path / "cm.png")
    assert width >= 1500 and height >= 1400  # about 55 px per class, labels included


HISTORY = [
    {"epoch": e, "accuracy": e / 6, "loss": 1 / (e + 1), "val_accuracy": e / 7, "val_loss": 1.2 / (e + 1)}
    for e in range(6)
]


@pytest.fixture
def history_csv(tmp_path):
    """history.csv as Keras' CSVLogger writes it, in its own folder."""
    path = tmp_path / "history" / "history.csv"
    path.parent.mkdir()
    lines = [",".join(HISTORY[0])] + [",".join(str(v) for v in row.values()) for row in HISTORY]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_curves_drawn_by_a_child_process_are_the_curves_drawn_here(history_csv, tmp_path):
    beside = plots.TrainingCurvesBeside(history_csv, 5, tmp_path / "child.png")
    beside.wait()
    assert beside.process is not None and beside.process.returncode == 0  # the child drew them
    plots.save_training_curves(HISTORY, 5, tmp_path / "here.png")
    assert png_size(tmp_path / "child.png") == png_size(tmp_path / "here.png")
    child, here = (np.asarray(Image.open(tmp_path / name)) for name in ("child.png", "here.png"))
    assert np.array_equal(child, here)


@pytest.mark.parametrize("interpreter", ["/nonexistent/python", "/bin/false"])
def test_curves_are_drawn_here_when_the_child_cannot_start_or_fails(history_csv, tmp_path, monkeypatch, interpreter):
    monkeypatch.setattr(plots.sys, "executable", interpreter)  # a frozen build; a child that exits 1
    beside = plots.TrainingCurvesBeside(history_csv, 5, tmp_path / "curves.png")
    assert (beside.process is None) == interpreter.startswith("/nonexistent")
    beside.wait()
    plots.save_training_curves(HISTORY, 5, tmp_path / "here.png")
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "curves.png")), np.asarray(Image.open(tmp_path / "here.png"))
    )


def test_a_failed_save_ends_the_curves_child_before_it_writes(history_csv, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(RuntimeError), plots.TrainingCurvesBeside(history_csv, 5, out / "curves.png") as beside:
        raise RuntimeError("the export failed")  # at once: the child is still importing matplotlib
    assert beside.process.returncode is not None  # ended, not left running
    assert list(out.iterdir()) == []  # nothing written into the folder being removed
