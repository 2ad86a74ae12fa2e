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
from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline.core.settings import COPY_CORRELATION, NEAR_DUPLICATE_DISTANCE

PAIRS_AT_ONCE = 10_000  # candidate pairs compared per batch: about 250 MB of thumbnails and their copies
TRIMMED = 0.01  # the share of a thumbnail's pixels a copy may differ in at will (a watermark, a patch)
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


def grey_thumbnails(pixels: np.ndarray) -> np.ndarray:
    """The 32x32 grey thumbnails phash starts from (float64, N x 32 x 32), for a batch at once.

    `pixels`: uint8, N x H x W (grey) or N x H x W x 1|3. imagehash's first steps for the
    whole batch: Pillow's grey (one call for the batch), LANCZOS to 32x32 as matrix products
    (width, then height, rounded in between as Pillow does). Per-picture Pillow calls cost
    more than decoding the picture's thumbnail did. Pictures below 32 pixels are enlarged.
    """
    grey = _grey(np.asarray(pixels)).astype(np.float64)
    if len(grey) and grey.shape[2] != PHASH_SIDE:
        grey = _resize_rows(grey, _lanczos_matrix(grey.shape[2]))
    grey = grey.transpose(0, 2, 1)  # columns as rows: the height pass is the same product
    if len(grey) and grey.shape[2] != PHASH_SIDE:
        grey = _resize_rows(np.ascontiguousarray(grey), _lanczos_matrix(grey.shape[2]))
    return np.ascontiguousarray(grey.transpose(0, 2, 1))


def perceptual_hashes(pixels: np.ndarray) -> np.ndarray:
    """imagehash's `phash` of each picture in a batch, as uint64 (bits row-major, first bit highest).

    `pixels` as `grey_thumbnails` takes them; then the 8x8 lowest DCT frequencies of each
    thumbnail, bits above their median.
    """
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.uint64)
    grey = grey_thumbnails(pixels).transpose(0, 2, 1)  # the thumbnail T transposed (G)
    # With D the DCT rows, D T D' = (G D')' D'.
    n = len(grey)
    half = (np.ascontiguousarray(grey).reshape(n * PHASH_SIDE, PHASH_SIDE) @ _DCT.T).reshape(n, PHASH_SIDE, 8)
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


