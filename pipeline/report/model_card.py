"""MODEL_CARD.md: what a person taking the model elsewhere needs to know, in the model folder.

Reads the model folder (settings.json, classes.json, preprocess.json, and where they exist
evaluation.json from evaluate, calibration.json from calibration, exports.json from
export) and the data folder's report.json, handed in as `prepare_report`. Writes
MODEL_CARD.md atomically. train writes it first (no test figures yet); evaluate and export
rewrite it whole with what they added, so the card always says what the folder holds.
Every figure is read from those files, none is typed in. Every name in it (classes, folders,
the warnings that quote them) goes through `_md`: a class named `<img onerror=...>` or one
holding a newline and a heading stays one line of text wherever the card is rendered.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core import paths
from pipeline.core.artifacts import atomic_write_text, read_json, read_json_optional
from pipeline.core.progress import plain
from pipeline.core.settings import EXPORT_FORMATS
from pipeline.inference.novelty import nearest


def write_model_card(model_dir: Path, prepare_report: dict | None) -> Path:
    """(Re)write MODEL_CARD.md in `model_dir` from what the folder holds; returns its path."""
    model_dir = Path(model_dir)
    atomic_write_text(model_dir / paths.MODEL_CARD_FILE, render_model_card(model_dir, prepare_report or {}))
    return model_dir / paths.MODEL_CARD_FILE


def render_model_card(model_dir: Path, prepare_report: dict) -> str:
    saved = read_json(model_dir / paths.TRAIN_SETTINGS_FILE, paths.TRAIN_HINT)
    preprocess = read_json(model_dir / paths.PREPROCESS_FILE, paths.TRAIN_HINT)
    classes = read_json(model_dir / paths.CLASSES_FILE, paths.TRAIN_HINT)
    evaluation = read_json_optional(model_dir / paths.EVALUATION_FILE)
    calibration = read_json_optional(model_dir / paths.CALIBRATION_FILE)
    exports = read_json_optional(model_dir / paths.EXPORTS_FILE) or {}
    size, color = preprocess["size"], preprocess["color"]
    lines = [
        f"# Model card: {_md(model_dir.name)}",
        "",
        f"An image classifier for {len(classes)} classes ({', '.join(map(_md, classes))}): {_network(saved)}, "
        f"taking {size}x{size} {color} images. Written by `pipeline train`, completed by "
        "`pipeline evaluate` and `pipeline export`; every figure below is read from the files beside it.",
        "",
        *_data_section(classes, prepare_report),
        *_backbone_section(saved.get("summary", {}).get("backbone")),
        *_training_section(saved),
        *_test_section(evaluation),
        *_calibration_section(calibration),
        *_unknown_section(read_json_optional(model_dir / paths.NOVELTY_FILE), (evaluation or {}).get("novelty")),
        *_input_section(preprocess),
        *_limits_section(classes, preprocess, saved, prepare_report),
        *_exports_section(preprocess, exports, model_dir),
    ]
    return "\n".join(lines).rstrip() + "\n"


_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]#|~!"} | {"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _md(text) -> str:
    """User text as Markdown and HTML read it literally, on one line."""
    return " ".join(plain(str(text)).splitlines()).translate(_MARKDOWN)


def _cells(*values) -> str:
    return "| " + " | ".join(re.sub(r"(?<!\\)\|", r"\\|", str(v)) for v in values) + " |"  # _md's are escaped


def _data_section(classes: list[str], report: dict) -> list[str]:
    lines = ["## Classes and data", ""]
    counts = report.get("counts", {})
    if not counts:
        return [*lines, "The data folder's report.json was not found: the counts per split are unknown.", ""]
    lines += [
        _cells("class", "images found", "skipped", "duplicates removed", "train", "val", "test", "+ augmented"),
        _cells(*["---"] * 8),
    ]
    for name in classes:
        c = counts.get(name, {})
        lines.append(
            _cells(
                _md(name),
                *(c.get(k, "") for k in ("found", "skipped", "duplicates", "train", "val", "test", "train_augmented")),
            )
        )
    totals = report.get("totals", {})
    lines += ["", f"From {_md(report.get('images_dir', 'unknown'))}: {totals.get('found', '?')} image files."]
    settings = report.get("settings", {})
    distance = settings.get("near_duplicate_distance", -1)
    lines += [
        "",
        "### Duplicates and leakage",
        "",
        f"- Exact duplicates (the same pixels once resized): {totals.get('duplicates_removed', 0)} removed, "
        "one copy of each kept, before the split.",
        f"- The same picture under two classes: {totals.get('label_conflicts_removed', 0)} removed (no label is trusted).",
        f"- Near copies (perceptual hashes within {distance} of 64 bits, confirmed on their pixels): "
        f"{len(report.get('near_duplicate_groups', []))} groups, each kept whole in one split, so no near copy "
        "of a test image was trained on"
        + (
            f"; {len(report['cross_class_near_copies'])} of them across classes (kept; labels to look at)."
            if report.get("cross_class_near_copies")
            else "."
        )
        if distance >= 0
        else "- Near-duplicates: not looked for (near_duplicate_distance -1).",
        f"- Split: stratified per class, seed {settings.get('seed', '?')}, test {settings.get('test_size', '?')}, "
        f"validation {settings.get('val_size', '?')}; augmented copies ({settings.get('augment', 0)} per image) "
        "only in the training split."
        + (
            f" Every class within {max(c['off_by'] for c in shares['classes'].values()):.1f} points of the shares asked."
            if (shares := report.get("split_shares")) and shares.get("classes")
            else ""
        ),
        "",
    ]
    return lines


def _network(saved: dict) -> str:
    backbone = saved.get("summary", {}).get("backbone")
    if not isinstance(backbone, dict):
        return "the CIFAR-style CNN of `pipeline`, trained from scratch"
    return f"{backbone.get('name')} pretrained on ImageNet, with a new head fine-tuned on these classes"


def _backbone_section(backbone: dict | None) -> list[str]:
    """Where a pretrained network's weights came from, under which license, and what was trained here."""
    if not isinstance(backbone, dict):
        return []
    return [
        "## Pretrained backbone",
        "",
        f"- Network: {backbone.get('name')} (EfficientNet-Lite: EfficientNet-B0's blocks without "
        "squeeze-and-excitation, ReLU6), published ImageNet top-1 "
        f"{backbone.get('imagenet_top1')} % at {backbone.get('trained_size')} px.",
        f"- Pretrained on {backbone.get('pretrained_on')}; weights: {backbone.get('weights')}, "
        f"license {backbone.get('license')}. What ImageNet's photos hold (and lack) shapes what it sees.",
        f"- Trained here: a new head on its pooled features, then {backbone.get('fine_tuned')}.",
        "",
    ]


