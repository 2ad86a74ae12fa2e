"""Where train runs: one process, every GPU of one machine, or a cluster described by TF_CONFIG.

Reads the TF_CONFIG environment variable (the cluster platforms' way of telling each
process who its peers are: Kubeflow's TFJob, Vertex AI, SageMaker, a shell loop over ssh)
and the local GPUs, and picks one of three strategies (`choose_strategy`, pure, so it is
tested with made-up device lists):

- "default": one process, at most one GPU: Keras `fit`, exactly as before. On one GPU the
  layers compute in mixed float16 (`--precision auto`).
- "mirrored": one process, several GPUs: tf.distribute.MirroredStrategy, one replica a GPU.
- "multi_worker": more than one worker in TF_CONFIG: MultiWorkerMirroredStrategy,
  gradients all-reduced across the processes; worker 0 (or the "chief" task) is the chief,
  the only process that writes the model folder.

Every strategy with more than one replica trains through the custom step of replicated.py
(Keras 3's `fit` fails under MultiWorkerMirroredStrategy: keras-team/keras#20585).

Nothing waits for ever: forming the cluster has a deadline (PIPELINE_CLUSTER_TIMEOUT,
seconds, default 300), after which the process prints one `error:` line and ends (137);
every collective has one too (PIPELINE_COLLECTIVE_TIMEOUT, default 300), and TensorFlow's
coordination service notices a peer that stopped sending heartbeats within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.native_stderr import import_tensorflow

STRATEGIES = ("default", "mirrored", "multi_worker")
CLUSTER_TIMEOUT_ENV = "PIPELINE_CLUSTER_TIMEOUT"  # seconds to wait for every worker at start-up
COLLECTIVE_TIMEOUT_ENV = "PIPELINE_COLLECTIVE_TIMEOUT"  # seconds one all-reduce may wait for its peers
DEFAULT_CLUSTER_TIMEOUT = 300.0
DEFAULT_COLLECTIVE_TIMEOUT = 300.0
HEARTBEAT_TIMEOUT_MS = 10_000  # a peer silent this long is dead: the others stop


@dataclass(frozen=True)
class Cluster:
    """This process's place in TF_CONFIG's cluster: the worker tasks in rank order."""

    workers: tuple[str, ...]  # addresses, the chief (if a "chief" task is named) first
    rank: int  # this process's index in `workers`
    task_type: str  # as TF_CONFIG names it: "worker" or "chief"
    task_index: int

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


@dataclass
class Plan:
    """The strategy this run uses and what the loop and the artifacts need to know of it."""

    kind: str  # one of STRATEGIES
    strategy: object  # a tf.distribute.Strategy
    cluster: Cluster | None = None
    gpus: int = 0
    replicas: int = 1  # replicas in sync, over every worker
    notes: list[str] = field(default_factory=list)

    @property
    def workers(self) -> int:
        return self.cluster.size if self.cluster else 1

    @property
    def rank(self) -> int:
        return self.cluster.rank if self.cluster else 0

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def custom_loop(self) -> bool:
        """Keras fit for one replica (unchanged, as fast as ever); the custom step for more."""
        return self.replicas > 1

    def describe(self) -> dict:
        """What settings.json records of where the run trained."""
        return {
            "strategy": self.kind,
            "workers": self.workers,
            "replicas": self.replicas,
            "gpus_per_worker": self.gpus,
        }

    def workspace(self, out_dir: Path):
        """Where this process writes while it trains: the chief, the model folder's temporary
        sibling (swapped in when complete); any other worker, a private folder removed at the
        end, so that it writes nothing beside the model folder."""
        from pipeline.core.artifacts import atomic_dir

        return atomic_dir(out_dir) if self.is_chief else _scratch_dir()

    def barrier(self, what: str) -> None:
        """Every worker waits here for the others (a one-number all-reduce); nothing for one process."""
        if self.workers > 1:
            tf = import_tensorflow()
            try:
                sum_across_workers(self.strategy, [0.0], self.replicas // self.workers)
            except tf.errors.OpError as e:  # Unavailable, DeadlineExceeded, Aborted...: a lost peer
                raise PipelineError(lost_peer_message(e, what)) from None


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="pipeline-worker-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_cluster(environ=None) -> Cluster | None:
    """TF_CONFIG's cluster and task, checked; None without TF_CONFIG or with one worker only."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    example = '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}'
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"TF_CONFIG is not valid JSON ({e}); it looks like {example}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise PipelineError(f"TF_CONFIG must have a 'cluster' and a 'task', like {example}")
    for job, addresses in cluster.items():
        if job not in ("chief", "worker", "evaluator", "ps"):
            raise PipelineError(f"TF_CONFIG's cluster names an unknown job {job!r}: use 'worker' (and 'chief')")
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise PipelineError(f"TF_CONFIG's cluster.{job} must be a list of 'host:port' addresses")
    if cluster.get("ps") or cluster.get("evaluator"):
        raise PipelineError("TF_CONFIG names 'ps' or 'evaluator' tasks: train runs synchronous workers only")
    if len(cluster.get("chief", [])) > 1:
        raise PipelineError("TF_CONFIG names more than one chief")
    workers = tuple(cluster.get("chief", [])) + tuple(cluster.get("worker", []))
    task_type, index = task.get("type"), task.get("index")
    if (
        task_type not in ("chief", "worker")
        or not isinstance(index, int)
        or not 0 <= index < len(cluster.get(task_type, []))
    ):
        raise PipelineError(
            f"TF_CONFIG's task {task!r} is not one of its cluster's tasks (type 'worker' or 'chief', index from 0)"
        )
    if len(set(workers)) != len(workers):
        raise PipelineError("TF_CONFIG lists the same address twice")
    if len(workers) < 2:
        return None  # one worker: an ordinary single-process run
    rank = index if task_type == "chief" else len(cluster.get("chief", [])) + index
    return Cluster(workers=workers, rank=rank, task_type=task_type, task_index=index)


