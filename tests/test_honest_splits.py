"""Honest splits: exact duplicates, label conflicts, near-duplicate groups, no leakage, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import dedup
from pipeline.data.splits import split_by_group
from tests.conftest import read_manifest, run_cli, write_image_folder


def textured(seed: int, size: int = 48) -> Image.Image:
    """A smooth random picture with fine grain: perceptual hashes of two seeds differ by ~30 bits."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    grain = rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse).astype(int) + grain, 0, 255).astype(np.uint8))


def write_textured_folder(root: Path, per_class: int = 12, classes=("cat", "dog", "fox"), size: int = 48) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            textured(1000 * c + i, size).save(root / name / f"{name}_{i:03d}.png")
    return root


def add_near_duplicates(root: Path, name: str, i: int) -> list[str]:
    """A resized PNG copy and a re-encoded JPEG copy of root/name/name_i.png, under other names."""
    original = Image.open(root / name / f"{name}_{i:03d}.png")
    (root / name / "edits").mkdir(exist_ok=True)
    original.resize((32, 32), Image.Resampling.LANCZOS).save(root / name / "edits" / f"small_{i}.png")
    original.save(root / name / f"IMG_{i:04d}.jpg", quality=85)
    return [f"{name}/{name}_{i:03d}.png", f"{name}/edits/small_{i}.png", f"{name}/IMG_{i:04d}.jpg"]


def split_sources(out: Path) -> dict[str, set[str]]:
    """Source path -> the splits its rows sit in."""
    found: dict[str, set[str]] = {}
    for row in read_manifest(out):
        found.setdefault(row["path"], set()).add(row["split"])
    return found


def assert_no_source_in_two_splits(out: Path) -> None:
    assert all(len(s) == 1 for s in split_sources(out).values())
    digests: dict[bytes, str] = {}
    for split in ("train", "val", "test"):
        rows = [r for r in read_manifest(out) if r["split"] == split and r["augmented"] == "0"]
        X = np.load(out / f"X_{split}.npy")
        for r in rows:
            digest = hashlib.sha256(X[int(r["index"])].tobytes()).digest()
            assert digests.setdefault(digest, split) == split, (
                f"{r['path']} has pixels identical to a row of another split"
            )


def test_exact_duplicates_across_formats_keep_one_copy(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=10)
    original = Image.open(images / "cat" / "cat_000.png")
    original.save(images / "cat" / "zz_copy.bmp")
    (images / "cat" / "sub").mkdir()
    original.save(images / "cat" / "sub" / "again.tif")
    Image.open(images / "dog" / "dog_002.png").save(images / "dog" / "other_name.webp", lossless=True)
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0")
    report = json.loads((out / "report.json").read_text())
    groups = sorted(report["duplicates"], key=lambda g: g["kept"])
    assert groups == [
        {"kept": "cat/cat_000.png", "removed": ["cat/zz_copy.bmp", "cat/sub/again.tif"]},
        {"kept": "dog/dog_002.png", "removed": ["dog/other_name.webp"]},
    ]
    assert report["counts"]["cat"]["duplicates"] == 2 and report["counts"]["dog"]["duplicates"] == 1
    assert report["totals"]["duplicates_removed"] == 3
    paths = {r["path"] for r in read_manifest(out)}
    assert "cat/cat_000.png" in paths and "dog/dog_002.png" in paths
    assert paths.isdisjoint({"cat/zz_copy.bmp", "cat/sub/again.tif", "dog/other_name.webp"})
    assert report["counts"]["cat"]["train"] + report["counts"]["cat"]["val"] + report["counts"]["cat"]["test"] == 10
    assert "3 duplicates removed" in result.stdout
    assert_no_source_in_two_splits(out)


