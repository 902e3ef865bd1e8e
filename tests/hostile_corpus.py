"""A corpus of hostile dataset inputs, shared by test_hostile.py (training) and test_lint.py (lint).

    cases = build_corpus(tmp_path / "dataset")   # dataset/good/... (8 good pairs) + dataset/cases/<case>/...
    before = tree_digest(tmp_path / "dataset")   # hash of every entry, symlinks and pipes included, never followed

Each Case puts its files in `cases/<name>/`, named after the case (`cases/cmyk_jpeg/cmyk_jpeg.jpg` + `.txt`), so
a printed file name says which case it is. `outcome` says what training must do with it:

    TRAINED       scanned, loaded and trained on (and captioned by the trainer's sample printout)
    SKIPPED       skipped by the scan and counted in its summary under `skip_reason`
    LOAD_SKIPPED  passes the header probe, fails on full decode: skipped with a warning naming the file
    IGNORED       not a training image at all (folder, hidden file, unsupported extension, caption alone)

`lint` lists the finding codes `caption-train lint` must report for files of the case (errors and warnings).
Cases that cannot be built here (no symlinks, no named pipes) or whose premise fails (root reads a chmod 000
file) carry `unavailable`, a reason; their files are still written where possible and their outcome adjusted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import random
import shutil
import stat
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

TRAINED, SKIPPED, LOAD_SKIPPED, IGNORED = "trained", "skipped", "load_skipped", "ignored"

GOOD_IMAGES = 8


@dataclass
class Case:
    name: str
    what: str
    outcome: str
    skip_reason: str | None = None
    lint: tuple[str, ...] = ()  # lint codes for this case, with the tests' tiny tokenizer (--model)
    build: Callable[[Path, str, Path], None] | None = field(default=None, repr=False)
    kept: int | None = None  # images of this case the scan keeps (default: 1 if TRAINED or LOAD_SKIPPED, else 0)
    skips: int = 1  # how many times skip_reason is counted
    unavailable: str | None = None

    def __post_init__(self):
        if self.kept is None:
            self.kept = 1 if self.outcome in (TRAINED, LOAD_SKIPPED) else 0

    def folder(self, root: Path) -> Path:
        return root / "cases" / self.name


# ---------------------------------------------------------------------------------------------
# file makers


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, row: bytes, *, extra_chunks: bytes = b"") -> bytes:
    """A PNG whose every row is `row` (filter byte included), compressed as a stream: cheap even when huge."""
    compressor = zlib.compressobj(9)
    parts = []
    block = row * max(1, 65536 // len(row))
    rows_left = height
    rows_per_block = len(block) // len(row)
    while rows_left > 0:
        n = min(rows_left, rows_per_block)
        parts.append(compressor.compress(block[: n * len(row)]))
        rows_left -= n
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra_chunks + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def bomb_png(pixels_over_limit: float) -> bytes:
    """A complete 1-bit PNG of about `pixels_over_limit` x Image.MAX_IMAGE_PIXELS pixels: a few KB on disk,
    gigabytes once decoded, were Pillow to decode it."""
    side = int((Image.MAX_IMAGE_PIXELS * pixels_over_limit) ** 0.5) + 1
    return raw_png(side, side, 1, 0, b"\x00" + b"\x00" * ((side + 7) // 8))


def sixteen_bit_rgb_png() -> bytes:
    """48-bit RGB (16 bits per channel), which Pillow cannot write itself."""
    row = b"\x00" + b"\xff\xff\x80\x00\x00\x00" * 32  # orange-ish, 32 pixels
    return raw_png(32, 32, 16, 2, row)


def text_bomb_png() -> bytes:
    """A valid 8x8 PNG whose zTXt chunk inflates past Pillow's MAX_TEXT_CHUNK (a memory bomb in metadata)."""
    from PIL import PngImagePlugin

    payload = zlib.compress(b"A" * (PngImagePlugin.MAX_TEXT_CHUNK + 1024), 9)
    ztxt = _chunk(b"zTXt", b"comment\x00\x00" + payload)
    return raw_png(8, 8, 8, 2, b"\x00" + b"\x80\x40\x20" * 8, extra_chunks=ztxt)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(Image.new("RGB", (48, 24), (30, 160, 60)), exif=exif)


