"""Where per-file work runs: a pool of local processes, or the workers of a Dask cluster.

prepare (decoding, hashing, augmenting) and inspect (decoding) hand a pool picklable
functions and get their results back in order (`imap`). Both sides of the seam have the
same small interface: `imap`, `check_storage` and a context-manager lifetime; `open_pool`
picks one. Tasks write their rows to files themselves and return only small results, so
either side moves pixels through storage, never through the caller's memory.

Dask (`distributed`) is imported only when a scheduler address is given, and pipeline only
ever connects to a scheduler: it never starts one that listens on a network.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import uuid
from collections import deque
from pathlib import Path

from threadpoolctl import threadpool_limits

from pipeline import __version__
from pipeline.core.errors import PipelineError

CONNECT_SECONDS = 10  # to reach the scheduler, and to wait for a first worker
TASKS_PER_THREAD = 4  # tasks in flight per worker thread: workers never idle, the client holds few futures


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def open_pool(processes: int, scheduler: str = ""):
    """The Dask cluster at `scheduler` if one is given, else `processes` local processes."""
    return DaskPool(scheduler) if scheduler else WorkerPool(processes)


class WorkerPool:
    """multiprocessing.Pool's ordered imap, or a plain map when one process is enough."""

    def __init__(self, processes: int):
        self.pool = None
        # One process per core already: BLAS threads (the hashes' matrix products) on top
        # of them only fought over the cores, doubling the CPU time. Forked workers inherit
        # the limit; it is lifted again on exit.
        self.blas_limit = threadpool_limits(1)
        if processes > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = context.Pool(processes, initializer=_quiet_worker)

    def imap(self, func, items, chunksize: int = 1):
        if self.pool is None:
            return map(func, items)
        return self.pool.imap(func, items, chunksize=chunksize)

    def check_storage(self, read_file: Path, write_dir: Path) -> None:
        """Local processes see what this one sees."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        self.blas_limit.restore_original_limits()


def _quiet_worker() -> None:
    """Ctrl-C and kill are the parent's to handle: it stops the pool and cleans up, so a
    worker neither prints a KeyboardInterrupt traceback nor outlives it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DaskPool:
    """The same ordered imap on the workers of a running Dask cluster.

    A worker that dies mid-task has its task re-run on another by the scheduler (Dask's own
    retry; tasks write the same bytes to the same rows, so a re-run changes nothing). A
    scheduler that goes away ends the run with one line.
    """

    def __init__(self, address: str):
        try:
            import distributed
        except ImportError:
            raise PipelineError(
                "--scheduler needs Dask's distributed package: pip install 'distributed' (or 'pipeline[cluster]')"
            ) from None
        _quiet_dask_logs()
        self.address = address
        try:
            self.client = distributed.Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as e:
            raise PipelineError(f"cannot reach the Dask scheduler at {address} ({_reason(e)})") from None
        try:
            self.client.wait_for_workers(1, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError):
            self.client.close()
            raise PipelineError(
                f"no Dask worker joined the scheduler at {address} within {CONNECT_SECONDS} s: start some with "
                f"`dask worker {address}`"
            ) from None

    def imap(self, func, items, chunksize: int = 1):
        return self._ordered(func, iter(items))

    def _ordered(self, func, items):
        # A bounded window of tasks in flight keeps every worker busy while the client holds
        # a few futures, whatever the folder's size; results come back in order, as imap's.
        window = max(8, TASKS_PER_THREAD * sum(self._call(self.client.nthreads).values()))
        pending = deque()
        for item in items:
            pending.append(self._call(self.client.submit, func, item, pure=False))
            if len(pending) >= window:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def check_storage(self, read_file: Path, write_dir: Path) -> None:
        """Every worker must read `read_file` as this process does and write into `write_dir`
        where this process sees it: the images and the output live on shared storage."""
        read_file, write_dir = Path(os.path.abspath(read_file)), Path(os.path.abspath(write_dir))
        token = uuid.uuid4().hex
        (write_dir / f"_probe-client-{token}").write_text(token)
        found = self._call(
            self.client.run,
            _probe_storage,
            str(read_file),
            read_file.stat().st_size,
            str(write_dir),
            token,
            __version__,
        )
        problems = []
        for worker, (problem, written) in sorted(found.items()):
            if problem is None and not (write_dir / written).is_file():
                problem = f"what it writes into {write_dir} does not appear here"
            problems.append((worker, problem))
            if written:
                (write_dir / written).unlink(missing_ok=True)
        (write_dir / f"_probe-client-{token}").unlink()
        bad = [(worker, problem) for worker, problem in problems if problem]
        if bad:
            worker, problem = bad[0]
            raise PipelineError(
                f"Dask worker {worker} {problem} ({len(bad)} of {len(problems)} workers): the images folder and "
                "--out must be on storage every worker sees at the same path, and workers must run the same pipeline"
            )

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (OSError, TimeoutError) as e:
            raise self._lost(e) from None

    def _result(self, future):
        from distributed import KilledWorker

        try:
            return future.result()
        except KilledWorker as e:
            raise PipelineError(f"a task ended every Dask worker that ran it ({_reason(e)})") from None
        except Exception as e:
            if self.client.status != "running" or type(e).__name__ in ("FutureCancelledError", "CancelledError"):
                raise self._lost(e) from None
            raise

    def _lost(self, e: BaseException) -> PipelineError:
        return PipelineError(
            f"lost the Dask scheduler at {self.address} ({_reason(e)}); nothing was written, "
            "earlier artifacts are untouched"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close(timeout=CONNECT_SECONDS)


def _probe_storage(
    read_file: str, size: int, write_dir: str, token: str, version: str
) -> tuple[str | None, str | None]:
    """Run on each worker: (what is wrong or None, the name of the file it wrote or None)."""
    if version != __version__:
        return f"runs pipeline {__version__}, this machine {version}", None
    try:
        if os.stat(read_file).st_size != size:
            return f"sees another {read_file} than this machine", None
        with open(read_file, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"cannot read {read_file} ({e.strerror or e})", None
    try:
        if Path(write_dir, f"_probe-client-{token}").read_text() != token:
            return f"sees another {write_dir} than this machine", None
        written = f"_probe-worker-{uuid.uuid4().hex}"
        Path(write_dir, written).write_text(token)
    except OSError as e:
        return f"cannot write into {write_dir} ({e.strerror or e})", None
    return None, written


def _reason(e: BaseException) -> str:
    if getattr(e, "reason", None):  # a cancelled future says why: "scheduler-connection-lost"
        return str(e.reason)
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _quiet_dask_logs() -> None:
    """Dask logs reconnections and lost workers to stderr; this command says what matters in one line."""
    import logging

    for name in ("distributed", "distributed.client", "distributed.comm", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
