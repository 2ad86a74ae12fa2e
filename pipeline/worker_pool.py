"""Where per-file work runs: a pool of local processes, one per core.

prepare (decoding, hashing, augmenting) and inspect (decoding) hand it picklable
functions and get their results back in order.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from threadpoolctl import threadpool_limits


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
