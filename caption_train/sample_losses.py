"""Every training image's caption loss per epoch: `<run>/sample_losses.jsonl`, its reader and writer, and how an
epoch's per-row losses become its lines.

    history = read_sample_losses(run_dir / LOSSES_FILE)   # {"part0/img_3.png": [SampleLoss, ...]}, oldest epoch first
    lines = epoch_lines(rows, epoch=2, dataset_dir=root)  # rows: ServedLoss tuples of every process, gathered
    size = append_epoch(run_dir / LOSSES_FILE, lines)     # one write of the epoch's lines; returns the file's new size
    truncate_losses(run_dir / LOSSES_FILE, size)          # on resume: back to what the checkpoint had seen written

One line per training image per epoch, `{"epoch": E, "image": "<path relative to dataset_dir>", "loss": L,
"tokens": N, "caption_sha1": "..."}`: L is the mean token cross-entropy over the caption's target tokens without
label smoothing, from the forward training ran anyway (models/loss.CaptionLoss.row_loss_sum / row_tokens); the
hash (hooks.caption_sha1) is of the caption text that forward was given, as training read it that epoch (a live
edit from the page included) before shuffling and dropout. The training loop (train.py) writes the file, the page
(iterative/ranking.py) and `review` read it, and `suspects` (suspects.py) writes its own file with the same keys.

Per epoch, from every process's rows (`ServedLoss`: one per sample served, keyed by its dataset index):
- a dataset index served twice (accelerate's even-batch padding repeats the first samples of an epoch on the
  processes that run short) counts once, as first served;
- a kohya-repeated image (one dataset index per repeat) gets one line: the mean of its repeats' losses, and the
  mean of their target counts (rounded); where the page edited its caption mid-epoch, the repeats served with the
  text served last count, and the line carries that text's hash;
- an image not served at all this epoch (unreadable, or rated 1 on the page) gets no line. Captions the scan
  skipped (empty, unreadable) never reach training, so they have no line either.

Atomic per epoch, and linear in the file's size: an epoch's lines are appended in one write and fsynced (rewriting
the whole file every epoch through a temp file would cost epochs x images lines per epoch). A crash during that
write can leave part of an epoch at the end; the resumed run cuts the file back to the size its checkpoint recorded
(`truncate_losses`), and the reader ignores a last line cut short. A reader running while the epoch is being
appended may see the epoch's first lines only; the page gets its losses from the loop instead (HookRun).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from caption_train.errors import UserError
from caption_train.hooks import SampleLoss
from caption_train.text import printable

LOSSES_FILE = "sample_losses.jsonl"  # in the run folder, beside metrics.jsonl
EXAMPLE_LINE = '{"epoch": 1, "image": "sub/img.png", "loss": 2.3, "tokens": 7, "caption_sha1": "..."}'
KEYS = ("epoch", "image", "loss", "tokens", "caption_sha1")


class ServedLoss(NamedTuple):
    """One sample as training served it in an epoch, and its caption loss (plain tuples: cheap to gather and to
    keep in a step checkpoint)."""

    index: int
    """The dataset index (repeats counted): a kohya repeat has its own, a padding repeat shares the original's."""
    path: str
    """The image's path as scanned (str(Sample.image_path))."""
    caption_sha1: str
    """hooks.caption_sha1 of the caption text served, before shuffling/dropout."""
    loss_sum: float
    """The row's summed token cross-entropy over its targets, unsmoothed."""
    tokens: int
    """The row's target-token count."""
    batch: int
    """Which batch of the epoch served it (1-based, per process; processes step together): orders a caption's edits."""


# ---------------------------------------------------------------------------------------------
# an epoch's rows -> its lines


def epoch_lines(rows: Iterable[ServedLoss], *, epoch: int, dataset_dir: str | os.PathLike) -> list[SampleLoss]:
    """The epoch's lines, one per image served (see the module docstring), sorted by image path. `epoch` is 1-based."""
    first: dict[int, ServedLoss] = {}
    for row in rows:
        # A padding repeat of an index counts nothing: the earliest serving wins (gathered rows come process by
        # process, so the list's order is not the epoch's).
        if row.tokens > 0 and (row.index not in first or row.batch < first[row.index].batch):
            first[row.index] = row
    by_image: dict[str, list[ServedLoss]] = {}
    for row in first.values():
        by_image.setdefault(row.path, []).append(row)
    root = Path(dataset_dir)
    lines = []
    for path, served in by_image.items():
        text = max(served, key=lambda row: (row.batch, row.index)).caption_sha1  # the text served last
        kept = [row for row in served if row.caption_sha1 == text]
        loss = sum(row.loss_sum / row.tokens for row in kept) / len(kept)
        tokens = round(sum(row.tokens for row in kept) / len(kept))
        lines.append(SampleLoss(image=relative_image(path, root), epoch=epoch, loss=loss, tokens=tokens, caption_sha1=text))
    lines.sort(key=lambda line: line.image)
    return lines


