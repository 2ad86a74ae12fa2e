"""Untrusted folders: bad files, odd modes, ignored clutter, empty classes, links, --strict.

Every bad file is built here under tmp_path; most cases run through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_folder import scan_folder
from pipeline.data.images import UnreadableImage, decode_image, preprocess
from tests.conftest import read_manifest, run_cli, snapshot, write_image_folder


def source_rows(out: Path, size: int) -> dict[str, np.ndarray]:
    """Each non-augmented manifest path -> its array row."""
    arrays = {s: np.load(out / f"X_{s}.npy") for s in ("train", "val", "test")}
    return {r["path"]: arrays[r["split"]][int(r["index"])] for r in read_manifest(out) if r["augmented"] == "0"}


def noise(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --- bad files ---------------------------------------------------------------------------


def truncated_jpeg(path: Path) -> Path:
    Image.fromarray(noise(1, 64)).save(path.with_suffix(".full.jpg"), quality=90)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(path: Path) -> Path:
    Image.fromarray(noise(2, 64)).save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def bomb_png(path: Path, size=(12000, 12000)) -> Path:
    """A bilevel PNG of over 89 million pixels: a few kilobytes on disk."""
    Image.new("1", size).save(path)
    return path


def write_bad_files(folder: Path) -> dict[str, str]:
    """One of each undecodable kind; returns {name: words its skip reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "letter.png").write_text("Dear user, this is not a picture.\n")
    truncated_jpeg(folder / "cut.jpg")
    truncated_png(folder / "cut.png")
    bomb_png(folder / "bomb.png")
    return {
        "empty.jpg": "empty file",
        "letter.png": "not an image",
        "cut.jpg": "truncated",
        "cut.png": "truncated",
        "bomb.png": "decompression bomb",
    }


