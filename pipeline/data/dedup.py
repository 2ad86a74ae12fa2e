"""Exact and near-duplicate source images, found before the split so none leaks across it.

Exact duplicates share identical pixels once resized to --size (a digest of the row the
model would see), so a PNG and a BMP of the same picture match whatever their names.
Near-duplicates share a 64-bit perceptual hash within a small Hamming distance; they are
grouped without an all-pairs loop by multi-index hashing: split the hash into distance+r
blocks, and any two hashes within the distance agree exactly on at least r blocks
(pigeonhole), so only hashes that share the values of some r blocks are compared. r grows
with the folder (`_blocks_to_match`), so that the hashes sharing a key stay a handful.

The perceptual hash is imagehash's `phash`, computed for a whole batch at once with
matrices (Pillow's LANCZOS coefficients, an 8x32 DCT) instead of per-picture Pillow calls
and scipy.fftpack (importing scipy cost each decoding process 0.4 s).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict

import numpy as np
from PIL import Image

from pipeline.core.settings import NEAR_DUPLICATE_DISTANCE

PHASH_SIDE = 32  # the picture is shrunk to 32x32 grey, and its 8x8 lowest frequencies kept
_k, _n = np.arange(8)[:, None], np.arange(PHASH_SIDE)[None, :]
_DCT = 2.0 * np.cos(np.pi * _k * (2 * _n + 1) / (2 * PHASH_SIDE))  # scipy.fftpack.dct type II rows 0-7


@functools.lru_cache(maxsize=64)
def _lanczos_matrix(in_size: int, out_size: int = PHASH_SIDE) -> np.ndarray:
    """Pillow's LANCZOS resize along one axis as an (out, in) matrix (Resample.c's coefficients)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        weights = np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)
        matrix[out, lo:hi] = weights / weights.sum() if weights.sum() else weights
    return matrix


def _round8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, 255)  # Pillow rounds and clips after each pass