def bad_exif_jpeg() -> bytes:
    """A JPEG whose APP1 Exif segment is garbage after its header."""
    data = jpeg_bytes(Image.new("RGB", (32, 32), (30, 160, 60)))
    garbage = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\xee" * 40
    segment = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    return data[:2] + segment + data[2:]


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 215, 35, 35] + [0] * 762)
    for x in range(8, 24):
        for y in range(8, 24):
            image.putpixel((x, y), 1)
    return png_bytes(image, transparency=0)


def sixteen_bit_gray() -> bytes:
    image = Image.new("I;16", (32, 32), 40000)
    return png_bytes(image)


# ---------------------------------------------------------------------------------------------
# case builders: build(folder, name, outside) writes the case's files into folder


def pair(data: bytes, ext: str = ".png", caption: bytes | str | None = "a red circle"):
    def build(folder: Path, name: str, outside: Path) -> None:
        (folder / f"{name}{ext}").write_bytes(data if not callable(data) else data())
        if caption is not None:
            (folder / f"{name}.txt").write_bytes(caption.encode() if isinstance(caption, str) else caption)

    return build


def lazy_pair(make: Callable[[], bytes], ext: str = ".png", caption: bytes | str | None = "a red circle"):
    def build(folder: Path, name: str, outside: Path) -> None:
        pair(make(), ext, caption)(folder, name, outside)

    return build


_serial = itertools.count()


