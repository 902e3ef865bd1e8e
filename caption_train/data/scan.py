"""Find image + caption pairs in a dataset folder (read-only) and split off a validation set.

    result = scan_dataset("dataset")          # dataset/**/img.png + dataset/**/img.txt
    result = scan_dataset("dataset", verify=True)   # also skip truncated images now, not when first loaded
    result = scan_dataset("dataset", probe=False, spot_check=256)   # training start-up: captions, plus the headers
                                                    # of at most 256 evenly spaced images
    print(result.summary())                   # dataset dataset: 120 images with captions; skipped 2 (2 missing caption)
    train, val = split_validation(result.samples, fraction=0.05, seed=0)

Captions come from a `<stem>.txt` sidecar next to each image (`img.png` -> `img.txt`), or else from a
`metadata.jsonl` in the root with lines `{"file_name": "sub/img.png", "text": "a caption"}`.
Hidden files and folders (names starting with ".") are ignored: they are tool debris such as macOS `._img.png`
resource forks or `.ipynb_checkpoints`, not training data. Symlinked folders are not followed (a link to a parent
would loop); symlinked files are read. Caption files that are not regular files (named pipes, devices) are
skipped as unreadable rather than read: reading them would block or never end.

Repeat folders (kohya's convention): a top-level folder named `N_name` (`30_mystyle/`) gives every image under it
`Sample.repeats == N`; CaptionDataset(repeat=True) serves it N times per epoch. Only the leading integer before the
first underscore of the folder directly under the root counts, as in kohya; N must be at least 1.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from caption_train.data.images import IMAGE_EXTENSIONS, is_image_file, probe_image, verify_image
from caption_train.errors import UserError
from caption_train.text import plural

METADATA_FILE = "metadata.jsonl"
EXPECTED_LAYOUT = "expected images with a caption file beside each (img.png + img.txt), or a metadata.jsonl"

# Skip reasons, as counted in ScanResult.skipped and printed by summary().
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
UNREADABLE_CAPTION = "unreadable caption"
UNREADABLE_IMAGE = "unreadable image"
BAD_METADATA_LINE = "bad metadata line"


@dataclass(frozen=True, slots=True)
class Sample:
    image_path: Path
    caption: str
    repeats: int = 1
    """Times per epoch training serves this image: N for images under a top-level `N_name/` folder, else 1."""


@dataclass
class ScanResult:
    root: Path
    samples: list[Sample]
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    """Reason -> count. Counts images, except "bad metadata line", which counts lines of metadata.jsonl."""
    problems: list[tuple[Path, str]] = field(default_factory=list)
    """(image path, skip reason) of each skipped image, in walk order (metadata lines are only counted)."""
    probed: bool = True
    """Image headers were read (False: only captions were; unreadable images are found when first loaded)."""
    repeat_folders: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Top-level `N_name` folder -> (N, samples under it), in walk order."""

    def summary(self) -> str:
        """One line for the log, e.g. `dataset /x: 120 images with captions; skipped 1 (1 missing caption)`."""
        line = f"dataset {self.root}: {plural(len(self.samples), 'image')} with captions"
        total = sum(self.skipped.values())
        if total:
            line += f"; skipped {total} ({_format_counts(self.skipped)})"
        return line


