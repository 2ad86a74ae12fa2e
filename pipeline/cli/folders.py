"""The commands on the images folder and the prepared data: prepare, inspect, audit, review."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.base import (
    AUDIT,
    INSPECT,
    PREPARE,
    Backbone,
    Color,
    DataDir,
    Precision,
    Quiet,
    app,
    one_blas_thread,
    settings_from,
    user_errors,
)
from pipeline.core import paths, progress
from pipeline.core.settings import AuditSettings, InspectSettings, PrepareSettings, ReviewSettings
from pipeline.report import terminal

REVIEW = ReviewSettings()


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
    near_duplicate_distance: Annotated[
        int,
        typer.Option(
            help="Perceptual-hash bits within which two pictures may be copies (confirmed on their pixels); "
            "copies stay in one split. -1: off.",
        ),
    ] = PREPARE.near_duplicate_distance,
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
    backbone: Annotated[
        Backbone,
        typer.Option(
            help="cifar-cnn: K CNNs, one per fold; or a pretrained network: a logistic head per fold on its "
            "frozen features (seconds; the features are cached with train --backbone's)."
        ),
    ] = Backbone[AUDIT.backbone],
    quiet: Quiet = False,
) -> None:
    """Find images whose label looks wrong (out-of-fold CNNs and cleanlab) and ones unfit to train on."""
    progress.set_quiet(quiet)
    from pipeline.audit import audit_dataset

    terminal.print_audit_summary(audit_dataset(data_dir, out_dir, settings_from(AuditSettings, locals())), out_dir)


@app.command()
@user_errors
def review(
    audit_dir: Annotated[Path, typer.Option("--audit", help="The audit folder (from audit).")] = paths.AUDIT_DIR,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data", help="The prepared data folder that was audited (default: the one audit.json names)."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; the default, loopback, lets only this machine connect.")
    ] = REVIEW.host,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = REVIEW.port,
    quiet: Quiet = False,
) -> None:
    """Go through the audit's findings on a page (keep, relabel, exclude); each decision is saved to reviewed.csv."""
    progress.set_quiet(quiet)
    from pipeline.review import review_audit

    review_audit(audit_dir, data_dir, settings_from(ReviewSettings, locals()), say=progress.say)
