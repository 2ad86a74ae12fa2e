"""The training loop for more than one replica: several GPUs, or several workers (TF_CONFIG).

Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585,
tensorflow/tensorflow#72388), so this is the custom step that works: `strategy.run` with a
GradientTape, the model and optimizer built in `strategy.scope()`, the gradients all-reduced
(summed) by the Keras optimizer's own `apply` across every replica. It drives the SAME
Keras callbacks as `fit` does in fit.py (early stopping with the best weights kept,
NaN stop, history.csv, the epoch lines), through a CallbackList, and uses the compiled
optimizer, so its learning-rate schedule, whatever it is, applies here too.

Data: worker w of W reads only its contiguous share of the training rows from the memory
map (in memory when it fits), reshuffled every epoch and wrapped round to the same length
on every worker, so that every worker runs the same number of steps. `--batch-size` is the
global batch: each of the R replicas takes ceil(batch / R) rows a step. Validation is
sharded the same way and its sums all-reduced, so every worker sees the same validation
loss and makes the same early-stopping decision.

Stopping: Ctrl-C or SIGTERM on any worker is noted, not raised, and travels with the
next all-reduce as a flag, so every worker stops after the same step and the chief keeps
the best model so far. A worker that dies or stops answering fails the next all-reduce
(heartbeats and collective timeouts, see distribute.py): the others stop with one line.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_keras, import_tensorflow
from pipeline.training.batches import example_weights, row_gatherer
from pipeline.training.distribute import lost_peer_message, sum_across_workers


def shard_bounds(n_rows: int, shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index`: contiguous, sizes differing by at most one."""
    return index * n_rows // shards, (index + 1) * n_rows // shards


def steps_per_epoch(n_rows: int, workers: int, local_replicas: int, per_replica_batch: int) -> int:
    """Steps an epoch takes on every worker: the largest share in full per-replica batches."""
    largest_share = math.ceil(n_rows / workers)
    return max(1, math.ceil(largest_share / (local_replicas * per_replica_batch)))


def epoch_rows(share: int, length: int, seed: int, worker: int, epoch: int) -> np.ndarray:
    """This worker's row order for one epoch: its share shuffled, wrapped round to `length`."""
    order = np.random.default_rng([seed, worker, epoch]).permutation(share)
    return np.resize(order, length)  # repeats the first rows when the share is shorter


@dataclass(frozen=True)
class Layout:
    """How the global batch spreads over the replicas, and the steps of an epoch."""

    replicas: int  # over every worker
    local: int  # replicas in this process
    per_replica: int  # rows each replica takes a step
    steps: int  # steps an epoch, the same on every worker

    @property
    def global_batch(self) -> int:
        return self.per_replica * self.replicas

    @classmethod
    def of(cls, batch_size: int, replicas: int, workers: int, n_rows: int) -> Layout:
        local = replicas // workers
        per_replica = max(1, math.ceil(batch_size / replicas))
        return cls(replicas, local, per_replica, steps_per_epoch(n_rows, workers, local, per_replica))


