"""train --find-lr: the learning-rate range test (Smith 2015; fastai's `lr_find`).

Reads the training split as train does; trains a fresh model for at most `STEPS` batches
while the rate grows exponentially from `START` to `END` (the `RangeTest` schedule), and
records each batch's loss. The loss, smoothed, falls slowly at tiny rates, fast at good
ones, and blows up past the usable range (the sweep stops there). The suggestion is the
rate at the smoothed loss's minimum divided by `BELOW_MINIMUM`: the steepest point of a
noisy 100-step curve moves a lot from seed to seed, the minimum much less. fastai's
`lr_min` divides by 10, for a constant rate; the suggestion here is the *peak* of a
one-cycle schedule, which warms up to it and spends most steps below it. On the letters
folder at batch 128 the minimum was near 9e-3; a tenth of it is below 2e-3, which reached
0.955 test accuracy in 10 epochs where 4e-3 reached 0.973 (see bench/RESULTS.md). Writes `lr_find.png`
(the curve, the suggestion marked) to the path given, which train puts beside the model
folder, and no model: an existing model folder is left as it was.

Under TF_CONFIG the chief alone sweeps, in one process at the global batch (the gradient of
one step is the same as the workers' all-reduced one), and writes the plot; the other
workers check TF_CONFIG, say so and exit: the sweep is 100 small steps, not worth a cluster.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import BACKBONE_PEAK_RATE, CNN, TrainSettings
from pipeline.data.data_folder import load_training_data
from pipeline.report import plots
from pipeline.training import distribute
from pipeline.training.batches import batches, in_memory_bytes
from pipeline.training.precision import build_with_precision, resolve_precision

STEPS = 100  # batches in the sweep
START, END = 1e-6, 1.0  # rates at the first and the last batch
SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
BELOW_MINIMUM = 3.0  # the suggestion: the rate at the smoothed loss's minimum over this


def find_learning_rate(data_dir: Path, plot_path: Path, settings: TrainSettings, steps: int = STEPS) -> dict:
    """Sweep, plot, suggest: {"suggestion", "steepest", "min_loss_lr", "plot", "lrs", "losses"};
    on a TF_CONFIG worker other than the chief, {"role": "worker i of n"} and nothing else."""
    settings.check()
    if settings.backbone != CNN:
        raise PipelineError(
            f"--find-lr sweeps the CNN's rate; --backbone fine-tunes at {BACKBONE_PEAK_RATE:g} unless --learning-rate says otherwise"
        )
    data = load_training_data(Path(data_dir))
    cluster = distribute.read_cluster()  # TF_CONFIG, checked before TensorFlow loads
    if cluster is not None and not cluster.is_chief:
        return {"role": f"worker {cluster.rank} of {cluster.size}"}
    progress.say("loading TensorFlow...")
    keras = import_keras()
    from pipeline.training.model import PixelStats, compile_model
    from pipeline.training.schedule import RangeTest

    keras.utils.set_random_seed(settings.seed)
    precision = resolve_precision(settings.precision)
    model = build_with_precision(data.X_train.shape[1:], len(data.classes), precision, PixelStats.of(data.X_train))
    compile_model(model, RangeTest(START, END, steps))
    in_memory = data.X_train.nbytes <= in_memory_bytes(settings.in_memory_mb)
    train_batches, _ = batches(data.X_train, data.y_train, settings.batch_size, settings.seed, True, in_memory)

    losses: list[float] = []
    smooth = Smoothed(SMOOTHING)

    def record(epoch, logs):  # one batch per "epoch": logs["loss"] is that batch's loss
        loss = float((logs or {}).get("loss", math.nan))
        losses.append(loss)
        value = smooth.add(loss)
        if not math.isfinite(value) or value > DIVERGED * smooth.lowest:
            model.stop_training = True

    progress.say(f"sweeping the learning rate from {START:g} to {END:g} over up to {steps} batches...")
    model.fit(
        train_batches,
        epochs=steps,
        steps_per_epoch=1,
        shuffle=False,  # the batches shuffle themselves, seeded
        verbose=0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=record)],
    )
    lrs = [START * (END / START) ** (i / steps) for i in range(len(losses))]
    found = suggest(lrs, losses)
    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    plots.save_lr_find(lrs, losses, found["smoothed"], found["suggestion"], Path(plot_path))
    return {**found, "plot": str(plot_path), "lrs": lrs, "losses": losses}


class Smoothed:
    """Bias-corrected exponential moving average, and the lowest value it has taken."""

    def __init__(self, beta: float):
        self.beta, self.mean, self.n, self.lowest = beta, 0.0, 0, math.inf

    def add(self, value: float) -> float:
        self.n += 1
        self.mean = self.beta * self.mean + (1 - self.beta) * value
        smoothed = self.mean / (1 - self.beta**self.n)
        if math.isfinite(smoothed):
            self.lowest = min(self.lowest, smoothed)
        return smoothed


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """The smoothed curve, the rate at its minimum, that rate / BELOW_MINIMUM (the suggestion) and the
    rate where it fell fastest (per unit of log rate) before the minimum."""
    smooth = Smoothed(SMOOTHING)
    smoothed = [smooth.add(loss) for loss in losses]
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 5:
        raise PipelineError("the learning-rate sweep had fewer than 5 finite losses: nothing to suggest")
    lowest = min(finite, key=lambda i: smoothed[i])
    before = [i for i in finite if i <= lowest]
    if len(before) >= 3:
        slope = np.gradient([smoothed[i] for i in before], [math.log(lrs[i]) for i in before])
        steepest = lrs[before[int(np.argmin(slope))]]
    else:
        steepest = lrs[lowest]
    return {
        "suggestion": lrs[lowest] / BELOW_MINIMUM,
        "steepest": steepest,
        "min_loss_lr": lrs[lowest],
        "smoothed": smoothed,
    }
