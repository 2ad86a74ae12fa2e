"""The Keras callbacks `train` adds to fit: progress on the terminal and TensorBoard logs.

Progress: live rich bars when stderr is a terminal (one for all epochs, one for the
batches of this epoch), else one line per epoch. Either way each finished epoch leaves the
same line (loss, accuracy, val loss, val accuracy, seconds), so a scrolled-back terminal
reads like a log.

TensorBoard (`train --tensorboard`): Keras' own callback needs the `tensorboard` pip
package even to write logs; `EpochScalars` writes the same per-epoch scalars
(epoch_loss, epoch_accuracy, ...) under logs/train and logs/validation with TensorFlow's
core summary writer, so `--tensorboard` works on a bare install and
`tensorboard --logdir MODEL_DIR/logs` reads them wherever it is installed.
"""

from __future__ import annotations

import atexit
import time
from pathlib import Path

from rich.progress import TextColumn

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras, import_tensorflow

keras = import_keras()

SHORT = {"loss": "loss", "accuracy": "acc", "val_loss": "val loss", "val_accuracy": "val acc"}


def epoch_summary(epoch: int, epochs: int, logs: dict, seconds: float) -> str:
    parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs]
    return f"epoch {epoch + 1}/{epochs}  " + "  ".join(parts) + f"  {seconds:.1f}s"


def short_metrics(logs: dict) -> str:
    return "  ".join(f"{SHORT[k]} {logs[k]:.4f}" for k in SHORT if k in logs)


class EpochBars(keras.callbacks.Callback):
    """Rich progress: epochs done (with time left for all of them) and batches of the current epoch."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.bars = None

    def on_train_begin(self, logs=None):
        self.bars = progress.bar(TextColumn("{task.fields[metrics]}"), transient=True)
        self.bars.start()
        atexit.register(self.close)  # an interrupted fit never calls on_train_end
        self.all_epochs = self.bars.add_task("epochs", total=self.epochs, metrics="")

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.bars.update(self.all_epochs, completed=epoch)  # a resumed run starts after the epochs done
        steps = self.params.get("steps") if self.params else None
        self.batches = self.bars.add_task(f"epoch {epoch + 1}/{self.epochs}", total=steps, metrics="")

    def on_train_batch_end(self, batch, logs=None):
        self.bars.update(self.batches, advance=1, metrics=short_metrics(logs or {}))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bars.remove_task(self.batches)
        self.bars.update(self.all_epochs, advance=1, metrics=short_metrics(logs))
        self.bars.console.print(
            epoch_summary(epoch, self.epochs, logs, time.perf_counter() - self.started), markup=False
        )

    def on_train_end(self, logs=None):
        self.close()

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None


class EpochLine(keras.callbacks.Callback):
    """One line per epoch, for logs and pipes."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        progress.say(epoch_summary(epoch, self.epochs, logs or {}, time.perf_counter() - self.started))


def epoch_progress(epochs: int) -> keras.callbacks.Callback:
    return EpochBars(epochs) if progress.enabled() else EpochLine(epochs)


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"  # what TensorBoard's scalar dashboard looks for
    return metadata


class EpochScalars(keras.callbacks.Callback):
    """Per-epoch train and validation metrics as TensorBoard scalar events."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writers: dict[str, object] = {}
        self.metadata = _scalar_metadata()

    def _writer(self, split: str):
        tf = import_tensorflow()
        if split not in self.writers:
            self.writers[split] = tf.summary.create_file_writer(str(self.log_dir / split))
        return self.writers[split]

    def on_epoch_end(self, epoch, logs=None):
        tf = import_tensorflow()
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            with self._writer(split).as_default():
                tf.summary.write(
                    f"epoch_{name}", tf.constant(float(value), tf.float32), step=epoch, metadata=self.metadata
                )
        for writer in self.writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self.writers.values():
            writer.close()
