"""Augmented copies of training images, with albumentations, reproducible per source image.

Each source image's copies are drawn from a generator seeded by (--seed, the image's
pixel digest), so they follow the image, not its position in the split nor the number of
worker processes: a prepare cache (data/cache.py) can keep them by the image's content,
and a run with files added or relabelled draws the same copies for every image it shares
with the last one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random

import numpy as np

from pipeline import __version__
from pipeline.data.cache import FORMAT_VERSION, CacheCounts, EntryStore

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

CHUNK_ROWS = 256  # source images per worker task
AUGMENT_VERSION = 2  # 2: seeded per source image (1 seeded per chunk of 256 positions); bump when the copies change


def build_augmenter(seed: int, flip: bool = True):
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=0.5 if flip else 0.0),  # off for digits, text, left/right classes
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.08, 0.08),
                rotate=(-12, 12),
                border_mode=0,  # cv2.BORDER_CONSTANT: no mirrored ghosts at the edges
                p=0.8,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.6),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        ],
        seed=seed,
    )


def image_seed(seed: int, digest: bytes) -> int:
    """The seed of one source image's copies: --seed and the digest of its pixels."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/".encode() + digest, digest_size=8).digest(), "little")


def _reseed(augmenter, seed: int) -> None:
    """One numpy and one Python generator for the whole pipeline (Compose.set_random_seed
    makes a pair per transform: three times the cost)."""
    augmenter.set_random_state(np.random.default_rng(seed), random.Random(seed))


@functools.cache
def cache_versions() -> str:
    """What, beside the source's pixels and the settings, decides the copies: read from the
    installed packages' metadata, since importing albumentations (and OpenCV) costs about a
    second, a third of a re-run whose copies all come from the cache."""
    from importlib import metadata

    def installed(*names: str) -> str:
        for name in names:
            try:
                return f"{name}-{metadata.version(name)}"
            except metadata.PackageNotFoundError:
                pass
        return "none"

    opencv = installed(
        "opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"
    )
    return f"{FORMAT_VERSION}/{AUGMENT_VERSION}/{__version__}/{installed('albumentations')}/{opencv}"


def cache_key(versions: str, digest: bytes, shape: tuple, copies: int, seed: int, flip: bool) -> str:
    salt = f"augmented/{versions}/{'x'.join(map(str, shape))}/{copies}/{seed}/{int(flip)}/{digest.hex()}"
    return hashlib.blake2b(salt.encode(), digest_size=20).hexdigest()


def augment_images(
    images: np.ndarray,
    rows: np.ndarray,
    digests: list[bytes],
    copies: int,
    seed: int,
    flip: bool = True,
    store: EntryStore | None = None,
    counts: CacheCounts | None = None,
) -> np.ndarray:
    """(copies, len(rows), H, W, C) augmented versions of `images[rows]` (uint8 NHWC; a
    memory map is read only at the rows whose copies are drawn), whose pixel digests are
    `digests`. With a cache `store`, an image's copies come from its entry when one is
    sound, and are put there when drawn (`counts` says which)."""
    augmenter = None  # built at the first image the cache does not hold: its import is the costly part
    out = np.empty((copies, len(rows), *images.shape[1:]), dtype=np.uint8)
    versions = cache_versions() if store is not None else ""
    shape = (copies, *images.shape[1:])
    for i, (row, digest) in enumerate(zip(rows.tolist(), digests, strict=True)):
        key = cache_key(versions, digest, images.shape[1:], copies, seed, flip) if store is not None else None
        found = store.get(key, shape, counts) if store is not None else None
        if found is not None:
            out[:, i] = found[0]
            counts.augmented_hits += 1
            continue
        image = np.array(images[row])  # a copy of its own: the map is read-only
        augmenter = augmenter or build_augmenter(0, flip)
        _reseed(augmenter, image_seed(seed, digest))
        for c in range(copies):
            out[c, i] = augmenter(image=image)["image"].reshape(image.shape)
        if store is not None:
            counts.augmented_misses += 1
            store.put(key, out[:, i], [])
    return out