def _training_section(saved: dict) -> list[str]:
    train, summary = saved.get("train", {}), saved.get("summary", {})
    rows = [
        ("epochs run (budget)", f"{summary.get('epochs_run', '?')} ({train.get('epochs', '?')})"),
        (
            "best epoch, kept",
            f"{summary.get('best_epoch', '?')} ({summary.get('monitor', '?')} {summary.get('best', 0):.4g})",
        ),
        ("batch size", train.get("batch_size")),
        ("peak learning rate, schedule", f"{train.get('learning_rate')}, {train.get('schedule')}"),
        ("class weights", train.get("class_weight")),
        ("precision", summary.get("precision", train.get("precision"))),
        ("seed", train.get("seed")),
        ("early stopping patience", train.get("patience")),
        ("training time", f"{summary.get('seconds', '?')} s"),
    ]
    lines = ["## Training", "", _cells("setting", "value"), _cells("---", "---")]
    lines += [_cells(name, value) for name, value in rows]
    lines += ["", "The validation split chose the epoch kept (early stopping); the test split chose nothing.", ""]
    return lines


def _test_section(evaluation: dict | None) -> list[str]:
    lines = ["## Test figures", ""]
    if not evaluation:
        return [*lines, "Not evaluated yet: run `pipeline evaluate` to add the test figures here.", ""]
    lines += [
        f"On {evaluation['n_test']} test images (engine `{evaluation.get('engine', 'keras')}`): "
        f"accuracy **{evaluation['accuracy']:.4f}**, macro F1 **{evaluation['macro_f1']:.4f}**, "
        f"loss {evaluation.get('loss', float('nan')):.4f}.",
        "",
        _cells("class", "precision", "recall", "F1", "test images"),
        _cells(*["---"] * 5),
    ]
    for name, m in evaluation.get("per_class", {}).items():
        lines.append(_cells(_md(name), f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]))
    pairs = evaluation.get("most_confused", [])
    lines.append("")
    if pairs:
        lines.append("Most confused (true -> predicted, test images):")
        lines += [f"- {_md(p['true'])} -> {_md(p['predicted'])}: {p['count']}" for p in pairs]
    else:
        lines.append("No test image was confused with another class.")
    return [*lines, ""]