def choose_strategy(cluster: Cluster | None, gpus: int) -> str:
    """The strategy for this cluster and this many local GPUs (pure: no TensorFlow)."""
    if cluster is not None and cluster.size > 1:
        return "multi_worker"
    if gpus > 1:
        return "mirrored"
    return "default"


def auto_precision(kind: str, gpus: int, cpu_precision: str) -> str:
    """--precision auto: mixed float16 on one GPU (its tensor cores), else what the CPU does best.

    Several GPUs stay in float32 for now: the custom step's loss scaling under MirroredStrategy
    has not been run on a GPU machine here."""
    if kind == "default" and gpus == 1:
        return "float16"
    if gpus > 1:
        return "float32"
    return cpu_precision


def timeout_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise PipelineError(f"{name} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise PipelineError(f"{name} must be above 0 seconds, got {text!r}")
    return value


def plan_training(cluster: Cluster | None) -> Plan:
    """Count the GPUs, build the strategy, and (in a cluster, `read_cluster`'s) wait for every
    worker, at most PIPELINE_CLUSTER_TIMEOUT seconds."""
    cluster_timeout = timeout_from_env(CLUSTER_TIMEOUT_ENV, DEFAULT_CLUSTER_TIMEOUT)
    collective_timeout = timeout_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT)

    tf = import_tensorflow()
    gpus = len(tf.config.list_physical_devices("GPU"))
    kind = choose_strategy(cluster, gpus)
    if kind == "default":
        return Plan(kind, tf.distribute.get_strategy(), None, gpus, 1)
    if kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return Plan(kind, strategy, None, gpus, strategy.num_replicas_in_sync)
    sigterm = signal.getsignal(signal.SIGTERM)
    with _deadline(cluster_timeout, cluster):
        strategy = _multi_worker_strategy(tf, cluster, collective_timeout)
        with contextlib.suppress(ValueError, TypeError):  # TensorFlow's server took SIGTERM: ours again
            signal.signal(signal.SIGTERM, sigterm)
        plan = Plan(kind, strategy, cluster, gpus, strategy.num_replicas_in_sync)
        plan.barrier("forming the cluster")  # every worker has its server up and its model code loaded
    return plan


