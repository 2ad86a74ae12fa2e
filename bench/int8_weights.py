"""Where an int8 export's disagreement comes from: weights or activations, nearest or GPTQ.

    python bench/int8_weights.py MODEL_DIR DATA_DIR [--images 300] [--int16-images 100]

On the first --images test images of DATA_DIR, against the Keras model's top-1:
  1. weights only, in Keras (activations float): each group of kernels (stem, depthwise,
     expand, project, head conv, the Dense; all) rounded to int8 as the converter does
     (nearest) and as export does (GPTQ, pipeline/inference/weight_rounding.py): agreement
     and the pooled features' relative error;
  2. the whole full-integer LiteRT model, converted as export does, with nearest and with
     GPTQ kernels: agreement;
  3. int16 activations with int8 GPTQ weights (LiteRT's 16x8 mode, reference kernels: slow,
     so on --int16-images only): agreement. If 3 is near 100 % and 2 is not, the rest of
     the disagreement is the int8 activations'.
Prints one JSON document. Group names follow the EfficientNet-Lite layer names.
"""

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.core.native_stderr import import_tensorflow
from pipeline.data.data_folder import load_split
from pipeline.export import calibration_rows
from pipeline.inference.model_folder import inference_model, load_keras_model
from pipeline.inference.weight_rounding import _depthwise, gptq_kernels, gptq_weights

GROUPS = {
    "all": lambda name: True,
    "stem": lambda name: name.startswith("stem"),
    "depthwise": lambda name: "_dw_" in name,
    "expand": lambda name: "expand" in name,
    "project": lambda name: "project" in name,
    "head_conv": lambda name: name == "head_conv",
    "dense": lambda name: name == "logits",
}


def nearest(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    rows = kernel.reshape(-1, kernel.shape[2]).T if depthwise else kernel.reshape(-1, kernel.shape[-1]).T
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.round(rows / scale) * scale).T.reshape(kernel.shape).astype(np.float32)


def litert_agreement(network, calibration, X, reference, int16: bool, gptq: bool) -> float:
    tf = import_tensorflow()
    from ai_edge_litert.interpreter import Interpreter

    folder = Path(tempfile.mkdtemp())
    try:
        with gptq_weights(network, calibration) if gptq else contextlib.nullcontext():
            network.export(str(folder / "saved"), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(folder / "saved"))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([row[None].astype(np.float32)] for row in calibration)
        ops = tf.lite.OpsSet
        converter.target_spec.supported_ops = [
            ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 if int16 else ops.TFLITE_BUILTINS_INT8
        ]
        interpreter = Interpreter(model_content=converter.convert())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = next(d for d in interpreter.get_output_details() if d["shape"][-1] == reference.shape[1])
    top = []
    for x in X:
        interpreter.set_tensor(source["index"], x[None].astype(source["dtype"]))
        interpreter.invoke()
        top.append(int(interpreter.get_tensor(target["index"])[0].argmax()))
    return float(np.mean(np.array(top) == reference[: len(X)].argmax(axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--int16-images", type=int, default=100)
    args = parser.parse_args()
    model = load_keras_model(args.model)
    network = inference_model(model) or model
    classes = model.output_shape[-1]
    calibration = calibration_rows(args.data, classes, 300)
    X = np.asarray(load_split(args.data, "test", classes)[0][: args.images], dtype=np.float32)
    reference, features = (np.asarray(a) for a in network.predict(X, batch_size=32, verbose=0))

    rounded = gptq_kernels(network, calibration)
    layers = {name: network.get_layer(name) for name in rounded}
    original = {name: layer.kernel.numpy() for name, layer in layers.items()}
    near = {name: nearest(original[name], _depthwise(layer)) for name, layer in layers.items()}

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

    result = {
        "test_images": len(X),
        "weights_only": {g: {"nearest": weights_only(g, near), "gptq": weights_only(g, rounded)} for g in GROUPS},
        "int8": {
            "nearest": litert_agreement(network, calibration, X, reference, int16=False, gptq=False),
            "gptq": litert_agreement(network, calibration, X, reference, int16=False, gptq=True),
        },
        "int16_activations_gptq": {
            "images": min(args.int16_images, len(X)),
            "agreement": litert_agreement(network, calibration, X[: args.int16_images], reference, True, True),
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
