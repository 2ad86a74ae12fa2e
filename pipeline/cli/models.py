"""The commands that make and measure a model: train, evaluate, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import (
    EXPORT,
    TRAIN,
    TTA_OPTION,
    Backbone,
    ClassWeight,
    DataDir,
    Engine,
    ExportFormat,
    ModelDir,
    Precision,
    Quiet,
    Schedule,
    app,
    settings_from,
    user_errors,
)
from pipeline.core import paths, progress
from pipeline.core.settings import PEAK_RATE, PEAK_RATE_BATCH, ExportSettings, TrainSettings
from pipeline.report import terminal


@app.command()
@user_errors
def train(
    data_dir: DataDir = paths.DATA_DIR,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the model.")] = paths.MODEL_DIR,
    epochs: Annotated[
        int, typer.Option(help="Epoch budget: the one-cycle schedule spans it (early stopping may end sooner).")
    ] = TRAIN.epochs,
    batch_size: Annotated[
        int, typer.Option(help="Images per training step (over every GPU and TF_CONFIG worker).")
    ] = TRAIN.batch_size,
    learning_rate: Annotated[
        float | None,
        typer.Option(
            help=f"Adam's peak learning rate: the top of the one-cycle schedule (constant: the rate). "
            f"Default: {PEAK_RATE:g} at batch {PEAK_RATE_BATCH}, scaled by sqrt(batch / {PEAK_RATE_BATCH}).",
            show_default=False,
        ),
    ] = TRAIN.learning_rate,
    schedule: Annotated[
        Schedule, typer.Option(help="one-cycle: warm-up to the peak rate, cosine decay over --epochs; or constant.")
    ] = Schedule[TRAIN.schedule],
    class_weight: Annotated[
        ClassWeight,
        typer.Option(
            help="balanced: weigh each class by the inverse of its training count, in the second half of the "
            "epochs (imbalanced folders)."
        ),
    ] = ClassWeight[TRAIN.class_weight],
    seed: Annotated[int, typer.Option(help="Seed for weights and shuffling.")] = TRAIN.seed,
    patience: Annotated[
        int, typer.Option(help="Epochs without validation improvement before stopping.")
    ] = TRAIN.patience,
    precision: Annotated[
        Precision,
        typer.Option(
            help="auto: mixed float16 on one GPU, mixed bfloat16 on CPUs with native bfloat16, else float32 (--backbone: float32)."
        ),
    ] = Precision[TRAIN.precision],
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Write TensorBoard logs to the model folder.")
    ] = TRAIN.tensorboard,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the checkpoint a killed or interrupted run left beside --out (after its last "
            "complete epoch); it must be of the same data and settings. Without a checkpoint: from epoch 1.",
        ),
    ] = TRAIN.resume,
    find_lr: Annotated[
        bool,
        typer.Option(
            "--find-lr",
            help="Only run a learning-rate range test (about 100 steps) and print the suggested --learning-rate; "
            "writes lr_find.png beside the --out folder (in its parent), never a model, and leaves --out untouched.",
        ),
    ] = False,
    backbone: Annotated[
        Backbone,
        typer.Option(
            help="cifar-cnn: the CIFAR-style CNN from scratch; or a network pretrained on ImageNet, fine-tuned "
            "(folders of real photos: prepare --size 224 for efficientnet-lite0, 240 lite1, 260 lite2; docs/train.md)."
        ),
    ] = Backbone[TRAIN.backbone],
    quiet: Quiet = False,
) -> None:
    """Train the CIFAR-style CNN (or --backbone) on the prepared arrays, keeping the best epoch on validation."""
    progress.set_quiet(quiet)
    from pipeline.train import train_model

    settings = settings_from(TrainSettings, locals())
    if find_lr:
        from pipeline.training.lr_find import find_learning_rate

        terminal.print_learning_rate_found(find_learning_rate(data_dir, out_dir.parent / paths.LR_FIND_PNG, settings))
        return
    terminal.print_train_summary(train_model(data_dir, out_dir, settings), out_dir)


@app.command()
@user_errors
def evaluate(
    data_dir: DataDir = paths.DATA_DIR,
    model_dir: ModelDir = paths.MODEL_DIR,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write metrics and figures.")] = paths.REPORTS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly the metrics JSON to stdout.")] = False,
    engine: Annotated[
        Engine, typer.Option(help="keras: model.keras itself; or litert, or an export by its format's name.")
    ] = Engine.keras,
    tta: Annotated[bool, TTA_OPTION] = False,
    foreign: Annotated[
        Path | None,
        typer.Option(
            "--foreign", metavar="DIR", help="A folder of pictures of none of the classes: how well 'unknown' works."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Measure the model on the test split: accuracy, per-class report, confusion matrix, calibration, novelty."""
    progress.set_quiet(quiet)
    from pipeline.evaluate import evaluate_model

    metrics = evaluate_model(data_dir, model_dir, out_dir, engine.value, tta=tta, foreign=foreign)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        terminal.print_metrics(metrics, out_dir)


@app.command(no_args_is_help=True)
@user_errors
def export(
    format: Annotated[
        ExportFormat | None,
        typer.Option(
            "--format", help="Required. litert-int8: full-integer LiteRT, uint8 in; or onnx, openvino, saved-model."
        ),
    ] = None,
    model_dir: ModelDir = paths.MODEL_DIR,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Prepared data folder: int8 calibrates on its training images; its test split checks the export.",
        ),
    ] = paths.DATA_DIR,
    calibration_images: Annotated[
        int, typer.Option(help="Training images the int8 ranges are calibrated on.")
    ] = EXPORT.calibration_images,
    min_agreement: Annotated[
        float, typer.Option(help="Refuse an export whose top-1 agrees with Keras on fewer test images (0-1).")
    ] = EXPORT.min_agreement,
    max_difference: Annotated[
        float | None,
        typer.Option(
            help="Refuse an export whose probabilities differ more from Keras' (default: 0.001 for float formats, none for int8).",
            show_default=False,
        ),
    ] = EXPORT.max_difference,
    quiet: Quiet = False,
) -> None:
    """Write the model in another format into the model folder, checked against Keras on the test split."""
    progress.set_quiet(quiet)
    from pipeline.export import export_model

    settings = settings_from(ExportSettings, locals())
    terminal.print_export(export_model(model_dir, data_dir, settings), settings.format, model_dir)
