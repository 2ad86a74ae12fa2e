"""`make bench-serve`: a bounded load test of `pipeline serve` on loopback, against cold processes.

Starts `pipeline serve --port 0` on a model, then, from this process (one keep-alive
connection per client thread, on the same CPU as the server):

- low load: 1 client, one photo a request, one after another: p50/p99 latency;
- load: 16 clients at once, 2,000 requests, one photo each, every 20th a bad upload (a
  non-image, a truncated JPEG, an empty body, a wrong content type, an upload over
  --max-upload-mb, too many files): requests/s, images/s, p50/p99, errors on good input
  (must be 0) and the statuses the bad ones got (must all be 4xx);
- batches: 16 clients, 8 photos a request; then the load once more;
- clients: 16, then 64 clients at once (`--client-counts`), one photo a request, all good:
  throughput, p50/p99 latency and every status (a request waits for a model worker in
  serve's queue; any answer but 200 is a failure of the bound queue);
- the server's resident memory (VmRSS) after loading, after the warm-up and after each
  phase (flat between the two loads: nothing grows with the requests served), and its CPU
  seconds per request under load (less disturbed than wall time by other jobs on the CPU);
- `pipeline predict PHOTO` as a cold process, a few times: images/s of one process per photo.

    python bench/serve_load.py                  # builds 200 photos and a 1-epoch model in bench/work
    python bench/serve_load.py --model DIR --photos DIR --requests 2000 --clients 16
    python bench/serve_load.py --client-counts 16,64      # the scaling table alone is in every run

Benchmarks are not tests: CI does not run this. run_bench.py calls `bench_serve` too.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / ".." / "shared" / "bench"
WORK = ROOT / "bench" / "work"
PIPELINE = str(Path(sys.executable).parent / "pipeline")
MAX_UPLOAD_MB = 1  # the server's --max-upload-mb: the over-limit upload sends 1.5 MB
MAX_FILES = 16
BOUNDARY = "serve-load-boundary"


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def bad_uploads(photo: bytes) -> list[tuple[str, bytes, str, int]]:
    """(what, body, content type, expected status) for each kind of bad input."""
    return [
        ("non-image", multipart([("notes.jpg", b"a letter, not a picture\n" * 20)]), MULTIPART, 422),
        ("truncated", multipart([("cut.jpg", photo[: len(photo) // 2])]), MULTIPART, 422),
        ("empty body", b"", "image/jpeg", 400),
        ("wrong content type", b'{"image": "cat"}', "application/json", 415),
        ("over --max-upload-mb", b"\xff" * int(1.5 * MAX_UPLOAD_MB * 2**20), "image/jpeg", 413),
        ("too many files", multipart([("p.jpg", photo)] * (MAX_FILES + 1)), MULTIPART, 413),
    ]


class Client:
    """One keep-alive connection; a new one after the server closes it (it does after a 413)."""

    def __init__(self, port: int):
        self.port, self.connection = port, None

    def post(self, body: bytes, content_type: str) -> tuple[int, float, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            start = time.perf_counter()
            try:
                self.connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                response = self.connection.getresponse()
                answer = response.read()
            except (ConnectionError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
                continue  # a kept-alive connection the server had closed: once more on a new one
            if response.getheader("connection", "").lower() == "close":
                self.connection.close()
                self.connection = None
            return response.status, time.perf_counter() - start, answer
        raise AssertionError("unreachable")


def run_clients(port: int, jobs: list[tuple], clients: int) -> tuple[list[tuple], float]:
    """Run (kind, body, content type, expected) jobs from `clients` threads; each result is
    (kind, status, seconds, expected). Returns the results and the wall time."""
    todo = iter(enumerate(jobs))
    lock = threading.Lock()
    results: list[tuple | None] = [None] * len(jobs)

    def work() -> None:
        client = Client(port)
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            i, (kind, body, content_type, expected) = item
            try:
                status, seconds, _ = client.post(body, content_type)
            except OSError as e:
                status, seconds = f"connection error: {e}", float("nan")
            results[i] = (kind, status, seconds, expected)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used: per request, a figure that other jobs
    on a shared CPU disturb far less than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024


def peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) / 1024


def start_server(model: Path, args: tuple = ()) -> tuple[subprocess.Popen, int]:
    command = [PIPELINE, "serve", "--model", str(model), "--port", "0", "--max-upload-mb", str(MAX_UPLOAD_MB)]
    command += ["--max-files", str(MAX_FILES), *map(str, args)]  # later options win
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()  # "serving MODEL (...) on http://127.0.0.1:PORT ..."
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start: {line}{process.stderr.read()}")
    process.said = []  # its stderr after the first line, kept drained
    threading.Thread(target=lambda: process.said.extend(process.stderr), daemon=True).start()
    return process, int(found.group(1))


def cold_predict(model: Path, photo: Path, runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [PIPELINE, "predict", str(photo), "--model", str(model), "--quiet"], check=True, capture_output=True
        )
        walls.append(time.perf_counter() - start)
    return walls


def bench_clients(port: int, one: list[tuple], requests: int, counts: tuple[int, ...]) -> dict:
    """For each number of clients at once: requests/s, p50/p99 latency and the statuses of
    `requests` good one-photo requests."""
    found = {}
    for clients in counts:
        jobs = list(itertools.islice(itertools.cycle(one), max(requests, clients)))
        results, wall = run_clients(port, jobs, clients)
        latencies = [r[2] * 1000 for r in results if r[1] == 200]
        statuses: dict[str, int] = {}
        for _, status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        found[str(clients)] = {
            "requests": len(results),
            "per_s": len(results) / wall,
            "p50_ms": percentile(latencies, 50) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None,
            "statuses": statuses,
        }
    return found


def bench_serve(
    model: Path,
    photos_dir: Path,
    requests: int = 2000,
    clients: int = 16,
    cold_runs: int = 5,
    client_counts: tuple[int, ...] = (16, 64),
) -> dict:
    """Every figure of the module docstring, as a dict (`report` turns it into lines)."""
    files = sorted(photos_dir.rglob("*.jpg"))
    photos = [(f.name, f.read_bytes()) for f in files]
    one = [("photo", multipart([p]), MULTIPART, 200) for p in photos]
    bad = bad_uploads(photos[0][1])
    process, port = start_server(model)
    try:
        figures = {"server_rss_mb_loaded": rss_mb(process.pid), "photos": len(photos)}
        run_clients(port, one[:100], clients)  # warm-up: threads, allocations, page cache
        figures["server_rss_mb_warm"] = rss_mb(process.pid)

        low, wall = run_clients(port, list(itertools.islice(itertools.cycle(one), 300)), 1)
        latencies = [r[2] * 1000 for r in low]
        figures["low"] = {
            "requests": len(low),
            "per_s": len(low) / wall,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "errors": sum(r[1] != 200 for r in low),
        }

        jobs = [bad[(i // 20) % len(bad)] if i % 20 == 19 else one[i % len(one)] for i in range(requests)]
        cpu_before = cpu_s(process.pid)
        loaded, wall = run_clients(port, jobs, clients)
        server_cpu = cpu_s(process.pid) - cpu_before
        good = [r for r in loaded if r[0] == "photo"]
        latencies = [r[2] * 1000 for r in good]
        statuses: dict[str, dict] = {}
        for kind, status, _, expected in loaded:
            if kind != "photo":
                statuses.setdefault(kind, {"expected": expected, "got": {}})
                statuses[kind]["got"][str(status)] = statuses[kind]["got"].get(str(status), 0) + 1
        figures["load"] = {
            "requests": len(loaded),
            "clients": clients,
            "per_s": len(loaded) / wall,
            "images_per_s": len(good) / wall,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "good": len(good),
            "errors_on_good": sum(r[1] != 200 for r in good),
            "server_cpu_ms_per_request": 1000 * server_cpu / len(loaded),
            "bad": statuses,
        }
        figures["server_rss_mb_after_load"] = rss_mb(process.pid)
        figures["clients"] = bench_clients(port, one, requests, client_counts)
        figures["server_rss_mb_after_clients"] = rss_mb(process.pid)

        batch = 8
        batches = [
            ("batch", multipart([photos[(i * batch + j) % len(photos)] for j in range(batch)]), MULTIPART, 200)
            for i in range(200)
        ]
        done, wall = run_clients(port, batches, clients)
        figures["batches"] = {
            "requests": len(done),
            "photos_per_request": batch,
            "images_per_s": batch * len(done) / wall,
            "p50_ms": percentile([r[2] * 1000 for r in done], 50),
            "errors": sum(r[1] != 200 for r in done),
        }
        figures["server_rss_mb_after_batches"] = rss_mb(process.pid)
        again, wall = run_clients(port, jobs, clients)  # the same load once more: does memory still grow?
        figures["load_again"] = {
            "per_s": len(again) / wall,
            "errors_on_good": sum(r[1] != 200 for r in again if r[0] == "photo"),
        }
        figures["server_rss_mb_end"] = rss_mb(process.pid)
    finally:
        process.terminate()
        try:
            figures["server_exit_code"] = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            figures["server_exit_code"] = "killed after 30 s"
        time.sleep(0.2)
        figures["server_said"] = "".join(process.said)[-3000:]
    walls = cold_predict(model, files[0], cold_runs)
    figures["cold"] = {"runs": len(walls), "median_s": statistics.median(walls), "walls_s": walls}
    figures["cold"]["images_per_s"] = 1 / figures["cold"]["median_s"]
    figures["speedup_vs_cold"] = figures["load"]["images_per_s"] / figures["cold"]["images_per_s"]
    return figures


def flood_uploads(big_mb: float, seed: int = 0) -> tuple[bytes, bytes]:
    """(a small JPEG, a PNG of noise just under `big_mb` MB: it cannot compress, so it decodes
    to as many bytes of pixels as it has)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small, big = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(small, "JPEG")
    side = int((big_mb * 2**20 / 3) ** 0.5 * 0.995)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(big, "PNG", compress_level=0)
    return small.getvalue(), big.getvalue()


