"""The CIFAR-10-style CNN, and nothing else."""

from __future__ import annotations

from pipeline.native_stderr import import_keras

keras = import_keras()
layers = keras.layers


def build_model(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Conv32-Conv32-Pool-Dropout, Conv64-Conv64-Pool-Dropout, Dense 512-Dropout, softmax.

    Takes uint8 pixels: the 0-255 -> 0-1 scaling is the first layer, so no float copy of
    the dataset is ever made and predict feeds raw pixels as prepare stored them. The
    softmax stays float32 under mixed precision.
    """
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="pixels"),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
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
    from pipeline.schedule import OneCycle

    rate = OneCycle(learning_rate, total_steps, warmup) if total_steps else learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
