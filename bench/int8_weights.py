"""Where an int8 export's disagreement comes from: weights or activations, nearest or GPTQ.

    python bench/int8_weights.py MODEL_DIR DATA_DIR [--images 300] [--int16-images 100]
        [--eval-data DIR] [--groups all stem ...]

Calibrated on DATA_DIR's training rows as export is; measured on --images test images
(evenly spaced over the split) of DATA_DIR, or of --eval-data (a folder prepared from other photos of the same
classes, for more images than one test split holds), against the Keras model's top-1:
  1. weights only, in Keras (activations float): each group of kernels (stem, depthwise,
     expand, project, head conv, the Dense; all) rounded to int8 as the converter does
     (nearest) and as export does (GPTQ, pipeline/inference/weight_rounding.py): agreement
     and the pooled features' relative error;
  2. the whole full-integer LiteRT model through export's own converter and runner
     (converters.convert, engines.litert_runner), with the converter's nearest rounding and
     with GPTQ's: agreement, and the images on which only one of the two agrees with an exact
     two-sided sign test on them (the same images on both sides: chance alone is the p-value);
  3. int16 activations with int8 GPTQ weights (LiteRT's 16x8 mode, reference kernels: about
     0.4 s a photo at 224 px, so on --int16-images): agreement. If 3 is near 100 % and 2 is
     not, the rest of the disagreement is the int8 activations'.
Prints one JSON document. Group names follow the EfficientNet-Lite layer names.
"""

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
from scipy.stats import binomtest

from pipeline.core.native_stderr import import_tensorflow
from pipeline.data.data_folder import load_split
from pipeline.export import calibration_rows
from pipeline.inference import weight_rounding
from pipeline.inference.converters import _coarse_and_residual_dense, _pixel_scaling_as_sub_then_mul, convert
from pipeline.inference.engines import litert_runner
from pipeline.inference.model_folder import inference_model, load_keras_model
from pipeline.inference.weight_rounding import _depthwise, gptq_kernels, gptq_weights, nearest_kernel

GROUPS = {
    "all": lambda name: True,
    "stem": lambda name: name.startswith("stem"),
    "depthwise": lambda name: "_dw_" in name,
    "expand": lambda name: "expand" in name,
    "project": lambda name: "project" in name,
    "head_conv": lambda name: name == "head_conv",
    "dense": lambda name: name.startswith("logits"),  # a backbone's head, as export converts it: two Denses
}


def exported_top1(network, calibration, X, gptq: bool) -> np.ndarray:
    """Top-1 of the int8 file that `export` writes (nearest: with GPTQ's kernels left out)."""
    folder = Path(tempfile.mkdtemp())
    try:
        with contextlib.nullcontext() if gptq else mock.patch.object(weight_rounding, "gptq_kernels", lambda *a: {}):
            convert("litert-int8", network, folder / "model_int8.tflite", calibration)
        run = litert_runner(folder / "model_int8.tflite", X.shape[1:], network.outputs[0].shape[-1], 2)
        return np.concatenate([run(X[i : i + 32])[0].argmax(axis=1) for i in range(0, len(X), 32)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def int16_top1(network, calibration, X) -> np.ndarray:
    """Top-1 with int16 activations and GPTQ's int8 weights (not a format export writes)."""
    tf = import_tensorflow()
    from ai_edge_litert.interpreter import Interpreter

    folder = Path(tempfile.mkdtemp())
    exact = _pixel_scaling_as_sub_then_mul(network)  # as export converts it
    try:
        with gptq_weights(exact, calibration):
            exact.export(str(folder / "saved"), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder / "saved"))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([row[None].astype(np.float32)] for row in calibration)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        interpreter = Interpreter(model_content=converter.convert())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    classes = network.outputs[0].shape[-1]
    target = next(d for d in interpreter.get_output_details() if d["shape"][-1] == classes)
    top = []
    for x in X:
        interpreter.set_tensor(source["index"], x[None].astype(source["dtype"]))
        interpreter.invoke()
        top.append(int(interpreter.get_tensor(target["index"])[0].argmax()))
    return np.array(top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--int16-images", type=int, default=100)
    parser.add_argument("--eval-data", type=Path, help="measure on this folder's test split")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    args = parser.parse_args()
    model = load_keras_model(args.model)
    # as export converts it: the same floats, a Dense with outlying weights as two (converters.py)
    network = _coarse_and_residual_dense(inference_model(model) or model)
    classes = model.output_shape[-1]
    calibration = calibration_rows(args.data, classes, 300)
    # evenly spaced over the split, which is in class order: its first rows are one or two classes
    X_all = load_split(args.eval_data or args.data, "test", classes)[0]
    X = np.asarray(
        X_all[np.unique(np.linspace(0, len(X_all) - 1, min(args.images, len(X_all))).astype(int))], np.float32
    )
    reference, features = (np.asarray(a) for a in network.predict(X, batch_size=32, verbose=0))

    rounded = gptq_kernels(network, calibration)
    layers = {name: network.get_layer(name) for name in rounded}
    original = {name: layer.kernel.numpy() for name, layer in layers.items()}
    near = {name: nearest_kernel(original[name], _depthwise(layer)) for name, layer in layers.items()}

    def weights_only(group, kernels) -> dict:
        for name, layer in layers.items():
            layer.kernel.assign(kernels[name] if GROUPS[group](name) else original[name])
        p, f = (np.asarray(a) for a in network.predict(X, batch_size=32, verbose=0))
        for name, layer in layers.items():
            layer.kernel.assign(original[name])
        return {
            "agreement": round(float(np.mean(p.argmax(1) == reference.argmax(1))), 4),
            "feature_error": round(float(np.linalg.norm(f - features) / np.linalg.norm(features)), 4),
        }

    keras_top = reference.argmax(axis=1)
    nearest_agrees = exported_top1(network, calibration, X, gptq=False) == keras_top
    gptq_agrees = exported_top1(network, calibration, X, gptq=True) == keras_top
    only_gptq, only_nearest = int(np.sum(gptq_agrees & ~nearest_agrees)), int(np.sum(nearest_agrees & ~gptq_agrees))
    some = np.unique(np.linspace(0, len(X) - 1, min(args.int16_images, len(X))).astype(int))  # every class, too
    result = {
        "test_images": len(X),
        "weights_only": {g: {"nearest": weights_only(g, near), "gptq": weights_only(g, rounded)} for g in args.groups},
        "int8": {
            "nearest": float(nearest_agrees.mean()),
            "gptq": float(gptq_agrees.mean()),
            "only_gptq_agrees": only_gptq,
            "only_nearest_agrees": only_nearest,
            "sign_test_p": binomtest(only_gptq, only_gptq + only_nearest).pvalue if only_gptq + only_nearest else 1.0,
        },
        "int16_activations_gptq": {
            "images": len(some),
            "agreement": float(np.mean(int16_top1(network, calibration, X[some]) == keras_top[some])),
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
