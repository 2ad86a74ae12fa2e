"""TensorBoard logs for `train --tensorboard`, written with TensorFlow alone.

Keras' TensorBoard callback needs the `tensorboard` pip package even to write logs; this
one writes the same per-epoch scalars (epoch_loss, epoch_accuracy, ...) under logs/train
and logs/validation with TensorFlow's core summary writer, so `--tensorboard` works on a
bare install and `tensorboard --logdir MODEL_DIR/logs` reads them wherever it is installed.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.native import quiet_native_stderr

with quiet_native_stderr():
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2


def _scalar_metadata() -> summary_pb2.SummaryMetadata:
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
        if split not in self.writers:
            self.writers[split] = tf.summary.create_file_writer(str(self.log_dir / split))
        return self.writers[split]

    def on_epoch_end(self, epoch, logs=None):
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
