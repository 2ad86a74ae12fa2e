#!/bin/bash
# bench/cpu_pair.sh, run from bench/work: whole-process wall and CPU seconds (getrusage of the children) of
# `pipeline train` (defaults) on letters_a0 and of the tutorial's 10 epochs, one after the other
export ROOT="$(cd "$(dirname "$0")/.." && pwd)"
python3 - "$@" <<'PY'
import resource, subprocess, sys, time, re, json
def run(name, cmd):
    t = time.perf_counter(); p = subprocess.run(cmd, capture_output=True, text=True); w = time.perf_counter() - t
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p, w, r
import os
P = os.environ["ROOT"] + "/.venv/bin/pipeline"; PY = os.environ["ROOT"] + "/.venv/bin/python"
before = resource.getrusage(resource.RUSAGE_CHILDREN)
p, w, r = run("pipe", [P, "train", "--data", "letters_a0", "--out", "cpu_def", "-q"])
cpu_p = (r.ru_utime - before.ru_utime) + (r.ru_stime - before.ru_stime)
e = subprocess.run([P, "evaluate", "--data", "letters_a0", "--model", "cpu_def", "--out", "/tmp/r10", "--json", "-q"], capture_output=True, text=True)
acc = json.loads(e.stdout)["accuracy"]
print(f"pipeline train (defaults): wall {w:.1f} s cpu {cpu_p:.1f} s test acc {acc:.4f} | {p.stdout.strip()}", flush=True)
before = resource.getrusage(resource.RUSAGE_CHILDREN)
p, w, r = run("tut", [PY, "../../../shared/bench/seed_style_train.py", "letters_a0", "--epochs", "10"])
cpu_t = (r.ru_utime - before.ru_utime) + (r.ru_stime - before.ru_stime)
print(f"tutorial 10 epochs: wall {w:.1f} s cpu {cpu_t:.1f} s {p.stdout.strip()}", flush=True)
print(f"cpu ratio tutorial/pipeline {cpu_t/cpu_p:.2f}")
PY
