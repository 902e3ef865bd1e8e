"""Find image + caption pairs in a dataset folder (read-only) and split off a validation set.

    result = scan_dataset("dataset")          # dataset/**/img.png + dataset/**/img.txt
    result = scan_dataset("dataset", verify=True)   # also skip truncated images now, not when first loaded
    print(result.summary())                   # dataset dataset: 120 images with captions; skipped 2 (2 missing caption)
    train, val = split_validation(result.samples, fraction=0.05, seed=0)

Captions come from a `<stem>.txt` sidecar next to each image (`img.png` -> `img.txt`), or else from a
`metadata.jsonl` in the root with lines `{"file_name": "sub/img.png", "text": "a caption"}`.
Hidden files and folders (names starting with ".") are ignored: they are tool debris such as macOS `._img.png`
resource forks or `.ipynb_checkpoints`, not training data. Symlinked folders are not followed (a link to a parent
would loop); symlinked files are read. Caption files that are not regular files (named pipes, devices) are
skipped as unreadable rather than read: reading them would block or never end.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from caption_train.data.images import IMAGE_EXTENSIONS, is_image_file, probe_image, verify_image
from caption_train.errors import UserError

METADATA_FILE = "metadata.jsonl"
EXPECTED_LAYOUT = "expected images with a caption file beside each (img.png + img.txt), or a metadata.jsonl"

# Skip reasons, as counted in ScanResult.skipped and printed by summary().
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
UNREADABLE_CAPTION = "unreadable caption"
UNREADABLE_IMAGE = "unreadable image"
BAD_METADATA_LINE = "bad metadata line"


@dataclass(frozen=True)
class Sample:
    image_path: Path
    caption: str


@dataclass
class ScanResult:
    root: Path
    samples: list[Sample]
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    """Reason -> count. Counts images, except "bad metadata line", which counts lines of metadata.jsonl."""

    def summary(self) -> str:
        """One line for the log, e.g. `dataset /x: 120 images with captions; skipped 1 (1 missing caption)`."""
        line = f"dataset {self.root}: {len(self.samples)} images with captions"
        total = sum(self.skipped.values())
        if total:
            line += f"; skipped {total} ({_format_counts(self.skipped)})"
        return line


def scan_dataset(root: str | os.PathLike, *, probe: bool = True, verify: bool = False) -> ScanResult:
    """Walk `root` recursively in sorted order and pair each image with its caption. Never writes to `root`.

    probe=True opens each image's header so that obviously broken files are skipped here, not mid-epoch.
    verify=True also reads each image's last bytes and fully decodes those that look truncated (see
    images.verify_image), so truncated files are counted here too; it costs one more small read per image.
    """
    check = verify_image if verify else probe_image
    root = _check_root(root)
    skipped: collections.Counter[str] = collections.Counter()
    metadata = _read_metadata(root / METADATA_FILE, skipped)
    samples = []
    images_found = 0
    for image_path, sidecar in _walk_images(root):
        images_found += 1
        caption, reason = _caption_for(image_path, sidecar, metadata.get(_relative_key(image_path, root)))
        if reason is None and (probe or verify):
            reason = UNREADABLE_IMAGE if check(image_path) is not None else None
        if reason is not None:
            skipped[reason] += 1
        else:
            samples.append(Sample(image_path, caption))
    if not samples:
        raise UserError(_no_pairs_message(root, images_found, skipped))
    return ScanResult(root=root, samples=samples, skipped=skipped)


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, validation); fraction 0 gives no validation set.

    Which samples go to validation depends only on the seed and each image's path, not on list order, so adding
    images to a dataset moves few existing ones between the sets. Both lists keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"validation_split {fraction!r}: must be >= 0 and < 1 (e.g. 0.05 for 5%)")
    samples = list(samples)
    if fraction == 0:
        return samples, []
    if len(samples) < 2:
        raise UserError(
            f"validation_split {fraction}: needs at least 2 captioned images, found {len(samples)}; "
            "add images or set validation_split = 0"
        )
    n_val = min(max(1, round(len(samples) * fraction)), len(samples) - 1)
    ranked = sorted(range(len(samples)), key=lambda i: (_split_rank(seed, samples[i]), i))
    val_indices = set(ranked[:n_val])
    train = [s for i, s in enumerate(samples) if i not in val_indices]
    val = [s for i, s in enumerate(samples) if i in val_indices]
    return train, val


# ---------------------------------------------------------------------------- walking


def _check_root(root: str | os.PathLike, label: str = "--dataset_dir") -> Path:
    if not os.fspath(root).strip():  # Path("") would silently mean the current directory
        raise UserError(f"{label} is empty; pass the folder that holds your images (img.png + img.txt)")
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(
            f"{label} {path}: no such directory; pass the folder that holds your images (img.png + img.txt)"
        )
    if not path.is_dir():
        raise UserError(f"{label} {path}: is a file, not a directory; pass the folder that holds your images")
    return path


def walk_dataset(root: Path):
    """os.walk over the dataset as the scanner sees it: sorted, hidden entries left out, symlinked folders
    listed in dirnames but not entered (followlinks=False: a link to a parent folder would loop forever).

    Yields (dirpath, dirnames, filenames) with both lists sorted and without names starting with ".".
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))