def _resize_rows(grey: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """N x H x W -> N x H x out: each row times matrix.T, as one matrix product for the batch."""
    n, height, width = grey.shape
    return _round8(grey.reshape(n * height, width) @ matrix.T).reshape(n, height, len(matrix))


def perceptual_hashes(pixels: np.ndarray) -> np.ndarray:
    """imagehash's `phash` of each picture in a batch, as uint64 (bits row-major, first bit highest).

    `pixels`: uint8, N x H x W (grey) or N x H x W x 1|3. imagehash's steps for the whole
    batch at once: Pillow's grey (one call for the batch), LANCZOS to 32x32 as matrix
    products (width, then height, rounded in between as Pillow does), the 8x8 lowest DCT
    frequencies, bits above their median. Per-picture Pillow calls cost more than decoding
    the picture's thumbnail did.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 4:
        if pixels.shape[-1] == 3:  # Pillow's own grey, for the batch as one tall picture
            n, height, width, _ = pixels.shape
            tall = Image.fromarray(np.ascontiguousarray(pixels).reshape(n * height, width, 3))
            pixels = np.asarray(tall.convert("L")).reshape(n, height, width)
        else:
            pixels = pixels[..., 0]
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.uint64)
    grey = pixels.astype(np.float64)
    if grey.shape[2] != PHASH_SIDE:
        grey = _resize_rows(grey, _lanczos_matrix(grey.shape[2]))
    grey = grey.transpose(0, 2, 1)  # columns as rows: the height pass is the same product
    if grey.shape[2] != PHASH_SIDE:
        grey = _resize_rows(np.ascontiguousarray(grey), _lanczos_matrix(grey.shape[2]))
    # grey is the 32x32 thumbnail T transposed (G); with D the DCT rows, D T D' = (G D')' D'.
    n = len(grey)
    half = (grey.reshape(n * PHASH_SIDE, PHASH_SIDE) @ _DCT.T).reshape(n, PHASH_SIDE, 8)
    low = (np.ascontiguousarray(half.transpose(0, 2, 1)).reshape(n * 8, PHASH_SIDE) @ _DCT.T).reshape(n, 64)
    middle = np.partition(low, (31, 32), axis=1)[:, 31:33]  # np.median's two middle values;
    bits = low > middle.mean(axis=1, keepdims=True)  # np.median itself imports numpy.ma, 15 ms
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def perceptual_hash(image: Image.Image) -> int:
    """imagehash.phash(image) as a 64-bit integer: `perceptual_hashes` of one picture."""
    grey = np.asarray(image.convert("L"))
    return int(perceptual_hashes(grey[None])[0])


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
    """Connected groups of hashes within `max_distance` bits; returns a group id per row.

    Groups are numbered in the order of their first row. Identical hashes are one group
    without comparing; only the distinct hashes' close pairs are joined, and the joining is
    numpy's too (`_components`), so no Python loop runs over rows or pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    pairs = _close_pairs(unique, max_distance) if max_distance >= 0 and len(unique) > 1 else np.zeros((0, 2), int)
    component = _components(len(unique), pairs[:, 0], pairs[:, 1])[inverse.ravel()]
    first_row = np.full(len(unique), len(hashes))
    np.minimum.at(first_row, component, np.arange(len(hashes)))
    _, group = np.unique(first_row[component], return_inverse=True)
    return group


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A label per node of the graph on n nodes with edges (a, b), equal within a connected
    component and different between them: each edge hooks the larger of its two labels onto
    the smaller, then every label jumps to its label's label until none moves; a few rounds,
    each numpy's over all the edges. On the 20,000-photo bench folder's hashes the grouping
    takes 0.089 s this way, 0.161 s with the union-find looped in Python that it replaced
    (medians of 9 alternating pairs; the same groups)."""
    label = np.arange(n)
    while True:
        low = np.minimum(label[a], label[b])
        hooked = label.copy()
        np.minimum.at(hooked, label[a], low)
        np.minimum.at(hooked, label[b], low)
        while True:  # pointer jumping: every node straight to its root
            jumped = hooked[hooked]
            if np.array_equal(jumped, hooked):
                break
            hooked = jumped
        if np.array_equal(hooked, label):
            return label
        label = hooked


def _block_bits(count: int) -> list[tuple[int, int]]:
    """(shift, width) of `count` blocks that cut the 64 bits, widths differing by one at most."""
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    return [(sum(widths[:i]), width) for i, width in enumerate(widths)]


# A sort of the keys against one hash's comparisons with its bucket: calibrated so that
# r = 1 wins at 100,000 hashes (0.13 against 0.18 s of CPU) and r = 2 at 1 M (2.7 against
# 12.9 s), medians of 3 pairs (bench/RESULTS.md); the two cross near 340,000.
SORT_COST = 20


def _blocks_to_match(n: int, max_distance: int) -> int:
    """r, the blocks two close hashes must share, for n distinct hashes.

    Each r gives C(max_distance + r, r) keys to sort by; the hashes sharing a key are about
    n / 2**(bits of the key) each, and each one is compared with all of them. r = 1 (13-bit
    blocks at distance 4) is cheapest for thousands of hashes but quadratic at millions:
    buckets of n / 8192, measured 4x the time per doubling. r = 2 at 10 million: 21-bit
    keys, buckets of about 5."""

    def cost(r: int) -> float:
        bits = r * (64 // (max_distance + r))
        return math.comb(max_distance + r, r) * (SORT_COST + n / 2.0**bits)

    return min(range(1, min(6, 64 - max_distance) + 1), key=cost)  # d + r blocks of a bit at least


def _close_pairs(unique: np.ndarray, max_distance: int, matching: int | None = None) -> np.ndarray:
    """Index pairs (rows of a, b with a < b, sorted) of distinct hashes within `max_distance` bits.

    Cut into max_distance + r blocks (r = `matching`, or `_blocks_to_match`), two hashes
    this close differ in max_distance blocks at most, so they agree on r blocks at least: every
    such pair shares the key made of some r blocks. For each choice of r blocks, hashes
    sorted by that key sit next to the others that share it: compare each with the one k
    places on, for k = 1, 2, ... while any such pair still shares the key.
    """
    n = len(unique)
    r = matching or _blocks_to_match(n, max_distance)
    blocks = _block_bits(max_distance + r)
    found = []
    for chosen in itertools.combinations(blocks, r):
        key = np.zeros(n, dtype=np.uint64)
        for shift, width in chosen:  # the chosen blocks side by side: at most 64 bits
            key = (key << np.uint64(width)) | ((unique >> np.uint64(shift)) & np.uint64((1 << width) - 1))
        order = np.argsort(key, kind="stable")
        values = key[order]
        del key
        for k in range(1, n):
            same = np.flatnonzero(values[:-k] == values[k:])
            if not len(same):
                break
            a, b = order[same], order[same + k]
            close = np.bitwise_count(unique[a] ^ unique[b]) <= max_distance
            a, b = a[close], b[close]
            found.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))  # a pair that shares several keys, once
    return np.stack([codes // n, codes % n], axis=1)