def _multi_worker_strategy(tf, cluster: Cluster, collective_timeout: float):
    """MultiWorkerMirroredStrategy with timeouts: the coordination service (run by the chief)
    takes heartbeats from every worker, and each all-reduce gives up after `collective_timeout`."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    tf_config = json.loads(os.environ["TF_CONFIG"])
    jobs = [job for job in ("chief", "worker") if tf_config["cluster"].get(job)]
    leader = f"/job:{jobs[0]}/replica:0/task:0"
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=leader,
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_MS,
        shutdown_barrier_timeout_in_ms=int(collective_timeout * 1000),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(tf_config["cluster"][job])) for job in jobs
        ],
    )
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=collective_timeout,
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO,  # ring on CPUs, NCCL on GPUs
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


# Sleeps, then (if its parent is still the training process) says why and ends it.
_WATCHDOG = """
import os, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
if os.getppid() == pid:
    os.write(2, (message + "\\n").encode())
    os.kill(pid, 9)
"""


@contextlib.contextmanager
def _deadline(seconds: float, cluster: Cluster) -> Iterator[None]:
    """TensorFlow waits for missing workers inside one C++ call that holds the GIL, where
    neither a Python thread, a timeout nor Ctrl-C reaches it: a tiny watchdog process ends
    this one with one line when the cluster has not formed in time (exit status 137)."""
    others = ", ".join(a for i, a in enumerate(cluster.workers) if i != cluster.rank)
    message = (
        f"error: the cluster did not form within {seconds:g}s: worker {cluster.rank} "
        f"({cluster.workers[cluster.rank]}) could not reach every other worker ({others}); start "
        f"`pipeline train` on each of them with the same TF_CONFIG cluster, or raise {CLUSTER_TIMEOUT_ENV}"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def lost_peer_message(error: Exception, what: str) -> str:
    """One line for a collective that failed: which peer, while doing what, and that this
    worker writes nothing."""
    text = " ".join(str(error).split())
    peer = re.search(r"stopped sending heartbeats\): (/job:\w+/replica:\d+/task:\d+)", text) or re.search(
        r"remote target (/job:\w+/replica:\d+/task:\d+)", text
    )
    name = type(error).__name__
    if "Deadline" in name or "timed out" in text.lower():
        detail = f"an all-reduce waited longer than {COLLECTIVE_TIMEOUT_ENV} seconds for the other workers"
    elif peer or "Unavailable" in name:
        who = peer.group(1) if peer else "another worker"
        detail = f"lost contact with {who} (it crashed, was killed, or cannot be reached)"
    else:
        first = text.split(" The error could be")[0].split(" [[")[0]
        detail = first[:300] + ("..." if len(first) > 300 else "")
    return f"the cluster failed while {what}: {detail}; this worker stops and writes nothing"


def sum_across_workers(strategy, values, local_replicas: int) -> np.ndarray:
    """The element-wise sum of `values` over every worker (each worker passes its own;
    each of its `local_replicas` replicas adds a share)."""
    tf = import_tensorflow()
    values = tf.constant(np.asarray(values, dtype=np.float64) / local_replicas, dtype=tf.float64)
    key = (id(strategy), values.shape[0])
    if key not in _SUMS:  # one traced function per strategy and length: eager collectives are slow

        @tf.function
        def reduce(v):
            # tf.identity: a tensor made in the replica, which the collective can place
            result = strategy.run(
                lambda x: tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(x)), args=(v,)
            )
            return strategy.experimental_local_results(result)[0]

        _SUMS[key] = reduce
    return _SUMS[key](values).numpy()


_SUMS: dict = {}
