"""export: each format written from the tiny trained model, checked, loaded back and run by
predict, evaluate and serve with --engine; refusals that write nothing; a missing extra in
one line; and the model card naming the real figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.core import paths
from pipeline.core.artifacts import MARKER
from pipeline.core.errors import PipelineError
from pipeline.core.settings import EXPORT_FORMATS, ExportSettings
from pipeline.data.data_folder import read_split_paths
from pipeline.export import export_model
from pipeline.inference.classifier import load_classifier
from pipeline.inference.engines import flex_ops
from pipeline.report.model_card import write_model_card
from pipeline.server.app import create_app
from tests.conftest import LOCAL, run_cli, snapshot
from tests.test_light_imports_and_engines import HEAVY, imported_modules


def copy_model(trained, where: Path) -> Path:
    return Path(shutil.copytree(trained["model"], where))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_one_line_error(result, *words: str) -> None:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    """A copy of the trained model folder with every format exported into it, once."""
    model = copy_model(trained, tmp_path_factory.mktemp("exported") / "model")
    printed = {}
    for fmt in EXPORT_FORMATS:
        result = run_cli("export", "--model", model, "--data", trained["data"], "--format", fmt)
        printed[fmt] = result.stdout
    return {"model": model, "data": trained["data"], "printed": printed}


def test_every_format_is_written_checked_and_recorded(exported):
    model = exported["model"]
    records = json.loads((model / paths.EXPORTS_FILE).read_text())
    assert sorted(records) == sorted(EXPORT_FORMATS)
    for fmt, record in records.items():
        where = model / paths.EXPORT_PATHS[fmt]
        assert where.exists() and record["path"] == where.name
        size = (
            sum(f.stat().st_size for f in where.rglob("*") if f.is_file() and f.name != MARKER)
            if where.is_dir()
            else where.stat().st_size
        )
        assert record["bytes"] == size
        assert record["n_test"] == len(np.load(exported["data"] / "X_test.npy"))
        assert record["agreement"] >= 0.99, (fmt, record)
        bound = 1.0 if fmt == "litert-int8" else 1e-3
        assert record["max_difference"] <= bound and record["max_difference_bound"] == bound
        assert f"top-1 agreement with Keras {record['agreement']:.2%}" in exported["printed"][fmt]
        assert f"largest probability difference {record['max_difference']:.3g}" in exported["printed"][fmt]
    assert (model / "model_openvino" / "model.xml").is_file() and (model / "model_openvino" / "model.bin").is_file()
    assert (model / "model_saved" / "saved_model.pb").is_file()
    assert "not covered by Keras' safe mode" in records["saved-model"]["note"]  # tf.saved_model.load runs its graph
    assert "not covered by Keras' safe mode" in (model / paths.MODEL_CARD_FILE).read_text()
    assert leftovers(model) == []


def test_int8_is_full_integer_with_uint8_input_and_a_fraction_of_the_float_size(exported):
    from ai_edge_litert.interpreter import Interpreter

    model = exported["model"]
    int8 = model / "model_int8.tflite"
    interpreter = Interpreter(model_path=str(int8))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert source["dtype"] == np.uint8 and target["dtype"] == np.uint8
    assert source["quantization"] == (1.0, 0)  # the pixels as they are
    float_kinds = {np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()} & {np.dtype("float32")}
    assert not float_kinds, "a float tensor left in a full-integer model"
    assert flex_ops(int8.read_bytes()) == []
    assert int8.stat().st_size <= 0.30 * (model / paths.TFLITE_FILE).stat().st_size
    record = json.loads((model / paths.EXPORTS_FILE).read_text())["litert-int8"]
    assert record["input_quantization"] == {"scale": 1.0, "zero_point": 0}
    assert record["calibration_images"] == len(np.load(exported["data"] / "X_train.npy"))  # fewer than 300 here


def test_predict_with_each_engine_agrees_with_keras_on_the_test_split(exported, trained):
    model, data = exported["model"], exported["data"]
    relative = read_split_paths(data, "test", len(np.load(data / "y_test.npy")))
    test_files = [trained["images"] / p for p in relative if p]
    assert test_files

    def predicted(engine: str) -> dict[str, dict]:
        result = run_cli("predict", *test_files, "--model", model, "--engine", engine, "--top-k", "3", "--json")
        return {r["file"]: r for r in json.loads(result.stdout)}

    keras = predicted("keras")
    assert all(r["novelty"] is not None for r in keras.values())
    for fmt in ("litert", *EXPORT_FORMATS):
        answers = predicted(fmt)
        assert set(answers) == set(keras)
        agree = np.mean([answers[f]["top_k"][0]["label"] == keras[f]["top_k"][0]["label"] for f in keras])
        assert agree >= 0.99, fmt
        step = 1 / 256 + 1e-6 if fmt == "litert-int8" else 1e-3
        for f in keras:
            assert abs(answers[f]["confidence"] - keras[f]["confidence"]) <= step, (fmt, f)
            # the features come out of the same call: every float engine gives the same novelty
            if fmt != "litert-int8":
                assert abs(answers[f]["novelty"] - keras[f]["novelty"]) <= 1e-4, (fmt, f)


def test_evaluate_with_an_engine_gives_the_export_s_checked_accuracy(exported, tmp_path):
    model, data = exported["model"], exported["data"]
    records = json.loads((model / paths.EXPORTS_FILE).read_text())
    for fmt in ("litert-int8", "onnx"):
        result = run_cli(
            "evaluate", "--data", data, "--model", model, "--out", tmp_path / fmt, "--engine", fmt, "--json"
        )
        metrics = json.loads(result.stdout)
        assert metrics["engine"] == fmt and metrics["accuracy"] == pytest.approx(records[fmt]["accuracy"])


def test_serve_runs_an_export_with_its_engine(exported, trained):
    from pipeline.core.settings import ServeSettings

    image = sorted((trained["images"] / "cat").iterdir())[0]
    keras = load_classifier(exported["model"], "keras")
    expected = keras.probabilities([keras.preprocess(image)])[0]
    for fmt in ("openvino", "saved-model"):
        app = create_app(exported["model"], ServeSettings(engine=fmt, workers=1))
        with TestClient(app, base_url=LOCAL) as client:
            assert client.get("/health").json()["engine"] == fmt
            answer = client.post("/predict", files=[("files", (image.name, image.read_bytes()))]).json()
        assert answer[0]["top_k"][0]["label"] == keras.classes[int(expected.argmax())]
        assert answer[0]["confidence"] == pytest.approx(float(expected.max()), abs=1e-3)


def test_an_export_beyond_the_bound_is_refused_and_nothing_is_written(trained, tmp_path):
    model = copy_model(trained, tmp_path / "model")
    before = snapshot(model)  # its files, byte for byte (the folder's own time moves with the staging)
    result = run_cli(
        "export",
        "--model",
        model,
        "--data",
        trained["data"],
        "--format",
        "onnx",
        "--max-difference",
        "0",
        "-q",
        expect=1,
    )
    assert_one_line_error(result, "refused", "onnx export disagrees", "(bound 0)", "nothing was written")
    assert snapshot(model) == before and leftovers(model) == []


def test_flex_ops_are_found_and_such_an_int8_file_is_refused(trained, tmp_path, monkeypatch):
    from pipeline.core.native_stderr import import_tensorflow
    from pipeline.inference import converters

    tf = import_tensorflow()

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def cumulative_product(x):
        return tf.math.cumprod(x, axis=1)  # no LiteRT builtin: a Select TF op

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [cumulative_product.get_concrete_function()], cumulative_product
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    with_flex = converter.convert()
    assert flex_ops(with_flex) == ["FlexCumprod"]
    assert flex_ops((trained["model"] / paths.TFLITE_FILE).read_bytes()) == []

    # A converter that let a Flex op through (Keras' LiteRT export allows them by default):
    monkeypatch.setattr(converters, "convert", lambda fmt, model, target, calibration: target.write_bytes(with_flex))
    model = copy_model(trained, tmp_path / "model")
    before = snapshot(model)  # its files, byte for byte (the folder's own time moves with the staging)
    with pytest.raises(PipelineError, match=r"Select TF \(Flex\) ops \(FlexCumprod\).*nothing was written"):
        export_model(model, trained["data"], ExportSettings(format="litert-int8"))
    assert snapshot(model) == before and leftovers(model) == []


def test_an_engine_without_its_export_says_which_command_writes_it(trained):
    image = sorted((trained["images"] / "cat").iterdir())[0]
    result = run_cli("predict", image, "--model", trained["model"], "--engine", "onnx", expect=1)
    assert_one_line_error(result, "model.onnx not found", "pipeline export --format onnx")


_BLOCKED_RUN = """
import sys
sys.modules[sys.argv[1]] = None  # as if the package were not installed
from typer.testing import CliRunner
from pipeline.cli import app
result = CliRunner().invoke(app, sys.argv[2:])
print(result.exit_code)
print(result.output)
"""


@pytest.mark.parametrize(
    "blocked, command, package",
    [
        ("onnxruntime", ["predict"], "onnxruntime"),
        ("tf2onnx", ["export", "--format", "onnx"], "tf2onnx"),
    ],
)
def test_a_missing_extra_is_one_line_with_the_install_command(exported, trained, tmp_path, blocked, command, package):
    image = sorted((trained["images"] / "dog").iterdir())[0]
    if command[0] == "predict":  # the export is there, its runtime is not
        args = ["predict", str(image), "--model", str(exported["model"]), "--engine", "onnx", "-q"]
    else:  # the converter is not there: nothing may be written
        model = copy_model(trained, tmp_path / "model")
        args = [*command, "--model", str(model), "--data", str(trained["data"]), "-q"]
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, blocked, *args], capture_output=True, text=True, timeout=300
    )
    code, *output = done.stdout.strip().splitlines()
    assert code == "1" and len(output) == 1, done.stdout + done.stderr[-2000:]
    assert output[0].startswith("error: ") and f"needs the {package} package" in output[0]
    assert "pip install 'pipeline[export]'" in output[0] and f"pip install {package}" in output[0]
    if command[0] == "export":
        assert not (model / "model.onnx").exists() and leftovers(model) == []


def test_export_help_and_an_int8_predict_import_no_heavy_module(exported, trained):
    assert not imported_modules("export", "--help") & set(HEAVY)
    image = sorted((trained["images"] / "fox").iterdir())[0]
    modules = imported_modules("predict", str(image), "--model", str(exported["model"]), "--engine", "litert-int8")
    assert "ai_edge_litert" in modules and not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_the_model_card_names_the_real_figures(exported, tmp_path):
    model, data = copy_model(exported, tmp_path / "model"), exported["data"]
    (model / paths.EVALUATION_FILE).unlink(missing_ok=True)  # as train and export leave it
    write_model_card(model, json.loads((data / "report.json").read_text()))
    assert "Not evaluated yet: run `pipeline evaluate`" in (model / paths.MODEL_CARD_FILE).read_text()
    (model / "calibration.json").write_text(json.dumps({"temperature": 1.734, "method": "temperature scaling"}))
    result = run_cli("evaluate", "--data", data, "--model", model, "--out", tmp_path / "reports", "--json")
    metrics = json.loads(result.stdout)
    card = (model / paths.MODEL_CARD_FILE).read_text()
    report = json.loads((data / "report.json").read_text())
    saved = json.loads((model / paths.TRAIN_SETTINGS_FILE).read_text())
    assert f"accuracy **{metrics['accuracy']:.4f}**" in card and f"macro F1 **{metrics['macro_f1']:.4f}**" in card
    assert f"On {metrics['n_test']} test images (engine `keras`)" in card
    for name, m in metrics["per_class"].items():
        counts = report["counts"][name]
        assert f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |" in card
        row = [counts[k] for k in ("found", "skipped", "duplicates", "train", "val", "test", "train_augmented")]
        assert f"| {name} | " + " | ".join(map(str, row)) + " |" in card
    for pair in metrics["most_confused"]:
        assert f"- {pair['true']} -> {pair['predicted']}: {pair['count']}" in card
    assert f"{report['totals']['duplicates_removed']} removed" in card
    assert f"| epochs run (budget) | {saved['summary']['epochs_run']} ({saved['train']['epochs']}) |" in card
    assert "| temperature | 1.734 |" in card
    size = saved["prepare"]["size"]
    assert f"shape (batch, {size}, {size}, 3)" in card and "uint8 pixels 0-255" in card
    records = json.loads((model / paths.EXPORTS_FILE).read_text())
    for fmt, record in records.items():
        assert f"### {fmt}: `{paths.EXPORT_PATHS[fmt]}" in card
        assert f"top-1 agreement with Keras {record['agreement']:.2%}" in card
    evaluation = json.loads((model / paths.EVALUATION_FILE).read_text())
    assert evaluation["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["export needs --format", "litert-int8, onnx, openvino, saved-model"]),
        (["--format", "onnx", "--min-agreement", "2"], ["--min-agreement must be between 0 and 1"]),
        (["--format", "litert-int8", "--calibration-images", "0"], ["--calibration-images must be at least 1"]),
    ],
)
def test_a_bad_export_option_is_one_line_before_anything_loads(tmp_path, args, words):
    result = run_cli("export", "--model", tmp_path / "model", *args, expect=1)
    assert_one_line_error(result, *words)


def test_openvino_is_loaded_without_its_telemetry():
    """openvino's converter would send usage statistics to Google Analytics from a child process
    (seen as DNS look-ups under strace); pipeline loads it with the converter's own stub instead."""
    probe = (
        "from pipeline.inference.engines import require\n"
        "require('openvino', 'openvino', 'test')\n"
        "import openvino.tools.ovc.telemetry_utils as t\n"
        "print(t.tm.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "openvino.tools.ovc.telemetry_stub", done.stderr[-2000:]


def test_the_model_card_s_python_loads_each_format_and_agrees_with_keras(exported, trained, monkeypatch):
    import re

    card = (exported["model"] / paths.MODEL_CARD_FILE).read_text()
    blocks = re.findall(r"^### ([\w-]+): .*?```python\n(.*?)```", card, flags=re.S | re.M)
    assert [name for name, _ in blocks] == ["keras", "litert", *EXPORT_FORMATS]
    setup = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    image = sorted((trained["images"] / "fox").iterdir())[0]
    monkeypatch.chdir(exported["model"])  # the snippets name the files as they lie in the model folder
    found = {}
    for name, code in blocks:
        scope: dict = {}
        exec(setup.replace("photo.jpg", str(image)), scope)
        exec(code, scope)
        found[name] = np.asarray(scope["probabilities"], dtype=np.float64)
    for name, probabilities in found.items():
        assert probabilities.shape == found["keras"].shape, name
        assert np.abs(probabilities - found["keras"]).max() <= (0.02 if name == "litert-int8" else 1e-3), name


def test_gptq_rounds_onto_the_int8_grid_with_less_output_error_than_nearest():
    """GPTQ on correlated inputs (as a filter's neighbouring pixels are): every value an integer
    step of its row's scale, the largest weight kept (so the converter's scale is the same), and
    the output error on those inputs below nearest rounding's."""
    from pipeline.inference.weight_rounding import gptq

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(4000, 9)), axis=1)  # strongly correlated inputs
    W = rng.normal(size=(6, 9)) * np.array([1, 1, 1, 1, 40, 1, 1, 1, 1])  # one outlier weight a row
    H = smooth.T @ smooth / len(smooth)
    rounded = gptq(W, H)
    scale = np.abs(W).max(axis=1, keepdims=True) / 127
    steps = rounded / scale
    assert np.allclose(steps, np.round(steps), atol=1e-9) and np.abs(steps).max() <= 127 + 1e-9
    assert np.allclose(np.abs(rounded).max(axis=1), np.abs(W).max(axis=1))
    nearest = np.round(W / scale) * scale
    error = lambda V: np.mean(((V - W) @ smooth.T) ** 2)  # noqa: E731
    assert error(rounded) < 0.5 * error(nearest), (error(rounded), error(nearest))


