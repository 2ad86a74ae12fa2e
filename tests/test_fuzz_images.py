"""Malformed images fed to the one decoder prepare, predict and serve share (data/images.py).

Hypothesis starts from small valid files of every format Pillow writes here, then breaks
them: truncated, bytes flipped, a header from another format, dimensions in the header
made huge. Each case must end within a time bound with a picture or UnreadableImage and
its reason, never another exception. FUZZ_EXAMPLES (default 300) sets how many cases one
run tries; bench/fuzz_images.py runs thousands.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.images import UnreadableImage, preprocess

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SECONDS_PER_CASE = 5.0  # a decode of these small files takes milliseconds; this catches a hang
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA")


def valid_file(fmt: str, width: int, height: int, mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    if fmt in ("JPEG", "PPM", "BMP") and mode in ("RGBA", "LA", "P"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR declares other dimensions, its CRC made right so the header passes."""
    ihdr = bytearray(data[12:29])  # the chunk type and its 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]


def declared_size(data: bytes, width: int, height: int) -> bytes:
    """The dimensions in the header replaced, where the format keeps them at a known place."""
    if data.startswith(b"\x89PNG"):
        return png_with_size(data, width, height)
    if data.startswith(b"GIF"):
        return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]
    if data.startswith(b"BM"):
        return data[:18] + struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF) + data[26:]
    if data.startswith(b"\xff\xd8"):
        at = data.find(b"\xff\xc0")
        if at > 0:
            return data[: at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9 :]
    return data


MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"RIFF",
    b"P6\n",
    b"\x00\x00\x01\x00",
]


@st.composite
def malformed(draw) -> bytes:
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(("RGB", "RGBA", "L", "P", "LA")))
    if fmt in ("ICO", "TGA", "WEBP") and mode == "LA":
        mode = "RGBA"
    data = valid_file(fmt, draw(st.integers(1, 24)), draw(st.integers(1, 24)), mode, draw(st.integers(0, 99)))
    damage = draw(st.sampled_from(("truncate", "flip", "header", "size", "garbage", "several")))
    rounds = draw(st.integers(2, 4)) if damage == "several" else 1
    for _ in range(rounds):
        kind = draw(st.sampled_from(("truncate", "flip", "header", "size"))) if damage == "several" else damage
        if kind == "truncate":
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        elif kind == "flip" and data:
            flipped = bytearray(data)
            for _ in range(draw(st.integers(1, 16))):
                at = draw(st.integers(0, len(flipped) - 1))
                flipped[at] ^= 1 << draw(st.integers(0, 7))
            data = bytes(flipped)
        elif kind == "header":
            magic = draw(st.sampled_from(MAGICS))
            data = magic + data[len(magic) :]
        elif kind == "size":
            huge = st.sampled_from((0, 1, 65535, 70000, 2**20, 2**31 - 1, 2**32 - 1))
            data = declared_size(data, draw(huge), draw(huge))
    if damage == "garbage":
        data = draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=512))
    return data


class TooSlow(Exception):
    pass


def decode_within_bound(data: bytes) -> str:
    """'ok' or the UnreadableImage reason; TooSlow when one case passes SECONDS_PER_CASE."""

    def alarm(signum, frame):
        raise TooSlow(f"one case took over {SECONDS_PER_CASE}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_CASE)
    try:
        result = preprocess(data, 16, "rgb")
        assert result.pixels.shape == (16, 16, 3) and result.pixels.dtype == np.uint8
        return "ok"
    except UnreadableImage as e:
        assert str(e).strip(), "an UnreadableImage without its reason"
        return str(e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.filterwarnings("error")  # nor a warning line: Pillow's are kept inside decode_image
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # the time bound is the alarm above: Hypothesis' deadline flakes on a busy CPU
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(malformed())
def test_malformed_images_are_decoded_or_refused_with_a_reason(data):
    decode_within_bound(data)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "JPEG"])
def test_huge_declared_dimensions_are_refused_quickly_without_allocating(fmt):
    data = declared_size(valid_file(fmt, 8, 8, "RGB", 0), 60000, 60000)
    started = time.perf_counter()
    reason = decode_within_bound(data)
    assert time.perf_counter() - started < 2
    assert reason != "ok", "a 60000x60000 header decoded from a few hundred bytes"