def good_png(color=(215, 35, 35), size=(32, 32)) -> bytes:
    """A plain image, different from every other one built (a marker pixel), so only deliberate duplicates are."""
    image = Image.new("RGB", size, color)
    n = next(_serial)
    image.putpixel((0, 0), (n % 256, n // 256 % 256, 255))
    return png_bytes(image)


def with_image(extra: Callable[[Path, str, Path], None]):
    """A good image plus whatever `extra` does with its caption slot."""

    def build(folder: Path, name: str, outside: Path) -> None:
        (folder / f"{name}.png").write_bytes(good_png())
        extra(folder, name, outside)

    return build


def caption_symlink(target: Callable[[Path, str, Path], str]):
    def extra(folder: Path, name: str, outside: Path) -> None:
        os.symlink(target(folder, name, outside), folder / f"{name}.txt")

    return extra


def build_fifo_image(folder: Path, name: str, outside: Path) -> None:
    os.mkfifo(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("a pipe")


def build_fifo_caption(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").write_bytes(good_png())
    os.mkfifo(folder / f"{name}.txt")


def build_broken_symlink_image(folder: Path, name: str, outside: Path) -> None:
    os.symlink("nowhere.png", folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("a red circle")


def build_symlink_loop_image(folder: Path, name: str, outside: Path) -> None:
    os.symlink(f"{name}-b.png", folder / f"{name}.png")
    os.symlink(f"{name}.png", folder / f"{name}-b.png")
    (folder / f"{name}.txt").write_text("a loop")
    (folder / f"{name}-b.txt").write_text("a loop")


def build_duplicates(folder: Path, name: str, outside: Path) -> None:
    data = png_bytes(Image.new("RGB", (32, 32), (30, 160, 60)))
    for stem, caption in ((f"{name}-a", "a green square"), (f"{name}-b", "a blue circle")):
        (folder / f"{stem}.png").write_bytes(data)
        (folder / f"{stem}.txt").write_text(caption)


def build_shared_stem(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").write_bytes(good_png())
    (folder / f"{name}.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (32, 32), (35, 75, 215))))
    (folder / f"{name}.txt").write_text("a shape")


def build_outside_symlink(folder: Path, name: str, outside: Path) -> None:
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "outside.png"
    target.write_bytes(good_png((235, 195, 20)))
    os.symlink(target, folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("a yellow square")


def build_dir_loop(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").write_bytes(good_png())
    (folder / f"{name}.txt").write_text("a red square")
    os.symlink("..", folder / "loop", target_is_directory=True)


def build_folder_named_png(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").mkdir()
    (folder / f"{name}.txt").write_text("a folder, not an image")


def build_caption_is_folder(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").write_bytes(good_png())
    (folder / f"{name}.txt").mkdir()


def build_unsupported_gif(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.gif").write_bytes(animated("GIF"))
    (folder / f"{name}.txt").write_text("a red circle")


def build_orphan_caption(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.txt").write_text("a caption whose image is gone")


def build_hidden(folder: Path, name: str, outside: Path) -> None:
    (folder / f".{name}.png").write_bytes(good_png())
    (folder / f".{name}.txt").write_text("hidden")
    (folder / f"._{name}.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")


def build_uppercase_txt(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}.png").write_bytes(good_png())
    (folder / f"{name}.TXT").write_text("a red circle")


def build_unreadable(which: str):
    def build(folder: Path, name: str, outside: Path) -> None:
        (folder / f"{name}.png").write_bytes(good_png())
        (folder / f"{name}.txt").write_text("a red circle")
        os.chmod(folder / f"{name}.{which}", 0)

    return build


def build_metadata(folder: Path, name: str, outside: Path) -> None:
    """metadata.jsonl at the dataset root (its only place): one good entry, one bad line, one for a missing image."""
    root = folder.parents[1]
    (folder / f"{name}.png").write_bytes(good_png((35, 75, 215)))
    lines = [
        b'{"file_name": "cases/%s/%s.png", "text": "a blue circle"}' % (name.encode(), name.encode()),
        b"{this is not json",
        b'{"file_name": "cases/%s/gone.png", "text": "an image that is not there"}' % name.encode(),
    ]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def build_bytes_name(folder: Path, name: str, outside: Path) -> None:
    stem = os.fsencode(folder) + b"/" + name.encode() + b"-caf\xe9"
    with open(stem + b".png", "wb") as handle:
        handle.write(good_png((30, 160, 60)))
    with open(stem + b".txt", "wb") as handle:
        handle.write(b"a green circle")


def build_newline_name(folder: Path, name: str, outside: Path) -> None:
    (folder / f"{name}\nsecond line.png").write_bytes(good_png())
    (folder / f"{name}\nsecond line.txt").write_text("a red circle")


def truncated(make: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: (lambda data: data[: len(data) // 2])(make())


def header_only_png() -> bytes:
    return png_bytes(Image.new("RGB", (32, 32)))[:33]  # signature + IHDR, nothing after


# ---------------------------------------------------------------------------------------------
# the corpus


def cases() -> list[Case]:
    """Every hostile case, in a fixed order. Fresh objects per call: build_corpus fills in `unavailable`."""
    long_caption = " ".join(random.Random(0).choice(["red", "green", "blue", "circle", "square", "triangle", "a"]) for _ in range(10_000))
    return [
        # ---- images the scan must skip and count
        Case("zero_byte_png", "a zero-byte .png", SKIPPED, "unreadable image", ("unreadable_image",), pair(b"")),
        Case("text_named_jpg", "a text file named .jpg", SKIPPED, "unreadable image", ("unreadable_image",), pair(b"this is not a JPEG\n", ".jpg")),
        Case("random_bytes_webp", "random bytes named .webp", SKIPPED, "unreadable image", ("unreadable_image",), pair(random.Random(1).randbytes(4096), ".webp")),
        Case("header_only_png", "a PNG cut right after its header", SKIPPED, "unreadable image", ("unreadable_image",), lazy_pair(header_only_png)),
        Case("decompression_bomb", "1-bit PNG declaring 3x Pillow's MAX_IMAGE_PIXELS (a few KB on disk)", SKIPPED, "unreadable image", ("unreadable_image",), lazy_pair(lambda: bomb_png(3.0))),
        Case("decompression_bomb_warning_zone", "1-bit PNG between 1x and 2x MAX_IMAGE_PIXELS (Pillow only warns)", SKIPPED, "unreadable image", ("unreadable_image",), lazy_pair(lambda: bomb_png(1.2))),
        Case("text_chunk_bomb_png", "a PNG whose zTXt chunk inflates past Pillow's MAX_TEXT_CHUNK", SKIPPED, "unreadable image", ("unreadable_image",), lazy_pair(text_bomb_png)),
        Case("broken_symlink_image", "an image that is a symlink to nothing", SKIPPED, "unreadable image", ("unreadable_image",), build_broken_symlink_image),
        Case("symlink_loop_image", "two image symlinks pointing at each other", SKIPPED, "unreadable image", ("unreadable_image",), build_symlink_loop_image, skips=2),
        Case("fifo_image", "a named pipe named .png (opening it would block forever)", SKIPPED, "unreadable image", ("unreadable_image",), build_fifo_image),
        Case("unreadable_image_permissions", "an image with mode 000", SKIPPED, "unreadable image", ("unreadable_image",), build_unreadable("png")),
        # ---- images that pass the header probe but not a full decode
        Case("truncated_png", "the first half of a PNG", LOAD_SKIPPED, None, ("unreadable_image",), lazy_pair(truncated(lambda: png_bytes(noise((64, 64)))))),
        Case("truncated_jpeg", "the first half of a JPEG", LOAD_SKIPPED, None, ("unreadable_image",), lazy_pair(truncated(lambda: jpeg_bytes(noise((64, 64)), quality=95)), ".jpg")),
        # ---- captions the scan must skip and count
        Case("missing_caption", "an image without a caption", SKIPPED, "missing caption", ("missing_caption",), lazy_pair(good_png, caption=None)),
        Case("uppercase_txt_caption", "img.png with img.TXT (names must match exactly)", SKIPPED, "missing caption", ("missing_caption",), build_uppercase_txt),
        Case("caption_is_folder", "a folder named <image>.txt", SKIPPED, "missing caption", ("missing_caption",), build_caption_is_folder),
        Case("empty_caption", "a zero-byte caption", SKIPPED, "empty caption", ("empty_caption",), lazy_pair(good_png, caption=b"")),
        Case("whitespace_caption", "a caption of spaces, tabs and newlines", SKIPPED, "empty caption", ("empty_caption",), lazy_pair(good_png, caption=b" \t\r\n  \n")),
        Case("bom_only_caption", "a caption that is only a UTF-8 BOM", SKIPPED, "empty caption", ("empty_caption",), lazy_pair(good_png, caption=b"\xef\xbb\xbf")),
        Case("latin1_caption", "a Latin-1 caption (not UTF-8)", SKIPPED, "caption not UTF-8", ("caption_not_utf8",), lazy_pair(good_png, caption="un caf\xe9 cr\xe8me".encode("latin-1"))),
        Case("utf16_caption", "a UTF-16 caption with BOM (Windows Notepad 'Unicode')", SKIPPED, "caption not UTF-8", ("caption_not_utf8",), lazy_pair(good_png, caption="a red circle".encode("utf-16"))),
        Case("caption_fifo", "a named pipe as caption (reading it would block forever)", SKIPPED, "unreadable caption", ("unreadable_caption",), build_fifo_caption),
        Case("caption_dev_zero", "a caption symlinked to /dev/zero (reading it would never end)", SKIPPED, "unreadable caption", ("unreadable_caption",),
             with_image(caption_symlink(lambda f, n, o: "/dev/zero"))),
        Case("caption_symlink_loop", "a caption that is a symlink to itself", SKIPPED, "unreadable caption", ("unreadable_caption",),
             with_image(caption_symlink(lambda f, n, o: f"{n}.txt"))),
        Case("caption_broken_symlink", "a caption that is a symlink to nothing", SKIPPED, "unreadable caption", ("unreadable_caption",),
             with_image(caption_symlink(lambda f, n, o: "nowhere.txt"))),
        Case("unreadable_caption_permissions", "a caption with mode 000", SKIPPED, "unreadable caption", ("unreadable_caption",), build_unreadable("txt")),
        Case("metadata_jsonl", "metadata.jsonl with a good entry, a bad line and an entry for a missing image", SKIPPED, "bad metadata line",
             ("bad_metadata_line", "orphan_metadata"), build_metadata, kept=1),
        # ---- odd but valid images: trained on
        Case("one_by_one", "a 1x1 PNG", TRAINED, None, ("tiny_image",), lazy_pair(lambda: good_png(size=(1, 1)))),
        Case("wide_20000x20", "a 20000x20 PNG", TRAINED, None, ("extreme_aspect_ratio",), lazy_pair(lambda: good_png(size=(20000, 20)))),
        Case("tall_20x20000", "a 20x20000 PNG", TRAINED, None, ("extreme_aspect_ratio",), lazy_pair(lambda: good_png(size=(20, 20000)))),
        Case("sixteen_bit_gray_png", "a 16-bit grayscale PNG", TRAINED, None, (), lazy_pair(sixteen_bit_gray)),
        Case("sixteen_bit_rgb_png", "a 48-bit RGB PNG", TRAINED, None, (), lazy_pair(sixteen_bit_rgb_png)),
        Case("cmyk_jpeg", "a CMYK JPEG", TRAINED, None, (), lazy_pair(lambda: jpeg_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0))), ".jpg")),
        Case("exif_rotated_jpeg", "a JPEG with EXIF orientation 6", TRAINED, None, (), lazy_pair(exif_rotated_jpeg, ".jpg")),
        Case("bad_exif_jpeg", "a JPEG with a garbage Exif block", TRAINED, None, (), lazy_pair(bad_exif_jpeg, ".jpg")),
        Case("palette_transparency_png", "a palette PNG with a transparent index", TRAINED, None, (), lazy_pair(palette_with_transparency)),
        Case("rgba_png", "an RGBA PNG, half transparent", TRAINED, None, (), lazy_pair(lambda: png_bytes(Image.new("RGBA", (32, 32), (35, 75, 215, 128))))),
        Case("bitonal_png", "a 1-bit PNG", TRAINED, None, (), lazy_pair(lambda: png_bytes(Image.new("1", (32, 32), 1)))),
        Case("animated_webp", "an animated WebP (first frame used)", TRAINED, None, ("animated_image",), lazy_pair(lambda: animated("WEBP"), ".webp")),
        Case("animated_png", "an animated PNG (APNG)", TRAINED, None, ("animated_image",), lazy_pair(lambda: animated("PNG"))),
        Case("animated_gif_named_png", "an animated GIF named .png", TRAINED, None, ("animated_image", "wrong_extension"), lazy_pair(lambda: animated("GIF"))),
        Case("png_named_jpg", "a PNG named .jpg", TRAINED, None, ("wrong_extension",), lazy_pair(good_png, ".jpg")),
        Case("jpeg_named_webp", "a JPEG named .webp", TRAINED, None, ("wrong_extension",), lazy_pair(lambda: jpeg_bytes(Image.new("RGB", (32, 32), (215, 35, 35))), ".webp")),
        Case("uppercase_extension", "IMG.PNG with IMG.txt", TRAINED, None, (), lazy_pair(good_png, ".PNG")),
        Case("symlink_to_outside_image", "an image symlinked from outside the dataset", TRAINED, None, (), build_outside_symlink),
        Case("duplicate_differing_captions", "the same image twice with different captions", TRAINED, None, ("duplicate_image_conflict",), build_duplicates, kept=2),
        Case("shared_caption", "img.png and img.jpg sharing img.txt", TRAINED, None, ("shared_caption",), build_shared_stem, kept=2),
        # ---- odd but valid captions: trained on
        Case("bom_caption", "a UTF-8 caption with BOM", TRAINED, None, (), lazy_pair(good_png, caption=b"\xef\xbb\xbfa red circle")),
        Case("crlf_multiline_caption", "a caption over several CRLF lines", TRAINED, None, (), lazy_pair(good_png, caption=b"a red\r\ncircle\r\n")),
        Case("ten_thousand_words", "a 10,000-word caption", TRAINED, None, ("long_caption", "clip_too_long", "t5_too_long"), lazy_pair(good_png, caption=long_caption)),
        Case("control_characters_caption", "a caption with NUL and escape characters", TRAINED, None, ("unknown_characters",), lazy_pair(good_png, caption=b"a red\x00 circle \x1b[31m")),
        Case("separators_only_caption", "a caption of commas only", TRAINED, None, ("no_words_caption", "unknown_characters"), lazy_pair(good_png, caption=", , ,")),
        Case("unicode_caption", "emoji, right-to-left and combining characters", TRAINED, None, ("unknown_characters",), lazy_pair(good_png, caption="a red circle \U0001f534 \u05e2\u05d9\u05d2\u05d5\u05dc e\u0301")),
        # ---- odd file names
        Case("non_utf8_file_name", "image and caption named with a Latin-1 byte", TRAINED, None, (), build_bytes_name),
        Case("newline_in_file_name", "image and caption names with a newline", TRAINED, None, (), build_newline_name),
        # ---- not training images at all
        Case("symlink_dir_loop", "a symlink to the parent folder (not followed)", TRAINED, None, ("symlinked_folder",), build_dir_loop),
        Case("folder_named_png", "a folder named .png with a caption beside it", IGNORED, None, ("orphan_caption",), build_folder_named_png),
        Case("unsupported_gif", "an animated .gif with a caption (extension not read)", IGNORED, None, ("unsupported_image",), build_unsupported_gif),
        Case("orphan_caption", "a caption without an image", IGNORED, None, ("orphan_caption",), build_orphan_caption),
        Case("hidden_files", "hidden image + caption and a macOS ._ resource fork", IGNORED, None, (), build_hidden),
    ]


def build_corpus(root: Path, *, good: int = GOOD_IMAGES, only: set[str] | None = None) -> list[Case]:
    """Write `good` good pairs under root/good and every case (or those named in `only`) under root/cases."""
    from caption_train.tiny import make_shapes_dataset

    root.mkdir(parents=True, exist_ok=True)
    outside = root.parent / f"{root.name}-outside"
    if good:
        make_shapes_dataset(root / "good", good, seed=5, size=32, subfolders=0)
    built = []
    for case in cases():
        if only is not None and case.name not in only:
            continue
        folder = case.folder(root)
        folder.mkdir(parents=True)
        try:
            case.build(folder, case.name, outside)
        except (OSError, NotImplementedError, AttributeError) as error:  # no symlinks / mkfifo on this system
            shutil.rmtree(folder)
            case.unavailable = f"cannot build here: {type(error).__name__}: {error}"
            case.outcome, case.skip_reason, case.lint, case.kept = IGNORED, None, (), 0
        else:
            if case.name.startswith("unreadable_") and _readable_anyway(folder):
                # root (as in CI containers) reads mode-000 files: the case degrades to a good pair.
                case.unavailable = NO_PERMISSIONS
                case.outcome, case.skip_reason, case.lint, case.kept = TRAINED, None, (), 1
        built.append(case)
    return built


@functools.cache
def permissions_enforced() -> bool:
    """Whether this process is refused a mode-000 file. Root normally is not (CAP_DAC_OVERRIDE), so the cases that
    need unreadable files or read-only folders cannot happen; .ci/run reruns the `permissions`-marked tests with
    root's override dropped (setpriv), so they run in CI too."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_bytes(b"x")
        os.chmod(probe, 0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        return False


NO_PERMISSIONS = ("this process reads and writes regardless of permission bits (root with CAP_DAC_OVERRIDE); "
                  ".ci/run reruns the permissions-marked tests with that capability dropped")
UNREADABLE_CASES = ("unreadable_image_permissions", "unreadable_caption_permissions")  # mode 000


def case_params(names: list[str]) -> list:
    """Case names as pytest parameters, the unreadable-file cases marked `permissions`."""
    return [pytest.param(name, marks=pytest.mark.permissions) if name in UNREADABLE_CASES else name for name in names]


def _readable_anyway(folder: Path) -> bool:
    for path in folder.iterdir():
        if stat.S_IMODE(path.lstat().st_mode) == 0:
            try:
                path.read_bytes()
                return True
            except OSError:
                return False
    return False


def expected_skips(built: list[Case]) -> dict[str, int]:
    """The scan's skip counter for the corpus: reason -> count."""
    counts: dict[str, int] = {}
    for case in built:
        if case.outcome == SKIPPED and case.skip_reason:
            counts[case.skip_reason] = counts.get(case.skip_reason, 0) + case.skips
    return counts


def kept_images(built: list[Case]) -> int:
    """Images the scan keeps from the cases (good ones not included); LOAD_SKIPPED ones are kept by the scan."""
    return sum(case.kept for case in built)


# ---------------------------------------------------------------------------------------------
# proof that nothing was written


def tree_digest(root: Path) -> dict[bytes, tuple]:
    """Every entry under root, never following links or opening pipes: kind, mode bits, and for regular files
    size + mtime + sha256 of the content (for links, the target). Any write, rename, chmod or new file shows."""
    entries: dict[bytes, tuple] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            rel = os.path.relpath(full, root_b)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(info.st_mode):
                entries[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_size, info.st_mtime_ns, _sha256(full, info))
            else:
                entries[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    return entries


def _sha256(path: bytes, info: os.stat_result) -> str:
    if stat.S_IMODE(info.st_mode) & 0o444 == 0:
        try:
            os.chmod(path, 0o400)  # as non-root: read a mode-000 file by lending it read permission for a moment
            with open(path, "rb") as handle:
                return hashlib.sha256(handle.read()).hexdigest()
        finally:
            os.chmod(path, stat.S_IMODE(info.st_mode))
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def built_corpus(root: Path) -> tuple[Path, dict[str, Case], dict]:
    """(root, cases by name, digest of every file) for a corpus built at `root`: the tests' module fixture."""
    built = build_corpus(root)
    return root, {case.name: case for case in built}, tree_digest(root)
