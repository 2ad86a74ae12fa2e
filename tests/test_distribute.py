"""Training across processes: TF_CONFIG read and checked, the strategy chosen for made-up
device lists, and real two-worker runs on loopback (127.0.0.1, free ports) that train in
sync, lose a worker, or are stopped by SIGTERM on one of them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.inference.model_folder import read_history
from pipeline.training import distribute
from pipeline.training.distribute import Cluster, auto_precision, choose_strategy, lost_peer_message, read_cluster
from pipeline.training.replicated import epoch_rows, shard_bounds, steps_per_epoch
from tests.conftest import run_cli, snapshot

# --- TF_CONFIG and the choice of strategy (no TensorFlow) -----------------------------------


def tf_config(workers: list[str], index: int, task_type: str = "worker", chief: list[str] | None = None) -> str:
    cluster = {"worker": workers, **({"chief": chief} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_tf_config_gives_each_process_its_rank_and_the_chief():
    assert read_cluster({}) is None and read_cluster({"TF_CONFIG": " "}) is None
    assert read_cluster({"TF_CONFIG": tf_config(["a:1"], 0)}) is None  # one worker: a plain run
    second = read_cluster({"TF_CONFIG": tf_config(["a:1", "b:2", "c:3"], 1)})
    assert second == Cluster(workers=("a:1", "b:2", "c:3"), rank=1, task_type="worker", task_index=1)
    assert second.size == 3 and not second.is_chief
    assert read_cluster({"TF_CONFIG": tf_config(["a:1", "b:2"], 0)}).is_chief
    # a named chief comes first, the workers after it
    chief = read_cluster({"TF_CONFIG": tf_config(["b:2", "c:3"], 0, "chief", chief=["a:1"])})
    assert chief.is_chief and chief.workers == ("a:1", "b:2", "c:3")
    worker = read_cluster({"TF_CONFIG": tf_config(["b:2", "c:3"], 1, chief=["a:1"])})
    assert worker.rank == 2 and worker.workers[worker.rank] == "c:3"


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', "'cluster' and a 'task'"),
        (tf_config(["a:1", "b:2"], 2), "not one of its cluster's tasks"),
        (tf_config(["a:1", "a:1"], 0), "same address twice"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}}', "'ps'"),
        ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ],
    ids=["json", "no-task", "index", "twice", "ps", "address"],
)
def test_a_bad_tf_config_is_one_line_before_tensorflow_loads(trained, tmp_path, monkeypatch, text, words):
    with pytest.raises(PipelineError, match=words):
        read_cluster({"TF_CONFIG": text})
    monkeypatch.setenv("TF_CONFIG", text)
    result = run_cli("train", "--data", trained["data"], "--out", tmp_path / "model", expect=1)
    assert result.output.strip().splitlines()[-1].startswith("error: TF_CONFIG")
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())


def test_the_strategy_follows_the_workers_and_the_gpus():
    two = Cluster(("a:1", "b:2"), 0, "worker", 0)
    assert choose_strategy(None, 0) == "default"  # the CPU: fit, as ever
    assert choose_strategy(None, 1) == "default"  # one GPU: fit, in mixed float16
    assert choose_strategy(None, 4) == "mirrored"  # every GPU of one machine
    assert choose_strategy(two, 0) == choose_strategy(two, 8) == "multi_worker"
    assert auto_precision("default", 1, "float32") == "float16"
    assert auto_precision("default", 0, "bfloat16") == "bfloat16"  # a CPU keeps what it does best
    assert auto_precision("mirrored", 4, "bfloat16") == "float32"
    assert auto_precision("multi_worker", 0, "float32") == "float32"


def test_timeouts_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv(distribute.COLLECTIVE_TIMEOUT_ENV, "12.5")
    assert distribute.timeout_from_env(distribute.COLLECTIVE_TIMEOUT_ENV, 300) == 12.5
    monkeypatch.setenv(distribute.COLLECTIVE_TIMEOUT_ENV, "soon")
    with pytest.raises(PipelineError, match="number of seconds"):
        distribute.timeout_from_env(distribute.COLLECTIVE_TIMEOUT_ENV, 300)


def test_a_lost_peer_is_named_in_one_line():
    class UnavailableError(Exception):
        pass

    heartbeats = UnavailableError(
        "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
        "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed."
    )
    line = lost_peer_message(heartbeats, "training epoch 4")
    assert "\n" not in line and "training epoch 4" in line and "/job:worker/replica:0/task:1" in line
    reset = UnavailableError("recvmsg:Connection reset by peer ... from remote target /job:worker/replica:0/task:0 x")
    assert "lost contact with /job:worker/replica:0/task:0" in lost_peer_message(reset, "x")


@pytest.mark.parametrize("rows, workers", [(84, 2), (85, 2), (7, 3), (1000, 4), (3, 2)])
def test_every_worker_takes_its_own_rows_and_the_same_number_of_steps(rows, workers):
    batch = 8
    shares = [shard_bounds(rows, workers, w) for w in range(workers)]
    assert shares[0][0] == 0 and shares[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, no row twice
    steps = steps_per_epoch(rows, workers, 1, batch)
    for w, (start, stop) in enumerate(shares):
        order = epoch_rows(stop - start, steps * batch, 42, w, 0)
        assert len(order) == steps * batch  # the same length everywhere: the same steps
        assert set(order.tolist()) == set(range(stop - start))  # every row of the share, each epoch
    assert not np.array_equal(epoch_rows(50, 50, 42, 0, 0), epoch_rows(50, 50, 42, 0, 1))  # reshuffled


# --- two real workers on loopback ---------------------------------------------------------


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Worker:
    """`python -m pipeline train ...` with its TF_CONFIG, in its own process group, stderr collected."""

    def __init__(self, index: int, workers: list[str], args: list, env: dict | None = None):
        environment = {
            **os.environ,
            "TF_CONFIG": tf_config(workers, index),
            "PIPELINE_PROGRESS": "never",
            distribute.CLUSTER_TIMEOUT_ENV: "90",
            **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=environment,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self.readers = [
            threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True),
            threading.Thread(target=lambda: self.out.extend(self.process.stdout), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self, signum=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


@contextlib.contextmanager
def cluster(n: int, args: list, env: dict | None = None):
    """n workers of one TF_CONFIG cluster on 127.0.0.1; every one is killed at the end, whatever happens."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(n)]
    workers = []
    try:
        for index in range(n):
            workers.append(Worker(index, addresses, args, env))
        yield workers
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.kill()
                worker.process.wait()


