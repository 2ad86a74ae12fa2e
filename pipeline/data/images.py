"""Decoding one image file the one way every stage does it: `preprocess`.

`decode_image` turns one file (a path, or the bytes of an upload) into a normalised 8-bit
RGB or L picture, or raises `UnreadableImage` with a reason a person understands.
`preprocess` adds the resize: prepare, predict and serve all call it, so a new file is
treated exactly as the training images were. `PREPROCESS_VERSION` names this treatment;
the model folder records it and refuses to serve a model trained under another one.

What is read is guarded here, once for every stage: only regular files (after following
links; a FIFO or a device is refused before it is opened), at most `MAX_FILE_BYTES`
(`read_image_file`), and only the formats in `FORMATS` (`open_image`): Pillow would
otherwise pick any of its decoders from the content, EPS included, which runs Ghostscript.
"""

from __future__ import annotations

import io
import os
import stat
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


# The only formats ever decoded, whatever a file's name or content says: the ones the image
# extensions name (image_folder.IMAGE_EXTENSIONS); a camera's MPO (a JPEG with a second
# picture) opens through Pillow's JPEG. PostScript, PDF and the rest are refused as not an image.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
MAX_FILE_BYTES = 256 * 2**20  # a file larger than this is not read (a scan this large is not a training picture)


class UnreadableImage(Exception):
    """A file with an image name that cannot be used; `str()` is the reason."""


def read_image_file(path: Path | str | bytes) -> tuple[os.stat_result, bytes]:
    """A file's stat and bytes: a regular file only (links followed), at most MAX_FILE_BYTES;
    else UnreadableImage, its reason.

    The kind is checked before opening, and again on what was opened (O_NONBLOCK: a FIFO
    swapped in between cannot block the open), so a FIFO or /dev/zero never hangs a run."""
    try:
        _refuse_unless_regular(os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            _refuse_unless_regular(st)
            os.set_blocking(fd, True)
            with open(fd, "rb", closefd=False) as f:
                data = f.read(MAX_FILE_BYTES + 1)  # one read, not dozens of small ones
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder, not a file") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except OSError as e:
        raise UnreadableImage(f"cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise UnreadableImage(f"larger than {MAX_FILE_BYTES // 2**20} MB: not read")
    return st, data


def _refuse_unless_regular(st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "a special file"
    )
    raise UnreadableImage(f"not a regular file ({kind}): not read")


def open_image(data: bytes | bytearray) -> Image.Image:
    """Pillow's lazy open of one image's bytes, in one of FORMATS only."""
    return Image.open(io.BytesIO(data), formats=FORMATS)


def decode_image(source: Path | str | bytes, color: str, draft_size: int | None = None) -> Image.Image:
    """Decode for real: EXIF orientation, alpha on a fixed background, 8-bit RGB or L.

    `source` is a file's path or its bytes (an upload)."""
    return _decode_sized(source, color, draft_size)[0]


def decoded_pixels(data: bytes | bytearray, draft_size: int | None = None) -> int:
    """How many pixels `preprocess` would decode from these bytes, read from the header alone
    (a JPEG at the reduced size its DCT draft decodes); 0 where the header cannot be read
    (the decoder then says why the file is unreadable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = open_image(data)
            if draft_size and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            return image.size[0] * image.size[1]
    except Exception:
        return 0


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
            data = source if isinstance(source, bytes | bytearray) else read_image_file(source)[1]
            image = open_image(data)
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
        raise UnreadableImage(
            f"not an image of a format read here ({', '.join(FORMATS)}): corrupt, or another kind of file"
        ) from None
    # (a missing, unreadable or non-regular file was refused by read_image_file, with its reason;
    # from here on the errors are of the bytes)
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
        image = _integers_to_8bit(np.asarray(image), 65535)  # always 16 bits, however dark
    elif mode == "I":
        values = np.asarray(image)
        image = _integers_to_8bit(values, 255 if values.max(initial=0) <= 255 else 65535)  # 8-bit values in 32 bits
    elif mode == "F":
        image = _floats_to_8bit(np.asarray(image))
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


# Wide pixels are scaled BLOCK_PIXELS at a time into one uint8 picture: whole-picture float64
# copies cost about 25 bytes a pixel (a 4000x4000 16-bit PNG raised the peak by 400 MB).
BLOCK_PIXELS = 2**20


def _integers_to_8bit(values: np.ndarray, full_scale: int) -> Image.Image:
    """round(v * 255 / full_scale), clipped to 0-255, in integers: exactly what float64 gave
    (no ties occur: 510 * v is even, full_scale odd)."""

    def scale(block: np.ndarray) -> np.ndarray:
        wide = np.clip(block, 0, full_scale).astype(np.uint32)
        wide *= 255
        wide += full_scale // 2
        wide //= full_scale
        return wide

    return _in_blocks(values, scale)


def _floats_to_8bit(values: np.ndarray) -> Image.Image:
    """A float image (0-1, or 0-255 when it goes above 1), NaN as 0, in float64 as before."""
    full_scale = 1.0 if np.nanmax(values, initial=0) <= 1.0 else 255.0
    return _in_blocks(values, lambda block: np.rint(np.nan_to_num(block.astype(np.float64)) * (255.0 / full_scale)))


def _in_blocks(values: np.ndarray, scale) -> Image.Image:
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, BLOCK_PIXELS // max(1, values[0].size if values.ndim > 1 else 1))
    for start in range(0, len(values), rows):
        out[start : start + rows] = np.clip(scale(values[start : start + rows]), 0, 255)
    return Image.fromarray(out)


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