def bench_flood(
    model: Path, clients: int = 64, requests: int = 256, big_mb: float = 15, max_upload_mb: float = 20, args=()
) -> dict:
    """`clients` threads post `requests` uploads at once, every other one `big_mb` MB: the
    statuses (only 200, 4xx and 503 with Retry-After are allowed), requests/s, p99, the 503s,
    the server's peak and final resident memory, and whether it still answers /health."""
    small, big = flood_uploads(big_mb)
    jobs = [("big" if i % 2 else "small", big if i % 2 else small, "image/png", 200) for i in range(requests)]
    process, port = start_server(model, ("--max-upload-mb", max_upload_mb, *args))
    try:
        loaded = rss_mb(process.pid)
        results, wall = run_clients(port, jobs, clients)
        statuses: dict[str, int] = {}
        for _, status, _, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        answered = [r[2] * 1000 for r in results if r[1] == 200]
        after = rss_mb(process.pid)
        time.sleep(2)
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        health.request("GET", "/health")
        alive = health.getresponse().status == 200
        return {
            "clients": clients,
            "requests": requests,
            "big_mb": round(len(big) / 2**20, 1),
            "statuses": statuses,
            "per_s": requests / wall,
            "p99_ms_of_200": percentile(answered, 99) if answered else None,
            "rss_mb_loaded": loaded,
            "rss_mb_peak": peak_rss_mb(process.pid),
            "rss_mb_after": after,
            "rss_mb_after_2s": rss_mb(process.pid),
            "alive_after": alive,
            "only_allowed": all(s == "200" or s == "503" or s.startswith("4") for s in statuses),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def report(f: dict) -> list[str]:
    low, load, batches, cold = f["low"], f["load"], f["batches"], f["cold"]
    bad = ", ".join(f"{kind} {'/'.join(v['got'])}" for kind, v in load["bad"].items())
    return [
        "| what | requests/s | images/s | p50 ms | p99 ms | errors | server RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| 1 client, 1 photo a request, one after another | {low['per_s']:.0f} | {low['per_s']:.0f} "
        f"| {low['p50_ms']:.1f} | {low['p99_ms']:.1f} | {low['errors']} | {f['server_rss_mb_warm']:.0f} |",
        f"| {load['clients']} clients, {load['requests']} requests, 1 photo each, every 20th bad "
        f"| {load['per_s']:.0f} | {load['images_per_s']:.0f} | {load['p50_ms']:.1f} | {load['p99_ms']:.1f} "
        f"| {load['errors_on_good']} of {load['good']} good | {f['server_rss_mb_after_load']:.0f} |",
        f"| {load['clients']} clients, {batches['requests']} requests of {batches['photos_per_request']} photos "
        f"| {batches['images_per_s'] / batches['photos_per_request']:.0f} | {batches['images_per_s']:.0f} "
        f"| {batches['p50_ms']:.1f} | | {batches['errors']} | {f['server_rss_mb_after_batches']:.0f} |",
        f"| the {load['requests']} requests of 16 clients again | {f['load_again']['per_s']:.0f} | | | "
        f"| {f['load_again']['errors_on_good']} | {f['server_rss_mb_end']:.0f} |",
        f"| `pipeline predict PHOTO`, cold process (median of {cold['runs']}) | {cold['images_per_s']:.2f} "
        f"| {cold['images_per_s']:.2f} | {1000 * cold['median_s']:.0f} | | | |",
        "",
        f"Served under load: **{f['speedup_vs_cold']:.0f}x** the images/s of one cold process per photo. "
        f"Server RSS {f['server_rss_mb_loaded']:.0f} MB loaded, {f['server_rss_mb_warm']:.0f} MB after the warm-up, "
        f"{f['server_rss_mb_after_load']:.0f} MB after the load, {f['server_rss_mb_after_batches']:.0f} MB after "
        f"the batches, {f['server_rss_mb_end']:.0f} MB after the load again; exit code {f['server_exit_code']} on SIGTERM. "
        f"Server CPU under load: {load['server_cpu_ms_per_request']:.1f} ms a request. "
        f"Bad uploads, status received: {bad}.",
        "",
        "| clients at once | requests | requests/s | p50 ms | p99 ms | statuses |",
        "|---:|---:|---:|---:|---:|---|",
        *(
            f"| {n} | {c['requests']} | {c['per_s']:.0f} | {_ms(c['p50_ms'])} | {_ms(c['p99_ms'])} "
            f"| {', '.join(f'{k} x {v}' for k, v in sorted(c['statuses'].items()))} |"
            for n, c in f["clients"].items()
        ),
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def build_model(n: int) -> tuple[Path, Path]:
    """n real-photo JPEGs and a 1-epoch model on them, in bench/work (reused when complete)."""
    photos, data, model = WORK / f"serve_photos{n}", WORK / "serve_data", WORK / "serve_model"
    if not (photos / ".complete").exists():
        subprocess.run([sys.executable, str(SHARED / "make_photo_folder.py"), str(photos), "--n", str(n)], check=True)
        (photos / ".complete").touch()
    if not (model / "model.tflite").exists():
        subprocess.run([PIPELINE, "prepare", str(photos), "--out", str(data), "--quiet"], check=True)
        subprocess.run([PIPELINE, "train", "--data", str(data), "--out", str(model), "--epochs", "1", "-q"], check=True)
    return model, photos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (default: build one in bench/work)")
    p.add_argument("--photos", type=Path, help="a folder of JPEGs to send (default: 200 built in bench/work)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--cold-runs", type=int, default=5)
    p.add_argument("--client-counts", default="16,64", help="clients at once for the scaling table, comma-separated")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--flood", action="store_true", help="only the flood: 64 clients, every other upload 15 MB")
    p.add_argument("--flood-args", default="", help="serve options for the flood, e.g. '--max-inflight 8'")
    a = p.parse_args()
    if a.flood:
        model = a.model or build_model(200)[0]
        print(json.dumps(bench_flood(model, a.clients, a.requests, args=tuple(a.flood_args.split())), indent=2))
        return
    model, photos = (a.model, a.photos) if a.model and a.photos else build_model(200)
    counts = tuple(int(n) for n in a.client_counts.split(","))
    figures = bench_serve(model, photos, a.requests, a.clients, a.cold_runs, counts)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    print("\n".join(report(figures)))


if __name__ == "__main__":
    main()
