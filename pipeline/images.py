"""Finding images in a user's folder and decoding them, the one way every stage does it.

`scan_folder` reads IMAGES_DIR (sub-folder = class) and says what it ignored and why;
`decode_image` turns one file into a normalised 8-bit RGB or L picture, or raises
`UnreadableImage` with a reason a person understands. `load_image` adds the resize that
prepare and predict share, so a new file is treated exactly as training data was.
Nothing here writes to the user's folder.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
METADATA_DIRS = frozenset({"__MACOSX"})
BACKGROUND = 255  # transparent pixels become white, whatever colour they hid
# Antialiased bilinear, as Keras' own image loaders default to: on a JPEG already shrunk in
# the DCT domain it looks the same as Lanczos at half the cost.
RESAMPLE = Image.Resampling.BILINEAR
RESIZE_METHOD = "squash to square; JPEG DCT draft, then antialiased bilinear (reducing_gap=3)"


class UnreadableImage(Exception):
    """A file with an image name that cannot be used; `str()` is the reason."""


@dataclass
class FolderScan:
    root: Path
    class_names: list[str]
    files: list[tuple[str, int]]  # (path relative to root, class index), sorted
    ignored: list[dict] = field(default_factory=list)  # {"path", "reason"}
    warnings: list[str] = field(default_factory=list)


def _ignore_reason(name: str, is_dir: bool) -> str | None:
    if name.startswith("._"):
        return "macOS resource fork (._ file)"
    if name.startswith("."):
        return "hidden folder" if is_dir else "hidden file"
    if is_dir and name in METADATA_DIRS:
        return "macOS metadata folder (__MACOSX)"
    if not is_dir and name.lower() in SYSTEM_FILES:
        return "system file"
    return None


def scan_folder(root: Path) -> FolderScan:
    """List class folders and their image files; never follows a symbolic-link loop."""
    root = Path(root)
    if not root.exists():
        raise PipelineError(f"images folder {root} does not exist")
    if not root.is_dir():
        raise PipelineError(f"{root} is not a folder: give a folder with one sub-folder per class")
    ignored: list[dict] = []
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        is_dir = entry.is_dir()
        reason = _ignore_reason(entry.name, is_dir)
        if reason is None and not is_dir:
            reason = "file directly in the images folder (classes are sub-folders)"
        if reason:
            ignored.append({"path": entry.name, "reason": reason})
        else:
            class_dirs.append(entry)
    files: list[tuple[str, int]] = []
    warnings_: list[str] = []
    # Every folder is read once: a link back to the images folder, to another class folder
    # or to a folder already walked (a loop) is listed as ignored, never followed again.
    seen = {_dir_key(root)} | {_dir_key(d) for d in class_dirs}
    walked_tops: set[tuple[int, int]] = set()
    for label, class_dir in enumerate(class_dirs):
        top = _dir_key(class_dir)
        if top in walked_tops:
            ignored.append({"path": class_dir.name, "reason": "symbolic link to another class folder"})
            found = []
        else:
            walked_tops.add(top)
            found = _walk_class(root, class_dir, ignored, seen)
        if not found:
            warnings_.append(f"class folder '{class_dir.name}' has no image files")
        files.extend((path, label) for path in found)
    return FolderScan(root, [d.name for d in class_dirs], files, ignored, warnings_)


def _dir_key(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_class(root: Path, class_dir: Path, ignored: list[dict], seen: set[tuple[int, int]]) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        if dirpath != str(class_dir):
            key = _dir_key(dirpath)
            if key in seen:  # a symbolic link back up the tree, or to a folder read elsewhere
                ignored.append({"path": _rel(root, dirpath), "reason": "symbolic link loop (folder already scanned)"})
                dirnames[:] = []
                continue
            seen.add(key)
        for name in sorted(dirnames):
            reason = _ignore_reason(name, True)
            if reason:
                ignored.append({"path": _rel(root, os.path.join(dirpath, name)), "reason": reason})
        dirnames[:] = sorted(d for d in dirnames if _ignore_reason(d, True) is None)
        prefix = _rel(root, dirpath) + "/"  # once per folder: relpath per file is slow at 100k files
        for name in sorted(filenames):
            reason = _ignore_reason(name, False)
            if reason is None and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                reason = "not an image file extension"
            rel = prefix + name
            if reason:
                ignored.append({"path": rel, "reason": reason})
            else:
                found.append(rel)
    return found


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def decode_image(path: Path | str, color: str, draft_size: int | None = None) -> Image.Image:
    """Decode for real: EXIF orientation, alpha on a fixed background, 8-bit RGB or L."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse both,
            # before any pixel is allocated.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                image = Image.open(io.BytesIO(f.read()))  # one read, not dozens of small ones
            image.seek(0)  # animated GIF/WebP: the first frame
            if draft_size and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))  # DCT-domain downscale
            image.load()
            image = ImageOps.exif_transpose(image)
            return _normalise_mode(image, color)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(
            f"too many pixels: refused as a possible decompression bomb (limit {Image.MAX_IMAGE_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        if os.stat(path).st_size == 0:
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


def load_image(path: Path, size: int, color: str) -> np.ndarray:
    """One file as the model sees it: uint8 (size, size, channels). Raises UnreadableImage."""
    return to_array(decode_image(path, color, draft_size=size), size)


def channels(color: str) -> int:
    return 1 if color == "grayscale" else 3


def collect_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given, and folders expanded to the image files inside them (recursively, with
    scan_folder's rules: hidden files and folders, __MACOSX, system files and files without
    an image extension are left out). Returns (files, notes about folders with no images)."""
    files: list[Path] = []
    notes: list[str] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)  # named explicitly: predict tries it and reports if it cannot
            continue
        found = _walk_class(item, item, ignored=[], seen={_dir_key(item)})
        if not found:
            notes.append(f"{item}: no image files inside")
        files.extend(item / rel for rel in found)
    return files, notes