def test_int8_weights_are_the_gptq_rounding_and_move_the_answers_less_than_nearest(exported, trained):
    """The int8 file holds the kernels GPTQ chose on the calibration images (the converter's own
    rounding kept them), the Keras model is left as it was, and on those images GPTQ's kernels
    move the model's probabilities less than the converter's nearest rounding would."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.export import calibration_rows
    from pipeline.inference.model_folder import inference_model, load_keras_model
    from pipeline.inference.weight_rounding import gptq_kernels, gptq_weights, nearest_kernel

    model = load_keras_model(exported["model"])
    network = inference_model(model) or model
    classes = json.loads((exported["model"] / paths.CLASSES_FILE).read_text())
    calibration = calibration_rows(exported["data"], len(classes), ExportSettings().calibration_images)
    rounded = gptq_kernels(network, calibration)
    assert {type(model.get_layer(name)).__name__ for name in rounded} == {"Conv2D", "Dense"}, sorted(rounded)

    interpreter = Interpreter(model_path=str(exported["model"] / "model_int8.tflite"))
    per_channel = []
    for tensor in interpreter.get_tensor_details():
        if tensor["dtype"] == np.int8 and len(tensor["quantization_parameters"]["scales"]) > 1:
            try:
                per_channel.append(interpreter.get_tensor(tensor["index"]).astype(np.float64))
            except ValueError:  # a tensor the interpreter does not hold as a constant
                continue
    for name, kernel in rounded.items():
        axes = tuple(range(kernel.ndim - 1))
        steps = kernel / (np.abs(kernel).max(axis=axes, keepdims=True) / 127)
        litert = np.moveaxis(steps, -1, 0)  # LiteRT keeps the output axis first
        same = [q for q in per_channel if q.shape == litert.shape and np.abs(q - litert).max() < 1e-3]
        assert same, f"{name}: no int8 kernel in the file holds GPTQ's steps"

    weights = [w.copy() for w in network.get_weights()]
    float_p = np.asarray(network.predict(calibration.astype(np.float32), verbose=0)[0])
    with gptq_weights(network, calibration):
        gptq_p = np.asarray(network.predict(calibration.astype(np.float32), verbose=0)[0])
    assert all(np.array_equal(a, b) for a, b in zip(weights, network.get_weights()))
    for name in rounded:
        layer = network.get_layer(name)
        layer.kernel.assign(nearest_kernel(layer.kernel.numpy(), depthwise=False))  # the CNN has no depthwise
    nearest_p = np.asarray(network.predict(calibration.astype(np.float32), verbose=0)[0])
    assert np.abs(gptq_p - float_p).mean() < np.abs(nearest_p - float_p).mean()


@pytest.mark.parametrize(
    ("fmt", "record", "hint"),
    [
        ("litert-int8", {"agreement": 0.972, "max_difference": 0.4}, True),  # a backbone's int8
        ("litert-int8", {"agreement": 1.0, "max_difference": 0.4}, False),  # only the bound it was given
        ("onnx", {"agreement": 0.95, "max_difference": 0.2}, False),  # float: a broken export, no choice
    ],
)
def test_an_int8_refused_for_agreement_says_what_the_user_can_do(fmt, record, hint):
    from pipeline.export import _refuse_disagreement

    settings = ExportSettings(format=fmt, max_difference=0.3 if not hint and fmt == "litert-int8" else None)
    with pytest.raises(PipelineError) as refused:
        _refuse_disagreement({"n_test": 529, "novelty_max_difference": None, **record}, settings, fmt)
    said = str(refused.value)
    assert said.startswith("refused: on 529 test images") and "\n" not in said
    assert ("--min-agreement lower writes it knowingly" in said) is hint
    assert ("onnx or openvino keeps float" in said) is hint


def test_a_dense_whose_int8_step_a_few_weights_set_keeps_the_rest_s_precision(tmp_path):
    """A head whose each class has one weight a thousand times the rest (a backbone's
    logistic-regression start, on a feature that is almost always 0): written as is, every other
    weight of the class rounds at a step of 1000/127, to 0 mostly, and the int8 file agreed on 70 %
    (its probabilities off by up to 0.96); export converts it as two Denses summed, the kernel on
    the int8 grid and what that left (the same floats), and the file agrees with Keras. The
    feature rounds to 0 in int8 on every calibration image: the outliers alone in a Dense would
    have an output range of 0, which XNNPACK refuses to run (it did)."""
    import keras

    from pipeline.inference.converters import _coarse_and_residual_dense, convert
    from pipeline.inference.engines import litert_runner

    rng = np.random.default_rng(0)
    pixels = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(128, 1, activation="relu")(keras.layers.Rescaling(1 / 255)(pixels))
    features = keras.layers.GlobalAveragePooling2D()(features)
    logits = keras.layers.Dense(10)(features)
    model = keras.Model(pixels, keras.layers.Softmax()(logits))
    conv, dense = model.layers[2], model.layers[4]
    kernel = rng.normal(size=(1, 1, 3, 128)).astype(np.float32)
    kernel[..., 0] *= 1e-3  # a feature almost always 0
    conv.set_weights([kernel, np.zeros(128, np.float32)])
    weights = rng.normal(size=(128, 10)).astype(np.float32)
    weights[0] = 1000.0
    dense.set_weights([weights, np.zeros(10, np.float32)])

    colours = rng.uniform(0, 255, size=(264, 1, 1, 3))  # pictures of one colour each, and noise
    images = np.clip(colours + rng.normal(0, 8, size=(264, 8, 8, 3)), 0, 255).round().astype(np.float32)
    calibration, pictures = images[:64], images[64:]
    reference = np.asarray(model(pictures))

    apart = _coarse_and_residual_dense(model)
    assert np.abs(np.asarray(apart(pictures)) - reference).max() < 1e-5  # the same floats
    assert sum(isinstance(layer, keras.layers.Dense) for layer in apart.layers) == 2
    assert _coarse_and_residual_dense(apart) is apart  # its kernel on the grid has nothing left
    no_outliers = keras.Model(pixels, keras.layers.Dense(10)(features))
    assert _coarse_and_residual_dense(no_outliers) is no_outliers
    hidden = keras.layers.Dense(10, activation="relu")  # the activation comes after the sum
    with_relu = keras.Model(pixels, hidden(features))
    hidden.set_weights([weights, np.linspace(-1, 1, 10, dtype=np.float32)])
    assert (
        np.abs(np.asarray(_coarse_and_residual_dense(with_relu)(pictures)) - np.asarray(with_relu(pictures))).max()
        < 1e-4
    )

    convert("litert-int8", model, tmp_path / "model_int8.tflite", calibration)
    run = litert_runner(tmp_path / "model_int8.tflite", pictures.shape[1:], 10, threads=1)
    exported = np.concatenate([run(pictures[i : i + 50])[0] for i in range(0, len(pictures), 50)])
    agreement = np.mean(exported.argmax(axis=1) == reference.argmax(axis=1))
    assert agreement >= 0.97 and np.abs(exported - reference).max() < 0.2, (
        agreement,
        np.abs(exported - reference).max(),
    )
