#!/usr/bin/env python3
"""Folders of pictures of none of a model's classes, for `evaluate --foreign` and bench/unknown_bench.py.

    python bench/make_foreign_folders.py emoji OUT        # Noto Color Emoji, every pictograph (~1,200),
                                                          # PNG with alpha (Debian fonts-noto-color-emoji,
                                                          # OFL-1.1)
    python bench/make_foreign_folders.py silhouettes OUT [--count N]
                                                          # animal silhouettes, white on black, 28x28
                                                          # (PyPI animal-mnist 0.4, MIT): N of 10,000

The .deb and the wheel are fetched once (`apt-get download`, `pip download --no-deps`) into a
cache beside OUT and unpacked there; nothing is installed. animal-mnist ships its arrays as a
gzipped pickle: it is read by an unpickler that builds numpy arrays and nothing else. The same
package versions give the same files.
"""

import argparse
import gzip
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EMOJI_DEB = "fonts-noto-color-emoji"
ANIMALS_WHEEL = "animal-mnist==0.4"
# Pictograph blocks; the regional-indicator letters and the skin-tone swatches are left out
# (a letter in a box would be a letter to a model of letters).
EMOJI_BLOCKS = [(0x1F300, 0x1FAFF), (0x2600, 0x27BF)]
LEFT_OUT = [(0x1F1E6, 0x1F1FF), (0x1F3FB, 0x1F3FF)]


def emoji(out: Path, cache: Path) -> int:
    from fontTools.ttLib import TTFont

    root = cache / EMOJI_DEB
    if not root.exists():
        cache.mkdir(parents=True, exist_ok=True)
        if not sorted(cache.glob(f"{EMOJI_DEB}_*.deb")):
            subprocess.run(["apt-get", "download", EMOJI_DEB], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["dpkg-deb", "-x", str(sorted(cache.glob(f"{EMOJI_DEB}_*.deb"))[-1]), str(root)], check=True)
    font_file = next(root.rglob("NotoColorEmoji.ttf"))
    codes = sorted(
        c
        for c in TTFont(font_file, lazy=True).getBestCmap()
        if any(a <= c <= b for a, b in EMOJI_BLOCKS) and not any(a <= c <= b for a, b in LEFT_OUT)
    )
    font = ImageFont.truetype(str(font_file), 109)  # the one size of its bitmaps
    (out / "emoji").mkdir(parents=True, exist_ok=True)
    count = 0
    for code in codes:
        image = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((0, 0), chr(code), font=font, embedded_color=True)
        box = image.getbbox()
        if box is None:
            continue
        image.crop(box).save(out / "emoji" / f"u{code:05x}.png")
        count += 1
    return count


class ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and nothing else: any other class in the pickle is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: only numpy arrays are read")


def silhouettes(out: Path, cache: Path, count: int) -> int:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("animal_mnist-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), ANIMALS_WHEEL], check=True
        )
        wheels = sorted(cache.glob("animal_mnist-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        data = next(n for n in wheel.namelist() if n.endswith("animal_data_version_3.gz"))
        with wheel.open(data) as raw, gzip.open(raw) as f:
            pictures = np.asarray(ArraysOnly(f).load(), dtype=np.uint8)
    rows = np.random.default_rng(0).choice(len(pictures), min(count, len(pictures)), replace=False)
    (out / "silhouettes").mkdir(parents=True, exist_ok=True)
    for i in sorted(rows):
        Image.fromarray(pictures[i]).save(out / "silhouettes" / f"animal_{i:05d}.png")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["emoji", "silhouettes"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=1000, help="silhouettes: how many (evenly drawn at random)")
    args = parser.parse_args()
    cache = args.out.parent / ".foreign-cache"
    made = emoji(args.out, cache) if args.kind == "emoji" else silhouettes(args.out, cache, args.count)
    print(f"{made} {args.kind} in {args.out}")


if __name__ == "__main__":
    main()