def scan_dataset(root: str | os.PathLike, *, probe: bool = True, verify: bool = False, spot_check: int = 0) -> ScanResult:
    """Walk `root` recursively in sorted order and pair each image with its caption. Never writes to `root`.

    probe=True opens each image's header so that obviously broken files are skipped here, not mid-epoch.
    verify=True also reads each image's last bytes and fully decodes those that look truncated (see
    images.verify_image), so truncated files are counted here too; it costs one more small read per image.
    spot_check=N (with probe=False): open the headers of at most N evenly spaced captioned images, skipping the
    broken ones, so that the cost stays flat however large the dataset (a dataset of at most N images is probed
    in full). Raises UserError when every image checked is broken: a folder of bad files fails here, not after
    an epoch that trained on nothing.
    """
    check = verify_image if verify else probe_image
    root = _check_root(root)
    skipped: collections.Counter[str] = collections.Counter()
    metadata = _read_metadata(root / METADATA_FILE, skipped)
    samples = []
    problems = []
    extensions: collections.Counter[str] = collections.Counter()
    repeated: collections.Counter[tuple[str, int]] = collections.Counter()  # (N_name folder, N) -> samples
    for image_path, sidecar, repeat_folder in _walk_images(root):
        extensions[image_path.suffix.lower()] += 1
        # The relative key is built only when there is a metadata.jsonl to look it up in: it is the one
        # per-image cost here that is not a file read.
        meta_text = metadata.get(_relative_key(image_path, root)) if metadata else None
        caption, reason = _caption_for(image_path, sidecar, meta_text)
        if reason is None and (probe or verify):
            reason = UNREADABLE_IMAGE if check(image_path) is not None else None
        if reason is not None:
            skipped[reason] += 1
            problems.append((image_path, reason))
        else:
            samples.append(Sample(image_path, caption, repeat_folder[1] if repeat_folder else 1))
            if repeat_folder:
                repeated[repeat_folder] += 1
    probed = probe or verify
    if not probed and spot_check > 0 and samples:
        samples, probed = _spot_check(root, samples, spot_check, skipped, problems, repeated)
    if not samples:
        raise UserError(_no_pairs_message(root, extensions, skipped))
    folders = {name: (n, count) for (name, n), count in repeated.items() if count}
    return ScanResult(root=root, samples=samples, skipped=skipped, problems=problems, probed=probed, repeat_folders=folders)


