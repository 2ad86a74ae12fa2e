"""`make bench-resilience` (part): what a SIGKILL costs a training run that is then resumed.

For each of `--kills` moments spread over the run (epoch k's checkpoint written, then 20%
to 80% of an epoch's time later), `pipeline train` is SIGKILLed, then run again with `--resume`:

- the work lost: the seconds since the last checkpoint at the kill, in epochs (at most 1);
- whether the resumed model's weights equal the uninterrupted run's of the same seed (bit
  for bit), and both test accuracies (`pipeline evaluate`);
- with `--cluster`, the same for two TF_CONFIG workers on 127.0.0.1: worker 1 is killed,
  the chief stops on its own, both are started again with --resume.

    python bench/resume_bench.py --data artifacts/data --epochs 6 --kills 3 [--cluster]

Without --data it prepares the letters folder as run_bench.py does. Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "resume"
ENV = {**os.environ, "PIPELINE_PROGRESS": "never", "PYTHONPATH": str(ROOT)}


def pipeline(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)], env=env or ENV, stdout=subprocess.DEVNULL, **kw
    )


def accuracy(data: Path, model: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", "--data", data, "--model", model, "--out", WORK / "r", "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)["accuracy"]


def weights_digest(model: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from pipeline.inference.model_folder import load_keras_model

    digest = hashlib.sha256()
    for w in load_keras_model(model).get_weights():
        digest.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return digest.hexdigest()


def checkpoint_state(out: Path) -> tuple[int, float]:
    """(epochs done, the checkpoint's modification time) of the run writing `out`."""
    state = out.parent / f".{out.name}.checkpoint" / "state.json"
    try:
        return json.loads(state.read_text())["epochs_done"], state.stat().st_mtime
    except (OSError, ValueError, KeyError):
        return 0, 0.0


def start(args: list, out: Path, cluster: list[str] | None) -> list[subprocess.Popen]:
    """One `pipeline train` process, or one per worker of a TF_CONFIG cluster on loopback."""
    if not cluster:
        return [pipeline("train", *args, "--out", out, stderr=subprocess.DEVNULL)]
    processes = []
    for index in range(len(cluster)):
        config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(config)}
        processes.append(pipeline("train", *args, "--out", out, env=env, stderr=subprocess.DEVNULL))
    return processes


def one_kill(data: Path, args: list, after: int, into: float, epoch_s: float, name: str, cluster) -> dict:
    """Kill `into` (a fraction) of an epoch after the checkpoint of epoch `after`, resume."""
    out = WORK / name / "model"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    processes = start(args, out, cluster)
    while checkpoint_state(out)[0] < after:
        assert all(p.poll() is None for p in processes), "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(into * epoch_s)
    victim = processes[-1]  # worker 1 in a cluster: the chief then stops on its own
    if victim.poll() is not None:
        raise SystemExit(
            f"the run finished before the kill {into:.0%} of an epoch after epoch {after}: use more --epochs"
        )
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    for process in processes:
        process.wait(timeout=600)
    done, written = checkpoint_state(out)
    lost_s = killed_at - written
    started = time.perf_counter()
    for process in start(args + ["--resume"], out, cluster):
        assert process.wait(timeout=1800) == 0, "the resumed run failed"
    summary = json.loads((out / "settings.json").read_text())["summary"]
    return {
        "killed_into_epoch": f"{into:.0%} of an epoch after epoch {after}'s checkpoint",
        "epochs_done_at_kill": done,
        "resumed_after_epoch": summary["resumed_after_epoch"],
        "lost_s": round(lost_s, 1),
        "lost_epochs": round(lost_s / epoch_s, 2),
        "resume_s": round(time.perf_counter() - started, 1),
        "digest": weights_digest(out),
        "accuracy": accuracy(data, out),
    }


def bench(data: Path, epochs: int, kills: int, seed: int, cluster: bool) -> dict:
    args = ["--data", data, "--epochs", epochs, "--patience", epochs, "--seed", seed, "--precision", "float32"]
    from run_bench import free_ports  # the same free loopback ports as the cluster pairs take

    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)] if cluster else None
    whole = WORK / ("whole_cluster" if cluster else "whole") / "model"
    shutil.rmtree(whole.parent, ignore_errors=True)
    started = time.perf_counter()
    for process in start(args, whole, addresses):
        assert process.wait(timeout=3600) == 0, "the uninterrupted run failed"
    total_s = time.perf_counter() - started
    epoch_s = json.loads((whole / "settings.json").read_text())["summary"]["seconds"] / epochs
    reference = {"seconds": round(total_s, 1), "digest": weights_digest(whole), "accuracy": accuracy(data, whole)}
    # kills spread over the run, each at another point of its epoch
    # (the last epochs run faster than the average, which counts the first trace: never after epochs - 2)
    moments = [(1 + i * (epochs - 3) // max(kills - 1, 1), 0.2 + 0.4 * i / max(kills - 1, 1)) for i in range(kills)]
    runs = [one_kill(data, args, k, f, epoch_s, f"kill{i}", addresses) for i, (k, f) in enumerate(moments)]
    for run in runs:
        run["same_weights"] = run.pop("digest") == reference["digest"]
    return {
        "cluster": cluster,
        "epochs": epochs,
        "epoch_s": round(epoch_s, 2),
        "uninterrupted": reference,
        "kills": runs,
    }


def report(f: dict) -> list[str]:
    where = "2 TF_CONFIG workers, worker 1 killed" if f["cluster"] else "one process"
    rows = [
        f"{where}: {f['epochs']} epochs of {f['epoch_s']} s; uninterrupted accuracy {f['uninterrupted']['accuracy']:.4f}",
        "| killed | epochs done | lost (epochs) | resumed after | same weights | accuracy |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for k in f["kills"]:
        rows.append(
            f"| {k['killed_into_epoch']} | {k['epochs_done_at_kill']} | {k['lost_epochs']} | {k['resumed_after_epoch']} "
            f"| {'yes' if k['same_weights'] else 'no'} | {k['accuracy']:.4f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="a prepared data folder (default: the letters, as run_bench.py)")
    p.add_argument("--epochs", type=int, default=6, help="at least 4")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cluster", action="store_true", help="two TF_CONFIG workers on 127.0.0.1")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.data is None:
        sys.path.insert(0, str(ROOT / "bench"))
        from run_bench import letters_data

        a.data = letters_data()
    figures = bench(a.data.resolve(), a.epochs, a.kills, a.seed, a.cluster)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    print("\n".join(report(figures)))


if __name__ == "__main__":
    main()
