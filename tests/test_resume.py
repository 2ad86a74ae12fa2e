"""train's checkpoints: a run SIGKILLed mid-way, then `--resume`, ends with the model an
uninterrupted run of the same seed gives; a checkpoint of other data or settings is refused
with one line; a run without --resume starts over and says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.training.checkpoints import checkpoint_dir
from tests.conftest import run_cli

EPOCHS = 12
ARGS = ["--epochs", EPOCHS, "--patience", EPOCHS, "--batch-size", "16", "--precision", "float32"]


def epochs_done(out: Path) -> int:
    try:
        return json.loads((checkpoint_dir(out) / "state.json").read_text())["epochs_done"]
    except (OSError, ValueError, KeyError):
        return 0


def killed_run(data: Path, out: Path, after_epochs: int) -> subprocess.Popen:
    """`pipeline train` in a process SIGKILLed as soon as `after_epochs` epochs are checkpointed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--data", data, "--out", out, *map(str, ARGS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PIPELINE_PROGRESS": "never"},
    )
    deadline = time.monotonic() + 240
    while epochs_done(out) < after_epochs:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process


@pytest.fixture(scope="module")
def killed(trained, tmp_path_factory) -> dict:
    """One run killed after its third epoch's checkpoint (what it left is copied by each test)."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "model"
    killed_run(trained["data"], out, 3)
    return {"root": root, "out": out, "done": epochs_done(out)}


def copy_of_killed(killed: dict, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    for entry in killed["root"].iterdir():
        shutil.copytree(entry, tmp_path / entry.name)
    return out


def test_a_sigkill_leaves_no_model_folder_and_a_checkpoint_beside_it(killed):
    names = sorted(p.name for p in killed["root"].iterdir())
    assert "model" not in names  # never a model folder that looks complete
    assert ".model.checkpoint" in names and any(n.startswith(".model.tmp-") for n in names), names
    assert 3 <= killed["done"] < EPOCHS


def test_resume_after_sigkill_ends_with_the_uninterrupted_runs_model(trained, killed, tmp_path):
    out = copy_of_killed(killed, tmp_path)
    result = run_cli("train", "--data", trained["data"], "--out", out, *ARGS, "--resume")
    said = result.stderr
    assert f"resuming after epoch {killed['done']} of {EPOCHS}" in said, said
    assert "note: removed .model.tmp-" in said  # the killed run's unfinished folder, said and gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no checkpoint, no leftover
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["epochs_run"] == EPOCHS and summary["resumed_after_epoch"] == killed["done"]
    assert len((out / "history.csv").read_text().splitlines()) == EPOCHS + 1

    whole = tmp_path / "whole"
    run_cli("train", "--data", trained["data"], "--out", whole, *ARGS, "--quiet")
    from pipeline.inference.model_folder import load_keras_model

    resumed, uninterrupted = load_keras_model(out).get_weights(), load_keras_model(whole).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted))  # the same weights, bit for bit
    assert (out / "history.csv").read_bytes() == (whole / "history.csv").read_bytes()


@pytest.mark.parametrize(
    "change, words",
    [(["--epochs", "13"], "other settings (epochs 12 there, 13 here)"), (["--seed", "7"], "seed 42 there, 7 here")],
    ids=["epochs", "seed"],
)
def test_a_checkpoint_of_other_settings_is_refused_in_one_line(trained, killed, tmp_path, change, words):
    out = copy_of_killed(killed, tmp_path)
    before = (checkpoint_dir(out) / "state.json").read_bytes()
    args = [*ARGS, *change, "--resume"]
    result = run_cli("train", "--data", trained["data"], "--out", out, *args, expect=1)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: refusing to resume from") and words in last, last
    assert "Traceback" not in result.output and not out.exists()
    assert (checkpoint_dir(out) / "state.json").read_bytes() == before  # left as it was


def test_a_checkpoint_of_other_data_is_refused_in_one_line(trained, killed, tmp_path):
    out = copy_of_killed(killed, tmp_path)
    data = Path(shutil.copytree(trained["data"], tmp_path / "data"))
    y = np.load(data / "y_val.npy")
    np.save(data / "y_val.npy", y[::-1].copy())  # other labels: other data
    result = run_cli("train", "--data", data, "--out", out, *ARGS, "--resume", expect=1)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: refusing to resume from") and "other data" in last, last


def test_without_resume_a_run_starts_over_and_says_a_checkpoint_was_there(trained, killed, tmp_path):
    out = copy_of_killed(killed, tmp_path)
    args = ["--epochs", "2", "--batch-size", "16", "--precision", "float32"]
    result = run_cli("train", "--data", trained["data"], "--out", out, *args)
    assert f"holds an unfinished run ({killed['done']} epoch(s) done): starting over" in result.stderr
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["epochs_run"] == 2 and summary["resumed_after_epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_resume_without_a_checkpoint_trains_from_the_first_epoch(trained, tmp_path):
    args = ["--epochs", "1", "--batch-size", "16", "--precision", "float32", "--resume"]
    result = run_cli("train", "--data", trained["data"], "--out", tmp_path / "model", *args)
    assert "--resume: no checkpoint at" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_killed_worker_restarted_with_the_cluster_resumes_from_the_last_epoch(trained, tmp_path):
    """As a Kubernetes Job does: worker 1 is SIGKILLed, the chief stops with one line (a
    lost peer), both are started again with the same TF_CONFIG and command (--resume
    every time), and the cluster continues after the chief's last checkpointed epoch."""
    from tests.test_distribute import Worker, free_ports, leftovers

    out = tmp_path / "model"
    epochs = 40
    args = ["--data", trained["data"], "--out", out, "--epochs", epochs, "--patience", epochs]
    args += ["--batch-size", "16", "--precision", "float32", "--resume"]
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    first = [Worker(index, addresses, args) for index in range(2)]
    try:
        deadline = time.monotonic() + 240
        while epochs_done(out) < 2:
            assert all(w.process.poll() is None for w in first), [w.stderr[-2000:] for w in first]
            assert time.monotonic() < deadline, [w.stderr[-2000:] for w in first]
            time.sleep(0.02)
        first[1].kill(signal.SIGKILL)
        assert first[0].wait(timeout=120) == 1, first[0].stderr
    finally:
        for worker in first:
            worker.kill()
    assert first[0].stderr.strip().splitlines()[-1].startswith("error: the cluster failed while")
    done = epochs_done(out)
    assert 2 <= done < epochs and not out.exists()

    again = [Worker(index, addresses, args) for index in range(2)]  # the same addresses: the Job's pods
    try:
        assert again[0].wait(timeout=300) == 0, again[0].stderr
        assert again[1].wait(timeout=60) == 0, again[1].stderr
    finally:
        for worker in again:
            worker.kill()
    resumed_at = int(again[0].stderr.split("resuming after epoch ")[1].split()[0])
    assert resumed_at >= done  # the last complete epoch (the chief may have finished one more before it stopped)
    assert not any(line.startswith(f"epoch {resumed_at}/") for line in again[0].lines)  # nothing trained twice
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["epochs_run"] == epochs and summary["resumed_after_epoch"] == resumed_at
    assert summary["strategy"] == "multi_worker" and summary["workers"] == 2
    assert len((out / "history.csv").read_text().splitlines()) == epochs + 1
    assert again[1].out[-1].startswith(f"worker 1 of 2: trained {epochs} epoch(s)")  # the chief's history too
    digest = again[0].out[-1].split("weights sha256 ")[1].strip()
    assert again[1].out[-1].split("weights sha256 ")[1].strip() == digest  # the workers stayed in sync
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and leftovers(tmp_path) == []
    from pipeline.inference.model_folder import load_keras_model

    assert load_keras_model(out) is not None


def test_after_ctrl_c_the_best_model_so_far_is_kept_and_resume_finishes_the_run(trained, tmp_path):
    out = tmp_path / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "--data", trained["data"], "--out", out, *map(str, ARGS)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PIPELINE_PROGRESS": "never"},
    )
    deadline = time.monotonic() + 240
    while epochs_done(out) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    said = process.communicate(timeout=120)[1]
    assert process.returncode == 130, said
    assert "`train --resume` continues from the checkpoint" in said and "the best model so far" in said
    interrupted = json.loads((out / "settings.json").read_text())["summary"]
    assert interrupted["interrupted"] is True and epochs_done(out) == interrupted["epochs_run"] < EPOCHS

    result = run_cli("train", "--data", trained["data"], "--out", out, *ARGS, "--resume")
    assert f"resuming after epoch {interrupted['epochs_run']} of {EPOCHS}" in result.stderr
    summary = json.loads((out / "settings.json").read_text())["summary"]
    assert summary["interrupted"] is False and summary["epochs_run"] == EPOCHS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
