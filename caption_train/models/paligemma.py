"""PaliGemma / PaliGemma 2 (`google/paligemma2-3b-pt-224`): a task prefix (prompt) and the caption as suffix, through
the processor's own `suffix=`, which marks the suffix (token type 1) as the only targets.

    family, _ = resolve_family("google/paligemma2-3b-pt-224")
    model, processor = family.load("google/paligemma2-3b-pt-224", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=128, prompt="caption en")
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)

The processor writes `<image>*N <bos> prompt \\n` (one `<image>` in our text, expanded; token type 0: attended bidirectionally, never a target) then
`caption <eos>` (token type 1: the targets). Generation feeds the same prefix and decodes what follows it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from caption_train.errors import UserError
from caption_train.models.base import (
    IGNORE_INDEX,
    FrozenVisionTower,
    ModelFamily,
    apply_config_overrides,
    load_model_config,
    load_processor,
    pop_load_kwargs,
    register,
    swap_class,
    to_model,
    unwrap_peft,
)
from caption_train.models.chat_vlm import IA3_FEEDFORWARD, IA3_TARGETS, LORA_TARGETS


@register
class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_types = ("paligemma",)
    # PaliGemma's own captioning task prefix (big_vision: "caption <lang>"); the pretrained checkpoints know it.
    default_prompt = "caption en"
    supports_feature_cache = True  # SigLIP's output is cached; the multi-modal projector runs every step

    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "vision_config"))
        processor = load_processor(name_or_path, PaliGemmaProcessor)
        model = PaliGemmaForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        return int(config.text_config.max_position_embeddings)

    def lora_targets(self) -> str:
        return LORA_TARGETS  # Gemma's attention and MLP projections; SigLIP's q/k/v (vision tower) stay frozen

    def ia3_targets(self) -> tuple[str, str]:
        return IA3_TARGETS, IA3_FEEDFORWARD

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).model.vision_tower

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).get_decoder()

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).lm_head  # (PaliGemma 2's soft cap: ModelFamily.logit_softcap)

    # ---- packing (packing.py): positions restart per row (rotary: only their differences count, so from 0 as well as
    # the forward's own 1); the prefix's bidirectional block is built from token_type_ids over the packed sequence,
    # and transformers 5.25 intersects it with the per-row mask, so it stays within each row (tests/test_packing.py).
    def packing_refusal(self, model: torch.nn.Module) -> None:
        return None

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        # get_image_features hands pixel_values to the vision tower unchecked: [batch, tokens, width] features
        # reach the frozen tower, which returns them as its last_hidden_state.
        swap_class(self.vision_tower(model), FrozenVisionTower)

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, int]:
        vision = unwrap_peft(model).config.vision_config
        return (vision.image_size // vision.patch_size) ** 2, vision.hidden_size  # one token per patch

    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        prompt = prompt or self.default_prompt
        tokenizer = processor.tokenizer
        captions = [caption.strip() for caption in captions]
        for caption in captions:
            if not tokenizer(caption, add_special_tokens=False)["input_ids"]:
                raise UserError(f"caption {caption!r} tokenizes to nothing with this model's tokenizer; fix or remove its .txt file")
        prefix = processor.image_seq_length + 1 + len(tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"])  # images, <bos>, prompt
        if max_length - prefix < 2:  # a caption token and <eos>
            raise UserError(f"max_length {max_length}: the prompt with its image takes {prefix} tokens, leaving no room for a caption; "
                            "raise --max_length or shorten --prompt")
        # truncation="only_second": a long caption loses its end, never the prefix (the image tokens must all stay).
        # The text does not depend on the pixels (image_seq_length placeholders per image): an image whose features
        # are cached (None) is stood in for by a blank one, and its pixel_values are dropped.
        stand_in = Image.new("RGB", (16, 16))  # not 1x1, whose channel layout numpy-based processors misread
        encoded = processor(images=[stand_in if image is None else image for image in images], text=[processor.image_token + prompt] * len(images),
                            suffix=captions, padding="longest", truncation="only_second", max_length=max_length, return_tensors="pt")
        batch = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        if rows := [row for row, image in enumerate(images) if image is not None]:
            batch["pixel_values"] = encoded["pixel_values"][rows]
        batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        _end_truncated_rows(batch, tokenizer.eos_token_id)
        return batch

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        tokenizer = processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # decoder-only: every row's prefix must end where generation starts
        try:
            inputs = processor(images=list(images), text=[processor.image_token + (prompt or self.default_prompt)] * len(images), padding="longest", return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        if features is not None:  # the frozen tower's cached output, taken in place of the pixels
            inputs["pixel_values"] = self.feature_inputs(features)["pixel_values"]
        inputs = to_model(inputs, model)
        prompt_length = inputs["input_ids"].shape[1]
        room = self.max_text_length(model) - prompt_length
        generate_kwargs["max_new_tokens"] = max(1, min(generate_kwargs.get("max_new_tokens") or 40, room))
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = model.generate(**inputs, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)]


def _end_truncated_rows(batch: dict[str, torch.Tensor], eos_id: int) -> None:
    """A caption cut at max_length lost its <eos>: make its last token <eos> (a target), so the model still learns
    to stop rather than to run off the end."""
    mask = batch["attention_mask"].bool()
    for row in range(mask.shape[0]):
        last = int(mask[row].nonzero().max())
        if batch["input_ids"][row, last] != eos_id:
            batch["input_ids"][row, last] = eos_id
            batch["labels"][row, last] = eos_id