def wait_until(predicate, workers, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for worker in workers:
            if worker.process.poll() is not None:
                raise AssertionError(f"a worker ended early: {worker.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out: " + " | ".join(w.stderr[-1000:] for w in workers))
        time.sleep(0.02)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    return digest.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_two_workers_train_in_sync_and_the_chief_writes_a_complete_model(trained, tmp_path):
    out = tmp_path / "model"
    args = ["--data", trained["data"], "--out", out, "--epochs", "3", "--batch-size", "16", "--precision", "float32"]
    with cluster(2, args) as (chief, other):
        assert chief.wait(timeout=240) == 0, chief.stderr
        assert other.wait(timeout=60) == 0, other.stderr
    chief_line, other_line = chief.out[-1], other.out[-1]
    assert "model written to" in chief_line and other_line.startswith("worker 1 of 2: trained 3 epoch(s)")
    digest = chief_line.split("weights sha256 ")[1].strip()
    assert other_line.split("weights sha256 ")[1].strip() == digest  # identical weights on both workers
    assert sum(line.startswith("epoch ") for line in chief.lines) == 3
    # the same global numbers on both: the validation sums are all-reduced
    assert [line.split("  ")[:-1] for line in chief.lines if line.startswith("epoch ")] == [
        line.split("  ")[:-1] for line in other.lines if line.startswith("epoch ")
    ]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # worker 1 wrote nothing beside it
    for name in ("model.keras", "model.tflite", "classes.json", "preprocess.json", "history.csv", "settings.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["strategy"] == "multi_worker" and summary["workers"] == summary["replicas"] == 2
    assert summary["global_batch"] == 16 and summary["per_replica_batch"] == 8 and summary["epochs_run"] == 3
    from pipeline.inference.model_folder import load_keras_model

    assert weights_sha256(load_keras_model(out)) == digest  # the saved model is those weights

    def accuracy(model_dir: Path) -> float:
        result = run_cli("evaluate", "--data", trained["data"], "--model", model_dir, "--out", tmp_path / "r", "--json")
        return json.loads(result.stdout)["accuracy"]

    single = accuracy(trained["model"])  # one process, same data, epochs, batch and precision
    assert accuracy(out) >= single - 0.1 and accuracy(out) > 0.6, (accuracy(out), single)


def test_a_killed_worker_stops_the_other_within_a_minute_and_the_previous_model_stays(trained, tmp_path):
    out = Path(shutil.copytree(trained["model"], tmp_path / "model"))
    before = snapshot(out)
    args = ["--data", trained["data"], "--out", out, "--epochs", "500", "--patience", "500", "--batch-size", "16"]
    with cluster(2, args) as (chief, other):
        wait_until(lambda: any(line.startswith("epoch 2/") for line in chief.lines), [chief, other], timeout=240)
        other.kill(signal.SIGKILL)
        killed = time.monotonic()
        code = chief.wait(timeout=120)
        seconds = time.monotonic() - killed
    assert code == 1, chief.stderr
    assert seconds < 60, seconds
    last = chief.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the cluster failed while") and "writes nothing" in last, last
    assert "Traceback" not in chief.stderr
    assert snapshot(out) == before and leftovers(tmp_path) == []  # the previous model, byte for byte


def test_sigterm_on_one_worker_stops_every_worker_and_the_chief_keeps_the_best_model(trained, tmp_path):
    out = tmp_path / "model"
    args = ["--data", trained["data"], "--out", out, "--epochs", "500", "--patience", "500", "--batch-size", "16"]
    with cluster(2, args) as (chief, other):
        wait_until(lambda: any(line.startswith("epoch 2/") for line in other.lines), [chief, other], timeout=240)
        os.kill(other.process.pid, signal.SIGTERM)  # as Kubernetes stops a pod
        assert other.wait(timeout=60) == 130, other.stderr
        assert chief.wait(timeout=60) == 130, chief.stderr
    assert "the best model so far" in chief.stderr.strip().splitlines()[-1]
    assert "is saved by the chief" in other.stderr.strip().splitlines()[-1]
    assert "Traceback" not in chief.stderr + other.stderr
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["interrupted"] is True and 2 <= summary["epochs_run"] < 500
    assert len((out / "history.csv").read_text().splitlines()) == summary["epochs_run"] + 1
    assert (out / "model.keras").is_file() and (out / "model.tflite").is_file() and leftovers(tmp_path) == []


def test_a_cluster_that_never_forms_ends_with_one_line(trained, tmp_path):
    """Worker 1 never starts: worker 0 gives up after PIPELINE_CLUSTER_TIMEOUT, writing nothing."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    alone = Worker(
        0, addresses, ["--data", trained["data"], "--out", tmp_path / "model"], {"PIPELINE_CLUSTER_TIMEOUT": "5"}
    )
    try:
        assert alone.wait(timeout=120) != 0, alone.stderr  # 137: the watchdog ended it
    finally:
        alone.kill()
    last = alone.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the cluster did not form within 5s") and addresses[1] in last, last
    assert not (tmp_path / "model").exists() and leftovers(tmp_path) == []


# Several GPUs of one machine, stood in for by two logical CPU devices: the MirroredStrategy
# that plan_training builds for them, through the same custom step.
_TWO_LOGICAL_CPUS = """
import json, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.training import distribute
from pipeline import train
from pipeline.core.settings import TrainSettings
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
distribute.plan_training = lambda cluster: distribute.Plan("mirrored", strategy, None, 2, 2)
epochs, class_weight = (int(sys.argv[3]), sys.argv[4]) if len(sys.argv) > 3 else (2, "none")
settings = TrainSettings(epochs=epochs, batch_size=16, precision="auto", class_weight=class_weight)
print(json.dumps(train.train_model(Path(sys.argv[1]), Path(sys.argv[2]), settings)))
"""


def two_logical_cpus(*args) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _TWO_LOGICAL_CPUS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIPELINE_PROGRESS": "never"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_on_two_devices_trains_through_the_custom_step(trained, tmp_path):
    out = tmp_path / "model"
    summary = two_logical_cpus(trained["data"], out)
    assert summary["strategy"] == "mirrored" and summary["replicas"] == 2 and summary["workers"] == 1
    assert summary["precision"] == "float32"  # several GPUs: float32 until loss scaling there is measured
    assert summary["per_replica_batch"] == 8 and summary["epochs_run"] == 2
    result = run_cli("evaluate", "--data", trained["data"], "--model", out, "--out", tmp_path / "r", "--json")
    assert json.loads(result.stdout)["accuracy"] > 0.6


def test_class_weights_reach_the_loss_of_the_custom_step_from_the_second_half(trained, tmp_path):
    """--class-weight balanced with two replicas: the weights from the training split's counts
    are recorded, and they weigh the training loss from the second of two epochs on (the first
    epoch's loss is the unweighted run's, same seed; the second's is not), while the
    validation loss that picks the best epoch is weighted in both."""
    data = Path(shutil.copytree(trained["data"], tmp_path / "data"))
    y = np.load(data / "y_train.npy")
    keep = np.flatnonzero((y != 0) | (np.cumsum(y == 0) <= 3))  # class 0 cut to 3 training images
    np.save(data / "X_train.npy", np.load(data / "X_train.npy")[keep])
    np.save(data / "y_train.npy", y[keep])
    counts = np.bincount(y[keep], minlength=3)

    weighted = two_logical_cpus(data, tmp_path / "weighted", 2, "balanced")
    plain = two_logical_cpus(data, tmp_path / "plain", 2, "none")
    classes = json.loads((data / "classes.json").read_text())
    expected = {name: round(counts.sum() / (3 * count), 6) for name, count in zip(classes, counts)}
    assert weighted["class_weights"] == pytest.approx(expected) and expected[classes[0]] > 2
    assert plain["class_weights"] is None and weighted["strategy"] == "mirrored"
    assert weighted["class_weights_from_epoch"] == 2

    weighted_history = read_history(tmp_path / "weighted" / "history.csv")
    plain_history = read_history(tmp_path / "plain" / "history.csv")
    assert weighted_history[0]["loss"] == pytest.approx(plain_history[0]["loss"], rel=1e-5)
    assert weighted_history[1]["loss"] != pytest.approx(plain_history[1]["loss"], rel=1e-4)
    assert weighted_history[0]["val_loss"] != pytest.approx(plain_history[0]["val_loss"], rel=1e-4)


def test_find_lr_under_tf_config_sweeps_on_the_chief_alone(trained, tmp_path):
    out = tmp_path / "runs" / "model"
    args = ["--data", trained["data"], "--out", out, "--find-lr", "--batch-size", "8"]
    with cluster(2, args) as (chief, other):
        assert chief.wait(timeout=240) == 0, chief.stderr
        assert other.wait(timeout=60) == 0, other.stderr
    assert "suggested --learning-rate" in chief.out[-1]
    assert other.out[-1].startswith("worker 1 of 2: the chief runs the learning-rate sweep")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lr_find.png"]  # one plot, no model
