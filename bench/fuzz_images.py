"""`make bench` part: thousands of malformed images through data/images.py's decoder.

Runs tests/test_fuzz_images.py with FUZZ_EXAMPLES cases (default 20,000) and prints how
many were tried and how long they took; any crash, hang or exception other than
UnreadableImage fails it, with Hypothesis' smallest failing file.

    python bench/fuzz_images.py [--examples 20000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20_000)
    args = parser.parse_args()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz_images.py")],
        cwd=ROOT,
        env={**os.environ, "FUZZ_EXAMPLES": str(args.examples), "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - started
    verdict = (
        "no crash, no hang, every refusal an UnreadableImage with its reason" if done.returncode == 0 else "FAILED"
    )
    print(f"fuzz: {args.examples} malformed images (+4 huge-header cases) in {seconds:.1f}s: {verdict}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