def near_copy_groups(
    hashes: np.ndarray,
    thumbnails_of: Callable[[np.ndarray], np.ndarray],
    max_distance: int = NEAR_DUPLICATE_DISTANCE,
    min_correlation: float = COPY_CORRELATION,
) -> np.ndarray:
    """Groups of copies of one picture; returns a group id per row, numbered in the order of
    each group's first row.

    A pair is a copy when its perceptual hashes are within `max_distance` bits (the
    candidates, found without an all-pairs loop) and their grey thumbnails
    (`thumbnails_of(rows)`, as `copy_thumbnails` makes them) correlate at `min_correlation`
    or more, brightness and contrast aside, the 1 % of pixels that differ most set aside
    (`_trimmed_correlation`): the hash alone also joins look-alikes (two fonts' C, a digit
    written twice).
    A group is a star, not a chain: taking rows in order, each row not yet in a group
    leads a new one and takes every confirmed copy of it not yet taken, so every member is
    a copy of the group's first row and no group runs through a folder of look-alikes
    (joined transitively, one folder of case letters made groups of 2,000 images).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    a, b = candidate_pairs(hashes, max_distance)
    if len(a):
        keep = np.zeros(len(a), dtype=bool)
        for start in range(0, len(a), PAIRS_AT_ONCE):  # thumbnails of a bounded batch at a time
            pa, pb = a[start : start + PAIRS_AT_ONCE], b[start : start + PAIRS_AT_ONCE]
            rows, inverse = np.unique(np.concatenate([pa, pb]), return_inverse=True)
            z = _standardised(thumbnails_of(rows))
            keep[start : start + len(pa)] = (
                _trimmed_correlation(z[inverse[: len(pa)]], z[inverse[len(pa) :]]) >= min_correlation
            )
        a, b = a[keep], b[keep]
    return _stars(n, a, b)


def copy_thumbnails(pixels: np.ndarray) -> np.ndarray:
    """What two candidate copies are compared on: phash's own 32x32 grey thumbnail of each
    row (`grey_thumbnails`), or the grey row itself where it is smaller (no detail is made
    up by enlarging it); float32, one flat row each."""
    pixels = np.asarray(pixels)
    grey = grey_thumbnails(pixels) if pixels.shape[1] >= PHASH_SIDE else _grey(pixels)
    return grey.reshape(len(grey), -1).astype(np.float32)


def _grey(pixels: np.ndarray) -> np.ndarray:
    """N x H x W grey from N x H x W (x 1|3) uint8: RGB by Pillow's own grey, for the batch
    as one tall picture (one call, not one a picture)."""
    if pixels.ndim == 4 and pixels.shape[-1] == 3 and len(pixels):
        n, height, width, _ = pixels.shape
        tall = Image.fromarray(np.ascontiguousarray(pixels).reshape(n * height, width, 3))
        return np.asarray(tall.convert("L")).reshape(n, height, width)
    return pixels[..., 0] if pixels.ndim == 4 else pixels  # grey already (an empty RGB batch too)


def _standardised(thumbnails: np.ndarray) -> np.ndarray:
    """Each row to mean 0 and standard deviation 1, so that the correlation is a mean of
    products: a brighter or flatter copy is the same picture. A flat row (under a grey
    level of spread) stays near 0 and correlates with nothing."""
    centred = thumbnails - thumbnails.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1.0)


def _trimmed_correlation(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """Per pair of standardised rows, their correlation once the TRIMMED share of pixels that
    differ most is set aside: a watermark, a date stamp or a patch painted over leaves a copy
    a copy (a 4x4 patch on a 48-pixel picture took the plain correlation to 0.91-0.97), and a
    look-alike differs along its whole outline, not in a few pixels."""
    differ = np.abs(za - zb)
    drop = max(1, round(za.shape[1] * TRIMMED))
    cutoff = np.partition(differ, -drop, axis=1)[:, -drop][:, None]  # the drop-th largest difference
    # (a tie at the cutoff sets aside a pixel more; pixels that do not differ at all always count)
    kept = ((differ < cutoff) | (differ == 0)).astype(np.float32)
    count = kept.sum(axis=1, keepdims=True)
    a = za - (za * kept).sum(axis=1, keepdims=True) / count
    b = zb - (zb * kept).sum(axis=1, keepdims=True) / count
    ab, aa, bb = (np.einsum("ij,ij->i", x * kept, y) for x, y in ((a, b), (a, a), (b, b)))
    return ab / np.sqrt(aa * bb + 1e-12)


def candidate_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (a < b, sorted) whose hashes are within `max_distance` bits: rows that share
    a hash, and rows of distinct hashes that `_close_pairs` finds close."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    empty = np.zeros(0, dtype=np.int64)
    if max_distance < 0 or len(hashes) < 2:
        return empty, empty
    unique, inverse = np.unique(hashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by their hash, in row order
    starts = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    counts = np.diff(starts)
    found = []
    for u in np.flatnonzero(counts > 1).tolist():  # rows sharing one hash: every pair of them
        rows = order[starts[u] : starts[u + 1]]
        i, j = np.triu_indices(len(rows), k=1)
        found.append((rows[i], rows[j]))
    pairs = _close_pairs(unique, max_distance) if len(unique) > 1 else np.zeros((0, 2), dtype=np.int64)
    single = (counts[pairs[:, 0]] == 1) & (counts[pairs[:, 1]] == 1)  # most pairs: one row each side
    found.append((order[starts[pairs[single, 0]]], order[starts[pairs[single, 1]]]))
    for u, v in pairs[~single].tolist():
        ru, rv = order[starts[u] : starts[u + 1]], order[starts[v] : starts[v + 1]]
        found.append((np.repeat(ru, len(rv)), np.tile(rv, len(ru))))
    a = np.concatenate([f[0] for f in found]).astype(np.int64)
    b = np.concatenate([f[1] for f in found]).astype(np.int64)
    a, b = np.minimum(a, b), np.maximum(a, b)
    codes = np.unique(a * len(hashes) + b)
    return codes // len(hashes), codes % len(hashes)


def _stars(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Group ids for n rows from confirmed pairs (a < b), numbered in the order of each
    group's first row. The row with the most copies leads a group of those not yet taken
    (ties: the first row), then the next: a star around the picture most copies are copies
    of, whatever sorts first (a darker JPEG of it, say). Only rows with a copy are looped over."""
    ends, others = np.concatenate([a, b]), np.concatenate([b, a])  # each pair from both ends
    order = np.lexsort((others, ends))
    ends, others = ends[order], others[order]
    starts = np.searchsorted(ends, np.arange(n + 1))
    degree = np.diff(starts)
    leader = np.arange(n)
    taken = np.zeros(n, dtype=bool)
    for row in np.lexsort((np.arange(n), -degree))[: int(np.count_nonzero(degree))].tolist():
        if taken[row]:
            continue  # a copy of an earlier leader: it leads nothing
        members = others[starts[row] : starts[row + 1]]
        members = members[~taken[members]]
        leader[members], taken[members], taken[row] = row, True, True
    first = np.full(n, n)
    np.minimum.at(first, leader, np.arange(n))  # each group's first row, at its leader
    _, group = np.unique(first[leader], return_inverse=True)
    return group


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
