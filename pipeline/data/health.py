"""Dataset health: cleanvision's image-property checks, on the picture prepare already decoded.

`raw_values` turns one decoded picture (and its file's original width and height) into
the raw properties cleanvision's `ImagePropertyIssueManager` computes (cleanvision 0.3:
`issue_managers/image_property.py`): the 99th and 5th percentiles of pixel brightness,
entropy, edge-strength blurriness and the grey histogram's spread, the size and whether
the content is grey. `decoding.py` calls it in the workers, next to the digest and hash,
so the folder is decoded once; prepare writes the values to the data folder's health.csv.
`issue_scores` and `flagged` turn them into cleanvision's scores (0-1, low = bad) and
issues with its default thresholds; audit reads them.

Where this differs from cleanvision, on purpose: a file's pixels are read as prepare reads
them (EXIF orientation applied, alpha over white, 16-bit scaled), large JPEGs at the
DCT-domain reduction prepare decodes them at (at least --size pixels a side), and
"grayscale" means grey content (every pixel R = G = B, or a one-band file), where
cleanvision looks at the file's mode alone. A one-band file (L, 1, I;16) is measured as
one band, a colour one as RGB, as cleanvision measures them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter, ImageStat

RAW_COLUMNS = (
    "width",
    "height",
    "brightness_perc_99",
    "brightness_perc_5",
    "entropy",
    "blurriness",
    "blurriness_grayscale_std",
    "grey",
)
ISSUE_KINDS = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
# cleanvision's defaults (ImagePropertyIssueManager.get_default_params): an image is an
# issue where its score is below the threshold.
THRESHOLDS = {"dark": 0.32, "light": 0.05, "odd_aspect_ratio": 0.35, "low_information": 0.3, "blurry": 0.29}
ENTROPY_FACTOR = 0.1
BLUR_FACTOR, BLUR_COLOR_THRESHOLD = 0.01, 0.18
BLUR_MAX_SIDE = 64  # cleanvision's MAX_RESOLUTION_FOR_BLURRY_DETECTION
SIZE_IQR_FACTOR = 3.0
GREY_FOLDER_SHARE = 0.5  # from this share of grey pictures on, a folder is grey, and grey is no issue


def as_fields(values) -> list[str]:
    """RAW_COLUMNS' values as health.csv's fields: shortest round-trip digits (repr), the
    text the csv module would make of the floats."""
    return [repr(float(v)) for v in values]


def raw_values(picture: Image.Image, original_size: tuple[int, int], original_mode: str = "RGB") -> tuple[float, ...]:
    """RAW_COLUMNS for one decoded picture (RGB or L) whose file was `original_size` (w, h) in `original_mode`."""
    pixels = np.asarray(picture)
    one_band = original_mode not in ("", "P") and Image.getmodebands(original_mode) == 1
    if one_band and picture.mode != "L":
        picture = picture.convert("L")  # exact: a one-band file decoded to RGB has R = G = B
        pixels = np.asarray(picture)
    grey = pixels.ndim == 2 or bool(
        (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    )
    if pixels.ndim == 3:
        r, g, b = (pixels[..., i].astype(np.int64) for i in range(3))
        brightness = np.sqrt(0.241 * (r * r) + 0.691 * (g * g) + 0.068 * (b * b)) / 255
    else:
        brightness = pixels / 255.0
    perc_99, perc_5 = np.percentile(brightness, [99, 5])
    ratio = max(picture.width, picture.height) / BLUR_MAX_SIDE
    small = (
        picture.resize((max(int(picture.width // ratio), 1), max(int(picture.height // ratio), 1)))
        if ratio > 1
        else picture
    )
    gray = small.convert("L")
    blurriness = math.sqrt(ImageStat.Stat(gray.filter(ImageFilter.FIND_EDGES)).var[0])
    return (
        float(original_size[0]),
        float(original_size[1]),
        float(perc_99),
        float(perc_5),
        float(picture.entropy()),
        blurriness,
        float(np.std(gray.histogram())),
        float(grey),
    )


def issue_scores(raw: np.ndarray) -> dict[str, np.ndarray]:
    """cleanvision's score per kind (0-1, lower is worse) for rows of RAW_COLUMNS; odd_size
    is judged against the rows given, as cleanvision judges it against its dataset."""
    column = {name: raw[:, i] for i, name in enumerate(RAW_COLUMNS)}
    width, height = column["width"], column["height"]
    blur = 1 - np.exp(-column["blurriness"] * BLUR_FACTOR)
    spread = 1 - np.exp(-column["blurriness_grayscale_std"] * BLUR_FACTOR)
    spread[spread <= BLUR_COLOR_THRESHOLD] = 0
    return {
        "dark": column["brightness_perc_99"],
        "light": 1 - column["brightness_perc_5"],
        "blurry": np.minimum(blur + spread, 1),
        "low_information": np.minimum(ENTROPY_FACTOR * column["entropy"], 1),
        "odd_aspect_ratio": np.minimum(width / height, height / width),
        "odd_size": odd_size_scores(np.sqrt(width) * np.sqrt(height))[0],
        "grayscale": 1 - column["grey"],
    }


def odd_size_scores(sizes: np.ndarray) -> tuple[np.ndarray, float]:
    """(scores, threshold): cleanvision's SizeProperty, distance from the middle of the
    inter-quartile fence (3 IQRs beyond each quartile) over its width."""
    if len(sizes) == 0:
        return sizes, 0.5
    q1, q3 = np.percentile(sizes, [25, 75])
    low, high = q1 - SIZE_IQR_FACTOR * (q3 - q1), q3 + SIZE_IQR_FACTOR * (q3 - q1)
    middle, gap = (low + high) / 2, high - low
    norm, threshold = (gap, 0.5) if gap > 0 else (middle, 1.0)
    return 1 - np.clip(np.abs(sizes - middle) / norm, 0, 1), threshold


def flagged(raw: np.ndarray, colour_folder: bool = True) -> dict[str, np.ndarray]:
    """A boolean per row and kind: cleanvision's default thresholds. Grayscale only in a
    colour folder: prepared in colour, and most of its pictures not grey (a folder of grey
    scans, or letters, is not a colour folder with grey strays)."""
    scores = issue_scores(raw)
    sizes = np.sqrt(raw[:, RAW_COLUMNS.index("width")]) * np.sqrt(raw[:, RAW_COLUMNS.index("height")])
    size_threshold = odd_size_scores(sizes)[1]
    found = {kind: scores[kind] < THRESHOLDS[kind] for kind in THRESHOLDS}
    found["odd_size"] = scores["odd_size"] < size_threshold
    grey = scores["grayscale"] == 0
    found["grayscale"] = grey & (colour_folder and grey.mean() < GREY_FOLDER_SHARE)
    return {kind: found[kind] for kind in ISSUE_KINDS}
