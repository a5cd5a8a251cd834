"""Turn whatever a visitor uploads into a sane RGB picture, or a clear refusal.

Decoding happens here rather than in the UI component, so that every failure — a truncated JPEG, random bytes
named `.png`, a header declaring a billion pixels — becomes one readable message in the UI and the API alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
# The formats a photo arrives in from a camera, a phone or a browser (JPEG includes cameras' multi-picture MPO
# files). Every other decoder Pillow ships (TIFF, PSD, ICO, PCX, ...) is attack surface this app does not need.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
# EXIF orientation → the transpose that makes the picture upright (as ImageOps.exif_transpose does)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


class NotAnImage(InputError):
    """The bytes are not in any picture format PIL knows; callers that know where the bytes came from (a link)
    can say so in their own words."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, upright, at most `max_side` on its longest side
    digest: str  # sha256 of the decoded pixels: the cache key of Analyze
    original_size: tuple[int, int]
    notes: tuple[str, ...] = ()  # what was done to it, shown to the user (e.g. "downscaled from 6000×4000")


def load_image(source: ImageSource, *, max_pixels: int, max_side: int, max_bytes: int | None = None) -> LoadedImage:
    if source is None:
        raise InputError("No image was given. Upload a photo, paste one, or pick an example.")
    notes: list[str] = []
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    else:
        image = _open(source, max_pixels=max_pixels, max_bytes=max_bytes)
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("The image is empty (zero pixels).")
    if width * height > max_pixels:
        raise InputError(f"The image is too large: {width}×{height} pixels (limit {max_pixels:,} pixels). "
                         "Resize it and try again.")
    original = image.size
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
            notes.append("animated image: the first frame is used")
        orientation = image.getexif().get(0x0112, 1)
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (2 * max_side, 2 * max_side))  # decode at 1/2, 1/4 or 1/8 scale when that suffices
        image.load()
        image = _to_rgb(_shrink(image, max_side))
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"The image could not be decoded ({_short(exc)}). It may be truncated or corrupt; "
                         "try another file.") from None
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notes.append(f"downscaled from {original[0]}×{original[1]} to {image.size[0]}×{image.size[1]}")
    digest = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()
    return LoadedImage(image=image, digest=digest, original_size=original, notes=tuple(notes))


def _open(source, *, max_pixels: int, max_bytes: int | None) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "upload"
    else:
        path = Path(source)
        name = path.name
        try:
            size = path.stat().st_size
        except OSError:
            raise InputError("The uploaded file could not be read.") from None
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.")
        data = path.read_bytes()
    if not data:
        raise InputError(f"The file {name} is empty.")
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(f"The file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.")
    if data.lstrip()[:5] in (b"<?xml", b"<svg ") or b"<svg" in data[:512]:
        raise InputError("SVG drawings are not supported; upload a photo (JPEG, PNG, WebP, GIF, ...).")
    # PIL's own bomb check warns at MAX_IMAGE_PIXELS and raises at twice that; ours is stricter and runs on the
    # header alone, before any pixel is decoded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            raise InputError(f"The image declares too many pixels (limit {max_pixels:,}); refusing to decode "
                             "it.") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise NotAnImage(f"{name} is not an image this app can read. Upload a JPEG, PNG, WebP or GIF "
                             "photo.") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(f"The image is too large: {width}×{height} pixels (limit {max_pixels:,} pixels). "
                         "Resize it and try again.")
    return image


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """Reduce a picture far larger than the models need by a whole factor in its own mode, before any conversion,
    so that a 16-bit or float image of tens of megapixels never becomes tens of megapixels of floats; the final
    LANCZOS downscale keeps at least 2× to work from."""
    factor = max(image.size) // (2 * max_side)
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # reduce() has no 16-bit kernels; 32-bit integers keep every value
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    return image.reduce(factor)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.size == 0:
        raise InputError("The image is empty (zero pixels).")
    if array.dtype != np.uint8:
        scale = 255.0 / max(float(np.nanmax(array)), 1.0) if array.dtype.kind in "iu" else 255.0
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * np.float32(scale), 0, 255).astype(np.uint8)
    try:
        return Image.fromarray(array)
    except (TypeError, ValueError) as exc:
        raise InputError(f"Unsupported image array ({_short(exc)}).") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # float32 on the (already shrunk) picture: one array, no float64 copies
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max()) if array.size else 0.0
        sixteen = mode.startswith("I;16") or image.info.get("bits") == 16 or top > 255
        scale = np.float32(255.0 / (65535.0 if sixteen else max(top, 1.0)))
        np.multiply(array, scale, out=array)
        return Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8)).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return image.convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
