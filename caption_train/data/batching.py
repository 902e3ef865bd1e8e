"""Batches with little padding: rows of similar length batched together, and the padding the model was shown.

    lengths = estimate_row_lengths(train_samples, family=family, processor=processor, prompt=prompt, max_length=128)
    plan = plan_grouping("auto", lengths, dataset, batch_size=8, seed=42)   # on or off, and why, in plan.message
    loader = DataLoader(dataset, batch_sampler=plan.sampler, collate_fn=collate)   # plan.sampler is None when off
    tally = PaddingTally(); tally.add(batch)     # each collated batch; tally.fraction() = pad tokens / all tokens

A row's length is estimated without decoding any image: its caption's tokens (the tokenizer on every caption) plus
the tokens before the caption (prompt, template, image tokens). Where the image's token count follows its size (a
chat VLM like Qwen2-VL), the family counts it from the size in the image file's header
(ModelFamily.prompt_token_counter); elsewhere it is the same for every row, measured once. Caption shuffles and
dropout change a caption's length a little from epoch to epoch: grouping uses the length of the caption as written,
which is close enough to group by.

The order of epoch e is a function of (seed, e, the lengths) alone, so every process draws the same batches (accelerate
then gives each process every n-th one) and a resumed run skips exactly the batches the interrupted one had trained.
Within windows of WINDOW_BATCHES batches of a random permutation the rows are sorted by length and cut into batches,
and the batches are shuffled: which rows share a batch still changes every epoch. The one short batch, if any, comes
last (where accelerate expects it), and the longest batch first, so that a batch too large for memory fails at the
first step rather than hours in. Rows whose lengths are within a few percent count as equal and are then ordered by
repeat, so a kohya repeat folder's copies of an image are spread over batches instead of filling one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from caption_train.data.scan import Sample
from caption_train.errors import UserError

GROUPING_MODES = ("auto", "on", "off")
WINDOW_BATCHES = 64
"""Batches per window of the random permutation whose rows are sorted by length: larger windows pad less, smaller ones
vary a batch's rows more from epoch to epoch."""
AUTO_MIN_PADDING = 0.05
"""`auto` groups when random batches of the estimated lengths would be at least this share padding."""
SAME_LENGTH_SHARE = 0.05
"""Rows within this share of a typical row's length (at least 4 tokens) count as the same length when sorting."""
MASK_KEYS = ("attention_mask", "decoder_attention_mask")
"""A batch's per-token masks (1 = a real token, 0 = padding): what its tokens are counted from."""


# ---------------------------------------------------------------------------------------------
# How long each row is


@dataclass(frozen=True)
class RowLengths:
    """Estimated tokens per training row of each distinct sample, and how they were estimated (for the start-up line)."""

    lengths: np.ndarray  # int64, one per sample
    how: str


def estimate_row_lengths(samples: Sequence[Sample], *, family: Any, processor: Any, prompt: str | None, max_length: int) -> RowLengths:
    """Each sample's row length in tokens, capped at `max_length` as training truncates: its caption's tokens plus the
    tokens before the caption, the latter from the image's header size where the family says it follows the size."""
    from caption_train.lint import count_tokens

    tokenizer = getattr(processor, "tokenizer", processor)
    captions = np.asarray(count_tokens(tokenizer, [sample.caption for sample in samples]), dtype=np.int64)
    counter = family.prompt_token_counter(processor, prompt)
    offset = _row_offset(family, processor, prompt, samples[0].caption, int(captions[0]), counter)
    if counter is None:
        lengths, how = captions + offset, "caption tokens"
    else:
        lengths = captions + offset + np.asarray(_prompt_tokens_by_size(samples, counter), dtype=np.int64)
        how = f"caption tokens + image tokens from {len(samples)} image headers"
    return RowLengths(lengths=np.clip(lengths, 1, max_length), how=how)


_STAND_IN_SIZE = (224, 224)


def _row_offset(family: Any, processor: Any, prompt: str | None, caption: str, caption_tokens: int, counter: Any) -> int:
    """What a row holds besides its caption's tokens (as the tokenizer counts them alone) and, where the family counts
    them per size, the tokens before the caption: one row built by the family's own collate on a blank image, less
    those. The same for every row (template, prompt, fixed image tokens, end token); 0 when the collate refuses."""
    from PIL import Image

    try:
        batch = family.collate(processor, [Image.new("RGB", _STAND_IN_SIZE)], [caption], max_length=1 << 20, prompt=prompt)
    except (UserError, ValueError):
        return 0
    before = 0 if counter is None else int(counter(*_STAND_IN_SIZE))
    return batch_tokens(batch)[0] - caption_tokens - before


