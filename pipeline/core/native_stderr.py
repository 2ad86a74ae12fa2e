"""Keeping native libraries' start-up chatter off the terminal, without hiding Python's output.

The one place that silences TensorFlow, Keras and LiteRT: every module that needs Keras or
TensorFlow gets it from `import_keras()` / `import_tensorflow()` here.

TensorFlow prints "WARNING: All log messages before absl::InitializeLog()..." and oneDNN
"I0000 ... port.cc" lines straight to file descriptor 2 while it loads, whatever
TF_CPP_MIN_LOG_LEVEL says; LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate"
when it first allocates tensors. `quiet_native_stderr` points fd 2 at /dev/null only
around those calls. Python's `sys.stderr` is moved to a copy of the real stderr for that
time, so warnings, tracebacks and our own messages still show.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator

# TensorFlow's C++ log lines would bury our one-line messages; real errors still show.
# Read once, when TensorFlow loads: set here, before any of the imports below can run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow turns its oneDNN kernels on only for CPUs with AVX-512 VNNI/BF16 or AMX; on an
# AVX2 CPU it falls back to Eigen: 1.19x fewer training images/s on two cores (bench/RESULTS.md).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# fd 2 and sys.stderr belong to the whole process: two threads swapping them at once (serve's
# workers allocating tensors together) restored each other's copies and left a closed
# sys.stderr behind. One thread at a time; the same thread may nest.
_one_at_a_time = threading.RLock()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    with _one_at_a_time:
        yield from _quiet_native_stderr()


def _quiet_native_stderr() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:
        yield  # no fd 2 at all: nothing to silence
        return
    python_stderr = sys.stderr
    try:
        uses_fd2 = python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        uses_fd2 = False  # sys.stderr is not fd 2 (a test runner's buffer): leave it alone
    if uses_fd2:
        python_stderr.flush()
        sys.stderr = io.TextIOWrapper(
            os.fdopen(os.dup(saved), "wb", buffering=0),
            encoding=python_stderr.encoding,
            errors="backslashreplace",
            write_through=True,
        )
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        if uses_fd2:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


# Keras imports these at start-up, if installed, only for its scikit-learn wrappers and its
# plotting helpers, neither of which pipeline uses: 1.6 of the 4.9 s `import keras` takes
# here (python -X importtime). Keras guards each import with `except ImportError`.
_KERAS_EXTRAS = ("sklearn", "matplotlib", "cv2")


def import_keras():
    """`import keras` (and TensorFlow behind it) without the native start-up lines, and
    without the optional extras it would load for nothing."""
    with quiet_native_stderr():
        if "keras" in sys.modules:
            return sys.modules["keras"]
        blocked = [name for name in _KERAS_EXTRAS if name not in sys.modules]
        sys.modules.update(dict.fromkeys(blocked, None))  # None in sys.modules: ImportError
        try:
            import keras
        except ImportError:  # a Keras that needs one of them after all: load it whole
            for name in blocked:
                sys.modules.pop(name, None)
            blocked = []
            import keras
        finally:
            for name in blocked:
                if sys.modules.get(name, "") is None:
                    del sys.modules[name]
    return keras


def import_tensorflow():
    """`import tensorflow` without the native start-up lines."""
    import_keras()  # the same start-up, extras left out; TensorFlow comes with it
    import tensorflow

    return tensorflow
