"""Where a backbone model's int8 disagreement arises: the frozen bottom or the fine-tuned top.

    python bench/int8_where.py MODEL_DIR DATA_DIR

For a `train --backbone` model: the Keras model is split where fine-tuning begins
(training.backbone: `bottom`, pixels -> the cut activations, frozen; `top`, those
activations -> probabilities). Each half is converted alone by export's own converter
(GPTQ weights, calibration on the same training rows export uses), and the other half kept
float; top-1 against the whole Keras model on DATA_DIR's validation and test splits (neither
trained on). Beside them, the whole int8 file as export writes it. Prints one JSON document.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.data.data_folder import load_split
from pipeline.export import calibration_rows
from pipeline.inference.converters import convert
from pipeline.inference.engines import _dequantizer, _quantizer, litert_runner
from pipeline.inference.model_folder import inference_model, load_keras_model
from pipeline.training.backbone import build_network


def batched(model, X: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model(X[i : i + 32], training=False)) for i in range(0, len(X), 32)])


def int8_part(part, calibration: np.ndarray, folder: Path):
    """`part` converted once as export converts a model: a function from its float inputs to its
    dequantized output, through the engines' own (de)quantizers."""
    from ai_edge_litert.interpreter import Interpreter

    path = folder / f"{part.name}.tflite"
    convert("litert-int8", part, path, calibration)
    interpreter = Interpreter(model_path=str(path))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(source["index"], [1, *part.input_shape[1:]])
    interpreter.allocate_tensors()
    to_input, from_output = _quantizer(source), _dequantizer(target)

    def run(X: np.ndarray) -> np.ndarray:
        out = []
        for x in X:
            interpreter.set_tensor(source["index"], to_input(x[None]))
            interpreter.invoke()
            out.append(from_output(interpreter.get_tensor(target["index"]))[0])
        return np.array(out, np.float32)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    model = load_keras_model(args.model)
    classes = model.output_shape[-1]
    backbone = json.loads((args.model / "settings.json").read_text())["train"]["backbone"]
    network = build_network(backbone, model.input_shape[1:], classes, pretrained=False)
    network.model.set_weights(model.get_weights())
    calibration = np.asarray(calibration_rows(args.data, classes, 300), np.float32)
    folder = Path(tempfile.mkdtemp())
    result = {"backbone": backbone}
    try:
        whole = folder / "model_int8.tflite"
        convert("litert-int8", inference_model(model) or model, whole, calibration)
        run = litert_runner(whole, model.input_shape[1:], classes, 2)
        bottom_int8 = int8_part(network.bottom, calibration, folder)
        top_int8 = int8_part(network.top, batched(network.bottom, calibration), folder)
        for split in ("val", "test"):
            X = np.asarray(load_split(args.data, split, classes)[0], np.float32)
            if not len(X):
                continue
            cut = batched(network.bottom, X)
            keras_top = batched(network.top, cut).argmax(axis=1)
            cut_int8 = bottom_int8(X)
            whole_top = np.concatenate([run(X[i : i + 32])[0] for i in range(0, len(X), 32)]).argmax(axis=1)
            result[split] = {
                "images": len(X),
                "whole_int8": float(np.mean(whole_top == keras_top)),
                "int8_bottom_float_top": float(np.mean(batched(network.top, cut_int8).argmax(1) == keras_top)),
                "float_bottom_int8_top": float(np.mean(top_int8(cut).argmax(1) == keras_top)),
                "cut_relative_error": float(np.linalg.norm(cut_int8 - cut) / np.linalg.norm(cut)),
            }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
