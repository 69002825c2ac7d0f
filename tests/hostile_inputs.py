"""Generators for damaged and hostile images: every input that ever broke the decoders, made on the fly.

Kept as code, not committed binaries: each one is rebuilt from a synthetic image and the damage
that was found, so the regression tests and the fuzz harness share one list.
"""

from __future__ import annotations

import zlib

import imagecodecs
import numpy as np

from tests.conftest import encode, synthetic_xray


def gradient16(width: int = 96, height: int = 80, peak: int = 65535) -> np.ndarray:
    """A smooth 16-bit (or ``peak``-bit range) test image with the full range in it."""
    return np.linspace(0, peak, width * height).reshape(height, width).astype(np.uint16)


def jpeg8(width: int = 400, height: int = 300, mode: str = "L", **save: object) -> bytes:
    return encode(synthetic_xray(width, height, seed=1, mode=mode), "JPEG", quality=90, **save)


def lossless_without_huffman_table() -> bytes:
    """Issue 10, finding 1: a lossless JPEG with its DHT segment removed.

    ``jpeg8_decode`` refuses it; the old fallback ``imagecodecs.ljpeg_decode`` then dereferenced a
    null pointer and took the whole service down (segfault).
    """
    data = imagecodecs.jpeg8_encode(
        np.random.default_rng(0).integers(0, 65535, (64, 64), dtype=np.uint16), lossless=True, bitspersample=16
    )
    start = data.find(b"\xff\xc4")
    length = int.from_bytes(data[start + 2 : start + 4], "big")
    return data[:start] + data[start + 2 + length :]


def cut_with_eoi(data: bytes, keep: float = 0.5) -> bytes:
    """Finding 2: the first part of a JPEG with an end-of-image marker appended (decoded grey-filled before)."""
    return data[: int(len(data) * keep)] + b"\xff\xd9"


def zero_middle(data: bytes, start: float = 0.3, stop: float = 0.7) -> bytes:
    """Finding 2: the middle 40% of the file zeroed."""
    a, b = int(len(data) * start), int(len(data) * stop)
    return data[:a] + bytes(b - a) + data[b:]


def patch_frame_size(data: bytes, width: int, height: int) -> bytes:
    """Finding 2: the start-of-frame header claims another size than the scan data holds."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2", b"\xff\xc3"):
        pos = data.find(marker)
        if pos >= 0:
            patched = bytearray(data)
            patched[pos + 5 : pos + 7] = height.to_bytes(2, "big")
            patched[pos + 7 : pos + 9] = width.to_bytes(2, "big")
            return bytes(patched)
    raise ValueError("no start-of-frame marker")


def two_channel_jpeg(bits: int = 12, lossless: bool = False, alpha: int | None = None) -> bytes:
    """Finding 3: a grey + alpha JPEG (2 components) at 12 or 16 bits."""
    grey = gradient16(96, 80, (1 << bits) - 1)
    alpha_plane = np.full_like(grey, (1 << bits) - 1 if alpha is None else alpha)
    return imagecodecs.jpeg8_encode(np.stack([grey, alpha_plane], -1), bitspersample=bits, lossless=lossless, level=95)


def one_colour_rgba_png(width: int, height: int) -> bytes:
    """Finding 5: a tiny file that decodes to width x height x 4 bytes (zlib squeezes one colour to nothing)."""
    row = b"\x00" + b"\x80\x80\x80\xff" * width
    return png_from_rows(width, height, 8, 6, zlib.compress(row * height, 9))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk (PNG spec 5.3): length, type, body, then the CRC of type and body."""
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def png_from_rows(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_bad_ihdr_crc() -> bytes:
    """Finding 7: one flipped bit in the IHDR checksum (was a 415, is a 422)."""
    data = bytearray(encode(synthetic_xray(), "PNG"))
    data[29] ^= 0x01  # IHDR's CRC: 8 signature + 4 length + 4 type + 13 body = offset 29
    return bytes(data)
