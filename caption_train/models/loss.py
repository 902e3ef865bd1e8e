"""The caption loss computed only where the labels are: the output layer and the cross-entropy run at target positions.

    result = family.caption_loss(model, batch, label_smoothing=0.1)   # models/base.py: the family says where its head is
    accelerator.backward(result.loss)          # mean over the batch's target tokens, smoothed as asked
    per_image = result.row_loss_sum / result.row_tokens   # each row's mean token cross-entropy, never smoothed

A captioner's targets are its caption tokens: 10-25% of a chat VLM's positions (the rest are image, template and
prompt tokens), yet `model(**batch, labels=...)` computes fp32 logits [rows, positions, vocabulary] everywhere and
keeps them (and their gradient) for backward: ~226 MB per Qwen2.5-VL sample at 448 px. Here the model runs for its
last hidden states (its output head, given `StashingHead` through `swap_class`, hands them back unchanged while a
stash is open), and the head and the cross-entropy are applied to the target positions alone, in chunks of
positions whose logits are recomputed in backward when targets x vocabulary is large, so no [targets, vocabulary]
tensor outlives its chunk. The forward still goes through the model's own (possibly DDP-wrapped) call, so
multi-process gradient sync sees one forward as before; the head runs under the autocast its forward call saw.

Per-row sums come from an index tensor (target position -> row), so a packed batch (several samples in one
sequence) can pass a sample index in place of the batch row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # positions with this label are left out of the loss (torch CrossEntropyLoss default)
LOGIT_CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk of target positions (64 MiB in fp32): above it the targets are taken in chunks whose logits are
recomputed in backward. Below it one chunk's logits are kept for backward, as the model's own loss keeps them."""


@dataclass(frozen=True)
class CaptionLoss:
    """One batch's caption loss and what it is made of, per row."""

    loss: torch.Tensor
    """The scalar to backpropagate: mean over the batch's target tokens, with the label smoothing asked for."""
    row_loss_sum: torch.Tensor
    """[rows] fp32, detached: each row's summed token cross-entropy over its targets, without label smoothing."""
    row_tokens: torch.Tensor
    """[rows] int64: each row's count of target tokens."""

    def row_mean(self) -> torch.Tensor:
        """[rows] each row's mean token cross-entropy (NaN for a row without targets)."""
        return self.row_loss_sum / self.row_tokens


class StashingHead:
    """Mixin (through models/base.swap_class) for a model's output head: while a `HeadStash` is open on it, its
    forward records its input (the last hidden states) and returns it unchanged instead of computing logits;
    `logits()` is the head's own forward, for the target positions."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        stash = self.__dict__.get("_caption_train_stash")
        if stash is None:
            return super().forward(hidden, *args, **kwargs)
        stash.capture(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)


class HeadStash:
    """What the head saw in one forward: its input, how often it was called, and the autocast it ran under."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.calls = 0
        self.autocast: tuple[str, bool, torch.dtype] | None = None

    def capture(self, hidden: torch.Tensor) -> None:
        device_type = hidden.device.type
        self.hidden, self.calls = hidden, self.calls + 1
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


@contextlib.contextmanager
def stashing(head: torch.nn.Module) -> Iterator[HeadStash]:
    """Open a stash on `head` (a module already given StashingHead) for the forward inside the block."""
    stash = HeadStash()
    head.__dict__["_caption_train_stash"] = stash
    try:
        yield stash
    finally:
        head.__dict__.pop("_caption_train_stash", None)


def output_width(head: torch.nn.Module) -> int:
    """The vocabulary size a head projects to: its widest linear layer's output."""
    return max(module.out_features for module in head.modules() if isinstance(module, torch.nn.Linear))


class UnknownLogitTransform(Exception):
    """The model's forward changed its output layer's result before returning it, other than as the family said."""