def test_verify_alone_passes_the_truncated_jpeg(tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    with Image.open(path) as image:
        image.verify()  # no complaint: only decoding the pixels finds the missing half
    with pytest.raises(UnreadableImage, match="truncated"):
        decode_image(path, "rgb")


def test_bad_files_are_skipped_with_reasons_and_the_run_succeeds(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)
    expected = write_bad_files(images / "dog")
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0")
    report = json.loads((out / "report.json").read_text())
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {f"dog/{name}" for name in expected}
    for name, words in expected.items():
        reason = skipped[f"dog/{name}"]
        assert words in reason, (name, reason)
        assert f"skipped dog/{name}: {reason}" in result.stdout  # on screen, same words
    assert report["counts"]["dog"]["found"] == 8 + len(expected)
    assert report["counts"]["dog"]["skipped"] == len(expected)
    assert report["totals"]["skipped"] == len(expected)
    assert {r["path"] for r in read_manifest(out)}.isdisjoint(skipped)  # never a row
    rows = sum(len(np.load(out / f"y_{s}.npy")) for s in ("train", "val", "test"))
    assert rows == 3 * 8


@pytest.mark.parametrize("size", [(12000, 12000), (20000, 10000)])  # warning zone, and past twice the limit
def test_decompression_bomb_is_refused_before_its_pixels_exist(tmp_path, size):
    path = bomb_png(tmp_path / "bomb.png", size)
    assert path.stat().st_size < 100_000
    script = textwrap.dedent(
        f"""
        import resource, sys
        from pipeline.data.images import UnreadableImage, preprocess
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            preprocess({str(path)!r}, 16, "rgb").pixels
        except UnreadableImage as e:
            print("refused:", e)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("grew_kib", after - before)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: too many pixels" in done.stdout and "decompression bomb" in done.stdout
    grew_kib = int(done.stdout.split("grew_kib")[1])
    # Even the packed 1-bit pixels would be 18 MB, as 8-bit RGB 430 MB; nothing was allocated.
    assert grew_kib < 8 * 1024, grew_kib


# --- modes and orientation ---------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # wide: left half red, right half black
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = decode_image(path, "rgb")
    assert image.size == (20, 40)  # now tall
    array = np.asarray(image).astype(int)
    assert array[:18].mean(axis=(0, 1)).round().tolist()[0] > 200  # red on top
    assert array[22:].max() < 40  # black below
    small = preprocess(path, 16, "rgb").pixels.astype(int)
    assert small[:6, :, 0].min() > 200 and small[10:, :, 0].max() < 60


def _palette(path: Path, transparent: bool) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    if transparent:
        image.save(path, transparency=1)
    else:
        image.save(path)


def _hidden_colour(path: Path, mode: str) -> None:
    """Every pixel fully transparent, hiding a bright colour (or a bright grey)."""
    if mode == "RGBA":
        pixels = np.zeros((8, 8, 4), dtype=np.uint8)
        pixels[..., 1] = 255  # pure green, invisible
    else:
        pixels = np.zeros((8, 8, 2), dtype=np.uint8)
        pixels[..., 0] = 90  # a dark grey, invisible
    Image.fromarray(pixels, mode).save(path)


@pytest.mark.parametrize(
    "maker, expected",
    [
        (lambda p: _palette(p, transparent=False), (255, 0, 0)),
        (lambda p: _palette(p, transparent=True), (255, 255, 255)),
        (lambda p: Image.new("L", (8, 8), 77).save(p), (77, 77, 77)),
        (lambda p: _hidden_colour(p, "LA"), (255, 255, 255)),
        (lambda p: _hidden_colour(p, "RGBA"), (255, 255, 255)),
        (lambda p: Image.new("1", (8, 8), 1).save(p), (255, 255, 255)),
    ],
    ids=["palette", "palette-transparent", "L", "LA-transparent", "RGBA-transparent", "bilevel"],
)
def test_modes_come_out_as_8bit_rgb_on_white(tmp_path, maker, expected):
    path = tmp_path / "image.png"
    maker(path)
    array = preprocess(path, 16, "rgb").pixels
    assert array.dtype == np.uint8 and array.shape == (16, 16, 3)
    assert np.all(array == np.array(expected, dtype=np.uint8)), array[0, 0]


def test_half_transparent_pixels_blend_with_white_not_with_their_hidden_colour(tmp_path):
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red at half opacity -> pink on white
    pixels[..., 3] = 128
    pixels[0, 0] = (0, 255, 0, 0)  # one invisible green pixel
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    image = np.asarray(decode_image(tmp_path / "a.png", "rgb")).astype(int)
    assert image[0, 0].tolist() == [255, 255, 255]
    assert abs(image[4, 4] - [255, 127, 127]).max() <= 1


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # full magenta+yellow = red
    assert Image.open(path).mode == "CMYK"
    array = preprocess(path, 16, "rgb").pixels.astype(int)
    assert abs(array - [255, 0, 0]).max() <= 8
    white = tmp_path / "white.jpg"
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(white, quality=95)
    assert preprocess(white, 16, "rgb").pixels.min() >= 247


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32768], [0, 1000]], dtype=np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    array = np.asarray(decode_image(path, "grayscale")).astype(int)
    assert array.tolist() == [[255, 128], [0, 4]]
    dark = tmp_path / "dark16.png"  # a dark 16-bit picture is still 16 bits: 200/65535 is black
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(dark)
    assert np.asarray(decode_image(dark, "grayscale")).max() <= 1


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_gives_its_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / f"anim{suffix}"
    options = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    array = preprocess(path, 16, "rgb").pixels.astype(int)
    assert abs(array - [255, 0, 0]).max() <= 2


def test_a_mixed_folder_gives_one_uint8_shape_with_the_right_pixels(tmp_path):
    """Grayscale, palette, RGBA, 16-bit, CMYK and rotated files side by side, through the CLI."""
    images = write_image_folder(tmp_path / "images", per_class=6, classes=("cat", "dog"))
    odd = images / "fox"
    odd.mkdir()
    Image.new("L", (20, 20), 60).save(odd / "gray.png")
    _palette(odd / "palette.gif", transparent=False)
    _hidden_colour(odd / "ghost.png", "RGBA")
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(odd / "deep.png")
    Image.new("CMYK", (20, 20), (255, 0, 255, 0)).save(odd / "print.jpg", quality=95)  # green
    Image.fromarray(noise(5, 20)).save(odd / "rgb.bmp")
    Image.fromarray(noise(6, 20)).convert("RGBA").save(odd / "rgba.webp", lossless=True)
    out = tmp_path / "data"
    run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0", "--quiet")
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == []
    for split in ("train", "val", "test"):
        X = np.load(out / f"X_{split}.npy")
        assert X.dtype == np.uint8 and X.shape[1:] == (16, 16, 3)
    rows = source_rows(out, 16)
    assert np.all(rows["fox/gray.png"] == 60)
    assert np.all(rows["fox/palette.gif"] == [255, 0, 0])
    assert np.all(rows["fox/ghost.png"] == 255)
    assert np.all(rows["fox/deep.png"] == 128)
    assert abs(rows["fox/print.jpg"].astype(int) - [0, 255, 0]).max() <= 8
    gray_out = tmp_path / "gray"
    run_cli("prepare", images, "--out", gray_out, "--size", "16", "--color", "grayscale", "--quiet")
    for split in ("train", "val", "test"):
        assert np.load(gray_out / f"X_{split}.npy").shape[1:] == (16, 16, 1)


# --- what is ignored ---------------------------------------------------------------------


def write_clutter(images: Path) -> None:
    good = Image.fromarray(noise(9))
    good.save(images / "cat" / ".hidden.jpg")
    good.save(images / "cat" / "._IMG_0001.jpg")
    (images / "dog" / "Thumbs.db").write_bytes(b"\0" * 64)
    (images / "dog" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (images / "dog" / "notes.txt").write_text("taken on holiday\n")
    (images / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    mac = images / "__MACOSX" / "cat"
    mac.mkdir(parents=True)
    for i in range(3):
        good.save(mac / f"._cat_{i}.jpg")
    hidden = images / "cat" / ".thumbnails"
    hidden.mkdir()
    good.save(hidden / "t1.jpg")
    (images / ".git").mkdir()
    good.save(images / ".git" / "x.png")
    good.save(images / "stray.jpg")  # directly in IMAGES_DIR
    (images / "README.md").write_text("my photos\n")


def test_clutter_is_ignored_never_counted_and_never_a_class(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6, classes=("cat", "dog"))
    write_clutter(images)
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0")
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == [] and report["warnings"] == []
    assert report["counts"]["cat"]["found"] == 6 and report["counts"]["dog"]["found"] == 6
    assert report["totals"]["found"] == 12
    ignored = {item["path"]: item["reason"] for item in report["ignored"]["items"]}
    assert ignored == {
        ".git": "hidden folder",
        "README.md": "file directly in the images folder (classes are sub-folders)",
        "__MACOSX": "macOS metadata folder (__MACOSX)",
        "stray.jpg": "file directly in the images folder (classes are sub-folders)",
        "cat/.thumbnails": "hidden folder",
        "cat/.hidden.jpg": "hidden file",
        "cat/._IMG_0001.jpg": "macOS resource fork (._ file)",
        "dog/.DS_Store": "hidden file",
        "dog/Thumbs.db": "system file",
        "dog/desktop.ini": "system file",
        "dog/notes.txt": "not an image file extension",
    }
    counts = report["ignored"]["counts"]
    assert counts["system file"] == 2 and counts["hidden file"] == 2 and sum(counts.values()) == len(ignored)
    assert report["totals"]["ignored"] == len(ignored)
    assert "11 ignored" in result.stdout
    assert all(not r["path"].startswith(("__MACOSX", ".", "stray")) for r in read_manifest(out))


def test_extensions_in_any_case_are_accepted(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=5, classes=("cat", "dog"))
    for i, suffix in enumerate([".JPG", ".Jpeg", ".PNG", ".BmP", ".GIF", ".TIF", ".tiff", ".WEBP"]):
        Image.fromarray(noise(100 + i)).save(images / "cat" / f"extra_{i}{suffix}")
    scan = scan_folder(images)
    assert sum(1 for _, label in scan.files if label == 0) == 5 + 8
    assert scan.ignored == []


# --- empty classes and links -------------------------------------------------------------


def test_a_class_with_no_usable_image_is_left_out_with_a_warning(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)
    write_bad_files(images / "broken")
    (images / "empty").mkdir()
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0")
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["cat", "dog", "fox"]
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == classes and set(report["counts"]) == set(classes)
    assert "class folder 'broken' has no usable image and is left out" in report["warnings"]
    assert "class folder 'empty' has no image files" in report["warnings"]
    assert "warning: class folder 'broken' has no usable image" in result.stdout
    assert "warning: class folder 'empty' has no image files" in result.stdout
    # labels are renumbered over the classes that remain
    for split in ("train", "val", "test"):
        y = np.load(out / f"y_{split}.npy")
        assert y.min() >= 0 and y.max() <= 2
    for row in read_manifest(out):
        assert row["label"] == row["path"].split("/")[0]


def test_symbolic_link_loops_never_hang_or_leak_between_classes(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=6)
    os.symlink("..", images / "cat" / "loop")  # back to IMAGES_DIR: would reach every class
    os.symlink(".", images / "dog" / "self")
    os.symlink(images / "fox", images / "dog" / "foxes")  # another class's folder
    deep = images / "fox" / "a" / "b"
    deep.mkdir(parents=True)
    os.symlink(images / "fox", deep / "up")
    out = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare", str(images), "--out", str(out), "--size", "16", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert {name: c["found"] for name, c in report["counts"].items()} == {"cat": 6, "dog": 6, "fox": 6}
    assert report["label_conflicts"] == [] and report["duplicates"] == []
    loops = {item["path"] for item in report["ignored"]["items"] if "symbolic link" in item["reason"]}
    assert loops == {"cat/loop", "dog/self", "dog/foxes", "fox/a/b/up"}


# --- --strict, too few images, the user's folder -----------------------------------------


@pytest.mark.parametrize("problem", ["corrupt file", "empty class", "label conflict"])
def test_strict_fails_on_any_problem_and_writes_nothing(tmp_path, problem):
    images = write_image_folder(tmp_path / "images", per_class=6)
    out = tmp_path / "data"
    run_cli("prepare", images, "--out", out, "--size", "16", "--quiet")
    before = snapshot(out)
    if problem == "corrupt file":
        (images / "dog" / "empty.jpg").write_bytes(b"")
    elif problem == "empty class":
        (images / "zebra").mkdir()
    else:
        Image.open(images / "cat" / "cat_000.png").save(images / "dog" / "looks_like_a_cat.png")
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--strict", expect=1)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --strict:"), result.output
    assert "nothing written" in lines[0] and "Traceback" not in result.output
    assert snapshot(out) == before
    # no temporary folder left; the decoded files' cache (.cache beside --out) stays for the next run
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "data", "images"]
    run_cli("prepare", images, "--out", out, "--size", "16", "--quiet")  # without --strict it goes through


def test_too_few_images_names_the_class_and_what_it_needs(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=10, classes=("cat", "dog"))
    write_image_folder(images, per_class=2, classes=("owl",), seed=3)
    result = run_cli("prepare", images, "--out", tmp_path / "data", expect=1)
    assert "class 'owl' has 2 usable image(s)" in result.output
    assert "needs at least 3 per class" in result.output
    assert result.output.strip().count("\n") == 0
    run_cli("prepare", images, "--out", tmp_path / "data", "--val-size", "0", "--quiet")  # train + test needs 2
    result = run_cli("prepare", images, "--out", tmp_path / "data", "--val-size", "0", "--test-size", "0.95", expect=1)
    assert "class 'cat'" in result.output or "class 'dog'" in result.output


def test_the_users_folder_is_never_modified(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)
    write_bad_files(images / "cat")
    write_clutter(images)
    Image.open(images / "dog" / "dog_000.png").save(images / "dog" / "copy.bmp")
    os.symlink("..", images / "fox" / "loop")
    before = snapshot(images)
    dirs_before = sorted(str(p) for p in images.rglob("*") if p.is_dir())
    run_cli("prepare", images, "--out", tmp_path / "data", "--size", "16", "--quiet")
    assert snapshot(images) == before
    assert sorted(str(p) for p in images.rglob("*") if p.is_dir()) == dirs_before


def test_predict_names_each_bad_file_and_still_predicts_the_others(trained, tmp_path):
    expected = write_bad_files(tmp_path / "bad")
    good = sorted((trained["images"] / "fox").iterdir())[:2]
    bad = [tmp_path / "bad" / name for name in sorted(expected)]
    result = run_cli("predict", good[0], *bad, good[1], "--model", trained["model"], "--json", expect=1)
    assert [p["file"] for p in json.loads(result.stdout)] == [str(g) for g in good]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors):
        assert line.startswith(f"error: {path}: ") and expected[path.name] in line
    assert "Traceback" not in result.output
