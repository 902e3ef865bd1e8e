"""A torch Dataset of (RGB image, augmented caption, path, served) items, reproducible per seed, epoch and index.

    dataset = CaptionDataset(train_samples, CaptionTransform(shuffle=True, dropout=0.1), seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)             # new shuffles/dropouts each epoch, same ones on a rerun
        for batch in DataLoader(dataset, batch_size=8, collate_fn=collate):   # collate calls drop_failed(items)
            ...

Repeat folders: `CaptionDataset(samples, repeat=True)` serves each sample `sample.repeats` times per epoch (kohya's
`30_mystyle/` folders, see data/scan.py); `dataset.samples` stays the list of distinct images. Each repeat has its
own index, so it gets its own caption shuffle, dropout and flip.

Each item's `served` (a `Served`) says which dataset index it is and which caption text it was made from (its
hooks.caption_sha1, before shuffling and dropout, a live edit included): what the per-image losses of an epoch are
keyed and hashed by (sample_losses.py), since only the worker that read the caption knows which text it was.

An image that fails to decode yields None instead of raising, so one bad file cannot end a long run; the collator
must drop those items with `drop_failed` (and cope with a batch that ends up empty).
With DataLoader workers, call set_epoch before creating the epoch's iterator and do not use persistent_workers:
each worker holds its own copy of the dataset and would keep the epoch it was started with.

Live edits (the interactive page): `dataset.follow(path)` makes every process and worker check one small JSON file
(`LiveCaptions`) each time it serves a sample, and reload it when it changed. The file maps image paths to new
captions and lists excluded images; an excluded sample yields None, exactly like an unreadable image.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

from caption_train.data.captions import CaptionTransform, sample_rng
from caption_train.data.images import ImageLoadError, load_rgb
from caption_train.data.scan import Sample
from caption_train.hooks import caption_sha1

log = logging.getLogger(__name__)


class Served(NamedTuple):
    """Which sample an item is, for its per-image loss."""

    index: int
    """The dataset index (repeats counted): each kohya repeat has its own; a DDP padding repeat shares it."""
    caption_sha1: str
    """hooks.caption_sha1 of the caption text the item was made from, before shuffling and dropout."""


Item = tuple[Image.Image | None, str, str, Served]
T = TypeVar("T")


class LiveCaptions:
    """Caption overrides and exclusions read from a JSON file that another process may replace at any time.

        {"captions": {"<image path as scanned>": "new caption"}, "excluded": ["<image path as scanned>"]}

    The writer replaces the file atomically (temp file + os.replace), so a reader sees the old or the new file,
    never half of one. `refresh()` costs one os.stat when nothing changed; the (inode, mtime, size) stamp catches
    a replacement even within the file system's timestamp granularity. Picklable: DataLoader workers and other
    ranks each keep their own copy and notice a change on their own, with no message passing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.captions: dict[str, str] = {}
        self.excluded: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self.captions, self.excluded, self._stamp = {}, frozenset(), None
            return
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            captions = {str(k): str(v) for k, v in dict(data.get("captions", {})).items()}
            excluded = frozenset(str(k) for k in data.get("excluded", []))
        except (OSError, ValueError, TypeError, AttributeError) as error:
            # Keep serving the last good state; the writer only ever replaces the file whole.
            log.warning("cannot read live captions %s (%s); keeping the previous ones", self.path, error)
            return
        self.captions, self.excluded, self._stamp = captions, excluded, stamp

    def lookup(self, key: str, default: str) -> str | None:
        """The caption to train on for `key` now: the override, `default`, or None when the sample is excluded."""
        self.refresh()
        if key in self.excluded:
            return None
        return self.captions.get(key, default)


class CaptionDataset(torch.utils.data.Dataset):
    """Serves `samples` with the caption transform and optional horizontal flip drawn from sample_rng."""

    def __init__(
        self,
        samples: list[Sample],
        transform: CaptionTransform = CaptionTransform(),
        *,
        seed: int = 0,
        random_flip: float = 0.0,
        repeat: bool = False,
    ):
        if not 0.0 <= random_flip <= 1.0:
            raise ValueError(f"random_flip must be a probability between 0 and 1, got {random_flip!r}")
        self.samples = list(samples)
        # Cumulative repeat counts (None when every sample is served once): index i belongs to the first sample
        # whose running total exceeds i. One int per distinct image, however large the repeats.
        self._ends: list[int] | None = None
        if repeat and any(s.repeats != 1 for s in self.samples):
            self._ends = list(itertools.accumulate(s.repeats for s in self.samples))
        self.transform = transform
        self.seed = seed
        # Off by default: flipping breaks captions that say "left"/"right" or contain text.
        self.random_flip = random_flip
        self.epoch = 0
        self.live: LiveCaptions | None = None
        # Set by the trainer when image features are cached (features.SkipCached): an image whose features are
        # known is not decoded; the item then carries None in place of the image.
        self.skip_image: Callable[[str], bool] | None = None
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def follow(self, path: str | os.PathLike) -> None:
        """Take caption edits and exclusions from the LiveCaptions file at `path` from now on.

        Call before the epoch's iterator is created, so that forked DataLoader workers inherit it.
        """
        self.live = LiveCaptions(path)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else len(self.samples)

    def sample_at(self, index: int) -> Sample:
        """The distinct image behind dataset index `index` (repeats counted)."""
        if self._ends is None:
            return self.samples[index]
        if not 0 <= index < self._ends[-1]:
            raise IndexError(f"index {index} out of range for {self._ends[-1]} samples")
        return self.samples[bisect.bisect_right(self._ends, index)]

    def sample_numbers(self) -> np.ndarray:
        """For each dataset index, the position in `samples` of the image behind it (repeats counted), as int64."""
        counts = [s.repeats for s in self.samples] if self._ends else [1] * len(self.samples)
        return np.repeat(np.arange(len(self.samples), dtype=np.int64), counts)

    def __getitem__(self, index: int) -> Item | None:
        sample = self.sample_at(index)
        text = sample.caption
        if self.live is not None:
            # Checked before loading the image: an excluded sample costs a dict lookup, not a decode.
            text = self.live.lookup(str(sample.image_path), sample.caption)
            if text is None:
                return None
        if self.skip_image is not None and self.skip_image(str(sample.image_path)):
            image = None
        else:
            try:
                image = load_rgb(sample.image_path)
            except ImageLoadError as error:
                self._warn_once(sample, error)
                return None
        rng = sample_rng(self.seed, self.epoch, index)
        # Caption draws come first, so turning the flip on or off does not change a seed's captions.
        caption = self.transform(text, rng)
        if self.random_flip > 0 and rng.random() < self.random_flip and image is not None:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, caption, str(sample.image_path), Served(index, caption_sha1(text))

    def _warn_once(self, sample: Sample, error: ImageLoadError) -> None:
        # Once per file per process: each DataLoader worker keeps its own set.
        key = str(sample.image_path)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipping image that cannot be loaded: %s", error)


def drop_failed(items: Iterable[T | None]) -> list[T]:
    """The items to train on, i.e. without the None that CaptionDataset returns for unreadable or excluded images."""
    return [item for item in items if item is not None]