def fit_replicated(
    model,
    data,
    settings,
    plan,
    callbacks,
    ctrl_c,
    in_memory_bytes: int,
    has_val: bool,
    class_weights=None,
    weighted_from: int = 0,
    checkpoints=None,
    restore=None,
):
    """Train like `model.fit`, under `plan.strategy`; returns (True when a signal on any worker
    stopped it, what settings.json records of the loop). `class_weights` (one per class, or
    None) weigh each example's loss from epoch `weighted_from` (0-based) on, as fit's path
    does: the weighted sum over the global batch, divided by the global batch. `restore` puts
    the chief's checkpoint into every worker's model (training.checkpoints); the epochs then
    start after the ones it had done."""
    keras = import_keras()
    tf = import_tensorflow()
    layout = Layout.of(settings.batch_size, plan.replicas, plan.workers, len(data.X_train))
    start, stop = shard_bounds(len(data.X_train), plan.workers, plan.rank)
    X_share, y_share = data.X_train[start:stop], data.y_train[start:stop]
    in_memory = X_share.nbytes <= in_memory_bytes
    weight_table = None if class_weights is None else tf.constant(np.asarray(class_weights, dtype=np.float32))
    if not model.optimizer.built:  # its slots made here, not on the step's first call, where the
        with plan.strategy.scope():  # variable-creating trace failed under MirroredStrategy
            model.optimizer.build(model.trainable_variables)
    if restore is not None:
        restore()  # every worker takes part: the chief's state reaches them all
    start = checkpoints.start_epoch if checkpoints is not None else 0
    stopped = checkpoints is not None and checkpoints.resumed is not None and checkpoints.resumed.stopped
    iterator = _shard_iterator(plan, X_share, y_share, in_memory, layout, settings, start)
    train_step = _train_step(model, plan.strategy, layout, weight_table)
    val_start, val_stop = shard_bounds(len(data.X_val), plan.workers, plan.rank)
    validation = (data.X_val[val_start:val_stop], data.y_val[val_start:val_stop]) if has_val else None
    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=False,
        add_progbar=False,
        model=model,
        epochs=settings.epochs,
        steps=layout.steps,
        verbose=0,
    )
    with _signals_noted(ctrl_c):
        signalled = False if stopped else _run_epochs(
            model, plan.strategy, callback_list, iterator, train_step, _val_step(model, weight_table), validation,
            layout, settings, ctrl_c, weighted_from, start,
        )  # fmt: skip
    return signalled, {
        "global_batch": layout.global_batch,
        "per_replica_batch": layout.per_replica,
        "steps_per_epoch": layout.steps,
        "train_rows_this_worker": len(X_share),
        "input": "memory (tf.data), this worker's share" if in_memory else "memory-mapped batches, this worker's share",
    }


def _shard_iterator(plan, X_share, y_share, in_memory: bool, layout: Layout, settings, start_epoch: int = 0):
    """This worker's rows, reshuffled every epoch, as per-replica batches of the distributed dataset."""
    tf = import_tensorflow()
    per_epoch = layout.steps * layout.local * layout.per_replica

    def dataset_fn(input_context):
        def rows(epoch):
            order = epoch_rows(len(X_share), per_epoch, settings.seed, plan.rank, int(epoch))
            return order.reshape(-1, layout.per_replica).astype(np.int64)

        index = (
            tf.data.Dataset.range(start_epoch, max(settings.epochs, start_epoch + 1))
            .map(
                lambda e: tf.ensure_shape(
                    tf.numpy_function(rows, [e], tf.int64, stateful=False), [None, layout.per_replica]
                )
            )
            .unbatch()
            # endless (the loop counts the steps), so the distributed iterator needs no
            # partial-batch handling: its get_next-as-optional cond failed under MirroredStrategy
            .repeat()
        )
        return index.map(row_gatherer(X_share, y_share, in_memory)).prefetch(2)

    return iter(plan.strategy.distribute_datasets_from_function(dataset_fn))


def _train_step(model, strategy, layout: Layout, weight_table):
    """The traced step: every replica's gradient step, and the all-reduced (loss sum, correct,
    examples, weight sum, stop flag)."""
    keras = import_keras()
    tf = import_tensorflow()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="none")
    optimizer = model.optimizer

    def replica_step(batch, stop_flag, weights_on):
        images, labels = batch
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example = loss_fn(labels, probabilities)
            weight = tf.ones_like(labels, dtype=tf.float32)
            if weight_table is not None:  # per-example weights, as batches.with_class_weights gives fit
                weight = example_weights(weight_table, labels, weights_on)
                per_example = per_example * tf.cast(weight, per_example.dtype)
            loss = tf.reduce_sum(per_example) / layout.global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / layout.replicas
            scaled = optimizer.scale_loss(loss)  # LossScaleOptimizer under mixed float16; else as is
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)  # all-reduces (sums) the gradients
        correct = tf.cast(tf.equal(tf.argmax(probabilities, -1), labels), tf.float32)
        stats = tf.stack(  # the accuracy weighted as fit weighs its metrics: over the weights
            [
                tf.reduce_sum(tf.cast(per_example, tf.float32)),
                tf.reduce_sum(correct * weight),
                tf.cast(tf.size(labels), tf.float32),
                tf.reduce_sum(weight),
                stop_flag / layout.local,
            ]
        )
        return tf.distribute.get_replica_context().all_reduce("SUM", stats)

    @tf.function
    def train_step(iterator, stop_flag, weights_on):
        per_replica_stats = strategy.run(replica_step, args=(next(iterator), stop_flag, weights_on))
        return strategy.experimental_local_results(per_replica_stats)[0]

    return train_step


