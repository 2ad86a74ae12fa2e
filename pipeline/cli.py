"""The command line: each command gathers options and calls one stage function.

The only module that imports Typer. Each stage module is imported inside its command, so
`pipeline --help` stays instant. Every error a user can cause, a bad option included,
ends with one line on stderr and exit code 1 (130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from pipeline.core import paths, progress
from pipeline.core.errors import PipelineError
from pipeline.core.settings import (
    CLASS_WEIGHTS,
    COLOR_MODES,
    ENGINES,
    EXPORT_FORMATS,
    PEAK_RATE,
    PEAK_RATE_BATCH,
    PRECISIONS,
    SCHEDULES,
    AuditSettings,
    ExportSettings,
    InspectSettings,
    PredictSettings,
    PrepareSettings,
    ServeSettings,
    TrainSettings,
)
from pipeline.report import terminal

try:  # typer below 0.29 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError


class OneLineErrors(TyperGroup):
    """A bad option or value (a usage error to click, exit 2 in a box) is one line and exit 1,
    like every other error a user can cause."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `pipeline` or `pipeline predict` alone: the help
            e.show()
            code = 0 if e.ctx is not None and e.ctx.parent is None else 1
        except ClickException as e:
            progress.console.print(f"error: {e.format_message()}", markup=False)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Turn a folder of class-named image folders into a trained image classifier.\n\n"
    "Run in order: prepare IMAGES_DIR, train, evaluate, predict FILE... (or serve the model: serve; "
    "take it elsewhere: export --format)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Option defaults come from the settings, the one place they are set.
PREPARE, TRAIN, PREDICT, INSPECT = PrepareSettings(), TrainSettings(), PredictSettings(), InspectSettings()
SERVE, EXPORT, AUDIT = ServeSettings(), ExportSettings(), AuditSettings()
Color = Enum("Color", {mode: mode for mode in COLOR_MODES}, type=str)
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
Engine = Enum("Engine", {e: e for e in ENGINES}, type=str)
Schedule = Enum("Schedule", {s: s for s in SCHEDULES}, type=str)
ClassWeight = Enum("ClassWeight", {w: w for w in CLASS_WEIGHTS}, type=str)
ExportFormat = Enum("ExportFormat", {f: f for f in EXPORT_FORMATS}, type=str)
ENGINE_HELP = "auto: LiteRT when installed, else Keras; or an export by its format's name (pipeline export)."


_signalled = False


def _interrupted_exit() -> typer.Exit:
    progress.console.print("interrupted: nothing was written, earlier artifacts are untouched", markup=False)
    return typer.Exit(code=130)


