"""prepare's per-file cache: a run served from it writes what a fresh run writes, byte for byte.

Every case compares a cached run with a --no-cache run of the same folder: files added,
removed, edited in place (same name, size and mtime), moved between class folders; broken
entries (corrupt, truncated, foreign) decoded again and counted; a run killed mid-way
followed by a good one; the size limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import cache, stat_index
from tests.conftest import run_cli, write_image_folder

OUTPUTS = ("X_train.npy", "X_val.npy", "X_test.npy", "y_train.npy", "y_val.npy", "y_test.npy", "manifest.csv")
OPTIONS = ("--size", "32", "--workers", "2")  # 32: perceptual hashes computed per task batch


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = write_image_folder(tmp_path / "images", per_class=20)  # 61 files: two tasks, two packs
    # BMP: a fixed size for fixed dimensions, so an edit can keep the file's size exactly
    Image.fromarray(np.full((24, 24, 3), (200, 30, 30), np.uint8)).save(images / "cat" / "flat.bmp")
    return images


@pytest.fixture(autouse=True)
def stat_trusted_at_once(monkeypatch):
    """Files written a moment ago are not trusted by stat (coarse timestamps); these tests
    write and prepare within the same second, and must exercise the stat fast path."""
    monkeypatch.setattr(stat_index, "RACY_NS", 0)


def cached(images: Path, out: Path, cache_dir: Path, *extra: str) -> dict:
    """A cached prepare; returns what its note on stderr says it served."""
    result = run_cli("prepare", images, "--out", out, "--cache", cache_dir, *OPTIONS, *extra)
    found = re.search(r"cache .*: (\d+) of (\d+) files from the cache \((\d+) not read again\)", result.stderr)
    assert found, result.stderr
    hits, files, unread = map(int, found.groups())
    copies = re.search(r"the augmented copies of (\d+) of (\d+) training images", result.stderr)
    augmented = tuple(map(int, copies.groups())) if copies else None
    return {"hits": hits, "files": files, "unread": unread, "augmented": augmented, "stderr": result.stderr}


def assert_same_as_fresh(images: Path, out: Path, tmp_path: Path, *extra: str) -> None:
    fresh = tmp_path / "fresh"
    run_cli("prepare", images, "--out", fresh, "--no-cache", *OPTIONS, *extra, "--quiet")
    for name in (*OUTPUTS, "report.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    shutil.rmtree(fresh)


def test_a_run_from_the_cache_writes_the_bytes_of_a_fresh_run(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    first = cached(folder, out, cache_dir)
    assert first["hits"] == 0 and first["files"] == 61
    assert_same_as_fresh(folder, out, tmp_path)
    assert first["augmented"][0] == 0
    again = cached(folder, out, cache_dir)
    assert again["hits"] == again["unread"] == 61  # nothing decoded, nothing even read
    assert again["augmented"][0] == again["augmented"][1] == first["augmented"][1] > 0  # no copy drawn again
    assert_same_as_fresh(folder, out, tmp_path)
    assert "cache" not in json.loads((out / "report.json").read_text())


def copies_by_path(data: Path) -> dict[str, bytes]:
    """Each training image's augmented copy (--augment 1), by the source's path."""
    rows = [line.split(",") for line in (data / "manifest.csv").read_text().splitlines()[1:]]
    X = np.load(data / "X_train.npy", allow_pickle=False)
    return {row[2]: X[int(row[1])].tobytes() for row in rows if row[0] == "train" and row[4] == "1"}


def test_augmented_copies_follow_their_image_not_its_position(folder, tmp_path):
    # seeded by (--seed, the image's pixels): files added ahead of it in the folder, which
    # move every position, leave each shared image's copy as it was, so the cache can keep them
    run_cli("prepare", folder, "--out", tmp_path / "before", "--no-cache", *OPTIONS, "--quiet")
    before = copies_by_path(tmp_path / "before")
    write_image_folder(tmp_path / "more", per_class=3, seed=7)
    for path in (tmp_path / "more").glob("*/*"):
        shutil.copyfile(path, folder / path.parent.name / f"a_new_{path.name}")  # sorted first
    run_cli("prepare", folder, "--out", tmp_path / "after", "--no-cache", *OPTIONS, "--quiet")
    after = copies_by_path(tmp_path / "after")
    shared = before.keys() & after.keys()
    assert len(shared) >= 20
    assert all(before[path] == after[path] for path in shared)
    assert len(set(after.values())) == len(after)  # and every image draws its own


def test_copies_come_from_the_cache_after_a_relabel_and_equal_a_fresh_run(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    trained_before = set(copies_by_path(out))
    (folder / "fox" / "fox_004.png").rename(folder / "cat" / "fox_004.png")
    run = cached(folder, out, cache_dir)
    # the relabel moves images between splits: those in train both times (the moved one
    # found by its pixels, under its new path) have their copies served; the rest are drawn
    was = {"cat/fox_004.png": "fox/fox_004.png"}
    trained_now = set(copies_by_path(out))
    assert run["augmented"] == (len({was.get(p, p) for p in trained_now} & trained_before), len(trained_now))
    assert run["augmented"][0] > 0
    assert_same_as_fresh(folder, out, tmp_path)
    other_seed = cached(folder, out, cache_dir, "--seed", "3")  # other seed, other copies: none served
    assert other_seed["augmented"][0] == 0


def test_files_added_removed_and_moved_between_classes(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    write_image_folder(tmp_path / "more", per_class=2, seed=7)
    for path in (tmp_path / "more").glob("*/*"):
        shutil.copyfile(path, folder / path.parent.name / f"new_{path.name}")
    (folder / "dog" / "dog_003.jpg").unlink()
    (folder / "fox" / "fox_004.png").rename(folder / "cat" / "fox_004.png")  # relabelled
    (folder / "dog" / "dog_005.jpg").rename(folder / "fox" / "dog_005.jpg")
    run = cached(folder, out, cache_dir)
    assert run["files"] == 61 + 6 - 1
    assert run["hits"] == 61 - 1  # the moved files come from the cache, found by content
    assert run["unread"] == 61 - 1 - 2  # ... but were read to be hashed: their paths are new
    assert_same_as_fresh(folder, out, tmp_path)
    manifest = (out / "manifest.csv").read_text()
    assert "cat/fox_004.png,cat" in manifest and "fox/dog_005.jpg,fox" in manifest


def test_a_file_edited_in_place_with_its_size_and_mtime_kept_is_decoded_again(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    path = folder / "cat" / "flat.bmp"
    before = os.stat(path)
    time.sleep(0.02)  # past the timestamps' tick
    with open(path, "r+b") as f:  # same inode, same size, new pixels
        image = Image.fromarray(np.full((24, 24, 3), (10, 240, 10), np.uint8))
        image.save(f, format="BMP")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    run = cached(folder, out, cache_dir)
    assert run["hits"] == 60 and run["unread"] == 60  # ctime gave the edit away: read, hashed, decoded
    assert_same_as_fresh(folder, out, tmp_path)
    rows = np.concatenate([np.load(out / f"X_{split}.npy") for split in ("train", "val", "test")])
    assert (rows.reshape(len(rows), -1, 3) == (10, 240, 10)).all(axis=(1, 2)).any()  # the new pixels


def test_settings_that_change_the_rows_do_not_share_entries(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    run = cached(folder, out, cache_dir, "--color", "grayscale")
    assert run["hits"] == 0
    assert cached(folder, out, cache_dir, "--seed", "3")["hits"] == 61  # the split's seed does not decode
    fresh = tmp_path / "fresh"
    run_cli("prepare", folder, "--out", fresh, "--no-cache", *OPTIONS, "--seed", "3", "--quiet")
    for name in (*OUTPUTS, "report.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def pack_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / cache.PACKS).glob("*/*.pack"))


def test_a_killed_run_s_temporary_pack_is_removed_once_stale(folder, tmp_path):
    # a pack is written under a temporary name (core.artifacts.atomic_write_bytes) and renamed;
    # one a killed run left behind goes at a later run once an hour old, a young one stays
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    left = pack_files(cache_dir)[0].parent
    stale, young = left / ".dead.pack.tmp-a1b2", left / ".busy.pack.tmp-c3d4"
    for path in (stale, young):
        path.write_bytes(b"half a pack")
    an_hour_ago = time.time() - cache.STALE_SECONDS - 60
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert cached(folder, out, cache_dir)["hits"] == 61
    assert not stale.exists() and young.exists()


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign"])
def test_a_broken_entry_is_decoded_again_and_counted(folder, tmp_path, damage):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    packs = pack_files(cache_dir)
    assert len(packs) >= 2
    first = packs[0]
    data = bytearray(first.read_bytes())
    if damage == "corrupt":
        _, length = cache.parse_entry(bytes(data), None, None)
        data[length - cache.CHECKSUM_BYTES - 1] ^= 0xFF  # the first entry's last pixel byte
        first.write_bytes(bytes(data))
    elif damage == "truncated":
        first.write_bytes(bytes(data[: len(data) - 7]))  # the last entry loses its tail
    else:
        first.write_bytes(packs[1].read_bytes()[: len(data)].ljust(len(data), b"\0"))  # another pack's entries
    run = cached(folder, out, cache_dir)
    assert f"unusable entries decoded again (1 {damage})" in run["stderr"] or damage == "foreign"
    report = json.loads((out / "report.json").read_text())
    assert report["cache"]["reasons"].get(damage, 0) >= 1, report.get("cache")
    assert report["cache"]["entries_recomputed"] == sum(report["cache"]["reasons"].values())
    fresh = tmp_path / "fresh"
    run_cli("prepare", folder, "--out", fresh, "--no-cache", *OPTIONS, "--quiet")
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    again = cached(folder, out, cache_dir)  # the rewritten entries win over the broken ones
    assert again["hits"] == 61
    assert_same_as_fresh(folder, out, tmp_path)


def test_packs_with_no_entry_left_in_the_index_are_deleted(folder, tmp_path):
    """A pack whose every entry was unusable and written again, and a stale copy of entries
    that other packs hold (two runs decoding the same files), serve nothing: they go, or
    every later run would scan them again. A young copy stays: its run may index it yet."""
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    broken, *others = pack_files(cache_dir)
    broken.write_bytes(bytes(broken.stat().st_size))  # every entry of it unreadable
    stale, young = (Path(cache.pack_path(cache_dir, name)) for name in ("e" * 32, "f" * 32))
    for copy in (stale, young):
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(others[0], copy)
    an_hour_ago = time.time() - cache.STALE_SECONDS - 60
    os.utime(stale, (an_hour_ago, an_hour_ago))
    run = cached(folder, out, cache_dir)
    assert "unusable entries decoded again" in run["stderr"]
    assert not broken.exists() and not stale.exists() and young.exists()
    assert all(p.exists() for p in others)
    again = cached(folder, out, cache_dir)
    assert again["hits"] == 61 and "unusable" not in again["stderr"]
    assert_same_as_fresh(folder, out, tmp_path)


def test_an_orphan_pack_of_another_format_is_not_adopted(folder, tmp_path):
    """A stale pack whose entries carry the previous format's magic (as an older pipeline
    wrote them) is neither adopted nor served: its entries, here for keys the index does not
    hold (another --size), would otherwise be indexed as this format's. It is deleted."""
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    other = tmp_path / "other_cache"
    run_cli("prepare", folder, "--out", tmp_path / "other", "--cache", other, "--size", "24", "--quiet")
    data = bytearray(pack_files(other)[0].read_bytes())
    offset = 0
    while offset < len(data):  # every entry of it marked as the previous format's
        _, length = cache.parse_entry(bytes(data[offset:]), None, None)
        data[offset + len(cache.MAGIC) - 1] = cache.FORMAT_VERSION - 1
        offset += length
    cached(folder, out, cache_dir)
    old = Path(cache.pack_path(cache_dir, "d" * 32))
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(bytes(data))
    an_hour_ago = time.time() - cache.STALE_SECONDS - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    indexed = len(cache.load_index(cache_dir))
    run = cached(folder, out, cache_dir)
    assert run["hits"] == 61 and "unusable" not in run["stderr"]
    assert len(cache.load_index(cache_dir)) == indexed and not old.exists()


