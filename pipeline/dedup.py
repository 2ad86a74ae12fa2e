"""Exact and near-duplicate source images, found before the split so none leaks across it.

Exact duplicates share identical decoded pixels (a digest computed while decoding), so a
PNG and a BMP of the same picture match whatever their names. Near-duplicates share a
64-bit perceptual hash within a small Hamming distance; they are grouped without an
all-pairs loop by multi-index hashing: split the hash into distance+1 blocks, and any two
hashes within the distance agree exactly on at least one block (pigeonhole), so only
hashes that share a block value are compared.

The perceptual hash is imagehash's `phash` (same bits), computed with a precomputed 8x32
DCT matrix instead of scipy.fftpack: importing scipy cost each decoding process 0.4 s.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from PIL import Image

from pipeline.settings import NEAR_DUPLICATE_DISTANCE

PHASH_SIDE = 32  # the picture is shrunk to 32x32 grey, and its 8x8 lowest frequencies kept
_k, _n = np.arange(8)[:, None], np.arange(PHASH_SIDE)[None, :]
_DCT = 2.0 * np.cos(np.pi * _k * (2 * _n + 1) / (2 * PHASH_SIDE))  # scipy.fftpack.dct type II rows 0-7


def perceptual_hash(image: Image.Image) -> int:
    """imagehash.phash(image) as a 64-bit integer (bits row-major, first bit highest)."""
    pixels = np.asarray(image.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS), np.float64)
    low = _DCT @ pixels @ _DCT.T
    bits = low.ravel() > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def find_exact_duplicates(
    digests: list[bytes], labels: list[int]
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Return (rows to drop, duplicate groups, label-conflict groups), in input order.

    Within a group of identical images, the first is kept; a group spread over several
    classes is a label conflict and every copy is dropped.
    """
    by_digest: dict[bytes, list[int]] = defaultdict(list)
    for row, digest in enumerate(digests):
        by_digest[digest].append(row)
    drop: list[int] = []
    duplicates: list[list[int]] = []
    conflicts: list[list[int]] = []
    for rows in by_digest.values():
        if len(rows) < 2:
            continue
        if len({labels[r] for r in rows}) > 1:
            conflicts.append(rows)
            drop.extend(rows)
        else:
            duplicates.append(rows)
            drop.extend(rows[1:])
    return sorted(drop), sorted(duplicates), sorted(conflicts)


def group_near_duplicates(hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
    """Connected groups of hashes within `max_distance` bits; returns a group id per row."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    parent = np.arange(len(hashes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    for row, u in enumerate(inverse):  # identical hashes: one group without comparing
        union(row, first[u])
    if max_distance >= 0 and len(unique) > 1:
        for block in _blocks(unique, max_distance + 1):
            order = np.argsort(block, kind="stable")
            sorted_block = block[order]
            starts = np.flatnonzero(np.r_[True, sorted_block[1:] != sorted_block[:-1]])
            ends = np.r_[starts[1:], len(order)]
            for s, e in zip(starts, ends):
                if e - s > 1:
                    _union_close(unique, order[s:e], max_distance, first, union)
    roots = np.array([find(i) for i in range(len(hashes))])
    _, group = np.unique(roots, return_inverse=True)
    return group


def _blocks(values: np.ndarray, count: int) -> list[np.ndarray]:
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    blocks, shift = [], 0
    for width in widths:
        blocks.append((values >> np.uint64(shift)) & np.uint64((1 << width) - 1))
        shift += width
    return blocks


def _union_close(unique: np.ndarray, members: np.ndarray, max_distance: int, first, union) -> None:
    values = unique[members]
    for i in range(len(members) - 1):  # a bucket holds few hashes unless data is degenerate
        distance = np.bitwise_count(values[i + 1 :] ^ values[i])
        for j in np.flatnonzero(distance <= max_distance):
            union(int(first[members[i]]), int(first[members[i + 1 + j]]))
