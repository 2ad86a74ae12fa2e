"""Decoding a scanned folder: every file into its row of a buffer file, in the worker processes.

Each task takes `DECODE_CHUNK` consecutive files, decodes and resizes them with
`images.preprocess`, writes their rows into the buffer file itself (the pixels never
travel back through a pipe) and returns, per file, its skip reason or its pixel digest
and perceptual hash, and its health values (`health.raw_values`, measured on the decoded
picture, so the folder is decoded once) as the text health.csv holds. `decode_all` keeps
only those small results in the calling process.

With a cache folder (data/cache.py), a file whose content was decoded before at the same
settings is not decoded again: its row and results come from its entry, and a file whose
stat is unchanged is not even read. A file's results are a tuple of JSON-able values
(bytes allowed) that the cache stores as they are, so a new per-file result only needs
RESULTS_VERSION bumped.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.settings import PrepareSettings
from pipeline.data import cache, dedup, health, stat_index
from pipeline.data.cache import CacheCounts, EntryStore
from pipeline.data.cache_index import CacheRun
from pipeline.data.data_folder import create_rows_file, write_rows
from pipeline.data.image_folder import FolderScan
from pipeline.data.images import UnreadableImage, channels, preprocess, read_image_file
from pipeline.data.worker_pool import WorkerPool

DECODE_CHUNK = 32  # files per task a worker takes: few messages, and the last tasks still balance
READ_AHEAD_BYTES = 16 * 2**20  # read before decoding, per worker: bounded for folders of big photos
RESULTS_VERSION = 4  # bump when what a file's results hold changes: cached entries of another are not used


@dataclass
class Decoded:
    ok: np.ndarray  # bool per scanned file
    reasons: dict[int, str]  # why a file was skipped
    digests: list[bytes | None]
    phashes: np.ndarray  # uint64, 0 where not decoded
    health: list[list[str] | None]  # per file, its health.RAW_COLUMNS as health.csv fields; None where not decoded
    cache: CacheCounts | None = None  # what the cache served; None without one


def _decode_file(path: str | bytes, size: int, color: str):
    """(row, skip reason, pixel digest, perceptual hash, health values); the hash is 0 where
    the batch computes it, the health values None where the file was skipped. The values
    come as health.csv's fields (`health.as_fields`): formatted here, in the workers and
    once per file content (the cache keeps them), rather than by prepare's one process at
    every run (formatting 160,000 floats there was 0.16-0.24 s of an unchanged re-run of
    20,000 photos)."""
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
    values = health.raw_values(image.decoded, image.original_size, image.original_mode)
    return image.pixels, None, digest, phash, health.as_fields(values)


def decode_one(path: str | bytes, size: int, color: str) -> tuple[np.ndarray | None, str | None, bytes | None, int]:
    """One file as prepare decodes it: (row, skip reason, pixel digest, perceptual hash), the
    hash as prepare's batch computes it (inspect's way to see what prepare would)."""
    row, reason, digest, phash, _ = _decode_file(path, size, color)
    if row is not None and size >= dedup.PHASH_SIDE:
        phash = int(dedup.perceptual_hashes(row[None])[0])
    return row, reason, digest, phash


def _decode_chunk(args: tuple) -> tuple[list[tuple], CacheCounts, list[list | None], list[tuple]]:
    """Decode consecutive files into their rows of the buffer file; return their
    (reason, digest, phash, health values) results, what the cache served, each file's stat record and
    the cache entries written.

    The worker writes the pixels itself, so they never travel back through a pipe and the
    parent never holds them.
    """
    buffer_path, offset, start, files, size, color, cache_dir, recorded = args
    shape = (size, size, channels(color))
    rows = np.zeros((len(files), *shape), dtype=np.uint8)
    store, counts = (EntryStore(cache_dir) if cache_dir else None), CacheCounts()
    results: list = [None] * len(files)
    seen: list = [None] * len(files)
    to_store, fresh = {}, []
    for i, source, key in _to_decode(files, recorded, shape, color, store, counts, rows, results, seen):
        array, results[i] = _decode(source, size, color)
        fresh.append(i)
        if key is not None:
            to_store[i] = key
        if array is not None:
            rows[i] = array
    write_rows(Path(buffer_path), offset, start, rows)
    if size >= dedup.PHASH_SIDE:  # for the files decoded now; an entry holds its own
        decoded = [i for i in fresh if results[i][0] is None]
        for i, phash in zip(decoded, dedup.perceptual_hashes(rows[decoded]).tolist()):
            results[i] = (None, results[i][1], phash, *results[i][3:])
    if store is None:
        return results, counts, seen, []
    for i, key in to_store.items():
        store.put(key, rows[i], results[i])
    return results, counts, seen, store.flush()


def _to_decode(files, recorded, shape, color, store, counts, rows, results, seen):
    """(i, bytes or path, key of the entry to write or None) for each file the chunk must
    decode. Files are read (and with a cache looked up and hashed) READ_AHEAD_BYTES at a
    time before any of them is decoded: the two loops apart run 2-3 % faster here than one
    file at a time, and with a cache the reading and hashing cost a third as much (each
    loop stays in the CPU's caches). Files served by the cache go into `rows` and `results`
    here; each file's stat record into `seen`."""
    pending, held = [], 0
    for i, path in enumerate(files):
        if store is None:
            source, key = _read(path), None
        else:
            found, seen[i], source, key = _look_up(path, recorded[i], shape, color, store, counts)
            if found is not None:
                rows[i], results[i] = found
                continue
        pending.append((i, source, key))
        held += len(source) if isinstance(source, bytes) else 0
        if held >= READ_AHEAD_BYTES:
            yield from pending
            pending, held = [], 0
    yield from pending


def _read(path: str) -> bytes | str:
    """The file's bytes, or its path where it cannot be read (the decoder then says why)."""
    try:
        return read_image_file(path)[1]
    except UnreadableImage:
        return path


def _decode(source: str | bytes, size: int, color: str) -> tuple[np.ndarray | None, tuple]:
    """(row, results): results are whatever _decode_file returns after the row, as the cache keeps them."""
    array, *results = _decode_file(source, size, color)
    return array, tuple(results)


def _look_up(path: str, recorded: list | None, shape, color: str, store: EntryStore, counts: CacheCounts):
    """((row, results) from a sound entry or None, stat record or None, what to decode:
    the bytes or, where it could not be read, the path; the key of the entry to write).

    A stat unchanged since the last run (`recorded`) spares reading the file; otherwise its
    bytes are read once, hashed, and decoded from memory only if no sound entry holds them."""
    size = shape[0]
    known = stat_index.unchanged_hash(path, recorded)
    if known is not None:
        found = store.get(cache.entry_key(known, size, color, RESULTS_VERSION), shape, counts)
        if found is not None:
            counts.hits, counts.unread = counts.hits + 1, counts.unread + 1
            return (found[0], _from_json(found[1])), recorded, None, None  # unchanged: its record stands
    read_ns = time.time_ns()
    try:
        st, data = read_image_file(path)
    except UnreadableImage:  # missing, a folder, a FIFO, no permission: the decoder says which; nothing to cache
        return None, None, path, None
    content = cache.content_hash(data)
    seen = [*stat_index.signature(st), content] if stat_index.recordable(st, read_ns) else None
    key = cache.entry_key(content, size, color, RESULTS_VERSION)
    found = None if content == known else store.get(key, shape, counts)  # known: looked up above
    if found is not None:
        counts.hits += 1
        return (found[0], _from_json(found[1])), seen, None, None
    counts.misses += 1
    return None, seen, data, key


def _from_json(stored: list) -> tuple:
    return tuple(bytes.fromhex(v["hex"]) if isinstance(v, dict) and set(v) == {"hex"} else v for v in stored)


def decode_all(
    scan: FolderScan, s: PrepareSettings, buffer_path: Path, pool: WorkerPool, run: CacheRun | None = None
) -> Decoded:
    """Decode every scanned file into row i of the buffer file; keep only digests and hashes here.

    With a cache `run`, files decoded before come from the cache; the entries written are
    added to `run.new` (prepare indexes them once, after the augmentation) and the stat
    index is updated for the next run."""
    n = len(scan.files)
    offset = create_rows_file(buffer_path, (n, s.size, s.size, channels(s.color)))
    ok = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}
    digests: list[bytes | None] = [None] * n
    phashes = np.zeros(n, dtype=np.uint64)
    health_values: list[list[str] | None] = [None] * n
    root = os.path.abspath(scan.root)  # the same file for a cluster's worker, whatever its working folder
    rel_paths = [rel for rel, _ in scan.files]
    books = _CacheBooks(run, root, rel_paths)
    # Made as they are taken: a list of every task would hold a second copy of every path.
    tasks = (
        (
            os.path.abspath(buffer_path),
            offset,
            start,
            [os.path.join(root, rel) for rel in rel_paths[start : start + DECODE_CHUNK]],
        )
        + (s.size, s.color, books.arg, books.recorded_stats[start : start + DECODE_CHUNK])
        for start in range(0, n, DECODE_CHUNK)
    )
    done = progress.track(pool.imap(_decode_chunk, tasks), -(-n // DECODE_CHUNK), f"decoding {n} images")
    i = 0
    for results, counts, seen, written in done:
        books.add(i, counts, seen, written)
        for reason, digest, phash, values, *_ in results:
            if reason is None:
                ok[i], digests[i], phashes[i], health_values[i] = True, digest, phash, values
            else:
                reasons[i] = reason
            i += 1
    return Decoded(ok, reasons, digests, phashes, health_values, books.finish())


class _CacheBooks:
    """The cache's side of one decode_all, in prepare's process: the last run's stat records
    handed to the workers before, the stat index written after."""

    def __init__(self, run: CacheRun | None, root: str, rel_paths: list[str]):
        self.run, self.root, self.rel_paths = run, root, rel_paths
        self.cache_dir = run.root if run is not None else None
        self.arg = os.path.abspath(self.cache_dir) if run is not None else ""
        self.counts, self.recorded = CacheCounts(), {}
        self.stats = stat_index.load(self.cache_dir, root) if run is not None else {}
        # each file's stat record from the last run; the workers compare it with the file's stat now
        self.recorded_stats = [self.stats.get(rel) for rel in rel_paths] if self.stats else [None] * len(rel_paths)

    def add(self, first: int, counts: CacheCounts, seen: list, written: list) -> None:
        self.counts.add(counts)
        if self.run is not None:
            self.run.new.extend(written)
        for i, record in enumerate(seen, start=first):
            if record is not None:
                self.recorded[self.rel_paths[i]] = record

    def finish(self) -> CacheCounts | None:
        if self.run is None:
            return None
        if self.recorded != self.stats:
            stat_index.save(self.cache_dir, self.root, self.recorded)
        return self.counts
