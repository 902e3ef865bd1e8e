"""BLIP (`Salesforce/blip-image-captioning-base` / `-large`): loading, labels, adapter targets, generation.

    family = BlipFamily()
    model, processor = family.load("Salesforce/blip-image-captioning-base", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64)
    loss = model(**batch).loss
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from caption_train.models.base import (
    ModelFamily,
    apply_config_overrides,
    load_model_config,
    model_device,
    model_dtype,
    pop_load_kwargs,
    register,
    unwrap_peft,
)

IGNORE_INDEX = -100  # positions with this label are left out of the loss (torch CrossEntropyLoss default)


@register
class BlipFamily(ModelFamily):
    name = "blip"
    model_types = ("blip",)

    def load(self, name_or_path: str, overrides: dict[str, Any], *, label_smoothing: float = 0.0) -> tuple[torch.nn.Module, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "vision_config"))
        config.text_config.label_smoothing = label_smoothing
        model = BlipForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        processor = BlipProcessor.from_pretrained(name_or_path)
        return model, processor

    def max_text_length(self, model: torch.nn.Module) -> int:
        return int(unwrap_peft(model).config.text_config.max_position_embeddings)

    def lora_targets(self) -> list[str]:
        # peft ships no defaults for BLIP. Text decoder self- and cross-attention (query/key/value) and the
        # vision encoder's fused attention (qkv, projection): the modules that adapt captions most per parameter.
        return ["query", "key", "value", "qkv", "projection"]

    def ia3_targets(self) -> tuple[str, str]:
        # IA3 rescales keys/values and the input of each feed-forward down projection. In the BERT-style text
        # decoder the FF down projection is `layer.N.output.dense` (not `attention.output.dense`), hence regexes.
        targets = r".*\.(key|value|qkv|fc2)$|.*\.layer\.\d+\.output\.dense$"
        feedforward = r".*\.fc2$|.*\.layer\.\d+\.output\.dense$"
        return targets, feedforward

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).vision_model

    def collate(self, processor: Any, images: Sequence[Image.Image], captions: Sequence[str], *, max_length: int) -> dict[str, torch.Tensor]:
        encoded = processor(
            images=list(images),
            text=list(captions),
            padding="longest",  # dynamic padding: pad to the batch's longest caption, not to 512
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"].clone()
        # BLIP's generate() starts every caption from bos ([DEC]); the tokenizer starts it with [CLS].
        # Train from the token generation will actually use.
        input_ids[:, 0] = processor.tokenizer.bos_token_id
        labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
        return {
            "pixel_values": encoded["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"],
            "labels": labels,
        }

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None, **generate_kwargs: Any) -> list[str]:
        texts = [prompt] * len(images) if prompt else None
        inputs = processor(images=list(images), text=texts, return_tensors="pt")
        inputs = {k: v.to(model_device(model)) for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype(model))
        # Positions past the text model's limit would index off its position embeddings.
        prompt_length = inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1
        room = self.max_text_length(model) - prompt_length
        generate_kwargs["max_new_tokens"] = min(generate_kwargs.get("max_new_tokens") or 40, room)
        output = model.generate(**inputs, **generate_kwargs)
        return [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]
