"""The CIFAR-10-style CNN, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.native_stderr import import_keras
from pipeline.inference.model_folder import FEATURES_LAYER

keras = import_keras()
layers = keras.layers


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean and variance of the training pixels (0-255), one value per channel."""

    mean: list[float]
    variance: list[float]

    @classmethod
    def of(cls, X: np.ndarray, max_rows: int = 10_000) -> PixelStats:
        """From up to `max_rows` evenly spaced rows: the same every run, and a memory-mapped
        split of millions of images is not read whole for a few numbers."""
        rows = np.unique(np.linspace(0, len(X) - 1, min(len(X), max_rows)).astype(np.int64))
        channels = X.shape[-1]
        total, squares, count = np.zeros(channels), np.zeros(channels), 0
        for chunk in np.array_split(rows, max(1, len(rows) // 256)):  # a few MB at a time
            pixels = np.asarray(X[chunk]).reshape(-1, channels).astype(np.float64)
            total += pixels.sum(axis=0)
            squares += np.square(pixels).sum(axis=0)
            count += len(pixels)
        mean = total / count
        # a channel that never changes (an all-white folder) would divide by zero
        variance = np.maximum(squares / count - mean**2, 1.0)
        return cls([round(float(v), 4) for v in mean], [round(float(v), 4) for v in variance])


def build_model(
    input_shape: tuple[int, int, int], num_classes: int, pixel_stats: PixelStats | None = None
) -> keras.Model:
    """Conv32-Conv32-Pool-Dropout, Conv64-Conv64-Pool-Dropout, Dense 512-Dropout, softmax.

    Takes uint8 pixels: the first layer standardizes them with the training split's
    per-channel mean and variance (`pixel_stats`; without them it scales 0-255 to 0-1), so
    no float copy of the dataset is ever made and predict feeds raw pixels as prepare
    stored them. Centred inputs start learning in the first epoch where 0-1 inputs spent
    most of it near chance (a point of test accuracy in a 6-epoch budget on the letters,
    bench/RESULTS.md). The softmax stays float32 under mixed precision.

    The last convolutional block's map is the layer named "features": how unlike the
    training images a picture is reads far better there than in the Dense-512 layer, which
    training pulls every input towards one class (docs/unknown.md).
    """
    first = (
        layers.Normalization(mean=pixel_stats.mean, variance=pixel_stats.variance, name="standardize")
        if pixel_stats is not None
        else layers.Rescaling(1.0 / 255)
    )
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="pixels"),
            first,
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2, name=FEATURES_LAYER),  # what the novelty score reads (inference/novelty.py)
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_classes),
            layers.Activation("softmax", dtype="float32", name="probabilities"),
        ],
        name="cifar_cnn",
    )


def compile_model(
    model: keras.Model, learning_rate: float = 1e-3, total_steps: int | None = None, warmup: float = 0.25
) -> keras.Model:
    """Adam and the loss. With `total_steps` the rate follows `OneCycle` (warm-up over the
    `warmup` share of the steps to `learning_rate`, its peak, then cosine decay); without, it
    stays at `learning_rate`. The schedule lives in the optimizer, so a custom training step
    that calls `optimizer.apply` follows it too."""
    from pipeline.training.schedule import OneCycle

    rate = OneCycle(learning_rate, total_steps, warmup) if total_steps else learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