def relative_image(path: str, root: Path) -> str:
    """An image's key in the file and on the page: its path relative to the dataset folder, with forward slashes."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:  # not under the dataset folder (cannot happen for scanned samples): the path as it is
        return Path(path).as_posix()


def latest_losses(history: dict[str, list[SampleLoss]]) -> dict[str, SampleLoss]:
    """Each image's latest line (HookRun.sample_losses) from its history (HookRun.sample_loss_history)."""
    return {image: rows[-1] for image, rows in history.items() if rows}


def add_epoch(history: dict[str, list[SampleLoss]], lines: Sequence[SampleLoss]) -> None:
    """Add an epoch's lines to a history in place (an image's rows stay oldest first)."""
    for line in lines:
        history.setdefault(line.image, []).append(line)


def epoch_note(lines: Sequence[SampleLoss], *, epoch: int, images: int, skipped_captions: int, top: int = 3) -> str:
    """One line after an epoch: how many images got a loss, the highest ones, and what is not ranked."""
    ranked = sorted(lines, key=lambda line: (math.isfinite(line.loss), -line.loss if math.isfinite(line.loss) else 0.0, line.image))
    highest = ", ".join(f"{printable(line.image)} {line.loss:.3f}" for line in ranked[:top])
    note = f"caption losses, epoch {epoch}: {len(lines)} of {images} training images in {LOSSES_FILE}"
    if highest:
        note += f"; highest: {highest}"
    if skipped_captions:
        note += f"; {skipped_captions} with an empty or unreadable caption not ranked"
    return note


# ---------------------------------------------------------------------------------------------
# the file


def format_line(line: SampleLoss) -> str:
    """A line of the file (a non-finite loss is written as NaN/Infinity, which Python's json reads back)."""
    return json.dumps({"epoch": line.epoch, "image": line.image, "loss": line.loss, "tokens": line.tokens,
                       "caption_sha1": line.caption_sha1}) + "\n"


def append_epoch(path: Path, lines: Sequence[SampleLoss]) -> int:
    """Append an epoch's lines in one write, flushed to disk; return the file's size after it (what a checkpoint
    records, so that a resumed run can cut back a crashed run's later lines)."""
    data = "".join(format_line(line) for line in lines).encode("utf-8", "backslashreplace")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def truncate_losses(path: Path, size: int) -> None:
    """Cut the file back to `size` bytes: the lines written up to the checkpoint a run resumes from (the lines a
    crashed or stopped run wrote after it are written again by the resumed run)."""
    try:
        if os.path.getsize(path) > size:
            os.truncate(path, size)
    except FileNotFoundError:
        pass


def read_sample_losses(path: str | Path) -> dict[str, list[SampleLoss]]:
    """Every line of a `sample_losses.jsonl`, grouped by image, oldest epoch first (a repeated (epoch, image): the
    later line wins). A line that is not such a record is a UserError naming the file and line; a last line cut
    short (no newline, not JSON: a crash while an epoch was appended) is left out."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; a training run writes {LOSSES_FILE} in its run folder") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it ({error})") from None
    lines = text.splitlines(keepends=True)
    by_image: dict[str, dict[int, SampleLoss]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = parse_line(line)
        if isinstance(row, str):
            if number == len(lines) and not line.endswith("\n") and row == "not a JSON object":
                break  # a torn append: the resumed run writes that epoch again
            raise UserError(f"{path}:{number}: {row}; expected lines like {EXAMPLE_LINE}")
        by_image.setdefault(row.image, {})[row.epoch] = row
    return {image: [rows[epoch] for epoch in sorted(rows)] for image, rows in by_image.items()}


def parse_line(line: str, keys: Sequence[str] = KEYS) -> SampleLoss | str:
    """The record of one line, or what is wrong with it. `keys`: the ones it must have (suspects.jsonl has no
    epoch: it reads back with epoch 0)."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not a JSON object"
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [key for key in keys if key not in record]
    if missing:
        return f"missing {', '.join(missing)}"
    epoch, image, loss, tokens, sha1 = (record.get(key, 0) for key in KEYS)
    if not _is_int(epoch) or epoch < (1 if "epoch" in keys else 0):
        return f"epoch {epoch!r} is not a whole number from 1"
    if not isinstance(image, str) or not image:
        return f"image {image!r} is not a path"
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        return f"loss {loss!r} is not a number"
    if not _is_int(tokens) or tokens < 0:
        return f"tokens {tokens!r} is not a whole number"
    if not isinstance(sha1, str):
        return f"caption_sha1 {sha1!r} is not a string"
    return SampleLoss(image=image, epoch=epoch, loss=float(loss), tokens=tokens, caption_sha1=sha1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
