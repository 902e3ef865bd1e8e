"""A torch Dataset of (RGB image, augmented caption, path) triples, reproducible per seed, epoch and index.

    dataset = CaptionDataset(train_samples, CaptionTransform(shuffle=True, dropout=0.1), seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)             # new shuffles/dropouts each epoch, same ones on a rerun
        for batch in DataLoader(dataset, batch_size=8, collate_fn=collate):   # collate calls drop_failed(items)
            ...

An image that fails to decode yields None instead of raising, so one bad file cannot end a long run; the collator
must drop those items with `drop_failed` (and cope with a batch that ends up empty).
With DataLoader workers, call set_epoch before creating the epoch's iterator and do not use persistent_workers:
each worker holds its own copy of the dataset and would keep the epoch it was started with.
"""

from __future__ import annotations

import logging
from typing import Iterable, TypeVar

import torch
from PIL import Image

from caption_train.data.captions import CaptionTransform, sample_rng
from caption_train.data.images import ImageLoadError, load_rgb
from caption_train.data.scan import Sample

log = logging.getLogger(__name__)

Item = tuple[Image.Image, str, str]
T = TypeVar("T")


class CaptionDataset(torch.utils.data.Dataset):
    """Serves `samples` with the caption transform and optional horizontal flip drawn from sample_rng."""

    def __init__(
        self,
        samples: list[Sample],
        transform: CaptionTransform = CaptionTransform(),
        *,
        seed: int = 0,
        random_flip: float = 0.0,
    ):
        if not 0.0 <= random_flip <= 1.0:
            raise ValueError(f"random_flip must be a probability between 0 and 1, got {random_flip!r}")
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        # Off by default: flipping breaks captions that say "left"/"right" or contain text.
        self.random_flip = random_flip
        self.epoch = 0
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item | None:
        sample = self.samples[index]
        try:
            image = load_rgb(sample.image_path)
        except ImageLoadError as error:
            self._warn_once(sample, error)
            return None
        rng = sample_rng(self.seed, self.epoch, index)
        # Caption draws come first, so turning the flip on or off does not change a seed's captions.
        caption = self.transform(sample.caption, rng)
        if self.random_flip > 0 and rng.random() < self.random_flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, caption, str(sample.image_path)

    def _warn_once(self, sample: Sample, error: ImageLoadError) -> None:
        # Once per file per process: each DataLoader worker keeps its own set.
        key = str(sample.image_path)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipping image that cannot be loaded: %s", error)


def drop_failed(items: Iterable[T | None]) -> list[T]:
    """The items that loaded, i.e. without the None that CaptionDataset returns for unreadable images."""
    return [item for item in items if item is not None]