def _val_step(model, weight_table):
    """(loss sum, correct, examples, weight sum) of one validation batch: with class weights,
    every epoch's loss and accuracy weighted as fit's path weighs them (the loss over the
    examples, the accuracy over the weights)."""
    keras = import_keras()
    tf = import_tensorflow()

    @tf.function
    def val_step(images, labels):
        probabilities = model(images, training=False)
        per_example = tf.cast(keras.losses.sparse_categorical_crossentropy(labels, probabilities), tf.float32)
        weight = tf.ones_like(per_example) if weight_table is None else example_weights(weight_table, labels, True)
        correct = tf.cast(tf.equal(tf.argmax(probabilities, -1), labels), tf.float32)
        return tf.stack(
            [
                tf.reduce_sum(per_example * weight),
                tf.reduce_sum(correct * weight),
                tf.cast(tf.size(labels), tf.float32),
                tf.reduce_sum(weight),
            ]
        )

    return val_step


def _run_epochs(
    model,
    strategy,
    callback_list,
    iterator,
    train_step,
    val_step,
    validation,
    layout,
    settings,
    ctrl_c,
    weighted_from,
    start_epoch=0,
) -> bool:
    """The epochs, driving the callbacks as fit does; True when a signal on some worker stopped them."""
    tf = import_tensorflow()
    model.stop_training = False
    signalled = False
    callback_list.on_train_begin()
    for epoch in range(start_epoch, settings.epochs):
        callback_list.on_epoch_begin(epoch)
        totals, whole = np.zeros(4), True
        weights_on = tf.constant(epoch >= weighted_from)
        for step in range(layout.steps):
            callback_list.on_train_batch_begin(step)
            flag = tf.constant(1.0 if ctrl_c.pressed else 0.0)
            stats = _collective(
                lambda f=flag, w=weights_on: train_step(iterator, f, w).numpy(), f"training epoch {epoch + 1}"
            )
            totals += stats[:4]
            logs = {"loss": float(totals[0] / totals[2]), "accuracy": float(totals[1] / totals[3])}
            callback_list.on_train_batch_end(step, logs)
            if stats[4] > 0:  # a signal on some worker: every worker stops after this same step
                signalled, whole = True, step == layout.steps - 1
                break
            if model.stop_training:  # TerminateOnNaN: the loss is global, so every worker agrees
                break
        if not whole:
            break  # an unfinished epoch is left out of the history, as fit leaves it
        if validation is not None:
            sums = _validate(strategy, val_step, *validation, settings.batch_size, layout.local, ctrl_c, epoch)
            signalled = signalled or bool(sums[4] > 0)
            logs = {**logs, "val_loss": float(sums[0] / sums[2]), "val_accuracy": float(sums[1] / sums[3])}
        callback_list.on_epoch_end(epoch, logs)
        if signalled or model.stop_training:
            break
    callback_list.on_train_end()
    return signalled


def _validate(strategy, val_step, X_val, y_val, batch_size: int, local: int, ctrl_c, epoch: int) -> np.ndarray:
    """This worker's validation sums, and a stop flag, summed over every worker."""
    tf = import_tensorflow()
    sums = np.zeros(5)
    for images, labels in _val_batches(X_val, y_val, batch_size):
        sums[:4] += val_step(tf.constant(images), tf.constant(labels)).numpy()
    sums[4] = 1.0 if ctrl_c.pressed else 0.0
    return _collective(lambda: sum_across_workers(strategy, sums, local), f"validating epoch {epoch + 1}")


def _val_batches(X, y, batch_size: int):
    for start in range(0, len(X), batch_size):
        yield np.asarray(X[start : start + batch_size]), np.asarray(y[start : start + batch_size], dtype=np.int64)


def _collective(call, what: str):
    """Run one step that all-reduces; a lost or silent peer becomes one PipelineError line."""
    tf = import_tensorflow()
    try:
        return call()
    except tf.errors.OpError as e:  # Unavailable, DeadlineExceeded, Aborted, Cancelled... as the peer failed
        raise PipelineError(lost_peer_message(e, what)) from None


@contextlib.contextmanager
def _signals_noted(ctrl_c):
    """Ctrl-C and SIGTERM only note the stop (it reaches the other workers with the next
    all-reduce); a second Ctrl-C raises at once. TensorFlow's own SIGTERM handler, installed
    with the cluster's server, is set aside for the loop."""

    def note(signum, frame):
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        ctrl_c.pressed = True

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, note)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
