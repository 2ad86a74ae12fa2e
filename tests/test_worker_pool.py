"""prepare on a real Dask cluster (a LocalCluster of worker processes on 127.0.0.1): the same
bytes as a local run, a worker killed mid-run, the scheduler going away, a worker that
cannot see the images."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")
from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

from tests.conftest import run_cli, snapshot, write_image_folder  # noqa: E402
from tests.test_images import truncated_jpeg  # noqa: E402

ARGS = ["--size", "16", "--augment", "2", "--quiet"]


def start_cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Good files, a corrupt one, an exact duplicate, and a copy in another class (a conflict)."""
    images = write_image_folder(tmp_path_factory.mktemp("mixed") / "images", per_class=40)
    truncated_jpeg(images / "cat" / "cut.jpg")
    (images / "dog" / "again.png").write_bytes((images / "dog" / "dog_000.png").read_bytes())
    (images / "fox" / "conflict.png").write_bytes((images / "cat" / "cat_002.png").read_bytes())
    return images


@pytest.fixture(scope="module")
def local_run(mixed, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("local") / "data"
    run_cli("prepare", mixed, "--out", out, *ARGS)
    return files_of(out)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_cluster_run_writes_the_same_bytes_as_a_local_run(cluster, mixed, local_run, tmp_path):
    out = tmp_path / "data"
    run_cli("prepare", mixed, "--out", out, "--scheduler", cluster.scheduler_address, *ARGS)
    assert files_of(out) == local_run
    assert set(local_run) >= {"X_train.npy", "manifest.csv", "report.json", "samples.png"}
    assert b"truncated" in local_run["report.json"] and b"label_conflicts" in local_run["report.json"]


def test_cluster_workers_and_local_runs_share_one_cache(cluster, mixed, local_run, tmp_path):
    """The workers write the cache on the shared storage; a local run then decodes nothing
    (the corrupt file's skip reason, too, comes from the cache), and both write the same bytes."""
    cache_dir = tmp_path / "cache"
    on_cluster = ["--scheduler", cluster.scheduler_address, "--cache", cache_dir]
    run_cli("prepare", mixed, "--out", tmp_path / "a", *on_cluster, *ARGS)
    assert files_of(tmp_path / "a") == local_run
    assert list((cache_dir / "packs").glob("*/*.pack"))
    result = run_cli("prepare", mixed, "--out", tmp_path / "b", "--cache", cache_dir, *ARGS[:-1])
    assert f"{3 * 40 + 3} of {3 * 40 + 3} files from the cache" in result.stderr
    assert files_of(tmp_path / "b") == local_run


class KillOnce(WorkerPlugin):
    """Ends its worker's process the moment a decoding task has written its rows but before
    the scheduler hears of it, once per cluster (a marker file says it happened)."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and "_decode_chunk" in str(key):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(1)


def test_a_worker_killed_mid_run_changes_no_byte(cluster, mixed, local_run, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)  # as --scheduler
    with distributed.Client(cluster.scheduler_address) as client:
        client.register_plugin(KillOnce(str(marker)), name="kill-once")
        try:
            out = tmp_path / "data"
            run_cli("prepare", mixed, "--out", out, *ARGS)
        finally:
            client.unregister_worker_plugin("kill-once")
    assert marker.exists(), "no worker was killed"
    assert files_of(out) == local_run


class KillSchedulerOnFirstResult(WorkerPlugin):
    """SIGKILLs the scheduler's process as soon as this worker has finished a decoding task."""

    def __init__(self, pid: int):
        self.pid = pid

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and "_decode_chunk" in str(key):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def start_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_the_scheduler_killed_mid_run_is_one_line_and_keeps_the_previous_artifacts(mixed, tmp_path):
    out = tmp_path / "data"
    run_cli("prepare", mixed, "--out", out, "--size", "12", "--quiet")
    before = snapshot(out)
    # A scheduler in its own process (LocalCluster's lives in this one), so it can be killed.
    address_file = tmp_path / "scheduler.json"
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    processes = [start_process("distributed.cli.dask_scheduler", *loopback, "--scheduler-file", str(address_file))]
    try:
        processes.append(
            start_process(
                "distributed.cli.dask_worker", "--scheduler-file", str(address_file), "--host", "127.0.0.1",
                "--nthreads", "1", "--no-nanny", "--no-dashboard",
            )
        )  # fmt: skip
        with distributed.Client(scheduler_file=str(address_file), timeout=30) as client:
            client.wait_for_workers(1, timeout=30)
            client.register_plugin(KillSchedulerOnFirstResult(processes[0].pid))
            address = client.scheduler.address
        result = run_cli("prepare", mixed, "--out", out, "--scheduler", address, *ARGS, expect=1)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert result.output.startswith(f"error: lost the Dask scheduler at {address}"), result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_a_worker_that_cannot_see_the_images_is_one_clear_line(cluster, mixed, tmp_path):
    # /proc/self/fd/N is this process's open folder; in a worker process it is nothing:
    # a path that, like a share mounted elsewhere, does not lead to the images there.
    fd = os.open(mixed, os.O_RDONLY)
    try:
        seen_here = f"/proc/self/fd/{fd}"
        out = tmp_path / "data"
        result = run_cli("prepare", seen_here, "--out", out, "--scheduler", cluster.scheduler_address, *ARGS, expect=1)
    finally:
        os.close(fd)
    assert result.output.startswith("error: Dask worker tcp://127.0.0.1:"), result.output
    assert f"cannot read {seen_here}/" in result.output and "(2 of 2 workers)" in result.output
    assert "storage every worker sees" in result.output
    assert result.output.strip().count("\n") == 0
    assert not out.exists() and not list(tmp_path.glob(".data.tmp-*"))


def test_a_scheduler_nobody_listens_on_is_one_line_and_writes_nothing(mixed, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "data"
    result = run_cli("prepare", mixed, "--out", out, "--scheduler", address, *ARGS, expect=1)
    assert result.output.startswith(f"error: cannot reach the Dask scheduler at {address}"), result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".data.tmp-*"))
