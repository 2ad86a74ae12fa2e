"""prepare through the CLI: splits, augmentation, manifest, determinism, user errors."""

import json

import numpy as np
import pytest

from pipeline.data.images import preprocess
from tests.conftest import read_manifest, run_cli, write_image_folder


def test_prepare_writes_the_contract(images, tmp_path):
    out = tmp_path / "data"
    run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "2", "--quiet")
    classes = json.loads((out / "classes.json").read_text())
    assert classes == ["cat", "dog", "fox"]
    sizes = {}
    for split in ("train", "val", "test"):
        X = np.load(out / f"X_{split}.npy", allow_pickle=False)
        y = np.load(out / f"y_{split}.npy", allow_pickle=False)
        assert X.dtype == np.uint8 and X.shape[1:] == (16, 16, 3)
        assert len(X) == len(y) and np.issubdtype(y.dtype, np.integer)
        sizes[split] = len(X)
    # 12 per class: round(2.4)=2 test, max(1, round(1.2))=1 val, 9 train (+2 copies each)
    assert sizes == {"train": 3 * 9 * 3, "val": 3 * 1, "test": 3 * 2}
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == classes
    assert report["counts"]["cat"] == {
        "found": 12,
        "skipped": 0,
        "duplicates": 0,
        "train": 9,
        "val": 1,
        "test": 2,
        "train_augmented": 18,
    }
    assert report["skipped"] == [] and report["settings"]["augment"] == 2


