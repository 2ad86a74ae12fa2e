"""Augmented copies of training images, with albumentations, reproducible per chunk of rows.

Each chunk of rows gets its own seed derived from (seed, chunk number), so the copies are
the same whatever the number of worker processes.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

CHUNK_ROWS = 256


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


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def augment_chunk(images: np.ndarray, copies: int, seed: int, chunk: int, flip: bool = True) -> np.ndarray:
    """Return (copies, len(images), H, W, C) augmented versions of `images` (uint8 NHWC)."""
    augmenter = build_augmenter(chunk_seed(seed, chunk), flip)
    out = np.empty((copies, *images.shape), dtype=np.uint8)
    for c in range(copies):
        for i, image in enumerate(images):
            result = augmenter(image=image)["image"]
            out[c, i] = result.reshape(image.shape)
    return out