def _walk_images(root: Path):
    """Yield (image path, sidecar .txt path or None) in a deterministic order. Symlinked files are read."""
    for dirpath, _dirnames, filenames in walk_dataset(root):
        names = set(filenames)
        for name in filenames:
            if not is_image_file(name):
                continue
            sidecar = caption_path_for(Path(dirpath, name))
            sidecar = sidecar if sidecar.name in names else None
            yield Path(dirpath, name), sidecar


def caption_path_for(image_path: Path) -> Path:
    """The caption file of an image: img.png -> img.txt in the same folder (the one rule every reader and writer uses)."""
    return image_path.with_name(image_path.stem + ".txt")


def _caption_for(image_path: Path, sidecar: Path | None, metadata_text: str | None) -> tuple[str, str | None]:
    """(caption, None) or ("", skip reason). The sidecar wins over metadata.jsonl: it is the file users edit."""
    if sidecar is not None:
        try:
            text = read_caption_bytes(sidecar).decode("utf-8-sig")
        except UnicodeDecodeError:
            return "", CAPTION_NOT_UTF8
        except OSError:
            return "", UNREADABLE_CAPTION
    elif metadata_text is not None:
        text = metadata_text
    else:
        return "", MISSING_CAPTION
    caption = normalize_caption(text)
    return (caption, None) if caption else ("", EMPTY_CAPTION)


def read_caption_bytes(path: Path) -> bytes:
    """The bytes of a caption file; OSError if it cannot be read or is not a regular file (symlinks followed).

    A named pipe would block the scan forever and a device such as /dev/zero would never end, so only regular
    files are read.
    """
    # O_NONBLOCK: opening a named pipe for reading would otherwise wait for a writer. No effect on regular files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return handle.read()


def normalize_caption(text: str) -> str:
    """Collapse runs of whitespace, newlines included, to one space, and strip the ends."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------- metadata.jsonl


def _read_metadata(path: Path, skipped: collections.Counter[str], bad_lines: list[int] | None = None) -> dict[str, str]:
    """Map normalized relative file name -> caption text. Malformed lines are counted in `skipped` (and their
    1-based numbers appended to `bad_lines`, when given)."""
    if not path.is_file():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error}); fix its permissions or remove it") from error
    captions = {}
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if not line.strip():
            continue
        entry = _parse_metadata_line(line)
        if entry is None:
            skipped[BAD_METADATA_LINE] += 1
            if bad_lines is not None:
                bad_lines.append(number)
        else:
            captions[_normalize_key(entry[0])] = entry[1]
    return captions


def _parse_metadata_line(line: bytes) -> tuple[str, str] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    file_name, text = record.get("file_name"), record.get("text")
    if not isinstance(file_name, str) or not file_name.strip() or not isinstance(text, str):
        return None
    return file_name, text


def _normalize_key(file_name: str) -> str:
    # Accept "./a/b.png" and Windows-style "a\\b.png" for the same file.
    return str(PurePosixPath(file_name.strip().replace("\\", "/")))


def _relative_key(image_path: Path, root: Path) -> str:
    return image_path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------- messages and splitting


def _format_counts(counts: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _no_pairs_message(root: Path, images_found: int, skipped: collections.Counter[str]) -> str:
    detail = f"; skipped {_format_counts(skipped)}" if skipped else ""
    return (
        f"--dataset_dir {root}: no usable image+caption pairs (found {images_found} images "
        f"with extensions {' '.join(sorted(IMAGE_EXTENSIONS))}{detail}); {EXPECTED_LAYOUT}"
    )


def _split_rank(seed: int, sample: Sample) -> bytes:
    return hashlib.blake2b(f"{int(seed)}:{sample.image_path.as_posix()}".encode(), digest_size=16).digest()
