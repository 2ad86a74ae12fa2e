"""A checkpoint at every epoch end, and `train --resume` continuing from the last one.

Writes `.NAME.checkpoint/` beside the model folder `--out` (a sibling, so the model folder
only ever appears complete), replaced atomically (core.artifacts.atomic_dir) at every
epoch end by the chief alone:

- state.npz: every model variable (the dropout seed generators' state included), every
  optimizer variable (Adam's moments and its iteration count, which the one-cycle schedule
  follows), and early stopping's best weights;
- state.json: the epochs done, whether early stopping had stopped, its best value, best
  epoch and wait, history.csv so far, and the fingerprint of the data folder and of the
  settings that shape the run (`fingerprint`).

The shuffling needs nothing saved: fit's stream is seeded and skipped past the epochs
done (training.batches), the replicated loop's order is a function of (seed, worker,
epoch). Resuming is asked for (`--resume`), never automatic: a run started again without
it starts over and says that a checkpoint was there, because a user who reruns
`pipeline train` may mean a fresh run; a Kubernetes Job passes `--resume` every time
(with no checkpoint it starts from epoch 1). A checkpoint from other data or other
settings is refused with one line. Under TF_CONFIG the chief reads its checkpoint and
sends the state to every worker through one all-reduce, so a restarted worker needs no
copy of its own. The checkpoint is removed once the model folder is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths, progress
from pipeline.core.artifacts import atomic_dir, atomic_write_text, clean_stale
from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_keras

STATE_ARRAYS, STATE_JSON = "state.npz", "state.json"
VERSION = 1
# What a resumed run may change: they do not shape the weights
UNSHAPING = ("resume", "tensorboard", "in_memory_mb")
DATA_FILES = (paths.CLASSES_FILE, paths.PREPARE_REPORT_FILE, paths.MANIFEST_FILE, "y_train.npy", "y_val.npy")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir).parent / f".{Path(out_dir).name}.checkpoint"


def fingerprint(data_dir: Path, settings, workers: int) -> dict:
    """What makes two runs the same run: the data folder (its small files whole, the image
    arrays by size: prepare writes all of them together) and every setting that shapes the weights."""
    digest = hashlib.sha256()
    for name in DATA_FILES + (paths.images_file("train"), paths.images_file("val")):
        path = Path(data_dir) / name
        digest.update(name.encode())
        if name.startswith("X_"):
            digest.update(str(path.stat().st_size if path.is_file() else -1).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    shaping = {k: v for k, v in dataclasses.asdict(settings).items() if k not in UNSHAPING}
    return {
        "data": digest.hexdigest(),
        "settings": {**shaping, "workers": workers},
    }


@dataclass
class State:
    """Everything an epoch end leaves that the next epoch needs."""

    epochs_done: int
    stopped: bool  # early stopping (or a NaN) had ended the run
    best: float | None
    best_epoch: int  # 0-based, as EarlyStopping counts
    wait: int
    history: str  # history.csv's text so far
    variables: list[np.ndarray]  # model.variables
    optimizer: list[np.ndarray]  # model.optimizer.variables
    best_weights: list[np.ndarray] | None  # model.get_weights() at the best epoch


class Checkpoints:
    """This run's checkpoint folder: what it resumes from (`resumed`), and the writer of new ones."""

    def __init__(self, out_dir: Path, print_as: dict, writes: bool, resumed: State | None):
        self.folder = checkpoint_dir(out_dir)
        self.print_as = print_as
        self.writes = writes
        self.resumed = resumed
        self.seconds = 0.0  # spent writing checkpoints

    @property
    def start_epoch(self) -> int:
        return self.resumed.epochs_done if self.resumed else 0

    def callback(self, early_stopping, history_path: Path):
        """The callback, last in the list, that writes the checkpoint at each epoch end."""
        return _epoch_checkpoint(self, early_stopping, Path(history_path))

    def restore(self, model, early_stopping, history_path: Path, plan=None) -> None:
        """Put the resumed state into the (built) model, its optimizer, early stopping and
        history.csv. In a cluster every worker calls this: the chief's state reaches them all."""
        if plan is not None and plan.workers > 1:
            self.resumed = _shared_by_chief(self.resumed, model, plan)
        state = self.resumed
        if state is None:
            return
        for variable, value in zip(model.variables, state.variables):
            variable.assign(value)
        for variable, value in zip(model.optimizer.variables, state.optimizer):
            variable.assign(value)
        set_early_stopping(early_stopping, state)
        Path(history_path).write_bytes(state.history.encode("utf-8"))

    def write(self, model, early_stopping, history_path: Path, epochs_done: int) -> None:
        if not self.writes:
            return
        started = time.perf_counter()
        state = State(
            epochs_done=epochs_done,
            stopped=bool(model.stop_training),
            best=None if early_stopping.best is None else float(early_stopping.best),
            best_epoch=int(early_stopping.best_epoch),
            wait=int(early_stopping.wait),
            history=history_path.read_bytes().decode("utf-8") if history_path.is_file() else "",  # CRLF kept
            variables=[np.asarray(v.numpy()) for v in model.variables],
            optimizer=[np.asarray(v.numpy()) for v in model.optimizer.variables],
            best_weights=early_stopping.best_weights,
        )
        with atomic_dir(self.folder) as tmp:
            arrays = {f"v{i}": a for i, a in enumerate(state.variables)}
            arrays |= {f"o{i}": a for i, a in enumerate(state.optimizer)}
            arrays |= {f"b{i}": np.asarray(a) for i, a in enumerate(state.best_weights or [])}
            np.savez(tmp / STATE_ARRAYS, **arrays)
            scalars = {k: getattr(state, k) for k in ("epochs_done", "stopped", "best", "best_epoch", "wait")}
            record = {"version": VERSION, "fingerprint": self.print_as, **scalars, "history": state.history}
            record["arrays"] = [len(state.variables), len(state.optimizer), len(state.best_weights or [])]
            atomic_write_text(tmp / STATE_JSON, json.dumps(record, indent=1) + "\n")
        self.seconds += time.perf_counter() - started

    def remove(self) -> None:
        """The model folder is complete: its checkpoint has served (the chief's alone)."""
        if self.writes:
            shutil.rmtree(self.folder, ignore_errors=True)