def _spot_check(root: Path, samples: list[Sample], limit: int, skipped: collections.Counter[str],
                problems: list[tuple[Path, str]], repeated: collections.Counter[tuple[str, int]]) -> tuple[list[Sample], bool]:
    """Probe at most `limit` evenly spaced samples; return the samples without the broken ones, and whether every
    sample was probed. Broken ones are counted in `skipped` and `problems`, and taken out of `repeated`."""
    step = -(-len(samples) // limit)  # ceil: every sample when there are at most `limit`
    broken: dict[int, str] = {}
    for index in range(0, len(samples), step):
        reason = probe_image(samples[index].image_path)
        if reason is not None:
            broken[index] = reason
    checked = len(range(0, len(samples), step))
    if broken and len(broken) == checked and step > 1:
        index, reason = next(iter(broken.items()))
        raise UserError(f"--dataset_dir {root}: none of the {checked} images checked can be read "
                        f"(e.g. {samples[index].image_path}: {reason}); run `caption-train lint {root}` to check every image")
    for index in broken:
        skipped[UNREADABLE_IMAGE] += 1
        problems.append((samples[index].image_path, UNREADABLE_IMAGE))
        if repeated:
            folder = _repeat_folder_of(samples[index].image_path.parent, root)
            if folder:
                repeated[folder] -= 1
    kept = [sample for index, sample in enumerate(samples) if index not in broken] if broken else samples
    return kept, step == 1


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
    """Yield (image path, sidecar .txt path or None, (repeat folder name, N) or None) in a deterministic order.
    Symlinked files are read."""
    for dirpath, _dirnames, filenames in walk_dataset(root):
        names = set(filenames)
        folder = Path(dirpath)
        repeat_folder = _repeat_folder_of(folder, root)
        for name in filenames:
            if not is_image_file(name):
                continue
            sidecar = caption_name_for(name)
            yield folder / name, (os.path.join(dirpath, sidecar) if sidecar in names else None), repeat_folder


# ---------------------------------------------------------------------------- repeat folders (kohya)


def repeat_count(folder_name: str) -> int | None:
    """N of a kohya repeat folder name `N_name` (`30_mystyle` -> 30); None for any other name (or N = 0)."""
    head, underscore, _ = folder_name.partition("_")
    if not underscore or not head.isascii() or not head.isdigit():
        return None
    return int(head) or None


def _repeat_folder_of(folder: Path, root: Path) -> tuple[str, int] | None:
    """(name, N) of the top-level `N_name` folder under `root` that holds `folder`, or None."""
    parts = folder.relative_to(root).parts
    repeats = repeat_count(parts[0]) if parts else None
    return (parts[0], repeats) if repeats else None


def repeat_folders(image_paths: Iterable[Path], root: Path) -> dict[str, tuple[int, int]]:
    """Top-level `N_name` folder -> (N, how many of `image_paths` lie under it), in first-seen order."""
    folders: dict[str, tuple[int, int]] = {}
    top_of: dict[Path, str] = {}  # parent folder -> its top-level folder name: one relative_to per folder
    for path in image_paths:
        parent = path.parent
        name = top_of.get(parent)
        if name is None:
            parts = parent.relative_to(root).parts
            name = top_of[parent] = parts[0] if parts else ""
        repeats = repeat_count(name)
        if repeats is not None:
            folders[name] = (repeats, folders.get(name, (repeats, 0))[1] + 1)
    return folders


def format_repeat_folders(folders: dict[str, tuple[int, int]], limit: int = 8) -> str:
    """`30_mystyle x30 (12 images), 10_extra x10 (4 images)`; at most `limit` folders, then `and N more`."""
    shown = [f"{name} x{repeats} ({plural(count, 'image')})" for name, (repeats, count) in list(folders.items())[:limit]]
    if len(folders) > limit:
        shown.append(f"and {len(folders) - limit} more")
    return ", ".join(shown)

# ---------------------------------------------------------------------------- captions


def caption_path_for(image_path: Path) -> Path:
    """The caption file of an image: img.png -> img.txt in the same folder (the one rule every reader and writer uses)."""
    return image_path.with_name(caption_name_for(image_path.name))


def caption_name_for(image_name: str) -> str:
    """caption_path_for on a bare file name (img.png -> img.txt); a string operation, as the scan runs it per image."""
    return os.path.splitext(image_name)[0] + ".txt"


def _caption_for(image_path: Path, sidecar: str | os.PathLike | None, metadata_text: str | None) -> tuple[str, str | None]:
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


def read_caption_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a caption file; OSError if it cannot be read or is not a regular file (symlinks followed).

    A named pipe would block the scan forever and a device such as /dev/zero would never end, so only regular
    files are read.
    """
    # O_NONBLOCK: opening a named pipe for reading would otherwise wait for a writer. No effect on regular files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        # Plain os.read, no file object: this runs once per image at start-up. A regular file returns fewer bytes
        # than asked only at its end, so one read usually does; a file that grew since fstat is read to the end.
        data = os.read(fd, info.st_size + 1)
        if len(data) <= info.st_size:
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


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


# Plurals that are not the reason + "s" ("2 captions not UTF-8").
_MANY = {CAPTION_NOT_UTF8: "captions not UTF-8"}


def _format_counts(counts: collections.Counter[str]) -> str:
    return ", ".join(plural(n, reason, _MANY.get(reason)) for reason, n in counts.most_common())


def _no_pairs_message(root: Path, extensions: collections.Counter[str], skipped: collections.Counter[str]) -> str:
    detail = f"; skipped {_format_counts(skipped)}" if skipped else ""
    if extensions:
        found = f"found {plural(sum(extensions.values()), 'image')} ({' '.join(sorted(extensions))}){detail}"
    else:
        found = f"found no images; caption-train reads {' '.join(sorted(IMAGE_EXTENSIONS))}"
    return f"--dataset_dir {root}: no usable image+caption pairs ({found}); {EXPECTED_LAYOUT}"


def _split_rank(seed: int, sample: Sample) -> bytes:
    return hashlib.blake2b(f"{int(seed)}:{sample.image_path.as_posix()}".encode(), digest_size=16).digest()