def test_split_is_stratified_and_seeded(images, tmp_path):
    run_cli("prepare", images, "--out", tmp_path / "a", "--size", "16", "--seed", "1", "--quiet")
    run_cli("prepare", images, "--out", tmp_path / "b", "--size", "16", "--seed", "1", "--quiet")
    run_cli("prepare", images, "--out", tmp_path / "c", "--size", "16", "--seed", "2", "--quiet")
    for name in ("X_train.npy", "X_val.npy", "X_test.npy", "y_train.npy", "manifest.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    test_a = {r["path"] for r in read_manifest(tmp_path / "a") if r["split"] == "test"}
    test_c = {r["path"] for r in read_manifest(tmp_path / "c") if r["split"] == "test"}
    assert test_a != test_c
    y_test = np.load(tmp_path / "a" / "y_test.npy")
    assert np.bincount(y_test).tolist() == [2, 2, 2]


@pytest.mark.parametrize("cache", [False, True])
def test_reading_ahead_in_small_batches_does_not_change_the_outputs(tmp_path, monkeypatch, cache):
    """A chunk's files are read ahead up to READ_AHEAD_BYTES before they are decoded: a bound
    below one file (so each file is decoded alone, as for a folder of big photos) gives the
    same arrays, manifest and report, with and without the cache."""
    from pipeline.data import decoding

    images = write_image_folder(tmp_path / "images", per_class=40)
    (images / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    flags = ("--cache", tmp_path / "cache") if cache else ("--no-cache",)
    run_cli("prepare", images, "--out", tmp_path / "batched", "--size", "16", *flags, "--quiet")
    monkeypatch.setattr(decoding, "READ_AHEAD_BYTES", 1)  # the workers fork after this
    flags = ("--cache", tmp_path / "cache2") if cache else ("--no-cache",)
    run_cli("prepare", images, "--out", tmp_path / "one_by_one", "--size", "16", *flags, "--quiet")
    for name in ("X_train.npy", "X_val.npy", "X_test.npy", "y_train.npy", "manifest.csv", "report.json"):
        assert (tmp_path / "batched" / name).read_bytes() == (tmp_path / "one_by_one" / name).read_bytes(), name
    skipped = json.loads((tmp_path / "one_by_one" / "report.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == ["cat/broken.jpg"]


def test_workers_do_not_change_the_arrays(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=40)
    run_cli("prepare", images, "--out", tmp_path / "one", "--size", "16", "--workers", "1", "--quiet")
    run_cli("prepare", images, "--out", tmp_path / "two", "--size", "16", "--workers", "2", "--quiet")
    for name in ("X_train.npy", "X_test.npy", "manifest.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_manifest_rows_match_array_rows_and_augmentation_is_train_only(images, tmp_path):
    out = tmp_path / "data"
    run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "1", "--quiet")
    classes = json.loads((out / "classes.json").read_text())
    rows = read_manifest(out)
    arrays = {s: (np.load(out / f"X_{s}.npy"), np.load(out / f"y_{s}.npy")) for s in ("train", "val", "test")}
    assert len(rows) == sum(len(x) for x, _ in arrays.values())
    sources, changed, copies = {}, 0, 0
    for row in rows:
        X, y = arrays[row["split"]]
        i = int(row["index"])
        assert classes[y[i]] == row["label"]
        if row["augmented"] == "1":
            assert row["split"] == "train"
            copies += 1
            changed += not np.array_equal(X[i], sources[row["path"]])
        else:
            # the row is exactly the decoded source file
            assert np.array_equal(X[i], preprocess(images / row["path"], 16, "rgb").pixels)
            sources[row["path"]] = X[i]
    assert changed >= 0.9 * copies  # a random augmentation may, now and then, change nothing
    per_split = {}
    for row in rows:
        if row["augmented"] == "0":
            per_split.setdefault(row["path"], set()).add(row["split"])
    assert all(len(s) == 1 for s in per_split.values())  # no source image in two splits
    assert {r["split"] for r in rows if r["augmented"] == "1"} == {"train"}


def test_grayscale_and_no_validation(images, tmp_path):
    out = tmp_path / "data"
    run_cli(
        "prepare",
        images,
        "--out",
        out,
        "--size",
        "12",
        "--color",
        "grayscale",
        "--val-size",
        "0",
        "--augment",
        "0",
        "--quiet",
    )
    assert np.load(out / "X_train.npy").shape[1:] == (12, 12, 1)
    assert len(np.load(out / "X_val.npy")) == 0
    assert len(np.load(out / "X_train.npy")) + len(np.load(out / "X_test.npy")) == 36


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: None, [], "does not exist"),
        (lambda p: write_image_folder(p, classes=("only",)), [], "at least 2"),
        (lambda p: write_image_folder(p, per_class=2), [], "needs at least 3 per class"),
        (lambda p: write_image_folder(p), ["--size", "4"], "--size must be between"),
        (lambda p: write_image_folder(p), ["--test-size", "0.7", "--val-size", "0.4"], "below 1"),
        (lambda p: write_image_folder(p), ["--color", "sepia"], "'sepia' is not one of 'rgb', 'grayscale'"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, setup, args, message):
    folder = tmp_path / "images"
    setup(folder)
    result = run_cli("prepare", folder, "--out", tmp_path / "data", *args, expect=1)
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "data").exists()


def test_no_flip_keeps_left_and_right(tmp_path):
    """Half-dark, half-light images: --no-flip copies keep the dark side left, flips swap some."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.full((24, 24, 3), 230, np.uint8)
            pixels[:, :12] = 20
            pixels = np.clip(pixels.astype(int) + rng.integers(-15, 16, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")

    def left_darker(out):
        X = np.load(out / "X_train.npy").astype(float)
        rows = [r for r in read_manifest(out) if r["split"] == "train" and r["augmented"] == "1"]
        return [X[int(r["index"]), :, :6].mean() < X[int(r["index"]), :, -6:].mean() for r in rows]

    common = ("--size", "16", "--augment", "6", "--quiet")
    run_cli("prepare", tmp_path / "images", "--out", tmp_path / "kept", "--no-flip", *common)
    run_cli("prepare", tmp_path / "images", "--out", tmp_path / "flipped", *common)
    assert all(left_darker(tmp_path / "kept"))
    assert not all(left_darker(tmp_path / "flipped"))
    assert json.loads((tmp_path / "kept" / "report.json").read_text())["settings"]["flip"] is False