def _prompt_tokens_by_size(samples: Sequence[Sample], counter: Any) -> list[int]:
    """counter(width, height) for each sample's image, from its header. EXIF rotation is not applied: the processors'
    counts are the same for (w, h) and (h, w). An unreadable header (the loader skips that image anyway) gets the
    median of the others."""
    from caption_train.data.images import ImageLoadError, read_header

    counts: list[int | None] = []
    for sample in samples:
        try:
            info = read_header(sample.image_path)
        except ImageLoadError:
            counts.append(None)
            continue
        counts.append(int(counter(info.width, info.height)))
    known = sorted(count for count in counts if count is not None)
    fill = known[len(known) // 2] if known else 0
    return [fill if count is None else count for count in counts]


# ---------------------------------------------------------------------------------------------
# The sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's batch order, the same in every process; unrelated streams for nearby seeds/epochs."""
    key = f"caption_train:batches:{int(seed)}:{int(epoch)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def group_batches(lengths: np.ndarray, samples: np.ndarray, *, batch_size: int, seed: int) -> list[np.ndarray]:
    """One epoch's batches of indices into `lengths` (each index's row length; `samples`: the distinct sample behind
    each index, so repeats can be told apart): see the module docstring. Deterministic in (its inputs, seed)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    same = max(4, int(SAME_LENGTH_SHARE * float(np.median(lengths)))) if len(lengths) else 4
    batches: list[np.ndarray] = []
    window = batch_size * WINDOW_BATCHES
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        # Sort keys, most significant last (np.lexsort): length band, then the repeat number of the index's sample
        # within the window (first copies of each image, then second copies, ...), then the exact length; ties keep
        # the random order of the permutation.
        keys = (lengths[chunk], _repeat_number(samples[chunk]), lengths[chunk] // same)
        chunk = chunk[np.lexsort(keys)]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [batch for batch in batches if len(batch) == batch_size]
    short = [batch for batch in batches if len(batch) < batch_size]  # at most one: the last window's remainder
    full = [full[i] for i in rng.permutation(len(full))]
    if full:
        longest = int(np.argmax([lengths[batch].max() for batch in full]))
        full[0], full[longest] = full[longest], full[0]
    return full + short


def _repeat_number(samples: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same sample (0 for its first copy)."""
    by_sample = np.argsort(samples, kind="stable")
    ordered = samples[by_sample]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(ordered)]))
    numbers = np.empty(len(samples), dtype=np.int64)
    numbers[by_sample] = np.arange(len(ordered)) - run_start
    return numbers


