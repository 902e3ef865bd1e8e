"""BLIP-2 with a decoder-only language model (`Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, ...): loading, labels,
adapter targets, generation.

    family = Blip2Family()
    model, processor = family.load("Salesforce/blip2-opt-2.7b", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64)
    loss = model(**batch).loss

The language model reads [<image> x num_query_tokens | bos | caption | eos]: the Q-Former's outputs replace the
<image> placeholders, bos (OPT's `</s>`) is where generate() starts, and forward() shifts labels internally (labels
line up with input_ids). Targets are the caption tokens and the eos after them only.
BLIP-2 with Flan-T5 (an encoder-decoder language model) is not covered yet: load() says so.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from caption_train.errors import UserError
from caption_train.models.base import (
    IGNORE_INDEX,
    FrozenPooledVisionTower,
    ModelFamily,
    apply_config_overrides,
    load_model_config,
    model_device,
    model_dtype,
    pop_load_kwargs,
    register,
    swap_class,
    unwrap_peft,
)
from caption_train.models.git import use_label_smoothing

# The OPT decoder's attention and MLP. The ViT (mlp.fc1/fc2) and the Q-Former stay frozen: anchored on language_model.
_LM_LAYER = r".*language_model\.model\.decoder\.layers\.\d+\."
_LORA_TARGETS = _LM_LAYER + r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$"
_IA3_TARGETS = _LM_LAYER + r"(self_attn\.(k_proj|v_proj)|fc2)$"
_IA3_FEEDFORWARD = _LM_LAYER + r"fc2$"  # IA3 scales the input of the MLP's down projection


@register
class Blip2Family(ModelFamily):
    name = "blip-2"
    model_types = ("blip-2",)
    supports_feature_cache = True  # the ViT's output is cached; the Q-Former and projection run every step

    def load(self, name_or_path: str, overrides: dict[str, Any], *, label_smoothing: float = 0.0) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        config = load_model_config(name_or_path)
        if not config.use_decoder_only_language_model:
            raise UserError(f"model {name_or_path}: BLIP-2 with an encoder-decoder language model ({config.text_config.model_type}) is not supported yet; use a BLIP-2 OPT model such as Salesforce/blip2-opt-2.7b")
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "qformer_config", "vision_config"))
        model = Blip2ForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        processor = AutoProcessor.from_pretrained(name_or_path)
        # Older hub processors leave num_query_tokens unset (the model then added the query tokens itself).
        if processor.num_query_tokens is None:
            processor.num_query_tokens = config.num_query_tokens
        image_token = _image_token_id(processor)
        if image_token != config.image_token_id or processor.num_query_tokens != config.num_query_tokens:
            raise UserError(f"model {name_or_path}: the processor's image placeholder (id {image_token}, {processor.num_query_tokens} tokens) does not match the model config's (image_token_index {config.image_token_id}, num_query_tokens {config.num_query_tokens}); save the processor that belongs to this model beside it")
        if label_smoothing:
            use_label_smoothing(model, label_smoothing, config.text_config.vocab_size)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        # The query tokens take positions of the language model too.
        return int(config.text_config.max_position_embeddings) - int(config.num_query_tokens)

    def lora_targets(self) -> str:
        return _LORA_TARGETS

    def ia3_targets(self) -> tuple[str, str]:
        return _IA3_TARGETS, _IA3_FEEDFORWARD

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).vision_model

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).language_model

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        # Blip2ForConditionalGeneration hands pixel_values to its vision_model unchecked: [batch, tokens, width]
        # features from the cache reach the frozen tower, which returns them (and their pooled [CLS]) as its output.
        swap_class(self.vision_tower(model), FrozenPooledVisionTower)

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, int]:
        vision = unwrap_peft(model).config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size  # patches + [CLS]

    # ---- data

    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        tokenizer = processor.tokenizer
        start = self.start_ids(processor)  # the query placeholders and bos: generate() starts from the same
        words = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
        sequences = [[*start, *ids, tokenizer.eos_token_id] for ids in words]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            # Right padding: the language model's positions then count from the first query token in every row,
            # as in generation. Targets: caption + eos (the placeholders and bos are given, pads are not text).
            n = len(sequence)
            input_ids[row, :n] = torch.tensor(sequence)
            attention_mask[row, :n] = 1
            labels[row, len(start):n] = input_ids[row, len(start):n]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return batch | self.pixel_inputs(processor, images)

    def start_ids(self, processor: Any) -> list[int]:
        return [_image_token_id(processor)] * processor.num_query_tokens + [processor.tokenizer.bos_token_id]

    # ---- inference

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        tokenizer = processor.tokenizer
        device = model_device(model)
        pixel_values = self.generation_pixels(processor, images, features).to(device, model_dtype(model))
        start = self.start_ids(processor)
        if prompt:  # conditional captioning: the caption continues the prompt, which stays in it (as with BLIP)
            start += tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([start] * len(images), device=device)
        room = self.max_text_length(model) - (input_ids.shape[1] - processor.num_query_tokens)
        generate_kwargs["max_new_tokens"] = max(1, min(generate_kwargs.get("max_new_tokens") or 40, room))
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **generate_kwargs)
        # The output repeats the input: drop the placeholders (bos is special and decodes to nothing).
        texts = tokenizer.batch_decode(output[:, processor.num_query_tokens:], skip_special_tokens=True)
        return [text.strip() for text in texts]


def _image_token_id(processor: Any) -> int:
    token = processor.image_token
    return int(processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token)))