def target_loss(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor, *, head: torch.nn.Module | None,
                shift: int, softcap: float | None, label_smoothing: float = 0.0, rows: torch.Tensor | None = None,
                chunk_elements: int = LOGIT_CHUNK_ELEMENTS, check_logits: bool = False) -> CaptionLoss:
    """Run `model(**inputs)` (no labels in `inputs`) and score `labels` at their target positions.

    `head` (with StashingHead) is the output layer to apply at the targets only; None, or a head the forward did not
    call (a hook replaced its forward), scores the model's full logits instead. `shift`: how far a label is ahead of
    the position that predicts it (1 for decoder-only models, 0 for encoder-decoders, whose labels are the decoder's
    next tokens already). `softcap`: the model's final_logit_softcapping, applied to the head's output as its forward
    does. `rows`: [batch, labels] the sample each label belongs to (default: its batch row). `check_logits`: raise
    UnknownLogitTransform unless the forward returned the head's output as `softcap` says it does (once per model is
    enough: what a forward does after its head does not change between batches).
    """
    if head is None:
        return _score(model(**inputs).logits, labels, _identity, shift=shift, label_smoothing=label_smoothing,
                      rows=rows, chunk_rows=None)
    with stashing(head) as stash:
        outputs = model(**inputs)
    if stash.calls == 0:  # the head's forward was replaced (an accelerate hook): the logits are real ones
        return _score(outputs.logits, labels, _identity, shift=shift, label_smoothing=label_smoothing, rows=rows, chunk_rows=None)
    if stash.calls > 1:
        raise RuntimeError(f"the output head {type(head).__name__} ran {stash.calls} times in one forward; cannot tell which call made the logits")
    if check_logits and not _returned_as_expected(outputs.logits, stash.hidden, softcap):
        raise UnknownLogitTransform("its forward changes its output layer's result before returning it")
    del outputs  # its "logits" are the hidden states themselves (soft-capped where the model caps)
    project = _projection(head, stash.autocast, softcap)
    return _score(stash.hidden, labels, project, shift=shift, label_smoothing=label_smoothing, rows=rows,
                  chunk_rows=max(1, chunk_elements // output_width(head)))


def _returned_as_expected(returned: torch.Tensor, hidden: torch.Tensor, softcap: float | None) -> bool:
    """Whether the forward returned the stashing head's output (the hidden states) as the loss will treat real
    logits: unchanged (a dtype cast aside), or soft-capped by `softcap`."""
    with torch.no_grad():
        # In the hidden states' own dtype, as the forward did it; compared to a few units of its rounding.
        expected = hidden if softcap is None else torch.tanh(hidden / softcap) * softcap
        tolerance = 4 * torch.finfo(hidden.dtype).eps if hidden.is_floating_point() else 0.0
        return returned.shape == expected.shape and torch.allclose(returned.float(), expected.float(), rtol=tolerance, atol=tolerance)


def _identity(states: torch.Tensor) -> torch.Tensor:
    return states


def _projection(head: torch.nn.Module, autocast: tuple[str, bool, torch.dtype], softcap: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states -> logits as the model's forward makes them: the head under the forward's autocast, then the
    model's soft cap."""
    device_type, enabled, dtype = autocast

    def project(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            logits = head.logits(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return project


def _score(states: torch.Tensor, labels: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], *, shift: int,
           label_smoothing: float, rows: torch.Tensor | None, chunk_rows: int | None) -> CaptionLoss:
    """The loss of `labels` from `states` ([batch, positions, width]: hidden states or logits, whose last
    labels.shape[1] positions are the text's, e.g. after GIT's image tokens)."""
    selected, targets, target_rows = select_targets(states, labels, shift=shift, rows=rows)
    terms, nll = token_losses(project, selected, targets, label_smoothing=label_smoothing, chunk_rows=chunk_rows)
    n_rows = labels.shape[0] if rows is None else int(rows.max()) + 1
    row_sum = torch.zeros(n_rows, dtype=torch.float32, device=nll.device).index_add_(0, target_rows, nll)
    row_tokens = torch.bincount(target_rows, minlength=n_rows)
    # Sum over every target, divided by their count: the model's own mean (NaN, as there, when nothing is a target).
    return CaptionLoss(loss=terms.sum() / targets.numel(), row_loss_sum=row_sum, row_tokens=row_tokens)


def select_targets(states: torch.Tensor, labels: torch.Tensor, *, shift: int, rows: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states at the positions that predict a target [targets, width], the targets [targets], their rows [targets])."""
    length = labels.shape[1]
    text = states[:, states.shape[1] - length:]
    targets = labels[:, shift:].to(states.device)
    keep = targets != IGNORE_INDEX
    if rows is None:
        rows = torch.arange(labels.shape[0], device=states.device).unsqueeze(1).expand(-1, length)
    return text[:, : length - shift][keep], targets[keep], rows[:, shift:].to(states.device)[keep]


def token_losses(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, *,
                 label_smoothing: float, chunk_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(each target's loss term, smoothed as asked; its plain cross-entropy, fp32 and detached), in chunks of
    `chunk_rows` targets (None: one chunk) whose logits are recomputed in backward when there is more than one."""
    if chunk_rows is None or hidden.shape[0] <= chunk_rows:
        return _chunk_losses(project, hidden, targets, label_smoothing)
    recompute = torch.is_grad_enabled()
    pieces = []
    for start in range(0, hidden.shape[0], chunk_rows):
        args = (project, hidden[start:start + chunk_rows], targets[start:start + chunk_rows], label_smoothing)
        pieces.append(checkpoint(_chunk_losses, *args, use_reentrant=False) if recompute else _chunk_losses(*args))
    return torch.cat([terms for terms, _ in pieces]), torch.cat([nll for _, nll in pieces])


def _chunk_losses(project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    # F.cross_entropy's own maths: fp32 log-softmax; smoothing mixes in the mean over the vocabulary of -log p.
    log_probs = project(hidden).float().log_softmax(-1)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    terms = nll if not label_smoothing else (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
    return terms, nll.detach()
