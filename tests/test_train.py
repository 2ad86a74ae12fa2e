"""train's schedule, class weights and learning-rate finder, on the real path with tiny data."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest

from pipeline.core.settings import TrainSettings
from tests.conftest import run_cli, snapshot


def test_the_rate_warms_up_to_the_peak_then_decays(tmp_path):
    """Read from the optimizer at every step of a real fit: the warm-up rises to the peak
    at the end of the warm-up share, then the rate falls every step to peak / final_div."""
    import keras

    from pipeline.training.model import build_model, compile_model

    steps, peak = 20, 4e-3
    model = compile_model(build_model((12, 12, 1), 2), peak, total_steps=steps, warmup=0.25)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: seen.append(
            float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        )
    )
    X = np.random.default_rng(0).integers(0, 256, (40, 12, 12, 1), dtype=np.uint8)
    model.fit(X, np.arange(40) % 2, batch_size=8, epochs=4, callbacks=[record], verbose=0)  # 5 steps x 4
    assert len(seen) == steps
    top = int(np.argmax(seen))
    assert top == 5 and seen[top] == pytest.approx(peak, rel=1e-4)  # 25% of 20 steps
    assert seen[0] == pytest.approx(peak / 25, rel=1e-3)
    assert all(a < b for a, b in zip(seen[:top], seen[1 : top + 1]))  # rises
    assert all(a > b for a, b in zip(seen[top:], seen[top + 1 :]))  # then falls
    assert seen[-1] < peak / 50


def test_train_records_its_peak_rate_and_saves_no_optimizer_state(trained):
    """The trained fixture (3 epochs, batch 16): the peak rate scaled to its batch, and a
    model.keras with the weights alone (the optimizer's moments would triple it)."""
    settings = json.loads((trained["model"] / "settings.json").read_text())
    assert settings["train"]["learning_rate"] == TrainSettings(batch_size=16).peak_learning_rate()
    assert settings["train"]["schedule"] == "one-cycle"
    with zipfile.ZipFile(trained["model"] / "model.keras") as z:
        config = json.loads(z.read("config.json"))
        assert not any("optimizer" in name for name in z.namelist())
    assert not config.get("compile_config")


def test_the_model_standardizes_pixels_with_the_training_split_statistics(trained):
    """The first layer centres and scales each channel by the training split's mean and
    variance, recorded in settings.json, and the saved model carries them: predict and
    evaluate feed it raw uint8 pixels."""
    X = np.load(trained["data"] / "X_train.npy")
    pixels = X.reshape(-1, X.shape[-1]).astype(np.float64)
    summary = json.loads((trained["model"] / "settings.json").read_text())["summary"]
    assert summary["pixel_mean"] == pytest.approx(pixels.mean(axis=0), abs=1e-3)
    assert summary["pixel_variance"] == pytest.approx(pixels.var(axis=0), rel=1e-4)
    with zipfile.ZipFile(trained["model"] / "model.keras") as z:
        layers = json.loads(z.read("config.json"))["config"]["layers"]
    first = next(layer for layer in layers if layer["class_name"] != "InputLayer")
    assert first["class_name"] == "Normalization"
    assert first["config"]["mean"] == pytest.approx(summary["pixel_mean"])


def test_pixel_statistics_of_a_constant_channel_do_not_divide_by_zero():
    from pipeline.training.model import PixelStats

    white = np.full((5, 4, 4, 1), 255, dtype=np.uint8)
    stats = PixelStats.of(white)
    assert stats.mean == [255.0] and stats.variance == [1.0]


def test_the_peak_rate_follows_the_square_root_of_the_batch():
    base = TrainSettings().peak_learning_rate()
    assert TrainSettings(batch_size=4 * TrainSettings().batch_size).peak_learning_rate() == pytest.approx(2 * base)
    assert TrainSettings(batch_size=64, learning_rate=0.01).peak_learning_rate() == 0.01


def test_class_weight_balanced_comes_from_the_training_counts_and_weighs_the_second_half(tmp_path):
    """The weights are n / (classes x count) of the training split, recorded; they weigh the
    training loss from the second half of the epochs on (deferred re-weighting): the first
    epoch's loss is the unweighted run's, the second's is not. The validation loss that picks
    the best epoch is weighted from the first epoch on: the same weights, another val_loss."""
    from pipeline.inference.model_folder import read_history
    from tests.conftest import write_image_folder

    images = write_image_folder(tmp_path / "images", per_class=6, classes=("cat", "dog"))
    write_image_folder(tmp_path / "images", per_class=24, classes=("fox",), seed=1)
    data = tmp_path / "data"
    run_cli("prepare", images, "--out", data, "--size", "12", "--augment", "0", "-q")
    for weighting in ("balanced", "none"):
        run_cli(
            "train", "--data", data, "--out", tmp_path / weighting, "--epochs", "2", "--class-weight", weighting, "-q"
        )
    settings = json.loads((tmp_path / "balanced" / "settings.json").read_text())
    counts = np.bincount(np.load(data / "y_train.npy"), minlength=3)
    expected = counts.sum() / (3 * counts)
    assert settings["train"]["class_weight"] == "balanced"
    weights = settings["summary"]["class_weights"]
    assert list(weights) == ["cat", "dog", "fox"]
    assert np.allclose(list(weights.values()), expected, rtol=1e-5)
    assert weights["cat"] > 1 > weights["fox"]
    assert settings["summary"]["class_weights_from_epoch"] == 2

    def losses(model_dir, column="loss"):
        return [row[column] for row in read_history(model_dir / "history.csv")]

    weighted, plain = losses(tmp_path / "balanced"), losses(tmp_path / "none")
    assert weighted[0] == pytest.approx(plain[0], rel=1e-5)
    assert weighted[1] != pytest.approx(plain[1], rel=1e-3)
    weighted_val, plain_val = losses(tmp_path / "balanced", "val_loss"), losses(tmp_path / "none", "val_loss")
    assert weighted_val[0] != pytest.approx(plain_val[0], rel=1e-3)


def test_early_stopping_waits_for_the_class_weights(trained, tmp_path):
    """A plateau before the weights begin must not end a --class-weight run, nor restore an
    epoch the weights never reached. At a rate of 1e-12 the validation loss is flat from the
    first epoch: with patience 1 the run stopped after epoch 2 of 6, unweighted, while
    settings.json said the weights begin at epoch 4."""
    model = tmp_path / "model"
    run_cli(
        "train", "--data", trained["data"], "--out", model, "--epochs", "6", "--patience", "1",
        "--learning-rate", "1e-12", "--class-weight", "balanced", "-q",
    )  # fmt: skip
    summary = json.loads((model / "settings.json").read_text())["summary"]
    assert summary["class_weights_from_epoch"] == 4
    assert summary["best_epoch"] == 4 and summary["epochs_run"] == 5  # first weighted epoch, then patience


def test_no_class_weight_by_default(trained):
    settings = json.loads((trained["model"] / "settings.json").read_text())
    assert settings["train"]["class_weight"] == "none" and settings["summary"]["class_weights"] is None
    assert settings["summary"]["class_weights_from_epoch"] is None


def test_find_lr_plots_and_prints_a_suggestion_and_writes_no_model(trained, tmp_path):
    out = tmp_path / "runs" / "model"
    existing = tmp_path / "runs" / "kept"
    existing.mkdir(parents=True)
    (existing / "model.keras").write_text("an earlier model")
    before = snapshot(existing)
    result = run_cli("train", "--data", trained["data"], "--out", out, "--find-lr", "--batch-size", "8", "-q")
    suggested = float(result.stdout.split("suggested --learning-rate ")[1].split()[0])
    assert 1e-6 <= suggested <= 1.0
    assert (tmp_path / "runs" / "lr_find.png").stat().st_size > 10_000
    assert not out.exists() and snapshot(existing) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept", "lr_find.png"]


def test_find_lr_leaves_an_existing_model_folder_untouched(trained, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "settings.json").write_text("{}")
    before = snapshot(out)
    run_cli("train", "--data", trained["data"], "--out", out, "--find-lr", "--batch-size", "8", "-q")
    assert snapshot(out) == before and (tmp_path / "lr_find.png").exists()


def test_suggest_picks_a_fraction_of_the_minimum():
    from pipeline.training.lr_find import BELOW_MINIMUM, suggest

    lrs = [1e-6 * 10 ** (i / 20) for i in range(100)]  # 1e-6 .. ~1
    losses = [2.3 - 2.0 / (1 + math.exp(-(math.log10(lr) + 3) * 4)) for lr in lrs]  # falls around 1e-3
    losses = [v if lr < 0.1 else v + (lr - 0.1) * 50 for v, lr in zip(losses, lrs)]  # blows up past 0.1
    found = suggest(lrs, losses)
    assert 1e-3 < found["min_loss_lr"] <= 0.15
    assert found["suggestion"] == pytest.approx(found["min_loss_lr"] / BELOW_MINIMUM)
    assert 1e-4 < found["steepest"] < 1e-2
