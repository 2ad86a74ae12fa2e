"""Decoding one image file the one way every stage does it: `preprocess`.

`decode_image` turns one file (a path, or the bytes of an upload) into a normalised 8-bit
RGB or L picture, or raises `UnreadableImage` with a reason a person understands.
`preprocess` adds the resize: prepare, predict and serve all call it, so a new file is
treated exactly as the training images were. `PREPROCESS_VERSION` names this treatment;
the model folder records it and refuses to serve a model trained under another one.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

BACKGROUND = 255  # transparent pixels become white, whatever colour they hid
# Antialiased bilinear, as Keras' own image loaders default to: on a JPEG already shrunk in
# the DCT domain it looks the same as Lanczos at half the cost.
RESAMPLE = Image.Resampling.BILINEAR
RESIZE_METHOD = "squash to square; JPEG DCT draft, then antialiased bilinear (reducing_gap=3)"
# Bump whenever decoding or resizing changes what a model sees: 1 was Lanczos, 2 bilinear.
PREPROCESS_VERSION = 2


class UnreadableImage(Exception):
    """A file with an image name that cannot be used; `str()` is the reason."""


def decode_image(source: Path | str | bytes, color: str, draft_size: int | None = None) -> Image.Image:
    """Decode for real: EXIF orientation, alpha on a fixed background, 8-bit RGB or L.

    `source` is a file's path or its bytes (an upload)."""
    return _decode_sized(source, color, draft_size)[0]


def _decode_sized(
    source: Path | str | bytes, color: str, draft_size: int | None
) -> tuple[Image.Image, tuple[int, int], str]:
    """decode_image's picture, the file's own width and height (before any JPEG draft), and its mode."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both,
            # before any pixel is allocated.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's notes on damaged files ("Corrupt EXIF data", "Truncated File Read")
            # would reach the user as warning lines with a source path: the file either
            # decodes or is refused with its reason, and that is what is said.
            warnings.simplefilter("ignore", UserWarning)
            if isinstance(source, bytes):
                data = source
            else:
                with open(source, "rb") as f:
                    data = f.read()  # one read, not dozens of small ones
            image = Image.open(io.BytesIO(data))
            image.seek(0)  # animated GIF/WebP: the first frame
            original_size, original_mode = image.size, image.mode
            if draft_size and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))  # DCT-domain downscale
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when upright (most photos)
            return _normalise_mode(image, color), original_size, original_mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(
            f"too many pixels: refused as a possible decompression bomb (limit {Image.MAX_IMAGE_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        if len(data) == 0:
            raise UnreadableImage("empty file (0 bytes)") from None
        raise UnreadableImage("not an image Pillow can read (corrupt, or wrong extension)") from None
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder, not a file") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as e:
        detail = str(e).strip() or type(e).__name__
        raise UnreadableImage(f"truncated or corrupt image data ({detail})") from None


def _normalise_mode(image: Image.Image, color: str) -> Image.Image:
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode == "P" or mode == "PA":
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    elif mode.startswith("I;16"):
        image = _scale_to_8bit(np.asarray(image), 65535)  # always 16 bits, however dark
    elif mode == "I":
        image = _scale_to_8bit(np.asarray(image), 65535, integer_mode=True)
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = _scale_to_8bit(values, 1.0 if np.nanmax(values, initial=0) <= 1.0 else 255.0)
    elif mode == "CMYK":
        image = _icc_to_srgb(image) or image.convert("RGB")
    elif mode in ("LAB", "HSV", "YCbCr", "RGBX"):
        image = image.convert("RGB")
    elif mode == "RGB" and image.info.get("icc_profile"):
        image = _icc_to_srgb(image) or image
    if image.mode in ("LA", "La", "RGBa", "RGBA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    wanted = "L" if color == "grayscale" else "RGB"
    return image if image.mode == wanted else image.convert(wanted)


def _scale_to_8bit(values: np.ndarray, full_scale: float, integer_mode: bool = False) -> Image.Image:
    values = np.nan_to_num(values.astype(np.float64))
    if integer_mode and values.max(initial=0) <= 255:
        full_scale = 255.0  # 32-bit integer mode holding 8-bit values
    scaled = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def _icc_to_srgb(image: Image.Image) -> Image.Image | None:
    profile = image.info.get("icc_profile")
    if not profile:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def to_array(image: Image.Image, size: int) -> np.ndarray:
    """Resize to `size` x `size` and return uint8 (size, size, channels)."""
    resized = image.resize((size, size), RESAMPLE, reducing_gap=3.0)
    array = np.asarray(resized, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


@dataclass
class Preprocessed:
    pixels: np.ndarray  # uint8 (size, size, channels): what the model sees
    decoded: Image.Image  # the upright, colour-normalised picture before the resize
    original_size: tuple[int, int] = (0, 0)  # the file's width and height, as stored (health's odd size)
    original_mode: str = ""  # the file's own Pillow mode (health measures a one-band file as one band)


def preprocess(source: Path | str | bytes, size: int, color: str) -> Preprocessed:
    """One file (path or bytes) as the model sees it. Raises UnreadableImage."""
    decoded, original_size, original_mode = _decode_sized(source, color, draft_size=size)
    return Preprocessed(to_array(decoded, size), decoded, original_size, original_mode)


def channels(color: str) -> int:
    return 1 if color == "grayscale" else 3
