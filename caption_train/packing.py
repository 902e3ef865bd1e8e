"""Padding-free batches: a batch's rows concatenated into one sequence whose position ids restart at each row.

    plan = plan_packing("auto", family, model, batch_size=8)   # on or off, and why: plan.message, one start-up line
    inputs = plan.pack(model, batch)       # the model's inputs (after the feature cache), a PackedBatch when on
    model(**inputs)                        # one sequence; inputs.rows: the row each position belongs to

Given no attention mask and position ids that restart at each row, transformers (5.25, masking_utils) finds the rows
in the position ids and builds a block-diagonal causal mask for SDPA and eager attention (each row attends to itself
only), and FlashAttention runs its variable-length kernels over the rows; no position is padding. Rows keep their own
positions: each row's position ids are the ones the model numbers it with on its own (the family's row_position_ids;
for Qwen2-VL/2.5-VL the 3D M-RoPE positions from get_rope_index, computed per row of the padded batch, with the text
positions in front as transformers expects of packed 3D positions). Image inputs stay as they are: a row's image
tokens keep their order in the packed sequence, so the vision features (computed or from the cache) land where they
did. Every row starts with prompt tokens, which are never targets, so no row's loss reads the row before it.

On SDPA and eager attention the packed mask is [positions, positions] over the whole packed sequence: the linear
layers (most of the work at these lengths) skip the padding, attention is computed masked over the pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from caption_train.errors import UserError

PACKING_MODES = ("auto", "on", "off")


class PackedBatch(dict):
    """A packed batch: the model's keyword arguments (the dict itself), and `rows`, [1, positions], the batch row
    (sample) each position belongs to, for per-row losses: an attribute, not a key, so the forward never sees it."""

    rows: torch.Tensor


def packed_rows(batch: dict[str, Any]) -> torch.Tensor | None:
    """The row index of a packed batch ([1, positions]: which sample each position belongs to), None for a padded
    one: what a loss sums per sample by (each row's own index is the default)."""
    return getattr(batch, "rows", None)


def pack_rows(batch: dict[str, Any], positions: torch.Tensor) -> PackedBatch:
    """`batch` (padded, with an attention_mask) as one sequence without padding. `positions`: each row's position ids,
    [rows, length] or [axes, rows, length] (Qwen's text + 3D positions). Per-token tensors (input_ids, labels,
    mm_token_type_ids, token_type_ids) lose their padding and become [1, tokens]; everything else (pixels, image
    sizes, cached image features) is kept as it is."""
    keep = batch["attention_mask"].bool()
    packed = PackedBatch()
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        packed[key] = value[keep].unsqueeze(0) if isinstance(value, torch.Tensor) and value.shape == keep.shape else value
    packed["position_ids"] = positions[..., keep].unsqueeze(-2).to(keep.device)
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)
    packed.rows = rows[keep].unsqueeze(0)
    # transformers looks for packed rows only where no cache is built (a forward with use_cache on makes one).
    packed["use_cache"] = False
    return packed


@dataclass(frozen=True)
class PackingPlan:
    """Whether the training and validation batches are packed, and the one start-up line that says why."""

    on: bool
    message: str
    family: Any = None

    def pack(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs for a collated batch: packed when the plan is on, else `batch` itself."""
        if not self.on:
            return batch
        return pack_rows(batch, self.family.row_position_ids(model, batch))


def plan_packing(requested: str, family: Any, model: torch.nn.Module, *, batch_size: int) -> PackingPlan:
    """`--packing auto|on|off`: `auto` packs where the family says the model can take it; `on` where it cannot is an
    error naming why; a batch of one row has nothing to pack."""
    if requested not in PACKING_MODES:
        raise UserError(f"--packing {requested!r}: choose one of {', '.join(PACKING_MODES)}")
    if requested == "off":
        return PackingPlan(False, "packing: off (--packing off): rows padded to their batch's longest")
    refusal = family.packing_refusal(model)
    if refusal is not None:
        if requested == "on":
            raise UserError(f"--packing on: {refusal}; use --packing auto or off")
        return PackingPlan(False, f"packing: off ({refusal}): rows padded to their batch's longest")
    if batch_size == 1:
        return PackingPlan(False, "packing: off (batch size 1: nothing to pack)")
    attention = attention_implementation(model)
    if attention == "eager" and requested == "auto":
        # Eager attention keeps [heads, positions, positions] weights for backward: over a whole packed batch that is
        # about batch-size times what its padded rows hold.
        return PackingPlan(False, "packing: off (auto: eager attention would hold the whole packed batch's attention weights; "
                                  "use sdpa or flash_attention_2, or --packing on)")
    kernel = "variable-length FlashAttention" if attention and attention.startswith("flash") else f"{attention or 'its attention'} with a per-row mask"
    return PackingPlan(True, f"packing: on ({requested}): each batch's rows in one sequence without padding, positions restarting per row ({kernel})", family)


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation of the model's text side (sdpa, eager, flash_attention_2, ...)."""
    from caption_train.models.base import unwrap_peft

    config = unwrap_peft(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
