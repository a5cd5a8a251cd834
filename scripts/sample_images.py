"""Odd and hostile images, made in memory: the tests' inputs and the benchmarks' photos."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring width×height, with one tiny compressed row: a decompression bomb
    in shape, harmless unless a decoder trusts the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    noise = rng.integers(0, 40, (height, width, 3))
    array = np.clip(gradient * np.array([1.0, 0.6, 0.3]) + noise, 0, 255).astype("uint8")
    return Image.fromarray(array)


def truncated_jpeg() -> bytes:
    data = encoded(photo(), "JPEG", quality=90)
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    array = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return encoded(Image.fromarray(array), "PNG")


def cmyk_jpeg() -> bytes:
    return encoded(photo().convert("CMYK"), "JPEG")


def palette_png_with_transparency() -> bytes:
    image = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 200 wide × 100 high, with EXIF orientation 6 (rotate 90° clockwise to display): upright it is 100×200."""
    image = Image.new("RGB", (200, 100), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 100, 100))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes())


def grayscale_png() -> bytes:
    return encoded(photo().convert("L"), "PNG")


def rgba_png() -> bytes:
    image = photo().convert("RGBA")
    image.putalpha(0)
    return encoded(image, "PNG")


def huge_legal_jpeg() -> bytes:
    return encoded(photo(4000, 3000), "JPEG", quality=70)