def set_early_stopping(early_stopping, state: State) -> None:
    early_stopping.best = state.best
    early_stopping.best_epoch = state.best_epoch
    early_stopping.wait = state.wait
    early_stopping.best_weights = state.best_weights


def open_checkpoints(out_dir: Path, print_as: dict, resume: bool, is_chief: bool) -> Checkpoints:
    """This run's checkpoints: on the chief, what `--resume` continues from (said on stderr),
    a foreign checkpoint refused with one line, and what killed runs left beside `out_dir` removed."""
    out_dir = Path(out_dir)
    if not is_chief:
        return Checkpoints(out_dir, print_as, writes=False, resumed=None)
    for left in clean_stale(out_dir) + clean_stale(checkpoint_dir(out_dir)):
        progress.say(f"note: removed {left.name}, the unfinished folder a killed run left beside {out_dir.name}")
    folder = checkpoint_dir(out_dir)
    try:
        found = _read_record(folder)
    except PipelineError:
        if resume:
            raise
        found = {"epochs_done": "?"}  # unreadable: starting over replaces it
    if found is None:
        if resume:
            progress.say(f"--resume: no checkpoint at {folder}: training from the first epoch")
        return Checkpoints(out_dir, print_as, writes=True, resumed=None)
    if not resume:
        progress.say(
            f"note: {folder} holds an unfinished run ({found['epochs_done']} epoch(s) done): starting over, "
            "which replaces it; `train --resume` continues from it"
        )
        return Checkpoints(out_dir, print_as, writes=True, resumed=None)
    _refuse_if_foreign(folder, found["fingerprint"], print_as)
    state = _read_state(folder, found)
    progress.say(
        f"resuming after epoch {state.epochs_done} of {print_as['settings']['epochs']} from {folder} "
        "(--resume; the same data and settings)"
    )
    return Checkpoints(out_dir, print_as, writes=True, resumed=state)


def _read_record(folder: Path) -> dict | None:
    path = folder / STATE_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"the checkpoint {path} is unreadable ({e}); remove {folder} to start over") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        raise PipelineError(f"{folder} is not a checkpoint this version of train wrote; remove it to start over")
    return record