def test_identical_images_in_two_classes_are_all_left_out(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=10)
    Image.open(images / "cat" / "cat_004.png").save(images / "dog" / "is_it_a_dog.png")
    Image.open(images / "cat" / "cat_004.png").save(images / "fox" / "or_a_fox.bmp")
    out = tmp_path / "data"
    result = run_cli("prepare", images, "--out", out, "--size", "16", "--augment", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["label_conflicts"] == [
        {
            "paths": ["cat/cat_004.png", "dog/is_it_a_dog.png", "fox/or_a_fox.bmp"],
            "classes": ["cat", "dog", "fox"],
            "class_of": ["cat", "dog", "fox"],
        }
    ]
    assert report["totals"]["label_conflicts_removed"] == 3
    paths = {r["path"] for r in read_manifest(out)}
    assert paths.isdisjoint({"cat/cat_004.png", "dog/is_it_a_dog.png", "fox/or_a_fox.bmp"})
    assert len(paths) == 3 * 10 - 1
    assert "warning: 3 identical images sit in different classes (cat, dog, fox): all left out" in result.stdout


def test_near_duplicates_share_one_split(tmp_path):
    images = write_textured_folder(tmp_path / "images", per_class=12)
    planted = [add_near_duplicates(images, name, i) for name in ("cat", "dog", "fox") for i in (0, 3, 6, 9)]
    # a slightly edited copy of a cat sits in the fox folder: it must not straddle splits either
    edited = np.asarray(Image.open(images / "cat" / "cat_005.png")).copy()
    edited[:4, :4] = 0
    Image.fromarray(edited).save(images / "fox" / "fox_lookalike.png")
    planted.append(["cat/cat_005.png", "fox/fox_lookalike.png"])

    for seed in (1, 2, 3):
        out = tmp_path / f"data{seed}"
        result = run_cli("prepare", images, "--out", out, "--size", "16", "--seed", str(seed), "--augment", "1")
        report = json.loads((out / "report.json").read_text())
        found = {frozenset(g["paths"]) for g in report["near_duplicate_groups"]}
        assert found == {frozenset(group) for group in planted}
        assert report["duplicates"] == [] and report["label_conflicts"] == []
        where = split_sources(out)
        for group in report["near_duplicate_groups"]:
            splits = set().union(*(where[p] for p in group["paths"]))
            assert splits == {group["split"]}, group
        assert len({g["split"] for g in report["near_duplicate_groups"]}) > 1  # groups do go to every split
        assert f"{len(planted)} near-duplicate groups kept together" in result.stdout
        assert_no_source_in_two_splits(out)


def test_same_seed_same_folder_gives_identical_bytes_with_duplicates(tmp_path):
    images = write_textured_folder(tmp_path / "images", per_class=10)
    for name, i in (("cat", 1), ("dog", 2), ("fox", 7)):
        add_near_duplicates(images, name, i)
    Image.open(images / "dog" / "dog_004.png").save(images / "dog" / "dup.bmp")
    Image.open(images / "fox" / "fox_003.png").save(images / "cat" / "conflict.png")
    for out in ("a", "b"):
        run_cli("prepare", images, "--out", tmp_path / out, "--size", "16", "--augment", "2", "--seed", "7", "--quiet")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"manifest.csv", "report.json", "X_train.npy", "y_test.npy"} <= set(names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_near_copies_found_among_100000_hashes_and_confirmed_by_their_pixels():
    rng = np.random.default_rng(0)
    n = 100_000
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)

    def flip(value: np.uint64, bits: int) -> np.uint64:
        mask = 0
        for b in rng.choice(64, size=bits, replace=False):
            mask |= 1 << int(b)
        return np.uint64(int(value) ^ mask)

    near, far = [], []
    for k in range(300):  # copies within 1..4 bits of a random original
        a, b = rng.choice(n, size=2, replace=False)
        if any(a in p or b in p for p in near + far):
            continue
        hashes[b] = flip(hashes[a], 1 + k % 4)
        near.append((a, b))
    for _ in range(100):  # 8 to 12 bits apart: too far to be candidates at the default 6
        a, b = rng.choice(n, size=2, replace=False)
        if any(a in p or b in p for p in near + far):
            continue
        hashes[b] = flip(hashes[a], int(rng.integers(8, 13)))
        far.append((a, b))
    hashes[-1] = hashes[-2]  # identical hashes

    # Thumbnails: every row its own random picture, a planted copy its original's (slightly
    # noisy), and half the planted pairs made look-alikes instead (an unrelated picture).
    picture = rng.integers(0, 256, (n, 64)).astype(np.float32)
    copies, lookalikes = near[::2], near[1::2]
    for a, b in copies:
        picture[b] = picture[a] + rng.normal(0, 3, 64)
    picture[-1] = picture[-2]
    asked = []

    def thumbnails_of(rows):
        asked.append(len(rows))
        return picture[rows]

    group = dedup.near_copy_groups(hashes, thumbnails_of)
    assert group.shape == (n,)
    assert all(group[a] == group[b] for a, b in copies)
    assert all(group[a] != group[b] for a, b in lookalikes + far)
    assert group[-1] == group[-2]
    assert len(np.unique(group)) == n - len(copies) - 1  # nothing else was merged
    assert sum(asked) <= 2 * (len(near) + 1)  # only the candidates' pixels were looked at


def test_candidates_are_exact_at_the_distance_and_groups_are_stars_not_chains():
    base = np.uint64(0x0123_4567_89AB_CDEF)
    four = np.uint64(int(base) ^ 0b1111)  # 4 bits from base
    eight = np.uint64(int(four) ^ (0b1111 << 40))  # 4 bits from `four`, 8 from base
    twelve = np.uint64(int(eight) ^ (0b1111 << 20))  # 4 bits from `eight`, 8 from `four`
    five = np.uint64(int(base) ^ (0b11111 << 50))  # 5 bits from base, 9 from `four`
    hashes = np.array([base, four, eight, twelve, five], dtype=np.uint64)
    a, b = dedup.candidate_pairs(hashes, 4)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (1, 2), (2, 3)]
    same = lambda rows: np.tile(np.arange(16, dtype=np.float32), (len(rows), 1))  # noqa: E731  (all alike)
    # A chain of four copies: `four` (the first of the rows with two copies) leads base and
    # eight; twelve, a copy of eight but not of `four`, is not chained on.
    assert dedup.near_copy_groups(hashes, same, 4).tolist() == [0, 0, 0, 1, 2]
    assert dedup.near_copy_groups(hashes, same, -1).tolist() == [0, 1, 2, 3, 4]


