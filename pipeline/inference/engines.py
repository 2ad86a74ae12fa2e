"""One runner per model file: a function from a uint8 batch to float64 probabilities and features.

Reads, without writing anything, train's model.tflite and the exports `pipeline export`
writes beside it (paths.EXPORT_PATHS): LiteRT, float or full-integer int8, through
ai_edge_litert's Interpreter; model.onnx through onnxruntime; model_openvino/ through the
OpenVINO runtime (float32 inference, as Keras computes); model_saved/ through TensorFlow.
Every runner takes the pixels exactly as `images.preprocess` makes them and returns, from
one call of the model, its own probabilities (a calibration temperature, where the folder
has one, is the Classifier's business, on top of every engine alike) and its features (the
model's second output, model_folder.inference_model; None for a file written before it had
one). A runtime that is not installed is one line with the pip command, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import quiet_native_stderr
from pipeline.inference.model_folder import check_model_fits

Outputs = tuple[np.ndarray, "np.ndarray | None"]  # float64 probabilities, float64 features or None
Runner = Callable[[np.ndarray], Outputs]
EXPORT_EXTRA = "pip install 'pipeline[export]'"
# The runtime each engine needs: (module, pip package)
RUNTIMES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "litert-int8": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "onnx": ("onnxruntime", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "saved-model": ("tensorflow", "tensorflow"),
}


def require(module: str, package: str, needed_for: str):
    """Import `module`, or one line saying what to install (the export extra brings them all)."""
    try:
        if module == "tensorflow":  # a main dependency, loaded the one quiet way
            from pipeline.core.native_stderr import import_tensorflow

            return import_tensorflow()
        if module == "openvino":
            # openvino's converter (which Keras' OpenVINO export calls) sends usage statistics to
            # Google Analytics from a child process unless the user opted out; without its
            # openvino_telemetry module it falls back to its own stub, which sends nothing.
            sys.modules.setdefault("openvino_telemetry", None)
        with quiet_native_stderr():
            return importlib.import_module(module)
    except ImportError:
        raise PipelineError(
            f"{needed_for} needs the {package} package: {EXPORT_EXTRA} (or pip install {package})"
        ) from None


def export_path(model_dir: Path, fmt: str) -> Path:
    return Path(model_dir) / paths.EXPORT_PATHS[fmt]


def load_export_runner(engine: str, model_dir: Path, input_shape, num_classes: int, threads: int) -> Runner:
    """The runner for `--engine <format>`: the export `pipeline export --format <format>` wrote."""
    path = export_path(model_dir, engine)
    if not path.exists():
        raise PipelineError(f"{path} not found: {paths.export_hint(engine)}")
    return runner_for(engine, path, input_shape, num_classes, threads)


def runner_for(fmt: str, path: Path, input_shape, num_classes: int, threads: int) -> Runner:
    """The runner for the export of format `fmt` at `path` (export checks one before it is kept)."""
    module, package = RUNTIMES[fmt]
    require(module, package, f"--engine {fmt}")
    build = {
        "litert-int8": litert_runner,
        "onnx": onnx_runner,
        "openvino": openvino_runner,
        "saved-model": saved_model_runner,
    }[fmt]
    return build(Path(path), tuple(input_shape), num_classes, threads)


def _fits(model_io, input_shape, num_classes, path: Path) -> None:
    check_model_fits(
        model_io, input_shape, num_classes, paths.PREPROCESS_FILE, paths.CLASSES_FILE, model_name=str(path)
    )


def litert_runner(path: Path, input_shape, num_classes: int, threads: int) -> Runner:
    """A .tflite through the LiteRT interpreter. A quantized input takes the pixels through its
    scale and zero point (1 and 0 when calibrated on 0-255 images: the pixels as they are);
    a quantized output is turned back into probabilities the same way."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as e:
        raise PipelineError(f"could not load {path}: {str(e).strip().splitlines()[0]}") from None
    source = interpreter.get_input_details()[0]
    targets = _litert_outputs(interpreter)
    _fits((tuple(int(n) for n in source["shape"][1:]), int(targets[0]["shape"][-1])), input_shape, num_classes, path)
    to_input = _quantizer(source)
    from_outputs = [(target["index"], _dequantizer(target)) for target in targets[:2]]
    allocated_for = []  # the batch shape the tensors were last allocated for

    def run(batch: np.ndarray) -> Outputs:
        if allocated_for != [batch.shape]:  # serve sends batches of one, again and again
            interpreter.resize_tensor_input(source["index"], batch.shape)
            with quiet_native_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                try:
                    interpreter.allocate_tensors()
                except RuntimeError as e:  # Select TF ("Flex") ops: this interpreter has no kernels for them
                    raise PipelineError(f"could not run {path}: {str(e).strip().splitlines()[0]}") from None
            allocated_for[:] = [batch.shape]
        interpreter.set_tensor(source["index"], to_input(batch))
        interpreter.invoke()
        return _pair([convert(interpreter.get_tensor(index)) for index, convert in from_outputs])

    return run


def _litert_outputs(interpreter) -> list[dict]:
    """The output details in the model's order (probabilities, then features): the interpreter
    lists its outputs in its own order, the signature names them output_0, output_1, ..."""
    details = interpreter.get_output_details()
    try:
        named = interpreter.get_signature_runner().get_output_details()
    except (ValueError, RuntimeError):  # no signature: a file of another origin, in its own order
        return details
    by_index = {d["index"]: d for d in details}
    ordered = [by_index.get(named[name]["index"]) for name in sorted(named)]  # output_0, output_1
    return ordered if ordered and None not in ordered else details


