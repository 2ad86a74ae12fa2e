"""The commands that answer for new images: predict, serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import (
    ENGINE_HELP,
    NOVELTY_OPTION,
    PREDICT,
    SERVE,
    TARGET_ACCURACY_OPTION,
    THRESHOLD_OPTION,
    TTA_OPTION,
    Engine,
    ModelDir,
    Quiet,
    app,
    settings_from,
    user_errors,
)
from pipeline.core import paths, progress
from pipeline.core.settings import PredictSettings, ServeSettings
from pipeline.report import terminal


@app.command()
@user_errors
def predict(
    files: Annotated[list[Path], typer.Argument(help="Image files, or folders (all images inside, recursively).")],
    model_dir: ModelDir = paths.MODEL_DIR,
    top_k: Annotated[int, typer.Option(help="Show the k most likely labels.")] = PREDICT.top_k,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of predictions to stdout.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Also write file,label,confidence,novelty and the top k to this CSV.")
    ] = None,
    threshold: Annotated[float, THRESHOLD_OPTION] = PREDICT.threshold,
    target_accuracy: Annotated[float | None, TARGET_ACCURACY_OPTION] = PREDICT.target_accuracy,
    novelty_threshold: Annotated[float | None, NOVELTY_OPTION] = PREDICT.novelty_threshold,
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
    """Label, calibrated confidence and novelty for each file, preprocessed exactly as the training images were."""
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
    novelty_threshold: Annotated[float | None, NOVELTY_OPTION] = SERVE.novelty_threshold,
    max_inflight: Annotated[
        int,
        typer.Option(help="Most requests held, queued ones included; more get 503 with Retry-After (0: 256)."),
    ] = SERVE.max_inflight,
    max_inflight_mb: Annotated[
        float,
        typer.Option(help="Most MB of uploads held at once; more get 503 (0: 5 x --max-upload-mb, at least 64)."),
    ] = SERVE.max_inflight_mb,
    read_timeout: Annotated[
        float, typer.Option(help="Seconds for an upload's body to arrive; a slower client gets 408.")
    ] = SERVE.read_timeout,
    queue_timeout: Annotated[
        float, typer.Option(help="Seconds a request waits for a model worker; a longer wait gets 503.")
    ] = SERVE.queue_timeout,
    max_megapixels: Annotated[
        float, typer.Option(help="Most pixels (millions) the pictures of one request decode to; more get 413.")
    ] = SERVE.max_megapixels,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Another name clients reach the server by (repeat for more); other Host names get 400."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Serve the model over HTTP: POST /predict (the JSON of predict --json), a page at /, the API at /docs."""
    progress.set_quiet(quiet)
    from pipeline.serve import serve_model

    allowed_host = tuple(allowed_host or ())
    settings = settings_from(ServeSettings, locals())
    serve_model(model_dir, settings, reports_dir, say=progress.say)
