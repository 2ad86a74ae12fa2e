"""Feeding the training split to the model, and class weights: what both training paths share.

`batches` is the tf.data stream fit trains on (shuffled row indices, a gather per batch,
prefetch); `row_gatherer` is its gather, used by the replicated loop's shards too.
`class_weights`, `class_weights_from_epoch`, `with_class_weights` and `example_weights`
are `--class-weight balanced`, the same numbers in fit's batches and in the custom step.
`in_memory_bytes` is how much of the data may be copied into memory.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.core.native_stderr import import_tensorflow


def class_weights(y_train: np.ndarray, num_classes: int) -> np.ndarray:
    """`--class-weight balanced`: n / (classes x count) per class, from the training split's
    counts (augmented copies included, as fit sees them), so every class weighs the same in
    the loss; a class with no training image gets 0 (it has nothing to weigh)."""
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return np.round(weights, 6)


def class_weights_from_epoch(epochs: int) -> int:
    """The 0-based epoch from which the class weights weigh the training loss: the second half
    of the budget (deferred re-weighting, as in Cao et al. 2019, "LDAM-DRW"); the validation
    loss that picks the best epoch is weighted in every epoch, and early stopping starts
    watching it at this epoch. Weighted from the first step, the short one-cycle budget spent
    its high-rate epochs on the rare classes' heavy, noisy examples: on the letters with three classes cut to a tenth, 6 epochs, macro F1 fell
    from 0.81-0.85 unweighted to 0.74-0.75; deferred, it was 0.84-0.86 (bench/RESULTS.md)."""
    return epochs // 2


def with_class_weights(dataset, weights: np.ndarray, from_step: int):
    """`dataset`'s (images, labels) batches as (images, labels, per-example weights): each
    example's class weight from batch `from_step` on (0: every batch), 1 before. By the
    batch's position, not a flag set by a callback, so what prefetching has read ahead
    cannot get the other weights."""
    table = import_tensorflow().constant(np.asarray(weights, dtype=np.float32))

    def add_weights(step, batch):
        images, labels = batch
        return images, labels, example_weights(table, labels, step >= from_step)

    return dataset.enumerate().map(add_weights)


def example_weights(table, labels, weighted):
    """Each example's class weight from `table` where `weighted` (a boolean tensor) holds, 1
    where it does not: what fit's batches carry and what the custom step weighs its loss by."""
    tf = import_tensorflow()
    weight = tf.gather(table, labels)
    return tf.where(weighted, weight, tf.ones_like(weight))


def in_memory_bytes(limit_mb: int) -> int:
    return limit_mb * 2**20 if limit_mb >= 0 else available_memory() // 2


def available_memory() -> int:
    """The memory the kernel says it can give without swapping (MemAvailable); 4 GiB where it does not say."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    except (OSError, StopIteration, ValueError):
        return 4 * 2**30


def row_gatherer(X, y, in_memory: bool):
    """A tf.data map function: a batch of row indices -> (uint8 images, int64 labels), gathered
    from one uint8 copy of the rows in memory, or read from the memory map (ascending rows)."""
    tf = import_tensorflow()
    if in_memory:
        images, labels = tf.constant(np.asarray(X)), tf.constant(np.asarray(y, dtype=np.int64))
        return lambda i: (tf.gather(images, i), tf.gather(labels, i))

    def read(i):
        i = np.sort(i)  # ascending reads from the memory map
        return np.asarray(X[i]), np.asarray(y[i], dtype=np.int64)

    def gather(i):
        images, labels = tf.numpy_function(read, [i], (tf.uint8, tf.int64), stateful=False)
        images.set_shape((None, *X.shape[1:]))
        labels.set_shape((None,))
        return images, labels

    return gather


def batches(X, y, batch_size: int, seed: int, shuffle: bool, in_memory: bool, skip_epochs: int = 0):
    """(dataset, steps per epoch): batches of uint8 pixels and integer labels, endlessly.

    The pipeline shuffles row indices (not images), reshuffled every epoch, and gathers each
    batch while the previous one trains: from one uint8 copy of the rows in memory, or
    from the memory map, where only the batch being read is in memory, so arrays larger
    than memory train too. It repeats, and fit counts epochs in steps: one iterator for
    the whole run, because making a new one every epoch stalled the epoch's first batch
    by up to 2.5 s here (measured on the bench arrays); Keras still remakes the validation
    iterator every epoch, hence no autotuner (below). `skip_epochs` (a resumed run) skips the
    row indices of the epochs done, before any image is gathered: the same seeded orders follow.
    """
    tf = import_tensorflow()
    rows = tf.data.Dataset.range(len(X))
    if shuffle:
        rows = rows.shuffle(len(X), seed=seed, reshuffle_each_iteration=True)
    steps = math.ceil(len(X) / batch_size)
    rows = rows.batch(batch_size).repeat().skip(skip_epochs * steps)
    dataset = rows.map(row_gatherer(X, y, in_memory), num_parallel_calls=1).prefetch(2)
    options = tf.data.Options()
    # tf.data's autotuner, when the validation iterator was remade each epoch, sometimes
    # stalled the run for ~2 s with the CPU idle; a fixed prefetch of 2 batches is enough.
    options.autotune.enabled = False
    return dataset.with_options(options), steps