def _refuse_if_foreign(folder: Path, theirs: dict, ours: dict) -> None:
    hint = f"remove {folder}, or train without --resume to start over"
    if theirs.get("data") != ours["data"]:
        raise PipelineError(
            f"refusing to resume from {folder}: it was made from other data (the data folder differs); {hint}"
        )
    changed = [
        f"{key} {theirs['settings'].get(key)!r} there, {value!r} here"
        for key, value in ours["settings"].items()
        if theirs.get("settings", {}).get(key) != value
    ]
    if changed:
        raise PipelineError(
            f"refusing to resume from {folder}: it was made with other settings ({'; '.join(changed)}); {hint}"
        )


def _read_state(folder: Path, record: dict) -> State:
    n_vars, n_opt, n_best = record["arrays"]
    try:
        with np.load(folder / STATE_ARRAYS, allow_pickle=False) as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, EOFError) as e:
        raise PipelineError(f"the checkpoint {folder / STATE_ARRAYS} is unreadable ({e}); remove {folder}") from None
    return State(
        epochs_done=int(record["epochs_done"]),
        stopped=bool(record["stopped"]),
        best=record["best"],
        best_epoch=int(record["best_epoch"]),
        wait=int(record["wait"]),
        history=record["history"],
        variables=[loaded[f"v{i}"] for i in range(n_vars)],
        optimizer=[loaded[f"o{i}"] for i in range(n_opt)],
        best_weights=[loaded[f"b{i}"] for i in range(n_best)] or None,
    )


def _shared_by_chief(state: State | None, model, plan) -> State | None:
    """The chief's state on every worker: two all-reduces, of (found, the scalars, the history's
    length), then of every array and the history's bytes flattened, the chief's values and zeros
    from the others. float64 holds the float32 weights and the integer counters exactly."""
    from pipeline.training.distribute import sum_across_workers

    local = plan.replicas // plan.workers
    like = list(model.variables) + list(model.optimizer.variables) + model.get_weights()
    shapes, sizes = [tuple(v.shape) for v in like], [int(np.prod(v.shape)) for v in like]
    mine = state if plan.is_chief else None
    history = np.frombuffer(mine.history.encode("utf-8"), dtype=np.uint8) if mine else np.zeros(0, np.uint8)
    header = np.zeros(7)
    if mine is not None:
        best = np.inf if mine.best is None else mine.best
        header[:] = [1, mine.epochs_done, mine.stopped, best, mine.best_epoch, mine.wait, len(history)]
    header = sum_across_workers(plan.strategy, header, local)
    if header[0] == 0:
        return None
    flat = np.zeros(sum(sizes) + int(header[6]))
    if mine is not None:
        best_weights = mine.best_weights or [np.zeros(s) for s in shapes[-len(model.weights) :]]
        arrays = mine.variables + mine.optimizer + best_weights + [history]
        flat = np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
    pieces = np.split(sum_across_workers(plan.strategy, flat, local), np.cumsum(sizes))
    arrays = [p.reshape(s).astype(_numpy_dtype(v.dtype)) for p, s, v in zip(pieces, shapes, like)]
    n_vars, n_opt = len(model.variables), len(model.optimizer.variables)
    best = float(header[3]) if np.isfinite(header[3]) else None
    return State(
        epochs_done=int(header[1]),
        stopped=bool(header[2]),
        best=best,
        best_epoch=int(header[4]),
        wait=int(header[5]),
        history=pieces[-1].astype(np.uint8).tobytes().decode("utf-8"),
        variables=arrays[:n_vars],
        optimizer=arrays[n_vars : n_vars + n_opt],
        best_weights=arrays[n_vars + n_opt :] if best is not None else None,
    )


def _numpy_dtype(dtype):
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _epoch_checkpoint(checkpoints: Checkpoints, early_stopping, history_path: Path):
    """The Keras callback (made here: train imports this module before Keras loads)."""

    class EpochCheckpoint(import_keras().callbacks.Callback):
        """Restores early stopping after its own reset at train begin; writes at each epoch end."""

        def on_train_begin(self, logs=None):
            if checkpoints.resumed is not None:  # EarlyStopping.on_train_begin has just reset it
                set_early_stopping(early_stopping, checkpoints.resumed)

        def on_epoch_end(self, epoch, logs=None):
            checkpoints.write(self.model, early_stopping, history_path, epoch + 1)

    return EpochCheckpoint()
