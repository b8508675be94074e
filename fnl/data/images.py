"""The one image reader of the package: every path that reads an image file (data loading, evaluation, export
verification, fnl-predict) goes through :func:`load_image`, so that EXIF orientation and bit depth are handled the
same way everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fnl.data.densepose_coco import DatasetError, DatasetFileNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# What Pillow raises on a damaged, empty or hostile file: OSError (UnidentifiedImageError, truncated data),
# SyntaxError (broken PNG chunks), ValueError / EOFError (bad headers), DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# Pillow modes holding 16 bits per pixel, which .convert("RGB") would clip to 255 instead of scaling.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(DatasetError):
    """An image file cannot be read or its pixels cannot be turned into 8-bit RGB; ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_image(path: str | Path) -> Image.Image:
    """The 8-bit RGB image in ``path``, turned upright by its EXIF orientation (as phones store portrait shots).

    16-bit images (gray or RGB) are scaled to 8 bits, float images with values in [0, 1] are scaled by 255; other
    pixel ranges are refused with :class:`ImageReadError`, as is any file Pillow cannot decode.
    """
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            upright.load()
    except FileNotFoundError as exc:
        raise DatasetFileNotFoundError(f"image {path}: file not found") from exc
    except Image.UnidentifiedImageError as exc:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        what = "an empty file" if size == 0 else "not an image Pillow can read"
        raise ImageReadError(path, what) from exc
    except _DECODE_ERRORS as exc:
        raise ImageReadError(path, f"cannot be decoded (damaged or truncated?): {exc}") from exc
    return Image.fromarray(_rgb8(upright, path))


def _rgb8(image: Image.Image, path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of ``image``, high bit depths scaled rather than clipped."""
    if image.mode in _UINT16_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / 65535.0)
    if image.mode == "I":
        # 32-bit integers: Pillow's mode for some 16-bit files; larger values have no agreed white level.
        pixels = np.asarray(image)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ImageReadError(path, f"32-bit integer pixels range {low}..{high}, beyond 16 bits: convert it to "
                                       "an 8- or 16-bit image")
        return _gray_to_rgb(pixels.astype(np.float64) / 65535.0)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ImageReadError(path, "float pixels include NaN or infinity")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise ImageReadError(path, f"float pixels range {low:.4g}..{high:.4g}, outside the 0..1 that is "
                                       "read as black..white: convert it to an 8- or 16-bit image")
        return _gray_to_rgb(pixels)
    return np.asarray(image.convert("RGB"))


def _gray_to_rgb(unit: np.ndarray) -> np.ndarray:
    """Gray levels in [0, 1] -> (H, W, 3) uint8, rounded to the nearest level."""
    gray = np.rint(unit * 255.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
