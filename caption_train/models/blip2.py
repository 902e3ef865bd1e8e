"""BLIP-2 with a decoder-only (OPT: `Salesforce/blip2-opt-2.7b`, ...) or an encoder-decoder (Flan-T5:
`Salesforce/blip2-flan-t5-xl`, ...) language model: loading, labels, adapter targets, generation.

    family = Blip2Family()
    model, processor = family.load("Salesforce/blip2-opt-2.7b", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64)
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)

The language model reads [<image> x num_query_tokens | bos | caption | eos]: the Q-Former's outputs replace the
<image> placeholders, bos (OPT's `</s>`) is where generate() starts, and forward() shifts labels internally (labels
line up with input_ids). Targets are the caption tokens and the eos after them only.

With Flan-T5 the encoder reads [<image> x num_query_tokens] and `labels` are [caption | eos] alone: T5 shifts them
right behind its decoder_start_token_id (pad) itself, and generate() returns the decoder's tokens only. The layout
follows the tokenizer (OPT's starts texts from a bos, T5's has none: `_is_encoder_decoder`); load() checks that the
model config agrees.
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
    load_processor,
    model_device,
    model_dtype,
    pop_load_kwargs,
    register,
    swap_class,
    unwrap_peft,
)

# The language model's attention and MLP: OPT's decoder layers, or T5's encoder and decoder blocks (self- and
# cross-attention q/k/v/o, feed-forward wi or gated wi_0/wi_1, and wo). A model has one of the two layouts, so one
# pattern serves both. The ViT (mlp.fc1/fc2) and the Q-Former stay frozen: anchored on language_model.
_OPT_LAYER = r".*language_model\.model\.decoder\.layers\.\d+\."
_T5_LAYER = r".*language_model\.(encoder|decoder)\.block\.\d+\.layer\.\d+\."
_T5_ATTENTION = r"(SelfAttention|EncDecAttention)\."
_LORA_TARGETS = (rf"(?:{_OPT_LAYER}(self_attn\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$)"
                 rf"|(?:{_T5_LAYER}({_T5_ATTENTION}(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))$)")
_IA3_TARGETS = rf"(?:{_OPT_LAYER}(self_attn\.(k_proj|v_proj)|fc2)$)|(?:{_T5_LAYER}({_T5_ATTENTION}(k|v)|DenseReluDense\.wo)$)"
# IA3 scales the input of the MLP's down projection
_IA3_FEEDFORWARD = rf"(?:{_OPT_LAYER}fc2$)|(?:{_T5_LAYER}DenseReluDense\.wo$)"
_T5_TEXT_LIMIT = 512  # T5's positions are relative: Flan-T5's tokenizers say model_max_length 512


@register
class Blip2Family(ModelFamily):
    name = "blip-2"
    model_types = ("blip-2",)
    supports_feature_cache = True  # the ViT's output is cached; the Q-Former and projection run every step

    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import Blip2ForConditionalGeneration

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "qformer_config", "vision_config"))
        processor = load_processor(name_or_path)
        if _is_encoder_decoder(processor) == config.use_decoder_only_language_model:
            has = "no bos token" if _is_encoder_decoder(processor) else f"a bos token ({processor.tokenizer.bos_token})"
            raise UserError(f"model {name_or_path}: its tokenizer has {has}, which does not fit its {config.text_config.model_type} language model; save the processor that belongs to this model beside it")
        # Older hub processors leave num_query_tokens unset (the model then added the query tokens itself).
        if processor.num_query_tokens is None:
            processor.num_query_tokens = config.num_query_tokens
        image_token = _image_token_id(processor)
        if image_token != config.image_token_id or processor.num_query_tokens != config.num_query_tokens:
            raise UserError(f"model {name_or_path}: the processor's image placeholder (id {image_token}, {processor.num_query_tokens} tokens) does not match the model config's (image_token_index {config.image_token_id}, num_query_tokens {config.num_query_tokens}); save the processor that belongs to this model beside it")
        model = Blip2ForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        if not config.use_decoder_only_language_model:  # the captions are the decoder's alone
            return int(getattr(config.text_config, "n_positions", None) or _T5_TEXT_LIMIT)
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

    # ---- the loss

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).language_model.lm_head  # OPT's or T5's (T5 rescales its input before it, inside)

    def label_shift(self, model: torch.nn.Module) -> int:
        return 1 if unwrap_peft(model).config.use_decoder_only_language_model else 0  # T5's labels are its next tokens

    def loss_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = super().loss_inputs(model, batch)
        config = unwrap_peft(model).config
        if not config.use_decoder_only_language_model and "decoder_input_ids" not in inputs:
            # What T5 builds from labels it is given: decoder_start_token_id, then the labels shifted right, pads for -100.
            labels = batch["labels"]
            start = torch.full_like(labels[:, :1], config.text_config.decoder_start_token_id)
            shifted = torch.cat([start, labels[:, :-1]], dim=1)
            inputs["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE_INDEX, config.text_config.pad_token_id)
        return inputs

    def packing_refusal(self, model: torch.nn.Module) -> str:
        return "BLIP-2 feeds each row's image to its language model as query tokens at the start of the sequence (OPT) or to its encoder (Flan-T5)"

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
        if _is_encoder_decoder(processor):
            return self._collate_encoder_decoder(processor, images, captions, max_length=max_length)
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

    def _collate_encoder_decoder(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *,
                                 max_length: int) -> dict[str, torch.Tensor]:
        """Flan-T5: the encoder reads the query placeholders; labels are caption + eos, padded with IGNORE_INDEX
        (T5 builds its decoder inputs from them: decoder_start_token_id, then the labels shifted right)."""
        tokenizer = processor.tokenizer
        words = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
        targets = [[*ids, tokenizer.eos_token_id] for ids in words]
        labels = torch.full((len(targets), max(len(target) for target in targets)), IGNORE_INDEX, dtype=torch.long)
        for row, target in enumerate(targets):
            labels[row, :len(target)] = torch.tensor(target)
        input_ids = torch.tensor([self.start_ids(processor)] * len(targets))
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        return batch | self.pixel_inputs(processor, images)

    def start_ids(self, processor: Any) -> list[int]:
        """What the language model reads before the caption: the query placeholders, then (OPT) bos. T5's
        decoder starts from its own decoder_start_token_id, so its encoder reads the placeholders alone."""
        bos = [] if _is_encoder_decoder(processor) else [processor.tokenizer.bos_token_id]
        return [_image_token_id(processor)] * processor.num_query_tokens + bos

    # ---- inference

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        tokenizer = processor.tokenizer
        device = model_device(model)
        pixel_values = self.generation_pixels(processor, images, features).to(device, model_dtype(self.vision_tower(model)))
        start = self.start_ids(processor)
        if prompt:  # conditional captioning: the caption continues the prompt, which stays in it (as with BLIP)
            start += tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([start] * len(images), device=device)
        # T5's encoder reads the prompt, its decoder only the caption; OPT's positions hold bos and prompt too.
        given = 0 if _is_encoder_decoder(processor) else input_ids.shape[1] - processor.num_query_tokens
        room = self.max_text_length(model) - given
        generate_kwargs["max_new_tokens"] = max(1, min(generate_kwargs.get("max_new_tokens") or 40, room))
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **generate_kwargs)
        # OPT's output repeats the input: drop the placeholders (bos is special and decodes to nothing). T5's is the
        # decoder's tokens alone (its leading pad is special).
        if not _is_encoder_decoder(processor):
            output = output[:, processor.num_query_tokens:]
        texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.strip() for text in texts]


def _is_encoder_decoder(processor: Any) -> bool:
    """Whether the processor is BLIP-2 Flan-T5's: T5's tokenizer has no bos token (its decoder starts from pad);
    OPT's puts bos before every text, and generation starts from it. load() checks the model config agrees."""
    return processor.tokenizer.bos_token_id is None


def _image_token_id(processor: Any) -> int:
    token = processor.image_token
    return int(processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token)))
