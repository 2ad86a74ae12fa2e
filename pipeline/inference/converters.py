"""A Keras model into each export format: `convert(fmt, model, target, calibration)`.

Reads nothing but the model (and, for int8, the calibration pixels it is handed); writes
the export at `target`, a path the caller stages (export.py checks it before it is kept):
model_int8.tflite (full-integer LiteRT: uint8 pixels in, uint8 probabilities out, through
Keras' LiteRT export and its converter options), model.onnx (tf2onnx), model_openvino/
(Keras' OpenVINO export: model.xml and model.bin) and model_saved/ (Keras' SavedModel
export, endpoint `serve`). Every model takes raw uint8 pixels (as floats for the float
formats): the first layer standardizes them itself (training/model.py).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_tensorflow, quiet_native_stderr
from pipeline.inference.engines import RUNTIMES, require

# What writing each format needs beyond TensorFlow and Keras, and the runtime its check runs on
_CONVERTERS = {"onnx": [("tf2onnx", "tf2onnx"), ("onnx", "onnx")], "openvino": [("openvino", "openvino")]}


def require_tools(fmt: str) -> None:
    """The converter and the runtime `fmt` needs, each installed, or one line naming it:
    before anything is loaded or written."""
    for module, package in [*_CONVERTERS.get(fmt, []), RUNTIMES[fmt]]:
        if module != "tensorflow":  # a main dependency, loaded later the quiet way
            require(module, package, f"export --format {fmt}")


def convert(fmt: str, model, target: Path, calibration: np.ndarray | None = None) -> None:
    """Write `model` as format `fmt` at `target` (a file, or a folder that exists and is empty)."""
    require_tools(fmt)
    tf = import_tensorflow()
    quiet = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx", "absl")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # conversion notes and deprecation warnings: not the user's business
        logger.setLevel(logging.ERROR)
    try:
        with quiet_native_stderr():  # the MLIR converter's and tf2onnx's native lines
            if fmt == "litert-int8":
                _to_litert_int8(tf, model, Path(target), calibration)
            elif fmt == "onnx":
                _to_onnx(tf, model, Path(target))
            elif fmt == "openvino":
                model.export(str(Path(target) / paths.OPENVINO_XML), format="openvino", verbose=False)
            elif fmt == "saved-model":
                model.export(str(target), format="tf_saved_model", verbose=False)
            else:
                raise ValueError(fmt)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _to_litert_int8(tf, model, target: Path, calibration: np.ndarray | None) -> None:
    """Full-integer LiteRT: every op int8 builtins (no Select TF ops, no float fallback), uint8
    in and out, the ranges calibrated on `calibration` (training pixels, one image at a time)."""
    if calibration is None or not len(calibration):
        raise PipelineError("export --format litert-int8 needs training images to calibrate on")

    def representative() -> Iterator[list[np.ndarray]]:
        for row in calibration:
            yield [np.asarray(row[None], dtype=np.float32)]  # the model's float input, 0-255 pixels

    from pipeline.inference.weight_rounding import gptq_weights

    model = _coarse_and_residual_dense(_pixel_scaling_as_sub_then_mul(model))
    try:
        with gptq_weights(model, calibration):
            model.export(
                str(target),
                format="litert",
                verbose=False,
                optimizations=[tf.lite.Optimize.DEFAULT],
                representative_dataset=representative,
                # replaces Keras' default [TFLITE_BUILTINS, SELECT_TF_OPS]: no Flex op can enter
                target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
                inference_input_type=tf.uint8,
                inference_output_type=tf.uint8,
            )
    except Exception as e:  # the converter's ConverterError, RuntimeError or ValueError
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise PipelineError(f"cannot convert to full-integer LiteRT (int8 builtin ops only): {first.strip()}") from None


def _pixel_scaling_as_sub_then_mul(model):
    """`model` with its Rescaling layer (x * s + o: a backbone's (x - 127) / 128) written as the
    same map in the other order, a Normalization ((x - m) / sqrt(v), m = -o / s, v = 1 / s^2),
    sharing every other layer: the same floats, but not the same int8 file. The converter turns
    Rescaling into MUL then ADD and quantizes the MUL's output over about [-1, 2] in 255 steps
    of 1/85, so every pixel was rounded by up to a grey level before the network saw it:
    half of a fine-tuned EfficientNet-Lite0's int8 error on Fashion-MNIST at 224 px (its pooled
    features moved 15.2 %, 8.0 % without it; agreement on 5,897 unseen photos 96.52 % -> 97.80 %,
    105 photos against 30, p = 6e-11).
    SUB then MUL is exact: integers -127..128 at step 1, then -127/128..1 at step 1/128."""
    from pipeline.core.native_stderr import import_keras

    keras = import_keras()
    Rescaling, Normalization = keras.layers.Rescaling, keras.layers.Normalization
    found = [layer for layer in model.layers if isinstance(layer, Rescaling)]
    if not found or not all(np.ndim(layer.scale) == 0 and float(layer.scale) > 0 for layer in found):
        return model

    def exact(layer):
        if not isinstance(layer, Rescaling):
            return layer  # shared: the same weights, GPTQ's kernels set on them reach the copy
        scale, offset = float(layer.scale), float(layer.offset)
        return Normalization(mean=-offset / scale, variance=1.0 / scale**2, name=layer.name)

    return keras.models.clone_model(model, clone_function=exact)


# A Dense whose int8 steps a few weights set: an output's largest weight at least this many
# times its 99th percentile (by size). sample_data's CNN: 1.99 and 1.36; a backbone's head: 6-17.
OUTLIER_SPREAD = 4.0
OUTLIER_MIN_INPUTS = 100  # below this a percentile says little: left as it is


def _coarse_and_residual_dense(model):
    """`model` with each Dense whose int8 steps a few outlying weights set written as two Denses
    summed: its kernel rounded onto the converter's own int8 grid (which the converter keeps
    exactly), and what that rounding left (with the bias), which gets a grid of its own, 127
    steps of at most half the first's. The same floats; in int8 the weights are held to the
    second grid's step.

    The converter quantizes each output's weights on one scale, its largest weight over 127. A
    backbone's head, its logistic-regression start with the standardization folded in, has
    weights up to 19 where the 99th percentile is under 1.3 (features almost always 0, divided by
    their ~0 spread), so the rest of a class's weights were rounded at a step of 0.15: the int8
    weights alone agreed with Keras on 98.2 % of 5,897 unseen Fashion-MNIST photos, the file on
    97.80 %; with this, 99.3 % and 98.32 % (59 photos against 28, p = 0.001). Splitting off
    the outliers alone did as well there, but a feature that is 0 on every calibration image
    leaves their Dense an output range of 0, which XNNPACK refuses to run. A Dense without such
    weights (the CNN's) is converted as it is."""
    from pipeline.core.native_stderr import import_keras
    from pipeline.inference.weight_rounding import nearest_kernel

    keras = import_keras()
    parts = {}  # layer name -> (the kernel on the int8 grid, the rest)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Dense) or layer.kernel.shape[0] < OUTLIER_MIN_INPUTS:
            continue
        kernel = layer.kernel.numpy()
        size = np.abs(kernel)
        if (size > OUTLIER_SPREAD * np.percentile(size, 99, axis=0)).any():
            coarse = nearest_kernel(kernel, depthwise=False)
            if np.any(kernel != coarse):  # one already on its grid (split before) has nothing left
                parts[layer.name] = (coarse, (kernel - coarse).astype(np.float32))
    if not parts:
        return model

    def call(layer, *args, **kwargs):
        if layer.name not in parts:
            return layer(*args, **kwargs)
        coarse, residual = parts[layer.name]
        units = int(layer.units)
        on_grid = keras.layers.Dense(units, use_bias=False, name=f"{layer.name}_on_grid")
        rest = keras.layers.Dense(units, use_bias=layer.use_bias, name=f"{layer.name}_residual")
        summed = keras.layers.Add(name=f"{layer.name}_sum")([on_grid(args[0]), rest(args[0])])
        on_grid.set_weights([coarse])
        rest.set_weights([residual, layer.bias.numpy()] if layer.use_bias else [residual])
        if layer.activation is keras.activations.linear:
            return summed
        return keras.layers.Activation(layer.activation, name=layer.name)(summed)

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def _to_onnx(tf, model, target: Path) -> None:
    """ONNX by tf2onnx from the frozen forward pass.

    Not Keras' own model.export(format="onnx") (Keras 3.15, tf2onnx 1.17): it hands tf2onnx's
    from_function the traced function, whose every input, captured constants included, becomes
    a graph input, so the Normalization layer's mean and variance came out as two more required
    inputs ("Required inputs (['cifar_cnn_1/standardize_1/Sub/y:0', ...]) are missing").
    tf2onnx.convert.from_keras fails on Keras 3 models (KeyError on the output's Keras tensor
    name). Freezing the function first turns the captured constants into constants of the graph.
    """
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # a Keras without it: a tf2onnx that needs no patch, we hope
        pass
    else:
        with warnings.catch_warnings():  # numpy's FutureWarning on the np.object it restores
            warnings.simplefilter("ignore", FutureWarning)
            patch_tf2onnx()  # Keras' own fixes for tf2onnx under numpy 2 (np.object, constant folding)
    import tf2onnx

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="pixels")
    forward = tf.function(lambda pixels: model(pixels, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(forward)
    tf2onnx.convert.from_graph_def(
        frozen.graph.as_graph_def(),
        name=model.name,
        input_names=[t.name for t in frozen.inputs],
        output_names=[t.name for t in frozen.outputs],
        output_path=str(target),
    )
