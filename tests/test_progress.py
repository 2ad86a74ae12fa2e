"""Progress bars on: stdout stays exactly JSON, and native libraries' start-up lines stay off stderr."""

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import run_cli

NATIVE_NOISE = ("absl::InitializeLog", "port.cc", "XNNPACK", "cpu_feature_guard")


def test_json_stays_valid_with_bars_forced_on(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_PROGRESS", "always")
    folder = trained["images"]
    runs = {
        "evaluate": run_cli(
            "evaluate", "--data", trained["data"], "--model", trained["model"], "--out", tmp_path / "r", "--json"
        ),
        "predict": run_cli("predict", folder, "--model", trained["model"], "--json"),
        "inspect": run_cli("inspect", folder, "--json", "--workers", "1"),
    }
    for name, bar in (("evaluate", "evaluating"), ("predict", "reading images"), ("inspect", "decoding images")):
        json.loads(runs[name].stdout)  # exactly JSON, no bar, no note
        assert bar in runs[name].stderr and "\x1b[" in runs[name].stderr, name  # the bar was drawn, on stderr
    quiet = run_cli("predict", folder, "--model", trained["model"], "--json", "--quiet")
    assert quiet.stderr == ""


def run_with_terminal_stderr(args: list[str]) -> tuple[int, str, str]:
    """Run the installed `pipeline` with stderr on a pseudo-terminal (bars on) and stdout on a pipe."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_PROGRESS"}
    env.update(COLUMNS="120", TERM="xterm-256color")
    bin_dir = Path(sys.executable).parent
    process = subprocess.Popen([str(bin_dir / "pipeline"), *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():  # a full pty buffer would block the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = process.communicate(timeout=240)
    reader.join(timeout=10)
    os.close(master)
    return process.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_terminal_stderr_gets_bars_and_no_native_noise(trained, tmp_path):
    code, stdout, terminal = run_with_terminal_stderr(
        ["predict", str(trained["images"]), "--model", str(trained["model"]), "--json"]
    )
    assert code == 0, terminal
    assert len(json.loads(stdout)) == 60
    assert "reading images" in terminal and "\x1b[" in terminal
    assert not [n for n in NATIVE_NOISE if n in terminal], terminal

    code, stdout, terminal = run_with_terminal_stderr(
        [
            "evaluate",
            "--data",
            str(trained["data"]),
            "--model",
            str(trained["model"]),
            "--out",
            str(tmp_path / "r"),
            "--json",
        ]
    )
    assert code == 0, terminal
    assert json.loads(stdout)["n_test"] > 0
    assert not [n for n in NATIVE_NOISE if n in terminal], terminal