class LengthGroupedBatches(torch.utils.data.Sampler):
    """A batch sampler over a CaptionDataset whose batches hold rows of similar length (see the module docstring).

    The epoch is the dataset's (`dataset.set_epoch`, which the loop calls each epoch for the caption transforms),
    so no wrapper around this sampler (accelerate's shard and skip samplers) needs to pass an epoch through.
    `batch_size` and `drop_last` are what accelerate reads to shard batches over processes.
    """

    drop_last = False

    def __init__(self, dataset: Any, sample_lengths: np.ndarray, *, batch_size: int, seed: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.samples = dataset.sample_numbers()
        self.lengths = np.asarray(sample_lengths, dtype=np.int64)[self.samples]

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        return group_batches(self.lengths, self.samples, batch_size=self.batch_size, seed=epoch_seed(self.seed, epoch))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches(self.dataset.epoch):
            yield batch.tolist()


# ---------------------------------------------------------------------------------------------
# On or off


@dataclass
class GroupingPlan:
    """What the loader does with the batch order, and the one start-up line that says why."""

    sampler: LengthGroupedBatches | None
    message: str
    lengths: np.ndarray | None = None  # per distinct sample, when grouped: saved in checkpoints (see state())

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run draws the same batches even when captions or images changed
        since (the page edits captions mid-run): the lengths this run grouped by, or None for random batches."""
        return {"lengths": None if self.lengths is None else torch.from_numpy(self.lengths.astype(np.int32))}


def expected_padding(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Pad tokens / all tokens of `batches` (indices into `lengths`) padded to their longest row."""
    total = sum(int(lengths[batch].max()) * len(batch) for batch in batches)
    return 1.0 - float(sum(int(lengths[batch].sum()) for batch in batches)) / total if total else 0.0


def random_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def plan_grouping(requested: str, dataset: Any, *, batch_size: int, seed: int, estimate: Any, packed: bool = False,
                  saved: dict[str, Any] | None = None) -> GroupingPlan:
    """Decide whether the training loader groups rows by length (`--group_by_length auto|on|off`).

    `estimate()` returns the RowLengths of dataset.samples (called only when needed: it tokenizes every caption and
    may read every image header). `packed`: rows are packed without padding, so grouping saves nothing. `saved`: the
    checkpoint's GroupingPlan.state() when resuming ({} for a checkpoint from before grouping existed, whose run
    batched at random); the resumed run keeps its order, so a request that contradicts it is an error.
    """
    if requested not in GROUPING_MODES:
        raise UserError(f"--group_by_length {requested!r}: choose one of {', '.join(GROUPING_MODES)}")
    if saved is not None:
        return _resumed_plan(requested, dataset, batch_size=batch_size, seed=seed, estimate=estimate, saved=saved)
    if requested == "off":
        return GroupingPlan(None, "batches: random order (--group_by_length off)")
    if batch_size == 1 and requested == "auto":  # (`on` with batch size 1 is refused by the config check)
        return GroupingPlan(None, "batches: random order (batch size 1: no padding)")
    if packed and requested == "auto":
        return GroupingPlan(None, "batches: random order (rows are packed: no padding to save by grouping)")
    rows = estimate()
    sampler = LengthGroupedBatches(dataset, rows.lengths, batch_size=batch_size, seed=seed)
    unsorted = expected_padding(sampler.lengths, random_batches(len(sampler.samples), batch_size, epoch_seed(seed, 0)))
    grouped = expected_padding(sampler.lengths, sampler.batches(0))
    spread = f"rows {int(rows.lengths.min())}-{int(rows.lengths.max())} tokens ({rows.how})"
    if requested == "auto" and unsorted < AUTO_MIN_PADDING:
        return GroupingPlan(None, f"batches: random order (auto: {spread}; random batches would be only ~{unsorted:.0%} padding)")
    why = "on" if requested == "on" else "auto"
    return GroupingPlan(sampler, f"batches: grouped by length ({why}: {spread}; padding ~{unsorted:.0%} in random batches, "
                                 f"~{grouped:.0%} grouped, estimated)", lengths=rows.lengths)


def _resumed_plan(requested: str, dataset: Any, *, batch_size: int, seed: int, estimate: Any, saved: dict[str, Any]) -> GroupingPlan:
    lengths = saved.get("lengths")
    if lengths is None:
        if requested == "on":
            raise UserError("--group_by_length on: the checkpoint's run batched its rows in random order, and a resumed run "
                            "keeps its order (else batches of this epoch would repeat or be skipped); resume with auto or off, or start a new run")
        return GroupingPlan(None, "batches: random order (as the checkpoint's run)")
    if requested == "off":
        raise UserError("--group_by_length off: the checkpoint's run grouped its rows by length, and a resumed run keeps its "
                        "order (else batches of this epoch would repeat or be skipped); resume with auto or on, or start a new run")
    lengths = lengths.numpy().astype(np.int64)
    if len(lengths) != len(dataset.samples):
        # The dataset has other images now: the order changes anyway (as random batches' would), so group afresh.
        plan = plan_grouping("on", dataset, batch_size=batch_size, seed=seed, estimate=estimate)
        plan.message += f"; the dataset has {len(dataset.samples)} images, the checkpoint's run had {len(lengths)}: this epoch's remaining batches differ from that run's"
        return plan
    sampler = LengthGroupedBatches(dataset, lengths, batch_size=batch_size, seed=seed)
    return GroupingPlan(sampler, "batches: grouped by length (the checkpoint's row lengths)", lengths=lengths)


# ---------------------------------------------------------------------------------------------
# The padding the model saw


def batch_tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, all token positions) of a collated batch, from its masks (a chat VLM's image tokens are real)."""
    real = total = 0
    for key in MASK_KEYS:
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor):
            real += int(mask.sum())
            total += mask.numel()
    return real, total


class PaddingTally:
    """Pad tokens / all tokens over the batches the model saw (this process's share; `counts()` to reduce), until
    `reported` is set."""

    def __init__(self) -> None:
        self.real = 0
        self.total = 0
        self.reported = False

    def add(self, batch: dict[str, Any], *, packed: bool = False) -> None:
        """Count a collated batch; `packed`: the model is shown its rows without padding."""
        if self.reported:
            return
        real, total = batch_tokens(batch)
        self.real += real
        self.total += real if packed else total

    def counts(self) -> torch.Tensor:
        """[pad tokens, all token positions], int64 (exact however many batches)."""
        return torch.tensor([self.total - self.real, self.total], dtype=torch.int64)


def padding_line(pad: float, total: float, epoch: int, how: str) -> str:
    share = pad / total if total else 0.0
    return f"padding: {share:.1%} of the {int(total):,} token positions in epoch {epoch}'s batches were padding ({how})"
