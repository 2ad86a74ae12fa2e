"""What a frozen network computed from each prepared image, kept by the image's content.

`cached_rows(folder, X, compute)` returns `compute`'s output for every row of the uint8 array
`X`, computing it only for rows whose bytes it has not seen: each row is keyed by the BLAKE3
digest of its pixels and shape, so a re-run of train, a resumed one, an audit, or a prepare
that changed a few files finds the rest where it left them. `folder` names what computed
them (the backbone, where it was cut, the input shape): train --backbone passes one under
prepare's cache folder (data_dir/../.cache/features/...).

On disk: keys.npy (N x 32 uint8 digests) and values.npy (N x ... float16: half the space,
and a pretrained network's activations need no more), written together atomically (both
in a new folder swapped in whole), loaded without pickle. The newest rows are kept up to
`limit_bytes`; older ones go first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np

from pipeline.core import progress
from pipeline.core.artifacts import atomic_dir

KEYS, VALUES = "keys.npy", "values.npy"
DEFAULT_LIMIT = 2 * 2**30  # 2 GiB of features per backbone and input shape


def row_keys(X: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, 32) uint8: each row's digest, its shape included."""
    shape = repr(tuple(X.shape[1:])).encode()
    keys = np.empty((len(X), 32), np.uint8)
    for start in range(0, len(X), batch):
        rows = np.ascontiguousarray(X[start : start + batch])
        for i, row in enumerate(rows):
            keys[start + i] = np.frombuffer(blake3.blake3(shape + row.tobytes()).digest(), np.uint8)
    return keys


def _load(folder: Path):
    try:
        keys = np.load(folder / KEYS, allow_pickle=False)
        values = np.load(folder / VALUES, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if keys.ndim != 2 or keys.shape[1] != 32 or len(values) != len(keys):
        return None  # a pair from two writes, or damaged: computed again
    return keys, values


def cached_rows(
    folder: Path,
    X: np.ndarray,
    compute: Callable[[np.ndarray], np.ndarray],
    batch: int = 32,
    description: str = "features",
    limit_bytes: int = DEFAULT_LIMIT,
) -> tuple[np.ndarray, int]:
    """(float16 values of every row of `X`, how many rows were computed now)."""
    folder = Path(folder)
    keys = row_keys(X)
    stored = _load(folder)
    index = {bytes(k): i for i, k in enumerate(stored[0])} if stored is not None else {}
    where = np.array([index.get(bytes(k), -1) for k in keys], dtype=np.int64)
    missing = np.flatnonzero(where < 0)
    # rows that are the same picture twice are computed once
    _, first = np.unique(keys[missing], axis=0, return_index=True) if len(missing) else (None, np.array([], int))
    todo = missing[np.sort(first)]
    computed = []
    for start in progress.track(range(0, len(todo), batch), -(-len(todo) // batch), description):
        rows = todo[start : start + batch]
        computed.append(np.asarray(compute(np.ascontiguousarray(X[np.sort(rows)])), dtype=np.float16))
    if len(todo):
        new_values = np.concatenate(computed)
        new_keys = keys[np.sort(todo)]
    if stored is None:
        out_shape = new_values.shape[1:] if len(todo) else None
    else:
        out_shape = stored[1].shape[1:]
    if out_shape is None:  # X is empty
        return np.zeros((0,), np.float16), 0
    values = np.empty((len(X), *out_shape), np.float16)
    hit = where >= 0
    if hit.any():
        values[hit] = stored[1][where[hit]]
    if len(todo):
        position = {bytes(k): i for i, k in enumerate(new_keys)}
        for row in missing:
            values[row] = new_values[position[bytes(keys[row])]]
        _store(folder, stored, new_keys, new_values, limit_bytes)
    return values, len(todo)


def _store(folder: Path, stored, new_keys: np.ndarray, new_values: np.ndarray, limit_bytes: int) -> None:
    """The old rows then the new ones, the oldest dropped beyond `limit_bytes`; both files swapped in."""
    if stored is not None and stored[1].shape[1:] == new_values.shape[1:]:
        keys = np.concatenate([stored[0], new_keys])
        values = np.concatenate([np.asarray(stored[1]), new_values])
    else:
        keys, values = new_keys, new_values
    row_bytes = max(1, values[0].nbytes if len(values) else 1)
    keep = max(len(new_keys), limit_bytes // row_bytes)
    keys, values = keys[-keep:], values[-keep:]
    try:
        with atomic_dir(folder) as tmp:  # both files swapped in together, never one without the other
            np.save(tmp / KEYS, keys, allow_pickle=False)
            np.save(tmp / VALUES, values, allow_pickle=False)
    except OSError as e:  # a cache that cannot be written costs time, never the run
        progress.say(
            f"note: the features could not be cached in {folder} ({e.strerror or e}); they are computed again next time"
        )
