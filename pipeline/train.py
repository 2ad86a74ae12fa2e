"""train: prepared arrays -> the CIFAR-style CNN, early-stopped on the validation split.

Reads X_train/y_train, X_val/y_val, classes.json and report.json from the data folder (the
test split is never touched here). Writes, atomically, the model folder (see
model_folder.py): model.keras (best weights by validation loss), model.tflite,
classes.json, preprocess.json, history.csv, training_curves.png, settings.json (this
run's settings and prepare's, the precision used, and whether the arrays were trained
from memory or streamed from disk) and MODEL_CARD.md (report/model_card.py).

The steps, in `train_model`'s order: check the inputs before TensorFlow loads
(`load_training_data`); build the model under its precision, its optimizer following the
one-cycle learning-rate schedule over all `epochs` x steps (`model.compile_model`,
`schedule.OneCycle`); fit with early stopping, Ctrl-C noted at every batch, classes
weighted with `--class-weight balanced` (`training.fit.fit_model`); write the model folder
with float32 weights and no optimizer state, and calibration.json: one temperature fitted
by negative log-likelihood on the validation split's probabilities, and the lowest
threshold reaching each target accuracy there (`inference.calibration`); none without a
validation split. Every epoch end leaves a checkpoint beside the
model folder, and `--resume` continues from it after a kill (`training.checkpoints`).

Speed: arrays that fit in memory are fed as uint8 through tf.data (shuffled row indices,
a gather per batch, prefetch), standardized inside the model, so there is no float copy of the
dataset; larger arrays stream from their memory maps a batch at a time. One endless
iterator serves the whole run (see `training.batches`).
On CPUs with native bfloat16 (AVX512-BF16 or AMX) the layers compute in mixed bfloat16
(softmax in float32); the saved and exported models are float32 either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

import numpy as np

from pipeline.core import paths, progress
from pipeline.core.artifacts import check_out_dir
from pipeline.core.errors import PipelineError, TrainingInterrupted
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import CNN, INFERENCE_BATCH, TrainSettings
from pipeline.data.data_folder import TrainingData, load_training_data, read_manifest
from pipeline.inference.calibration import calibrate_on_validation
from pipeline.inference.model_folder import (
    FEATURES_DESCRIPTION,
    add_to_settings,
    write_calibration,
    write_model_folder,
)
from pipeline.inference.novelty import MAX_BANK, even_rows, fit_novelty, write_novelty
from pipeline.report import plots
from pipeline.report.model_card import write_model_card
from pipeline.training import distribute
from pipeline.training.batches import class_weights_from_epoch, in_memory_bytes
from pipeline.training.checkpoints import fingerprint, open_checkpoints
from pipeline.training.fit import FitResult, ctrl_c_noted, fit_model
from pipeline.training.precision import build_with_precision, resolve_precision


def train_model(data_dir: Path, out_dir: Path, settings: TrainSettings) -> dict:
    """Train, keep the best weights, write the model folder; returns a summary."""
    settings.check()
    settings = dataclasses.replace(settings, learning_rate=settings.peak_learning_rate())  # recorded as used
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_out_dir(out_dir, {"data folder": data_dir})
    data = load_training_data(data_dir)
    cluster = distribute.read_cluster()  # TF_CONFIG, checked before TensorFlow loads
    checkpoints = open_checkpoints(  # a foreign checkpoint is refused before TensorFlow loads, too
        out_dir, fingerprint(data_dir, settings, cluster.size if cluster else 1), settings.resume,
        cluster is None or cluster.is_chief,
    )  # fmt: skip

    # TensorFlow takes seconds to load: only once the inputs are known to be usable.
    progress.say("loading TensorFlow...")
    keras = import_keras()
    from pipeline.training.model import PixelStats

    plan = distribute.plan_training(cluster)  # one process, every local GPU, or the cluster
    keras.utils.set_random_seed(settings.seed)
    prepared = None
    if settings.backbone != CNN:  # steps 1-2 of training.backbone; step 3 fits its top below
        from pipeline.training.backbone import prepare_backbone

        precision, pixel_stats = "float32", None
        if settings.precision in ("bfloat16", "float16"):  # asked for, not silently dropped
            progress.say(f"note: --precision {settings.precision} is the CNN's; train --backbone computes in float32")
        with plan.strategy.scope():
            prepared = prepare_backbone(data, data_dir, settings)
            model = _compiled(prepared.network.top, prepared.fit_data, settings)
        fit_data = prepared.fit_data
    else:
        precision = resolve_precision(settings.precision, plan)
        pixel_stats = PixelStats.of(data.X_train)
        with plan.strategy.scope():
            model = _compiled(
                build_with_precision(data.X_train.shape[1:], len(data.classes), precision, pixel_stats), data, settings
            )
        fit_data = data
    in_memory = fit_data.X_train.nbytes + fit_data.X_val.nbytes <= in_memory_bytes(settings.in_memory_mb)

    with ctrl_c_noted() as ctrl_c, plan.workspace(out_dir) as tmp:  # only the chief writes the model folder
        fit = fit_model(model, fit_data, settings, in_memory, tmp, ctrl_c, plan, checkpoints)
        if fit.best is None:
            raise PipelineError(
                f"training diverged: the {fit.monitor} was never a finite number in {len(fit.history)} epoch(s), "
                "so there is no model to keep and nothing was written; try a lower --learning-rate"
            )
        summary = _summary(fit, fit_data, settings, precision, in_memory, pixel_stats, plan, model)
        summary["checkpoint_seconds"] = round(checkpoints.seconds, 3)  # writing one at every epoch end
        # Save and export float32 weights (they run the same everywhere) in an uncompiled copy:
        # without Adam's two moments per weight, model.keras is a third the size, saves and loads faster.
        if prepared is not None:
            summary["backbone"] = _backbone_summary(prepared)
            from pipeline.training.backbone import saved_copy

            model = saved_copy(prepared.network)
        else:
            weights = model.get_weights()
            model = build_with_precision(data.X_train.shape[1:], len(data.classes), "float32", pixel_stats)
            model.set_weights(weights)
        if plan.is_chief:
            with plots.TrainingCurvesBeside(tmp / paths.HISTORY_FILE, fit.best_epoch, tmp / paths.CURVES_PNG):
                write_model_folder(tmp, model, data.classes, data_dir, data.prepare_report, settings, summary)
                run = folder_runner(tmp, model)
                calibration, seconds = calibrate(run, data)
                summary["calibration"] = write_calibration(tmp, calibration, seconds)  # for the CLI's line
                summary["novelty"] = fit_unknown(tmp, run, data, source_rows(data_dir, len(data.X_train)))
            # after calibration.json, which it reads; here, not in write_model_folder: report sits above inference
            write_model_card(tmp, data.prepare_report)
    plan.barrier("the chief wrote the model folder")  # no worker leaves before the model is in place
    if fit.interrupted:  # the best model so far is saved; the checkpoint can finish the run
        if plan.is_chief and checkpoints.folder.is_dir():
            progress.say(f"`train --resume` continues from the checkpoint {checkpoints.folder}")
    else:
        checkpoints.remove()  # the model folder is complete: its checkpoint has served
    _raise_if_interrupted(fit, ctrl_c, summary, f"is saved in {out_dir}" if plan.is_chief else "is saved by the chief")
    return summary


def folder_runner(folder: Path, model):
    """The model just written to `folder`, run as predict will run it: its model.tflite when
    LiteRT is installed (an interpreter starts in milliseconds, where Keras would first trace a
    predict function for the float32 copy: 1-2 s of a loaded machine's time), else Keras."""
    from pipeline.inference.classifier import load_classifier
    from pipeline.inference.engines import keras_runner

    try:
        return load_classifier(folder, "litert").run
    except PipelineError:  # no LiteRT here: the float32 Keras copy
        return keras_runner(model)


def run_rows(run, X, rows: np.ndarray | None = None, mirror: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, features) of the given rows of X (all without `rows`), a batch at a time."""
    rows = np.arange(len(X)) if rows is None else rows
    outputs = []
    for start in range(0, len(rows), INFERENCE_BATCH):
        batch = np.asarray(X[rows[start : start + INFERENCE_BATCH]])
        outputs.append(run(np.ascontiguousarray(batch[:, :, ::-1] if mirror else batch)))
    if not outputs:
        return np.zeros((0, 0)), None
    features = None if any(f is None for _, f in outputs) else np.concatenate([f for _, f in outputs])
    return np.concatenate([p for p, _ in outputs]), features


def calibrate(run, data: TrainingData) -> tuple[dict | None, float | None]:
    """The validation probabilities of the model `run` runs -> calibration.json's content, and
    the seconds it took (None, None without a validation split, said on stderr)."""
    if len(data.X_val) == 0:
        progress.say("note: no validation split, so no temperature: the probabilities are not calibrated")
        return None, None
    started = time.perf_counter()
    flips = bool(data.prepare_report.get("settings", {}).get("flip", False))  # --tta's mirror images
    calibration = calibrate_on_validation(
        run_rows(run, data.X_val)[0],
        np.asarray(data.y_val),
        run_rows(run, data.X_val, mirror=True)[0] if flips else None,
    )
    return calibration, round(time.perf_counter() - started, 3)


def source_rows(data_dir: Path, n: int) -> np.ndarray:
    """The training split's rows that are source images, not augmented copies (all of them when
    the manifest cannot say): what the novelty score measures against."""
    try:
        manifest = read_manifest(data_dir)
    except PipelineError:
        return np.arange(n)
    rows = sorted(r["index"] for r in manifest if r["split"] == "train" and not r["augmented"] and r["index"] < n)
    return np.asarray(rows, dtype=np.int64) if rows else np.arange(n)


def fit_unknown(folder: Path, run, data: TrainingData, rows: np.ndarray) -> dict:
    """novelty.json and its training features, into the model folder being written: the
    features of the training source `rows` (up to novelty.MAX_BANK, evenly drawn), the
    threshold keeping novelty.KEEP of the validation split. Returns settings.json's line."""
    started = time.perf_counter()
    bank_rows = rows[even_rows(len(rows), MAX_BANK)]
    _, train_features = run_rows(run, data.X_train, bank_rows)
    _, val_features = run_rows(run, data.X_val)
    if train_features is None:  # a model without a layer named features: nothing to measure with
        return add_to_settings(
            folder, "novelty", {"threshold": None, "note": "no layer named 'features': no novelty score"}
        )
    if val_features is None:
        val_features = np.zeros((0, train_features.shape[1]))
    bank, info = fit_novelty(train_features, val_features, described=FEATURES_DESCRIPTION)
    info["training_sources"] = int(len(rows))  # of which bank_images were kept
    write_novelty(folder, bank, info)
    if info["set_on"] != "validation":
        progress.say("note: no validation split: the novelty threshold is set on the training images' own distances")
    record = {
        "threshold": info["threshold"],
        "keep": info["keep"],
        "set_on": info["set_on"],
        "bank_images": info["bank_images"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return add_to_settings(folder, "novelty", record)


def _compiled(model, data: TrainingData, settings: TrainSettings):
    """`model` with Adam following the schedule over every step of the budget."""
    from pipeline.training.model import compile_model

    steps = (
        settings.epochs * math.ceil(len(data.X_train) / settings.batch_size)
        if settings.schedule == "one-cycle"
        else None
    )
    return compile_model(model, settings.learning_rate, steps, settings.warmup)


def _backbone_summary(prepared) -> dict:
    """settings.json's record of a backbone run."""
    from pipeline.training.backbone import describe

    return {**describe(prepared.network.name), "seconds": prepared.seconds, "head": prepared.head}


def _summary(
    fit: FitResult, data: TrainingData, settings: TrainSettings, precision, in_memory, pixel_stats, plan, model
):
    """What settings.json records of the run (and what the CLI prints)."""
    summary = {
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "monitor": fit.monitor,
        "best": fit.best,
        "seconds": round(fit.seconds, 2),
        "train_images_per_s": (
            round((len(fit.history) - fit.resumed_after) * len(data.X_train) / fit.seconds, 1) if fit.seconds else None
        ),
        "resumed_after_epoch": fit.resumed_after,  # epochs a checkpoint had done (train --resume); 0: none
        "interrupted": fit.interrupted,
        "precision": precision,
        "input": "memory (tf.data)" if in_memory else "memory-mapped batches",
        "class_weights": fit.class_weights,
        "class_weights_from_epoch": class_weights_from_epoch(settings.epochs) + 1 if fit.class_weights else None,
        "pixel_mean": pixel_stats.mean if pixel_stats else None,  # a backbone scales as it was pretrained
        "pixel_variance": pixel_stats.variance if pixel_stats else None,
        **plan.describe(),
        **fit.loop,
    }
    if plan.custom_loop:  # the same on every worker when the replicas stayed in sync
        summary["weights_sha256"] = weights_digest(model)
    if not plan.is_chief:
        summary["role"] = f"worker {plan.rank} of {plan.workers}"
    return summary


def _raise_if_interrupted(fit: FitResult, ctrl_c, summary: dict, where: str) -> None:
    if fit.interrupted:
        raise TrainingInterrupted(
            f"training interrupted after {summary['epochs_run']} epoch(s); the best model so far (epoch {summary['best_epoch']}) {where}"
        )
    if ctrl_c.pressed:  # after the last batch, as the folder was written: settings.json says not interrupted
        raise TrainingInterrupted(
            f"interrupted after training had finished; the complete model ({summary['epochs_run']} epoch(s), "
            f"best epoch {summary['best_epoch']}) {where}"
        )


def weights_digest(model) -> str:
    """sha256 of the float32 weights: equal on every worker that trained in sync."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    return digest.hexdigest()
