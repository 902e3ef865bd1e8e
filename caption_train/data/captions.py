"""Caption augmentation over comma-separated parts: shuffle, keep the first N in place, drop parts.

    transform = CaptionTransform(shuffle=True, frozen_parts=1, dropout=0.1)
    transform("a photo of a cat, sitting, indoors, blurry", sample_rng(seed=0, epoch=3, index=17))
    # -> "a photo of a cat, sitting, blurry"
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def split_parts(caption: str) -> list[str]:
    """Comma-separated parts of a caption, stripped, empty parts dropped."""
    return [part.strip() for part in caption.split(",") if part.strip()]


@dataclass(frozen=True)
class CaptionTransform:
    """How to vary a caption each time it is shown. The default does nothing."""

    shuffle: bool = False
    """Shuffle the parts after the first `frozen_parts`."""
    frozen_parts: int = 0
    """Leading parts kept in place and never dropped (kohya's keep_tokens counts parts the same way)."""
    dropout: float = 0.0
    """Probability of dropping each non-frozen part. The caption is the target, so it is never dropped whole."""

    def __post_init__(self):
        if isinstance(self.frozen_parts, bool) or not isinstance(self.frozen_parts, int) or self.frozen_parts < 0:
            raise ValueError(f"frozen_parts must be an integer >= 0, got {self.frozen_parts!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"caption dropout must be between 0 and 1, got {self.dropout!r}")

    @property
    def enabled(self) -> bool:
        """False when calling the transform would return every caption unchanged."""
        return self.shuffle or self.dropout > 0

    def __call__(self, caption: str, rng: random.Random) -> str:
        if not self.enabled:
            return caption
        parts = split_parts(caption)
        frozen, movable = parts[: self.frozen_parts], parts[self.frozen_parts :]
        if self.shuffle:
            rng.shuffle(movable)
        if self.dropout > 0:
            movable = self._drop(movable, have_frozen=bool(frozen), rng=rng)
        return ", ".join(frozen + movable)

    def _drop(self, movable: list[str], *, have_frozen: bool, rng: random.Random) -> list[str]:
        kept = [part for part in movable if rng.random() >= self.dropout]
        if not kept and not have_frozen and movable:
            # An empty target would teach the model to write nothing; keep one part instead.
            kept = [rng.choice(movable)]
        return kept


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A Random for one sample in one epoch, the same whichever worker or order asks for it.

    Derived through a hash of the three numbers (not Python's hash(), which is salted per process for strings),
    so nearby seeds/epochs/indices give unrelated streams.
    """
    key = f"caption_train:{int(seed)}:{int(epoch)}:{int(index)}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "big"))