def _pair(outputs: list) -> Outputs:
    """(probabilities, features or None) as float64, from a model's outputs in order."""
    probabilities = np.asarray(outputs[0], dtype=np.float64)
    if len(outputs) < 2:
        return probabilities, None
    features = np.asarray(outputs[1], dtype=np.float64)
    return probabilities, features.reshape(len(features), -1)


def keras_runner(model) -> Runner:
    """A Keras model through Keras, as its inference model: its features from the same call."""
    from pipeline.inference.model_folder import inference_model

    network = inference_model(model) or model

    def run(batch: np.ndarray) -> Outputs:
        answer = network.predict_on_batch(batch)
        return _pair(list(answer) if isinstance(answer, (list, tuple)) else [answer])

    return run


def _quantizer(detail: dict) -> Callable[[np.ndarray], np.ndarray]:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not np.issubdtype(dtype, np.integer) or not scale or (scale, zero_point) == (1.0, 0):
        return lambda batch: batch.astype(dtype)
    info = np.iinfo(dtype)
    return lambda batch: np.clip(np.round(batch / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantizer(detail: dict) -> Callable[[np.ndarray], np.ndarray]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer) or not scale:
        return lambda out: np.asarray(out, dtype=np.float64)
    return lambda out: (np.asarray(out, dtype=np.float64) - zero_point) * scale


def flex_ops(tflite: bytes) -> list[str]:
    """The Select TF ("Flex") ops a .tflite holds: the ai-edge-litert interpreter (and a phone's
    plain LiteRT) has no kernels for them, so such a file fails where it is deployed."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(tflite, 0)
    codes = (model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength()))
    return sorted({code.decode() for code in codes if code and code.startswith(b"Flex")})


def onnx_runner(path: Path, input_shape, num_classes: int, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings would bury our one-line messages
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException
        raise PipelineError(f"could not load {path}: {str(e).strip().splitlines()[0]}") from None
    inputs, output = session.get_inputs(), session.get_outputs()[0]  # outputs in the model's order
    if len(inputs) != 1:  # a graph that wants more than pixels cannot be fed by any caller
        raise PipelineError(f"{path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), not only pixels")
    shape = tuple(int(n) if isinstance(n, int) else -1 for n in inputs[0].shape[1:])
    _fits((shape, output.shape[-1]), input_shape, num_classes, path)
    name = inputs[0].name
    return lambda batch: _pair(session.run(None, {name: batch.astype(np.float32)}))


def openvino_runner(path: Path, input_shape, num_classes: int, threads: int) -> Runner:
    import openvino

    xml = Path(path) / paths.OPENVINO_XML
    if not xml.is_file():
        raise PipelineError(f"{xml} not found: {paths.export_hint('openvino')}")
    config = {
        "INFERENCE_NUM_THREADS": threads,
        # f32, as Keras computes: on CPUs with AMX or AVX512-BF16 the CPU plugin would pick bf16
        "INFERENCE_PRECISION_HINT": "f32",
    }
    try:
        compiled = openvino.Core().compile_model(str(xml), "CPU", config)
    except RuntimeError as e:
        raise PipelineError(f"could not load {xml}: {str(e).strip().splitlines()[0]}") from None
    source, target = compiled.inputs[0], compiled.outputs[0]  # outputs in the model's order
    shape = tuple(d.get_length() if d.is_static else -1 for d in source.get_partial_shape())[1:]
    classes = target.get_partial_shape()[-1]
    _fits((shape, classes.get_length() if classes.is_static else -1), input_shape, num_classes, path)
    request = compiled.create_infer_request()  # one per runner: serve gives every worker its own copy
    outputs = compiled.outputs[:2]

    def run(batch: np.ndarray) -> Outputs:
        answer = request.infer({0: batch.astype(np.float32)})
        return _pair([answer[output] for output in outputs])

    return run


def saved_model_runner(path: Path, input_shape, num_classes: int, threads: int) -> Runner:
    from pipeline.core.native_stderr import import_tensorflow

    tf = import_tensorflow()
    try:
        with quiet_native_stderr():  # TensorFlow's absl and oneDNN lines, at the load and the first call
            loaded = tf.saved_model.load(str(path))
            signature = loaded.signatures["serving_default"]
            loaded.serve(tf.zeros((1, *input_shape), tf.float32))
    except (OSError, ValueError, KeyError) as e:
        raise PipelineError(f"could not load {path}: {str(e).strip().splitlines()[0]}") from None
    spec = next(iter(signature.structured_input_signature[1].values()))
    outputs = signature.structured_outputs  # output_0 (probabilities), output_1 (features) or one
    output = outputs["output_0"] if "output_0" in outputs else next(iter(outputs.values()))
    _fits((tuple(spec.shape[1:]), output.shape[-1]), input_shape, num_classes, path)

    # `loaded` itself is kept: its endpoint `serve` (Keras' export) only references the variables it owns
    def run(batch: np.ndarray) -> Outputs:
        answer = loaded.serve(tf.constant(batch, dtype=tf.float32))
        return _pair(list(answer) if isinstance(answer, (list, tuple)) else [answer])

    return run
