"""report.html: self-contained, escaped, and rendered by a real headless browser."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate import compute_metrics
from pipeline.report.html import write_report
from tests.conftest import run_cli

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("PIPELINE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (PIPELINE_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "reports"
    result = run_cli("evaluate", "--data", trained["data"], "--model", trained["model"], "--out", out)
    assert "report.html" in result.stdout
    return out / "report.html"


def test_report_is_one_self_contained_file(report):
    html = report.read_text(encoding="utf-8")
    images = re.findall(r"<img [^>]*src=\"([^\"]*)\"", html)
    assert len(images) == 7  # confusion matrix, reliability, risk-coverage, novelty, gallery, training curves, samples
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from anywhere
    for text in ("test accuracy", "cat", "dog", "fox", "Settings", "batch_size", "near_duplicate_distance"):
        assert text in html, text


def test_report_escapes_user_text(tmp_path):
    classes = ["<script>alert(1)</script>", 'b&b "quoted"']
    y = np.array([0, 1, 1])
    metrics = compute_metrics(y, np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]]), classes)
    data = tmp_path / "<data>"
    data.mkdir()
    counts = {c: {"found": 2, "skipped": 0, "duplicates": 0, "train": 1, "val": 0, "test": 1} for c in classes}
    (data / "report.json").write_text(
        json.dumps(
            {
                "images_dir": "/photos/<img src=x onerror=alert(1)>",
                "counts": counts,
                "skipped": [{"path": "a/<b>.jpg", "reason": "empty file (0 bytes)"}],
                "warnings": ["class folder '<i>' has no image files"],
                "settings": {"size": 16},
            }
        )
    )
    write_report(tmp_path / "report.html", metrics, data, tmp_path / "no-model", tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html and "<b>.jpg" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "b&amp;b &quot;quoted&quot;" in html
    assert "not available" in html  # missing figures and settings are said, not broken


def test_report_renders_in_a_browser(report, tmp_path):
    browser = chromium()
    shot = tmp_path / "shot.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    url = report.resolve().as_uri()
    done = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode()[-2000:]
    with Image.open(shot) as image:
        image.load()
        assert image.size == (1200, 2400)
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 20  # not a blank page
    # Every embedded figure decoded in the browser: a copy of the page that writes each
    # image's decoded width into the DOM (not a pixel count tuned to one colormap and window).
    probe = tmp_path / "probe.html"
    probe.write_text(
        report.read_text().replace(
            "</body>",
            "<script>window.addEventListener('load', () => { document.body.dataset.decoded = "
            "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0).join(','); });</script></body>",
        )
    )
    probed = subprocess.run(
        [*common[:-1], f"--user-data-dir={tmp_path / 'profile3'}", "--virtual-time-budget=10000", "--dump-dom"]
        + [probe.resolve().as_uri()],
        capture_output=True,
        timeout=120,
        text=True,
    )
    decoded = re.search(r'data-decoded="([\d,]*)"', probed.stdout)
    assert decoded, probed.stdout[-2000:]
    widths = [int(w) for w in decoded.group(1).split(",")]
    assert len(widths) == 7 and min(widths) > 200, widths

    dom = subprocess.run(
        [*common[:-1], f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom", url],
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    sources = re.findall(r"<img [^>]*src=\"([^\"]*)\"", dom.stdout)
    assert len(sources) == 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    for src in sources:  # each embedded figure is a whole PNG
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as figure:
            figure.load()
            assert figure.size[0] > 200
    assert "Confusion matrix" in dom.stdout and "Misclassified test images" in dom.stdout
