"""Learning-rate schedules, inside the optimizer: any loop that steps it follows them.

`OneCycle` is fastai's `fit_one_cycle` shape over a known number of steps: a cosine
warm-up from peak/div to the peak over the first `warmup` share of the steps, then a cosine
decay to peak/final_div at the last step. Large rates early move fast; the small rates at
the end settle the weights, so the last epochs give the accuracy that a constant rate
needs many more epochs (or a smaller batch) to reach. `RangeTest` is the exponential sweep
of `train --find-lr`. Both are Keras `LearningRateSchedule`s, called with the optimizer's
step counter, so `model.fit` and a custom training step (`optimizer.apply`) use them
alike, and both save with the model (`get_config`).
"""

from __future__ import annotations

import math

from pipeline.core.native_stderr import import_keras

keras = import_keras()
ops = keras.ops


@keras.saving.register_keras_serializable(package="pipeline")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine warm-up to `peak` over `warmup` of `total_steps`, then cosine decay to peak/final_div."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.25, div: float = 25.0, final_div: float = 1e4):
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup = float(warmup)
        self.div = float(div)
        self.final_div = float(final_div)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = max(self.warmup * self.total_steps, 1.0)
        down = max(self.total_steps - up, 1.0)
        start, end = self.peak / self.div, self.peak / self.final_div
        # cosine from a to b as t goes 0 -> 1: b + (a - b) * (1 + cos(pi t)) / 2
        t_up = ops.clip(step / up, 0.0, 1.0)
        t_down = ops.clip((step - up) / down, 0.0, 1.0)
        warming = self.peak + (start - self.peak) * (1 + ops.cos(math.pi * t_up)) / 2
        cooling = end + (self.peak - end) * (1 + ops.cos(math.pi * t_down)) / 2
        return ops.where(step < up, warming, cooling)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup": self.warmup,
            "div": self.div,
            "final_div": self.final_div,
        }


@keras.saving.register_keras_serializable(package="pipeline")
class RangeTest(keras.optimizers.schedules.LearningRateSchedule):
    """The LR range test's sweep: from `start` at step 0 to `end` at `steps`, exponentially."""

    def __init__(self, start: float, end: float, steps: int):
        self.start, self.end, self.steps = float(start), float(end), max(int(steps), 1)

    def __call__(self, step):
        t = ops.cast(step, "float32") / self.steps
        return self.start * ops.power(self.end / self.start, t)

    def get_config(self) -> dict:
        return {"start": self.start, "end": self.end, "steps": self.steps}
