"""Decoding a scanned folder: every file into its row of a buffer file, in the worker processes.

Each task takes `DECODE_CHUNK` consecutive files, decodes and resizes them with
`images.preprocess`, writes their rows into the buffer file itself (the pixels never
travel back through a pipe) and returns, per file, its skip reason or its pixel digest
and perceptual hash, and its health values (`health.raw_values`, measured on the decoded
picture, so the folder is decoded once). `decode_all` keeps only those small results in
the calling process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.settings import PrepareSettings
from pipeline.data import dedup, health
from pipeline.data.data_folder import create_rows_file, write_rows
from pipeline.data.image_folder import FolderScan
from pipeline.data.images import UnreadableImage, channels, preprocess
from pipeline.data.worker_pool import WorkerPool

DECODE_CHUNK = 32  # files per task a worker takes: few messages, and the last tasks still balance


@dataclass
class Decoded:
    ok: np.ndarray  # bool per scanned file
    reasons: dict[int, str]  # why a file was skipped
    digests: list[bytes | None]
    phashes: np.ndarray  # uint64, 0 where not decoded
    health: np.ndarray  # float64, one row of health.RAW_COLUMNS per file, NaN where not decoded


def _decode_file(path: str, size: int, color: str):
    """(row, skip reason, pixel digest, perceptual hash, health values); the hash is 0 where
    the batch computes it, the health values None where the file was skipped."""
    try:
        image = preprocess(path, size, color)
    except UnreadableImage as e:
        return None, str(e), None, 0, None
    except Exception as e:  # a decoder bug must not end the whole run: skip and say why
        return None, f"could not decode ({type(e).__name__}: {e})", None, 0, None
    # Exact duplicates are rows the model could not tell apart: identical pixels at --size.
    digest = hashlib.blake2b(image.pixels.data, digest_size=16).digest()
    # Near-duplicates are judged at the resolution the model sees (hashed for the whole
    # chunk at once), unless that is below the hash's own 32x32: then on the decoded image.
    phash = 0 if size >= dedup.PHASH_SIDE else dedup.perceptual_hash(image.decoded)
    return image.pixels, None, digest, phash, health.raw_values(image.decoded, image.original_size, image.original_mode)


def _decode_chunk(args: tuple[str, int, int, list[str], int, str]) -> list[tuple]:
    """Decode consecutive files into their rows of the buffer file; return (reason, digest,
    phash, health values) each.

    The worker writes the pixels itself, so they never travel back through a pipe and the
    parent never holds them.
    """
    buffer_path, offset, start, files, size, color = args
    rows = np.zeros((len(files), size, size, channels(color)), dtype=np.uint8)
    results = []
    for i, path in enumerate(files):
        array, reason, digest, phash, health_values = _decode_file(path, size, color)
        if array is not None:
            rows[i] = array
        results.append((reason, digest, phash, health_values))
    write_rows(Path(buffer_path), offset, start, rows)
    if size >= dedup.PHASH_SIDE:
        decoded = [i for i, result in enumerate(results) if result[0] is None]
        for i, phash in zip(decoded, dedup.perceptual_hashes(rows[decoded]).tolist()):
            results[i] = (None, results[i][1], phash, results[i][3])
    return results


def decode_all(scan: FolderScan, s: PrepareSettings, buffer_path: Path, pool: WorkerPool) -> Decoded:
    """Decode every scanned file into row i of the buffer file; keep only digests and hashes here."""
    n = len(scan.files)
    offset = create_rows_file(buffer_path, (n, s.size, s.size, channels(s.color)))
    ok = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}
    digests: list[bytes | None] = [None] * n
    phashes = np.zeros(n, dtype=np.uint64)
    health_values = np.full((n, len(health.RAW_COLUMNS)), np.nan)
    root = os.path.abspath(scan.root)  # the same file for a cluster's worker, whatever its working folder
    # Made as they are taken: a list of every task would hold a second copy of every path.
    tasks = (
        (
            os.path.abspath(buffer_path),
            offset,
            start,
            [os.path.join(root, rel) for rel, _ in scan.files[start : start + DECODE_CHUNK]],
        )
        + (s.size, s.color)
        for start in range(0, n, DECODE_CHUNK)
    )
    done = progress.track(pool.imap(_decode_chunk, tasks), -(-n // DECODE_CHUNK), f"decoding {n} images")
    i = 0
    for results in done:
        for reason, digest, phash, values in results:
            if reason is None:
                ok[i], digests[i], phashes[i], health_values[i] = True, digest, phash, values
            else:
                reasons[i] = reason
            i += 1
    return Decoded(ok, reasons, digests, phashes, health_values)