def _interrupt(signum, frame):
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def user_errors(command):
    """Errors a user can cause end with one line on stderr and a non-zero exit, no traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PipelineError as e:
            progress.console.print(f"error: {e}", markup=False)
            raise typer.Exit(code=getattr(e, "exit_code", 1)) from None
        except KeyboardInterrupt:
            raise _interrupted_exit() from None
        except Exception:
            # A signal that lands inside C code (numpy reading a file, say) can come out as
            # that code's own error instead of KeyboardInterrupt: still an interruption.
            if _signalled:
                raise _interrupted_exit() from None
            raise

    return run


def one_blas_thread() -> None:
    """For commands that run one decoding process per core: numpy's OpenBLAS, told before
    it loads, starts no threads of its own, which otherwise spun on the cores the decoding
    processes needed (5% of prepare's CPU time, measured with perf)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def settings_from(kind, options: dict):
    """A settings dataclass from a command's options, taken by field name (enums as their values)."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v.value if isinstance(v, Enum) else v for k, v in options.items() if k in names})


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
DataDir = Annotated[Path, typer.Option("--data", help="Prepared data folder (from prepare).")]
ModelDir = Annotated[Path, typer.Option("--model", help="Model folder (from train).")]
THRESHOLD_OPTION = typer.Option(help="Below this calibrated confidence (0-1) the label is 'unsure'.")
TARGET_ACCURACY_OPTION = typer.Option(
    help="Answer 'unsure' below the lowest confidence that reached this accuracy on the validation split "
    "(train records 0.95 and 0.99).",
    show_default=False,
)
TTA_OPTION = typer.Option("--tta", help="Average over the image and its mirror image (where prepare allowed flips).")


@app.command()
@user_errors
def prepare(
    images_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the arrays.")] = paths.DATA_DIR,
    size: Annotated[int, typer.Option(help="Square side in pixels.")] = PREPARE.size,
    color: Annotated[Color, typer.Option(help="Colour mode of the arrays.")] = Color[PREPARE.color],
    test_size: Annotated[float, typer.Option(help="Fraction of each class for the test split.")] = PREPARE.test_size,
    val_size: Annotated[
        float, typer.Option(help="Fraction of each class for validation (0: none).")
    ] = PREPARE.val_size,
    augment: Annotated[int, typer.Option(help="Augmented copies per training image.")] = PREPARE.augment,
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Mirror left-right when augmenting (--no-flip for digits, text).")
    ] = PREPARE.flip,
    seed: Annotated[int, typer.Option(help="Seed for the split and augmentation.")] = PREPARE.seed,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: all cores).")] = PREPARE.workers,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on any skipped file or warning.")] = PREPARE.strict,
    scheduler: Annotated[
        str,
        typer.Option(
            envvar="DASK_SCHEDULER_ADDRESS",
            help="Dask scheduler (tcp://host:8786) whose workers decode; images and --out on storage they share.",
        ),
    ] = PREPARE.scheduler,
    cache: Annotated[
        str,
        typer.Option(
            help="Per-file cache folder, keyed by content (default: .cache beside --out).", show_default=False
        ),
    ] = PREPARE.cache,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Decode every file; neither read nor write the cache.")
    ] = PREPARE.no_cache,
    cache_limit_gb: Annotated[
        float, typer.Option(help="Cache size limit; least recently used entries go first.")
    ] = PREPARE.cache_limit_gb,
    fixes: Annotated[
        str,
        typer.Option(
            help="An audit.csv: relabel or leave out the files it names (action keep | relabel:CLASS | exclude); "
            "the images folder is never changed.",
            show_default=False,
        ),
    ] = PREPARE.fixes,
    quiet: Quiet = False,
) -> None:
    """Scan IMAGES_DIR, decode, resize, de-duplicate, split and augment into .npy arrays."""
    one_blas_thread()
    from pipeline.prepare import prepare_dataset

    progress.set_quiet(quiet)
    settings = settings_from(PrepareSettings, locals())
    report = prepare_dataset(images_dir, out_dir, settings)
    terminal.print_prepare_summary(report, out_dir)


@app.command()
@user_errors
def inspect(
    images_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON to stdout.")] = False,
    workers: Annotated[int, typer.Option(help="Decoding processes (0: all cores).")] = INSPECT.workers,
    quiet: Quiet = False,
) -> None:
    """What prepare would find in IMAGES_DIR (classes, formats, sizes, problem files), writing nothing."""
    one_blas_thread()
    from pipeline.inspect import inspect_folder

    progress.set_quiet(quiet)
    found = inspect_folder(images_dir, settings_from(InspectSettings, locals()))
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
    else:
        terminal.print_inspection(found)


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
        typer.Option(help="auto: mixed float16 on one GPU, mixed bfloat16 on CPUs with native bfloat16, else float32."),
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
    quiet: Quiet = False,
) -> None:
    """Train the CIFAR-style CNN on the prepared arrays, keeping the best epoch on validation."""
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
    quiet: Quiet = False,
) -> None:
    """Measure the model on the test split: accuracy, per-class report, confusion matrix, calibration."""
    progress.set_quiet(quiet)
    from pipeline.evaluate import evaluate_model

    metrics = evaluate_model(data_dir, model_dir, out_dir, engine.value, tta=tta)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        terminal.print_metrics(metrics, out_dir)


@app.command()
@user_errors
def predict(
    files: Annotated[list[Path], typer.Argument(help="Image files, or folders (all images inside, recursively).")],
    model_dir: ModelDir = paths.MODEL_DIR,
    top_k: Annotated[int, typer.Option(help="Show the k most likely labels.")] = PREDICT.top_k,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of predictions to stdout.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Also write file,label,confidence and the top k to this CSV.")
    ] = None,
    threshold: Annotated[float, THRESHOLD_OPTION] = PREDICT.threshold,
    target_accuracy: Annotated[float | None, TARGET_ACCURACY_OPTION] = PREDICT.target_accuracy,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine[PREDICT.engine],
    tta: Annotated[bool, TTA_OPTION] = PREDICT.tta,
    explain: Annotated[
        str,
        typer.Option(
            "--explain", metavar="DIR", help="Write a Grad-CAM heatmap of each image (one PNG each) into this folder."
        ),
    ] = PREDICT.explain,
    quiet: Quiet = False,
) -> None:
    """Label and calibrated confidence for each file, preprocessed exactly as the training images were."""
    progress.set_quiet(quiet)
    from pipeline.predict import predict_paths, write_csv

    settings = settings_from(PredictSettings, locals())
    results, errors = predict_paths(files, model_dir, settings)
    if csv_file is not None:
        write_csv(csv_file, results, errors, settings.top_k)
        progress.say(f"predictions written to {csv_file}")
    for error in errors:
        progress.console.print(f"error: {error['file']}: {error['error']}", markup=False)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        terminal.print_predictions(results)
    if errors:
        raise typer.Exit(code=1)


@app.command()
@user_errors
def serve(
    model_dir: ModelDir = paths.MODEL_DIR,
    host: Annotated[
        str, typer.Option(help="Address to listen on; the default, loopback, lets only this machine connect.")
    ] = SERVE.host,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = SERVE.port,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest request body in MB; a larger upload gets 413.")
    ] = SERVE.max_upload_mb,
    max_files: Annotated[int, typer.Option(help="Most images in one request.")] = SERVE.max_files,
    workers: Annotated[
        int, typer.Option(help="Requests answered at once, each with its own model copy (0: one per core).")
    ] = SERVE.workers,
    reports_dir: Annotated[
        Path | None,
        typer.Option(
            "--reports", help="evaluate's folder, for the test accuracy (default: reports beside the model folder)."
        ),
    ] = None,
    engine: Annotated[Engine, typer.Option(help=ENGINE_HELP)] = Engine[SERVE.engine],
    threshold: Annotated[float, THRESHOLD_OPTION] = SERVE.threshold,
    target_accuracy: Annotated[float | None, TARGET_ACCURACY_OPTION] = SERVE.target_accuracy,
    max_inflight: Annotated[
        int, typer.Option(help="Most uploads in flight; more get 503 with Retry-After (0: 4 a worker, at least 8).")
    ] = SERVE.max_inflight,
    max_inflight_mb: Annotated[
        float,
        typer.Option(help="Most MB of uploads held at once; more get 503 (0: 5 x --max-upload-mb, at least 64)."),
    ] = SERVE.max_inflight_mb,
    read_timeout: Annotated[
        float, typer.Option(help="Seconds for an upload's body to arrive; a slower client gets 408.")
    ] = SERVE.read_timeout,
    quiet: Quiet = False,
) -> None:
    """Serve the model over HTTP: POST /predict (the JSON of predict --json), a page at /, the API at /docs."""
    progress.set_quiet(quiet)
    from pipeline.serve import serve_model

    settings = settings_from(ServeSettings, locals())
    serve_model(model_dir, settings, reports_dir, say=progress.say)


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


@app.command()
@user_errors
def audit(
    data_dir: DataDir = paths.DATA_DIR,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write audit.html, .json and .csv.")
    ] = paths.AUDIT_DIR,
    folds: Annotated[int, typer.Option(help="Out-of-fold models, each trained on the other folds.")] = AUDIT.folds,
    epochs: Annotated[int, typer.Option(help="Each fold's training budget in epochs.")] = AUDIT.epochs,
    seed: Annotated[int, typer.Option(help="Seed for the folds and the models.")] = AUDIT.seed,
    precision: Annotated[
        Precision, typer.Option(help="As train's: auto is mixed bfloat16 on CPUs with native bfloat16, else float32.")
    ] = Precision[AUDIT.precision],
    quiet: Quiet = False,
) -> None:
    """Find images whose label looks wrong (out-of-fold CNNs and cleanlab) and ones unfit to train on."""
    progress.set_quiet(quiet)
    from pipeline.audit import audit_dataset

    terminal.print_audit_summary(audit_dataset(data_dir, out_dir, settings_from(AuditSettings, locals())), out_dir)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a kill runs the same clean-up as Ctrl-C
        signal.signal(signum, _interrupt)
    app()
