"""Image files: which files are images, and decoding one safely (torch-free: Pillow and numpy).

:func:`decode` bounds the pixel count with mbquant's own limit (``--max-image-pixels``, Pillow's 89,478,485 by
default) instead of Pillow's process-wide one, and converts 16-bit and float images to 8 bits; what cannot be read
raises :class:`Unreadable` with the reason, and callers skip and count the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 89_478_485   # Pillow's decompression-bomb bound; larger images are skipped and counted


class Unreadable(Exception):
    """An image file that cannot be used (the message is the reason, kept in the report)."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def to_8bit(im: Image.Image) -> Image.Image:
    """An 8-bit image of ``im``: 16-bit images are scaled (/257), float images in [0, 1] or [0, 255] are scaled or
    kept; anything else raises :class:`Unreadable` with the reason."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        hi = int(a.max()) if a.size else 0
        if a.size and int(a.min()) < 0 or hi > 65535:
            raise Unreadable(f"32-bit integer pixels in [{int(a.min())}, {hi}]; convert it to 8 or 16 bits")
        return Image.fromarray((a if im.mode == "I" and hi <= 255 else np.round(a / 257.0)).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all() or lo < 0 or hi > 255:
            raise Unreadable(f"float pixels in [{lo:g}, {hi:g}] (expected [0, 1] or [0, 255])")
        return Image.fromarray(np.round(a * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8), "L")
    return im


class _PixelBound:
    """Decode with mbquant's own size bound instead of Pillow's process-wide one (restored after)."""

    def __enter__(self):
        self.before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.before


def decode(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``path``, fully loaded and 8-bit; :class:`Unreadable` (with the reason) when it cannot be."""
    try:
        with _PixelBound(), Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Unreadable(f"{w}x{h} pixels, more than the bound of {max_pixels} (a decompression bomb?); "
                                 f"raise it with --max-image-pixels if the image is genuine")
            im.load()
            return to_8bit(im).copy()
    except Unreadable:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Unreadable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