def test_a_lost_index_costs_a_scan_of_the_packs_not_a_wrong_row(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    (cache_dir / cache.INDEX_FILE).write_bytes(b"not an index")
    assert cached(folder, out, cache_dir)["hits"] == 61
    assert_same_as_fresh(folder, out, tmp_path)


def test_a_run_killed_mid_way_leaves_a_cache_the_next_run_uses(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=300, size=48)
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "prepare", images, "--out", out, "--cache", cache_dir, *OPTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(pack_files(cache_dir)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert process.poll() is None, "prepare finished before it could be killed: give it more images"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (cache_dir / cache.INDEX_FILE).exists()  # killed before it could index anything
    run = cached(images, out, cache_dir)
    assert 0 < run["hits"] < 900  # what the killed run decoded, adopted from its packs
    assert_same_as_fresh(images, out, tmp_path)
    assert cached(images, out, cache_dir)["hits"] == 900


def test_the_size_limit_evicts_the_least_recently_used_packs(folder, tmp_path):
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    # --augment 0: the decoded files' packs alone (with copies, the newest pack is theirs)
    limit = ("--cache-limit-gb", str(150_000 / 2**30), "--augment", "0")  # packs of ~100 KB: one stays
    cached(folder, out, cache_dir, *limit)
    total = sum(p.stat().st_size for p in pack_files(cache_dir))
    assert 0 < total <= 150_000 and len(pack_files(cache_dir)) == 1
    run = cached(folder, out, cache_dir, "--augment", "0")
    assert 0 < run["hits"] < 61
    assert_same_as_fresh(folder, out, tmp_path, "--augment", "0")


def test_default_place_no_cache_and_a_cache_in_the_images_folder(folder, tmp_path):
    run_cli("prepare", folder, "--out", tmp_path / "art" / "data", *OPTIONS, "--quiet")
    assert (tmp_path / "art" / ".cache" / cache.INDEX_FILE).is_file()  # beside --out
    run_cli("prepare", folder, "--out", tmp_path / "other" / "data", *OPTIONS, "--no-cache", "--quiet")
    assert not (tmp_path / "other" / ".cache").exists()
    bad = run_cli("prepare", folder, "--out", tmp_path / "d", "--cache", folder / "cat" / "c", expect=1)
    assert "overlaps the images folder" in bad.output and "Traceback" not in bad.output
    assert not (folder / "cat" / "c").exists()
    report = json.loads((tmp_path / "art" / "data" / "report.json").read_text())
    assert not {"cache", "no_cache", "cache_limit_gb"} & set(report["settings"])


def test_files_changed_just_before_they_were_read_are_hashed_again(folder, tmp_path, monkeypatch):
    """Within RACY_NS of its last change a file's stat is not recorded: a second edit in the
    same timestamp tick could keep every field. Such files are read and hashed next time."""
    monkeypatch.setattr(stat_index, "RACY_NS", 3600 * 10**9)  # every file here is that recent
    cache_dir, out = tmp_path / "cache", tmp_path / "data"
    cached(folder, out, cache_dir)
    run = cached(folder, out, cache_dir)
    assert run["hits"] == 61 and run["unread"] == 0
    assert_same_as_fresh(folder, out, tmp_path)


def test_fixes_from_an_audit_give_the_bytes_of_a_fresh_run_with_the_same_fixes(folder, tmp_path):
    """A relabelled file keeps its cached row under its new class, an excluded one is left
    out: the arrays, manifest and report.json (its list of fixes included) are a fresh run's."""
    cache_dir, out, fixes = tmp_path / "cache", tmp_path / "data", tmp_path / "audit.csv"
    cached(folder, out, cache_dir)
    fixes.write_text("path,action\ncat/cat_001.jpg,relabel:dog\nfox/fox_002.png,exclude\ncat/cat_003.jpg,keep\n")
    served = cached(folder, out, cache_dir, "--fixes", fixes)
    assert served["hits"] == 60 and served["files"] == 60  # one file excluded, the rest from the cache
    report = json.loads((out / "report.json").read_text())
    assert len(report["fixes"]) >= 2, report["fixes"]
    fresh = tmp_path / "fresh"
    run_cli("prepare", folder, "--out", fresh, "--no-cache", *OPTIONS, "--fixes", fixes, "--quiet")
    for name in (*OUTPUTS, "report.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    manifest = (out / "manifest.csv").read_text()
    assert "fox/fox_002.png" not in manifest and ",cat/cat_001.jpg,dog," in manifest
