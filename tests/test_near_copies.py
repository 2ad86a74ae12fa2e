"""Near copies, not look-alikes: real copies of a picture stay in one split, pictures that
merely look alike are not chained into groups, and every class gets the split it asked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from tests.conftest import read_manifest, run_cli
from tests.test_honest_splits import assert_no_source_in_two_splits, split_sources, textured, write_textured_folder


def lookalike(kind: int, i: int, size: int = 48) -> Image.Image:
    """An outlined disc (kinds 0, 1: a pixel apart in radius) or rounded square (kind 2),
    each picture with its own jitter, stroke, greys and noise: their perceptual hashes sit
    within 4 bits of many others, so joined transitively they chained into groups of 20
    images of every class; no two are copies of one picture."""
    rng = np.random.default_rng(1000 * kind + i)
    picture = Image.new("L", (size, size), int(rng.integers(200, 250)))
    draw = ImageDraw.Draw(picture)
    r = 13 + rng.uniform(-2, 2) + kind
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    box, stroke, width = (cx - r, cy - r, cx + r, cy + r), int(rng.integers(10, 60)), int(rng.integers(3, 7))
    if kind == 2:
        draw.rounded_rectangle(box, radius=9, outline=stroke, width=width)
    else:
        draw.ellipse(box, outline=stroke, width=width)
    noisy = np.asarray(picture) + rng.normal(0, 6, (size, size))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB")


def write_lookalike_folder(root: Path, per_class: int = 40) -> Path:
    for kind, name in enumerate(("disc", "wide_disc", "square")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            lookalike(kind, i).save(root / name / f"{name}_{i:03d}.png")
    return root


def shares_from_manifest(out: Path) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, int]] = {}
    for row in read_manifest(out):
        if row["augmented"] == "0":
            c = counts.setdefault(row["label"], {"train": 0, "val": 0, "test": 0})
            c[row["split"]] += 1
    return {name: {s: n / sum(c.values()) for s, n in c.items()} for name, c in counts.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_folder_of_lookalikes_keeps_every_class_share(tmp_path, seed):
    images = write_lookalike_folder(tmp_path / "images")
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--augment", "0", "--seed", str(seed))
    report = json.loads((out / "report.json").read_text())
    assert max((len(g["paths"]) for g in report["near_duplicate_groups"]), default=1) <= 2
    made = shares_from_manifest(out)
    for name, shares in made.items():
        assert abs(shares["test"] - 0.2) <= 0.02 and abs(shares["val"] - 0.1) <= 0.02, (name, shares)
    table = report["split_shares"]
    assert table["asked"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    for name, shares in made.items():  # the report's table is what the manifest holds
        assert table["classes"][name]["made"] == pytest.approx(shares, abs=1e-4)
        assert table["classes"][name]["images"] == {s: round(v * 40) for s, v in shares.items()}
    assert table["largest_group"] <= 2
    assert not any("split" in w for w in report["warnings"])
    assert "split as asked (70/10/20 %) within" in result.stdout


def copies_of(original: Image.Image) -> dict[str, tuple[Image.Image, dict]]:
    """Each kind of copy a folder of photos holds: (picture, save options) by kind. Crops and
    brighter copies are not here: the perceptual hash of these textured pictures moves 8-12
    bits for a 1.5 % crop; bench/near_copies.py measures how many of them, and of these,
    the rule keeps together on real photos (docs/prepare.md)."""
    w, h = original.size
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter, shown upright: the copy decodes to the original
    patched = np.asarray(original).copy()
    patched[:4, :4] = 0
    return {
        "half.png": (original.resize((w // 2, h // 2), Image.Resampling.LANCZOS), {}),
        "q95.jpg": (original, {"quality": 95}),
        "q75.jpg": (original, {"quality": 75}),
        "q50.jpg": (original, {"quality": 50}),
        "q30.jpg": (original, {"quality": 30}),
        "darker.jpg": (ImageEnhance.Brightness(original).enhance(0.9), {"quality": 90}),
        "grey.png": (original.convert("L"), {}),
        "rotated.jpg": (original.transpose(Image.Transpose.ROTATE_90), {"quality": 90, "exif": exif}),
        "patched.png": (Image.fromarray(patched), {}),
    }


def test_real_copies_of_every_kind_never_cross_splits(tmp_path):
    images = tmp_path / "images"
    planted = []
    for c, name in enumerate(("cat", "dog", "fox")):
        (images / name).mkdir(parents=True)
        for i in range(14):
            original = textured(1000 * c + i, size=64)
            original.save(images / name / f"{name}_{i:03d}.png")
            if i < 4:  # four originals a class, each with every kind of copy
                for kind, (picture, options) in copies_of(original).items():
                    picture.save(images / name / f"copy_{i}_{kind}", **options)
                planted.append([f"{name}/{name}_{i:03d}.png"] + [f"{name}/copy_{i}_{k}" for k in copies_of(original)])
    for seed in (1, 2, 3):
        out = tmp_path / f"data{seed}"
        run_cli("prepare", images, "--out", out, "--augment", "0", "--seed", str(seed), "--quiet")
        where = split_sources(out)
        report = json.loads((out / "report.json").read_text())
        removed = {r for d in report["duplicates"] for r in d["removed"]}
        for group in planted:
            splits = set().union(*(where[p] for p in group if p not in removed))
            assert len(splits) == 1, (group, {p: where.get(p) for p in group})
        assert_no_source_in_two_splits(out)
        assert max(len(g["paths"]) for g in report["near_duplicate_groups"]) <= 1 + len(
            copies_of(Image.new("RGB", (8, 8)))
        )


def write_bursts_folder(root: Path) -> Path:
    """dog: 20 pictures; cat: two bursts, 12 copies of one picture and 8 of another, whose
    groups cannot both stay in train: the smaller goes whole to test (40 % of the class)."""
    (root / "dog").mkdir(parents=True)
    for i in range(20):
        textured(100 + i, size=64).save(root / "dog" / f"dog_{i:03d}.png")
    (root / "cat").mkdir()
    for burst, (seed, copies) in {"a": (7, 12), "b": (8, 8)}.items():
        for q in range(copies):
            textured(seed, size=64).save(root / "cat" / f"burst_{burst}_{q:02d}.jpg", quality=40 + 5 * q)
    return root


def test_a_class_a_group_pushes_off_its_shares_is_warned_about_and_fails_strict(tmp_path):
    images = write_bursts_folder(tmp_path / "images")
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--augment", "0")
    report = json.loads((out / "report.json").read_text())
    cat = report["split_shares"]["classes"]["cat"]
    assert cat["off_by"] > 5
    assert report["split_shares"]["largest_group"] == 12
    warning = next(w for w in report["warnings"] if w.startswith("class 'cat' split"))
    assert "test 40% (asked 20%)" in warning
    assert warning.endswith("its near-copy group of 8 images (first: cat/burst_b_00.jpg) went whole to test")
    assert f"warning: {warning}" in result.stdout
    assert not any(w.startswith("class 'dog'") for w in report["warnings"])
    strict = run_cli("prepare", images, "--out", tmp_path / "strict", "--augment", "0", "--strict", expect=1)
    assert "--strict" in strict.output and "class 'cat' split" in strict.output
    assert not (tmp_path / "strict").exists()


def test_a_near_copy_in_another_class_is_listed_as_a_label_conflict_and_kept(tmp_path):
    images = write_textured_folder(tmp_path / "images", per_class=10, classes=("cat", "dog"), size=64)
    Image.open(images / "cat" / "cat_003.png").save(images / "dog" / "maybe_a_dog.jpg", quality=80)
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--augment", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["cross_class_near_copies"] == [
        {
            "paths": ["cat/cat_003.png", "dog/maybe_a_dog.jpg"],
            "class_of": ["cat", "dog"],
            "split": report["cross_class_near_copies"][0]["split"],
            "classes": ["cat", "dog"],
        }
    ]
    assert report["label_conflicts"] == []
    kept = {r["path"] for r in read_manifest(out)}
    assert {"cat/cat_003.png", "dog/maybe_a_dog.jpg"} <= kept  # looked at, not removed
    assert "1 group(s) of near copies sit in different classes" in result.stdout


def test_near_duplicate_distance_option(tmp_path):
    images = write_textured_folder(tmp_path / "images", per_class=10, classes=("cat", "dog"), size=64)
    Image.open(images / "cat" / "cat_001.png").save(images / "cat" / "again.jpg", quality=70)
    run_cli("prepare", images, "--out", tmp_path / "on", "--augment", "0", "--quiet")
    on = json.loads((tmp_path / "on" / "report.json").read_text())
    assert [g["paths"] for g in on["near_duplicate_groups"]] == [["cat/again.jpg", "cat/cat_001.png"]]
    run_cli("prepare", images, "--out", tmp_path / "off", "--augment", "0", "--near-duplicate-distance", "-1", "-q")
    off = json.loads((tmp_path / "off" / "report.json").read_text())
    assert off["near_duplicate_groups"] == [] and off["settings"]["near_duplicate_distance"] == -1
    bad = run_cli("prepare", images, "--out", tmp_path / "bad", "--near-duplicate-distance", "40", expect=1)
    assert bad.output.startswith("error: --near-duplicate-distance must be -1 (off) to 16")


def test_inspect_says_how_prepare_would_split_each_class(tmp_path):
    images = write_bursts_folder(tmp_path / "images")
    found = json.loads(run_cli("inspect", images, "--json").stdout)
    run_cli("prepare", images, "--out", tmp_path / "data", "--quiet")
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert found["split_shares"] == report["split_shares"]  # what prepare then made, at its defaults
    assert any(w.startswith("class 'cat' split") for w in found["warnings"])
    text = run_cli("inspect", images).stdout
    assert "class 'cat' split" in text and "largest near-copy group: 12 images" in text
