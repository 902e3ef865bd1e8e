"""The review queue: which captions to check first, from each image's caption loss per epoch and its caption now.

    history = read_sample_losses(run_dir / LOSSES_FILE)      # {"part0/img_3.png": [SampleLoss, ...]}, oldest first
    order = suspect_order(history, captions)                 # image paths, most suspect first
    trend = loss_trend(history["part0/img_3.png"])           # the card's numbers: latest loss, its trend

A caption the model, trained on the rest, still finds unlikely for its image is the first one to check. The queue
holds every image that has a loss whose caption is still the text that loss was measured on (its `caption_sha1`
against `caption_sha1(caption now)`: a caption fixed since leaves the queue until its next loss is in), minus the
images a person marked fine for that same text and those rated 1 (left out of training), ordered by the latest
epoch's loss, highest first (a non-finite loss first of all; ties by path). `not_down` keeps only the images whose
loss did not go down: the latest epoch's loss is not below the first one measured on the same caption text (two
such epochs needed). Images without a loss (validation images, captions training skipped) are never in it.

`suspect_order` is the one place the order is decided: the page's queue views (store.Workspace) call it, and so can
a test that trains on a mislabelled dataset and checks that the swapped captions come first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Sequence

from caption_train.errors import UserError
from caption_train.hooks import SampleLoss, caption_sha1
from caption_train.sample_losses import LOSSES_FILE, read_sample_losses  # noqa: F401 (the page's names for them)


@dataclass(frozen=True)
class LossTrend:
    """One image's losses as the page shows them."""

    epochs: tuple[int, ...]
    """Every epoch with a loss, oldest first."""
    losses: tuple[float, ...]
    """The loss of each of those epochs."""
    same_caption_from: int
    """Index of the first of them measured on the same caption text as the latest (earlier ones: an older text)."""
    caption_sha1: str
    """The caption text the latest loss was measured on."""

    @property
    def loss(self) -> float:
        return self.losses[-1]

    @property
    def epoch(self) -> int:
        return self.epochs[-1]

    @property
    def went_down(self) -> bool | None:
        """Whether the latest caption's loss fell from its first epoch to its latest; None with one epoch of it."""
        run = self.losses[self.same_caption_from :]
        if len(run) < 2:
            return None
        return run[-1] < run[0]  # a NaN never "went down"


def loss_trend(rows: Sequence[SampleLoss]) -> LossTrend:
    """The trend of one image's loss rows (any order; one per epoch)."""
    ordered = sorted(rows, key=lambda row: row.epoch)
    if not ordered:
        raise ValueError("an image with no loss rows has no trend")
    latest = ordered[-1].caption_sha1
    start = len(ordered)
    while start > 0 and ordered[start - 1].caption_sha1 == latest:
        start -= 1
    return LossTrend(tuple(row.epoch for row in ordered), tuple(row.loss for row in ordered), start, latest)


def in_queue(trend: LossTrend, caption: str, *, fine_sha1: str | None = None, excluded: bool = False) -> bool:
    """Whether an image with this loss trend and this caption now waits in the queue (see the module docstring)."""
    now = caption_sha1(caption)
    return not excluded and trend.caption_sha1 == now and fine_sha1 != now


def suspect_order(history: Mapping[str, Sequence[SampleLoss]], captions: Mapping[str, str], *,
                  fine: Mapping[str, str] | None = None, excluded: Collection[str] = (), not_down: bool = False) -> list[str]:
    """The review queue, most suspect first: image paths (the keys of `history`, relative to the dataset folder).

    history: every epoch's loss rows per image (read_sample_losses, HookRun.sample_loss_history); captions: the
    caption now per image (an image missing here is not in the dataset shown, and not in the queue); fine: image ->
    caption_sha1 of the text a person marked fine; excluded: images rated 1; not_down: only those whose loss did not
    go down.
    """
    fine = fine or {}
    ranked = []
    for image, rows in history.items():
        if image not in captions or not rows:
            continue
        trend = loss_trend(rows)
        if not in_queue(trend, captions[image], fine_sha1=fine.get(image), excluded=image in excluded):
            continue
        if not_down and trend.went_down is not False:
            continue
        ranked.append((_suspicion(trend.loss), image))
    ranked.sort()
    return [image for _, image in ranked]


def _suspicion(loss: float) -> tuple[int, float]:
    """Sort key: highest loss first; a non-finite loss (a diverged or broken sample) before every finite one."""
    return (0, 0.0) if not math.isfinite(loss) else (1, -loss)


# ---------------------------------------------------------------------------------------------
# the run's sample_losses.jsonl (read by caption_train.sample_losses, the file's one reader and writer)


def find_losses_file(*, losses: str | Path | None = None, model: str | None = None) -> Path | None:
    """The sample_losses.jsonl `review` ranks by: `--losses` (the file, or a run folder holding it; must exist), else
    the one of the run whose checkpoint `--model` is (RUN/final, RUN/epoch-N -> RUN/sample_losses.jsonl), else None."""
    if losses is not None:
        path = Path(losses).expanduser()
        if path.is_dir():
            path = path / LOSSES_FILE
        if not path.is_file():
            raise UserError(f"--losses {losses}: no {LOSSES_FILE} there; pass a run folder or its {LOSSES_FILE}")
        return path
    if model is not None:
        checkpoint = Path(model).expanduser()
        candidate = checkpoint.parent / LOSSES_FILE
        if checkpoint.is_dir() and candidate.is_file():
            return candidate
    return None