def _calibration_section(calibration: dict | None) -> list[str]:
    lines = ["## Calibration", ""]
    if not calibration:
        return [*lines, "None: the probabilities are the softmax as trained, not calibrated.", ""]
    shown = {k: v for k, v in calibration.items() if isinstance(v, int | float | str | bool)}
    lines += [_cells("", "value"), _cells("---", "---")]
    lines += [_cells(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()]
    return [*lines, "", f"From {paths.CALIBRATION_FILE}, fitted on the validation split.", ""]


def _unknown_section(novelty: dict | None, measured: dict | None) -> list[str]:
    """How "unknown" was set (novelty.json) and what it was measured against (evaluate's figures)."""
    lines = ["## Unknown pictures", ""]
    if not novelty:
        return [*lines, "No novelty score (trained before it existed): every picture gets one of the classes.", ""]
    lines += [
        f"Each picture's novelty is the distance from its features ({novelty.get('features', '?')}) to the "
        f"{nearest(novelty.get('k', 1))} of {novelty.get('bank_images', '?')} training images' features "
        f"(of {novelty.get('training_sources', '?')} training source images, augmented copies left out; "
        f"{novelty.get('reference', '')}). Above **{novelty.get('threshold', 0):.4f}** the answer is `unknown`: the "
        f"threshold keeps {novelty.get('keep', 0):.0%} of the {novelty.get('set_on_images', '?')} "
        f"{novelty.get('set_on', '?')} pictures. `--novelty-threshold` moves it (0: off).",
        "",
    ]
    if not measured or not measured.get("available"):
        return [*lines, "Not measured on test pictures yet: run `pipeline evaluate` (with `--foreign DIR`).", ""]
    lines.append(
        f"On the test split it answered `unknown` for {measured['test_refused']:.1%} "
        f"(± {measured['test_refused_se']:.1%}) of the pictures."
    )
    foreign = measured.get("foreign")
    if foreign:
        baseline = foreign["baseline"]
        lines.append(
            f"Measured against {foreign['n_foreign']} pictures of none of the classes ({_md(foreign['folder'])}): "
            f"AUROC {foreign['auroc']:.4f} ± {foreign['auroc_se']:.4f} (max softmax: {baseline['auroc']:.4f}), "
            f"{foreign['foreign_accepted']:.1%} ± {foreign['foreign_accepted_se']:.1%} of them accepted as a class "
            "at the threshold."
        )
    else:
        lines.append("Not measured against foreign pictures: `pipeline evaluate --foreign DIR` adds that here.")
    return [*lines, ""]


def _input_section(preprocess: dict) -> list[str]:
    size, channels = preprocess["size"], preprocess.get("channels", 3)
    return [
        "## Input the model expects",
        "",
        f"- uint8 pixels 0-255, shape (batch, {size}, {size}, {channels}), channels last, "
        f"{preprocess['color']} ({'RGB order' if channels == 3 else 'one grey channel'}); the model "
        f"{preprocess.get('scaling', 'standardizes them itself')} (its first layer), so feed them as they are, "
        "not scaled to 0-1.",
        f"- Resize: {preprocess.get('resize', 'unknown')}; EXIF orientation applied, transparency on white. "
        f"Preprocessing version {preprocess.get('version', '?')}: "
        "`pipeline.data.images.preprocess(path, size, color).pixels` does exactly this.",
        "- Output: one probability per class, in the order of classes.json; every file but model.keras gives "
        "the features the novelty is measured on as a second output, from the same call.",
        "",
    ]


def _limits_section(classes: list[str], preprocess: dict, saved: dict, report: dict) -> list[str]:
    flip = saved.get("prepare", {}).get("flip", True)
    lines = [
        "## What it was not trained on",
        "",
        f"- Anything outside these {len(classes)} classes: it answers `unknown` where a picture is unlike the "
        "training images (see Unknown pictures), but a foreign picture close to them still gets a class "
        "(`--threshold` turns a low confidence into `unsure`).",
        f"- Pictures unlike those in {_md(report.get('images_dir', 'the training folder'))}: other cameras, "
        "lighting, backgrounds or framing were not seen, and the test figures are of pictures from the same folder.",
        f"- Detail finer than {preprocess['size']}x{preprocess['size']} pixels, and aspect ratio: every picture "
        "is squashed to a square.",
        "- Mirror images as distinct: training added left-right mirrored copies."
        if flip
        else "- Mirrored pictures: no mirrored copy was trained on (--no-flip).",
    ]
    lines += [f"- {_md(warning)}" for warning in report.get("warnings", [])]
    return [*lines, ""]


# How to run each file in a few lines of Python, from `pixels`, the uint8 batch of the card.
# Every file but model.keras is the inference model: probabilities, then features, from one call.
_INTERPRETER = """from ai_edge_litert.interpreter import Interpreter
runner = Interpreter(model_path="{file}").get_signature_runner()  # outputs by name: output_0, output_1
outputs = runner(pixels={feed})
"""
_LOAD = {
    "keras": (
        "model.keras",
        "keras",
        """import keras
model = keras.saving.load_model("model.keras", safe_mode=True)
probabilities = model.predict(pixels)""",
    ),
    "litert": (
        "model.tflite",
        "ai-edge-litert",
        _INTERPRETER.format(file="model.tflite", feed='pixels.astype("float32")')
        + 'probabilities, features = outputs["output_0"], outputs["output_1"]',
    ),
    "litert-int8": (
        "model_int8.tflite",
        "ai-edge-litert",
        _INTERPRETER.format(file="model_int8.tflite", feed="pixels")  # uint8 in, as they are
        + """scale, zero_point = runner.get_output_details()["output_0"]["quantization"]  # uint8 out, steps of 1/256
probabilities = (outputs["output_0"].astype("float32") - zero_point) * scale""",
    ),
    "onnx": (
        "model.onnx",
        "onnxruntime",
        """import onnxruntime
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
probabilities, features = session.run(None, {session.get_inputs()[0].name: pixels.astype("float32")})""",
    ),
    "openvino": (
        "model_openvino/",
        "openvino",
        """import openvino
config = {"INFERENCE_PRECISION_HINT": "f32"}  # as Keras computes (AMX CPUs would pick bf16)
compiled = openvino.Core().compile_model("model_openvino/model.xml", "CPU", config)
outputs = compiled(pixels.astype("float32"))
probabilities, features = outputs[compiled.outputs[0]], outputs[compiled.outputs[1]]""",
    ),
    "saved-model": (
        "model_saved/",
        "tensorflow",
        """import tensorflow as tf
loaded = tf.saved_model.load("model_saved")
probabilities, features = (t.numpy() for t in loaded.serve(tf.constant(pixels, tf.float32)))""",
    ),
}


def _exports_section(preprocess: dict, exports: dict, model_dir: Path) -> list[str]:
    size, color = preprocess["size"], preprocess["color"]
    lines = [
        "## Loading each format",
        "",
        "Each snippet starts from `pixels`, a uint8 batch made as above:",
        "",
        "```python",
        "import numpy as np",
        "from pipeline.data.images import preprocess",
        f'pixels = np.stack([preprocess("photo.jpg", {size}, "{color}").pixels])',
        "# without pipeline, nearly the same (JPEG's DCT draft aside): PIL's Image.open(path), EXIF-transposed,",
        f'# .convert("{"L" if color == "grayscale" else "RGB"}").resize(({size}, {size}), Image.BILINEAR, reducing_gap=3.0)',
        "```",
        "",
    ]
    for name in ("keras", "litert", *EXPORT_FORMATS):
        file, package, code = _LOAD[name]
        lines += [
            f"### {name}: `{file}` ({package})",
            "",
            *_export_status(name, exports, model_dir),
            "```python",
            code,
            "```",
            "",
        ]
    lines += [
        "On the command line, `pipeline predict`, `evaluate` and `serve` run any of them with `--engine <format>`.",
        "",
    ]
    return lines


def _export_status(name: str, exports: dict, model_dir: Path) -> list[str]:
    if name in ("keras", "litert"):
        return ["Written by `pipeline train`.", ""]
    record = exports.get(name)
    if not record or not (model_dir / paths.EXPORT_PATHS[name]).exists():
        return [f"Not exported yet: `pipeline export --format {name}`.", ""]
    return [
        f"Exported and checked on {record['n_test']} test images: top-1 agreement with Keras "
        f"{record['agreement']:.2%}, largest probability difference {record['max_difference']:.3g}, "
        f"test accuracy {record['accuracy']:.4f} (Keras {record['keras_accuracy']:.4f}), "
        f"{record['bytes'] / 1e6:.2f} MB.",
        *_quantization_note(record),
        *([f"Note: {record['note']}."] if record.get("note") else []),
        "",
    ]


def _quantization_note(record: dict) -> list[str]:
    found = record.get("input_quantization")
    if not found:
        return []
    if (found["scale"], found["zero_point"]) == (1.0, 0):
        return [f"Calibrated on {record.get('calibration_images')} training images; input scale 1, zero point 0."]
    return [
        f"Calibrated on {record.get('calibration_images')} training images; input scale {found['scale']:.6g}, "
        f"zero point {found['zero_point']}: feed `round(pixels / scale + zero_point)` as uint8."
    ]
