"""Load any image a user might put in a dataset as 8-bit RGB, or say clearly why it cannot be read.

    from caption_train.data.images import load_rgb, probe_image, ImageLoadError
    reason = probe_image("dataset/cat.png")   # None, or e.g. "not an image (cannot identify image file)"
    image = load_rgb("dataset/cat.png")       # PIL.Image.Image in mode "RGB", EXIF orientation applied
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Transparent pixels become white: captioners are shown logos, icons and cut-outs on white far more
# often than on black, and Pillow's plain convert("RGB") would paint them black.
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageLoadError(Exception):
    """An image file that cannot be decoded. Not a UserError: one bad file should skip a sample, not stop a run."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name has one of IMAGE_EXTENSIONS, in any letter case."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully and return an upright 8-bit RGB image; raise ImageLoadError if it cannot be read."""
    image = _decode(path)
    try:
        return to_rgb(image)
    except ValueError as error:  # a mode Pillow cannot convert
        raise ImageLoadError(path, f"unsupported image mode {image.mode!r} ({error})") from error


def probe_image(path: str | os.PathLike) -> str | None:
    """Cheap check of the file header only; return why the file is clearly not a readable image, else None.

    A file that passes can still fail in load_rgb (e.g. truncated pixel data): the header is all this reads.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with _bomb_warning_is_error(), Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        return f"too large ({error})"
    except Image.DecompressionBombWarning as error:
        return f"too large ({error})"
    except Image.UnidentifiedImageError:
        return "not an image (cannot identify image file)"
    except Exception as error:  # Pillow's format plugins raise many types for malformed headers
        return f"unreadable ({type(error).__name__}: {error})"
    if width <= 0 or height <= 0:
        return f"invalid size {width}x{height}"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (alpha composited on white, high bit depths scaled)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _scale_to_8bit(image.convert("I"), low=0, high=65535).convert("RGB")
    if image.mode == "I":
        return _scale_int32(image).convert("RGB")
    if image.mode == "F":
        return _scale_float(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_background(image)
    return image.convert("RGB")  # RGB, L, 1, P, CMYK, YCbCr, LAB, HSV


def _decode(path: str | os.PathLike) -> Image.Image:
    """Open, pick the first frame, load every pixel and apply EXIF orientation."""
    try:
        with _bomb_warning_is_error(), Image.open(path) as image:
            image.seek(0)  # animated GIF/WebP/PNG: train on the first frame, as viewers show it
            image.load()  # force full decode now, so truncated files fail here and not inside a worker later
            return _upright(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"too large ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(path, "not an image (cannot identify image file)") from error
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... for bad data
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def _upright(image: Image.Image) -> Image.Image:
    """Rotate per EXIF orientation; always returns an image detached from the open file."""
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF blocks are common and the pixels are still good: keep them unrotated
        return image.copy()
    return rotated if rotated is not None else image.copy()


def _composite_on_background(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # premultiplied; Pillow only converts it back to straight LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")  # also applies a palette's or a colour key's "transparency" entry
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_8bit(image: Image.Image, low: float, high: float) -> Image.Image:
    """Map [low, high] linearly onto 0..255. Pillow's own convert("L") clips instead, turning 16-bit data white."""
    scale = 255.0 / (high - low) if high > low else 0.0
    # +0.5 rounds to nearest: point() on "I"/"F" images truncates
    return image.point(lambda value: value * scale + (0.5 - low * scale)).convert("L")


def _scale_int32(image: Image.Image) -> Image.Image:
    """Mode "I" holds 32-bit ints; in practice it is 16-bit data (old PNG/TIFF readers) unless values exceed it."""
    low, high = image.getextrema()
    if low >= 0 and high <= 65535:
        return _scale_to_8bit(image, 0, 65535)
    return _scale_to_8bit(image, low, high)  # no known bit depth: stretch the actual range


def _scale_float(image: Image.Image) -> Image.Image:
    """Mode "F": float data in [0, 1] is the usual convention; [0, 255] next; anything else is stretched."""
    low, high = image.getextrema()
    if low >= 0 and high <= 1:
        return _scale_to_8bit(image, 0, 1)
    if low >= 0 and high <= 255:
        return _scale_to_8bit(image, 0, 255)
    return _scale_to_8bit(image, low, high)


@contextlib.contextmanager
def _bomb_warning_is_error():
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse those images as well.

    Like warnings.catch_warnings, which it uses, this swaps the process-wide filter list: not thread-safe.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