def test_stars_match_the_plainest_star_linkage_numbered_by_first_row():
    """The numpy grouping against the plainest one: every pair compared; the row with the
    most copies (then the first) leads a group of its copies not yet taken, and so on; groups
    numbered in the order of their first row (report.json and the split depend on it)."""
    rng = np.random.default_rng(3)
    n = 150
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    hashes = base[rng.integers(0, 40, n)]
    for _ in range(3):
        hashes ^= (np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)) * (rng.random(n) < 0.5)
    picture = rng.integers(0, 3, (n, 1)) * 10.0 + rng.normal(0, 1, (n, 32))  # three kinds of picture
    picture[:, :8] += np.arange(8) * 50.0
    z = (picture - picture.mean(1, keepdims=True)) / picture.std(1, keepdims=True)
    for distance in (-1, 0, 2, 4, 8):
        a, b = dedup.candidate_pairs(hashes, distance)
        confirmed = dedup._trimmed_correlation(z[a], z[b]) >= 0.98
        copy = {(i, j) for i, j, c in zip(a.tolist(), b.tolist(), confirmed) if c}
        leader = list(range(n))
        taken = [False] * n
        degree = [sum((i, j) in copy or (j, i) in copy for j in range(n)) for i in range(n)]
        for i in sorted(range(n), key=lambda i: (-degree[i], i)):
            if taken[i] or not degree[i]:
                continue
            for j in range(n):
                if not taken[j] and ((i, j) in copy or (j, i) in copy):
                    leader[j], taken[j], taken[i] = i, True, True
        first = {}
        for i in range(n):
            first.setdefault(leader[i], i)
        _, expected = np.unique([first[leader[i]] for i in range(n)], return_inverse=True)
        found = dedup.near_copy_groups(hashes, lambda rows: picture[rows].astype(np.float32), distance)
        assert found.tolist() == expected.tolist(), distance
        assert distance < 4 or len(copy) > 10


@pytest.mark.parametrize("seed", range(5))
def test_split_by_group_never_splits_a_group_and_stays_stratified(seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 60)
    groups = np.arange(len(labels))
    for _ in range(40):  # merge random same-class images into groups of 2-5
        i = rng.integers(len(labels))
        same = np.flatnonzero(labels == labels[i])
        members = rng.choice(same, size=int(rng.integers(2, 6)), replace=False)
        groups[members] = groups[members[0]]
    _, groups = np.unique(groups, return_inverse=True)
    split = split_by_group(labels, groups, 0.2, 0.1, seed, ["a", "b", "c"])
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    for label in range(3):
        share = np.mean(split[labels == label] == "test")
        assert 0.1 <= share <= 0.3
        assert np.any(split[labels == label] == "train") and np.any(split[labels == label] == "val")


@pytest.mark.parametrize("matching", [1, 2, 3])
def test_close_pairs_are_every_pair_within_the_distance_whatever_blocks_must_match(matching):
    """However many blocks two close hashes are made to share (the folder's size picks it),
    the pairs found are exactly those an all-pairs comparison finds."""
    rng = np.random.default_rng(matching)
    unique = np.unique(rng.integers(0, 2**63, 1500, dtype=np.int64).astype(np.uint64))
    copies = unique[rng.integers(0, len(unique), 600)]
    for _ in range(4):  # 0 to 4 bits flipped: close and not-quite-close copies
        copies ^= (np.uint64(1) << rng.integers(0, 64, 600).astype(np.uint64)) * (rng.random(600) < 0.7)
    unique = np.unique(np.concatenate([unique, copies]))
    distances = np.bitwise_count(unique[:, None] ^ unique[None, :])
    for distance in (0, 2, 4):
        a, b = np.nonzero(np.triu(distances <= distance, k=1))
        expected = sorted(zip(a.tolist(), b.tolist()))
        assert dedup._close_pairs(unique, distance, matching).tolist() == [list(pair) for pair in expected], distance
        assert distance == 0 or len(expected) > 100


def test_more_blocks_must_match_as_the_folder_grows():
    assert dedup._blocks_to_match(2_000, 4) == 1  # 13-bit blocks: a bucket holds a hash or none
    assert dedup._blocks_to_match(10_000_000, 4) == 2  # 21-bit keys of two blocks: about 5 a bucket


def test_split_by_group_is_pinned():
    """Same labels, groups and seed: the same split as every earlier version wrote."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 500)
    _, groups = np.unique(rng.integers(0, 300, 500), return_inverse=True)
    split = split_by_group(labels, groups, 0.2, 0.1, 3, ["a", "b", "c"])
    digest = hashlib.sha256(",".join(split.tolist()).encode()).hexdigest()
    assert digest == "b72b6d3788b12175fc8c54bc4249c5ab18fb87289217a3f2beab9a960259c5f2"
