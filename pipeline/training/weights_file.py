"""A legacy PyTorch weights file (.pth, before 1.6: not a zip) read into numpy, without torch.

The file is a run of pickles: a magic number, the protocol version, the system's sizes, then
the state dict, whose tensors point (by persistent id) at storages that follow it as raw
little-endian arrays, each after an 8-byte element count, in the order of the last pickle's
list of keys. The unpickler here builds only what a state dict needs: an OrderedDict and
tensors (`torch._utils._rebuild_tensor_v2` over a `torch.*Storage`); any other class in the
file is refused, so a weights file cannot run code. The file's sha256 is checked first.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """What `torch.FloatStorage` and its kin stand for here: only their element type."""

    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Tensor:
    """A tensor waiting for its storage's bytes: (storage key, offset, shape, strides in elements)."""

    def __init__(self, storage, offset, shape, strides, *unused):
        self.key, self.dtype = storage
        self.offset, self.shape, self.strides = int(offset), tuple(shape), tuple(strides)


def _rebuild_tensor_v2(storage, offset, shape, strides, requires_grad=False, hooks=None, *rest):
    return _Tensor(storage, offset, shape, strides)


class _StateDictUnpickler(pickle.Unpickler):
    """Builds OrderedDicts, tensors and storage types; refuses every other class by name."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError("a persistent id that is not a storage")
        return str(pid[2]), pid[1].dtype


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, sha256: str) -> dict[str, np.ndarray]:
    """The state dict of a legacy .pth file as {name: array}, after checking its sha256.

    A missing, altered or unreadable file raises PipelineError with one line saying which."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"the pretrained weights {path} are missing: reinstall the package (make install)")
    found = sha256_of(path)
    if found != sha256:
        raise PipelineError(
            f"the pretrained weights {path} are altered (sha256 {found[:12]}..., expected {sha256[:12]}...): "
            "reinstall the package (make install)"
        )
    try:
        return _read(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise PipelineError(f"could not read the pretrained weights {path}: {e}") from None


def _read(data: bytes) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)
    if _StateDictUnpickler(f).load() != LEGACY_MAGIC:
        raise ValueError("not a legacy PyTorch file (its magic number differs)")
    _StateDictUnpickler(f).load()  # protocol version
    _StateDictUnpickler(f).load()  # system info: little-endian, type sizes
    state = _StateDictUnpickler(f).load()
    keys = _StateDictUnpickler(f).load()
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise ValueError("no state dict in the file")
    dtypes = {t.key: t.dtype for t in state.values() if isinstance(t, _Tensor)}
    storages = {}
    view = memoryview(data)
    position = f.tell()
    for key in keys:
        count = int(np.frombuffer(view[position : position + 8], "<i8")[0])
        dtype = np.dtype(dtypes[str(key)]).newbyteorder("<")
        end = position + 8 + count * dtype.itemsize
        if end > len(data):
            raise ValueError("the file ends inside a tensor")
        storages[str(key)] = np.frombuffer(view[position + 8 : end], dtype)
        position = end
    arrays = {}
    for name, tensor in state.items():
        if not isinstance(tensor, _Tensor):
            raise ValueError(f"{name} is not a tensor")
        storage = storages[tensor.key]
        items = storage.itemsize
        span = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.strides)) + 1
        if min(tensor.shape, default=1) > 0 and span > len(storage):
            raise ValueError(f"{name} reaches past its storage")
        arrays[name] = np.lib.stride_tricks.as_strided(
            storage[tensor.offset :], tensor.shape, tuple(s * items for s in tensor.strides), writeable=False
        ).astype(storage.dtype.newbyteorder("="), copy=True)
    return arrays
