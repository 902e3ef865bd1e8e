"""Load any image a user might put in a dataset as 8-bit RGB, or say clearly why it cannot be read.

    from caption_train.data.images import load_rgb, probe_image, ImageLoadError
    reason = probe_image("dataset/cat.png")   # None, or e.g. "not an image (cannot identify image file)"
    reason = verify_image("dataset/cat.png")  # also catches truncated files, decoding only suspicious ones
    info = read_header("dataset/cat.png")     # ImageInfo(format="PNG", mode="RGB", width=64, height=64, ...)
    image = load_rgb("dataset/cat.png")       # PIL.Image.Image in mode "RGB", EXIF orientation applied

Guards: files that are not regular files (named pipes would block `open` forever, devices never end) are refused
before they are opened; images over Pillow's `Image.MAX_IMAGE_PIXELS` are refused from their header (the pixel
data is never decoded); truncated files fail on full decode; animated images give their first frame.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

# Transparent pixels become white: captioners are shown logos, icons and cut-outs on white far more
# often than on black, and Pillow's plain convert("RGB") would paint them black.
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageInfo:
    """What an image file's header says, read without decoding its pixels."""

    format: str  # Pillow's format name from the file's content ("PNG", "JPEG", ...), whatever the extension says
    mode: str  # Pillow mode as stored ("RGB", "P", "CMYK", "I;16", ...), before conversion to RGB
    width: int  # as stored, before EXIF rotation
    height: int
    animated: bool  # more than one frame; training uses the first
    file_size: int


class ImageLoadError(Exception):
    """An image file that cannot be decoded. Not a UserError: one bad file should skip a sample, not stop a run."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the file name has one of IMAGE_EXTENSIONS, in any letter case."""
    # os.path rather than Path: the scanner calls this for every file of the dataset, and building a Path costs
    # more than the rest of the check.
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


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
        read_header(path)
    except ImageLoadError as error:
        return error.reason
    return None


def verify_image(path: str | os.PathLike, info: ImageInfo | None = None) -> str | None:
    """probe_image, plus a look at the file's last bytes: a file that does not end the way its format ends
    (PNG without IEND, JPEG without EOI, GIF without trailer, RIFF/BMP shorter than declared) is decoded
    in full, and the decoder decides. Return why it cannot be loaded, else None.

    Costs one extra small read per file; only suspect files (truncated downloads, or the rare file with data
    appended after its end marker) pay for a full decode, so no good file is ever refused. Pass `info` from
    read_header to skip reading the header again.
    """
    if info is None:
        try:
            info = read_header(path)
        except ImageLoadError as error:
            return error.reason
    if not _looks_truncated(path, info):
        return None
    try:
        load_rgb(path)
    except ImageLoadError as error:
        return error.reason
    return None


def read_header(path: str | os.PathLike) -> ImageInfo:
    """Format, mode, size and animation of an image from its header; raise ImageLoadError if it is not readable.

    Reasons: "not a regular file (...)", "empty file", "too large (<Pillow's message, with its limit>)",
    "not an image (cannot identify image file)", "unreadable (<error>)", "invalid size WxH".
    """
    try:
        size = _regular_file_size(path)
        with _pillow_warnings(), Image.open(path) as image:
            width, height = image.size
            info = ImageInfo(
                format=image.format or "?", mode=image.mode, width=width, height=height,
                animated=bool(getattr(image, "is_animated", False)), file_size=size,
            )
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"too large ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (cannot identify image file)") from None
    except OSError as error:
        if error.strerror is None:  # Pillow's own OSErrors ("cannot open ...", "truncated ...") carry no strerror
            raise ImageLoadError(path, f"unreadable ({type(error).__name__}: {error})") from None
        broken = " (broken symbolic link)" if error.errno == errno.ENOENT and os.path.islink(path) else ""
        raise ImageLoadError(path, f"unreadable ({error.strerror}{broken})") from None
    except Exception as error:  # Pillow's format plugins raise many types for malformed headers
        raise ImageLoadError(path, f"unreadable ({type(error).__name__}: {error})") from None
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"invalid size {width}x{height}")
    return info


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
        _regular_file_size(path)
        with _pillow_warnings(), Image.open(path) as image:
            image.seek(0)  # animated GIF/WebP/PNG: train on the first frame, as viewers show it
            image.load()  # force full decode now, so truncated files fail here and not inside a worker later
            return _upright(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(path, f"too large ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(path, "not an image (cannot identify image file)") from error
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... for bad data
        raise ImageLoadError(path, f"{type(error).__name__}: {error}") from error


def _regular_file_size(path: str | os.PathLike) -> int:
    """Size of the file `path` leads to (symlinks followed); ImageLoadError unless it is a regular, non-empty file.

    Checked before Image.open: opening a named pipe blocks until something writes to it, and a device such as
    /dev/zero never ends. A 0-byte file is "empty file" here, for every reader (lint, the scan, training, caption),
    not Pillow's "cannot identify image file". OSError (missing, permission denied, symlink loop) propagates to the
    caller's handler.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(path, f"not a regular file ({_file_kind(info.st_mode)})")
    if info.st_size == 0:
        raise ImageLoadError(path, "empty file")
    return info.st_size


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


# Bytes every complete file of a format ends with, or where its header records its own length.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"
_GIF_END = b"\x3b"


def _looks_truncated(path: str | os.PathLike, info: ImageInfo) -> bool:
    """True when the file does not end as a complete file of its format would (a hint, not a verdict)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            handle.seek(max(0, info.file_size - 16))
            tail = handle.read()
    except OSError:
        return True  # let the full decode report the real error
    if info.format == "PNG":
        return not tail.endswith(_PNG_END)
    if info.format in ("JPEG", "MPO"):
        return not tail.rstrip(b"\x00\r\n ").endswith(_JPEG_END)
    if info.format == "GIF":
        return not tail.endswith(_GIF_END)
    if info.format == "WEBP" and head[:4] == b"RIFF":
        return info.file_size < int.from_bytes(head[4:8], "little") + 8
    if info.format in ("BMP", "DIB") and head[:2] == b"BM":
        return info.file_size < int.from_bytes(head[2:6], "little")
    return False


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
def _pillow_warnings():
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse those images as well.
    A malformed Exif block is common (editors, phones) and harmless (_upright keeps such pixels unrotated), so
    Pillow's "Corrupt EXIF data" warning, printed with a path inside Pillow, is silenced.

    Like warnings.catch_warnings, which it uses, this swaps the process-wide filter list: not thread-safe.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
        yield
