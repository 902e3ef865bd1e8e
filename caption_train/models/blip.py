"""BLIP (`Salesforce/blip-image-captioning-base` / `-large`): loading, labels, adapter targets, generation.

    family = BlipFamily()
    model, processor = family.load("Salesforce/blip-image-captioning-base", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64)
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from caption_train.errors import UserError
from caption_train.models.base import (
    IGNORE_INDEX,
    FrozenPooledVisionTower,
    ModelFamily,
    apply_config_overrides,
    swap_class,
    load_model_config,
    load_processor,
    model_device,
    model_dtype,
    pop_load_kwargs,
    register,
    unwrap_peft,
)


@register
class BlipFamily(ModelFamily):
    name = "blip"
    model_types = ("blip",)
    supports_feature_cache = True

    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "vision_config"))
        # transformers runs BLIP's attention eagerly only; "sdpa" (the default) swaps in our SDPA attention below.
        attention = load_kwargs.pop("attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise UserError(f"model_config.attn_implementation {attention!r}: BLIP supports 'sdpa' (default) or 'eager'")
        processor = load_processor(name_or_path, BlipProcessor)  # first: a folder without it fails before the weights load
        model = BlipForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        if attention == "sdpa":
            use_sdpa_attention(model)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        return int(config.text_config.max_position_embeddings)

    def lora_targets(self) -> list[str]:
        # peft ships no defaults for BLIP. The text decoder's self- and cross-attention (query/key/value) only:
        # measured against also adapting the vision tower (qkv, projection) in benchmarks/quality_defaults.py
        # (README, "Default adapter targets"), and a frozen tower lets image features be computed once.
        return ["query", "key", "value"]

    def ia3_targets(self) -> tuple[str, str]:
        # IA3 rescales keys/values and the input of each feed-forward down projection, of the text decoder only
        # (like the LoRA default): the vision tower stays frozen, so its features can be cached. In the BERT-style
        # decoder the FF down projection is `layer.N.output.dense` (not `attention.output.dense`), hence regexes.
        # Add the tower's `qkv`/`fc2` through peft_args to rescale it too.
        feedforward = r"text_decoder\..*\.layer\.\d+\.output\.dense"
        targets = rf"text_decoder\..*\.(key|value)|{feedforward}"
        return targets, feedforward

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).vision_model

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).text_decoder

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        # The whole prediction head (dense, GELU, LayerNorm, then the vocabulary projection), not just its decoder.
        return unwrap_peft(model).text_decoder.cls

    def packing_refusal(self, model: torch.nn.Module) -> str:
        return "BLIP's text decoder cross-attends to one image per sequence"

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        swap_class(self.vision_tower(model), FrozenPooledVisionTower)  # takes its own output for pixels

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, int]:
        vision = unwrap_peft(model).config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size  # patches + [CLS]

    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        encoded = processor.tokenizer(
            list(captions),
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
        batch = {"input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}
        return batch | self.pixel_inputs(processor, images)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        texts = [prompt] * len(images) if prompt else None
        # verbose=False: no "longer than the maximum" warning; a prompt too long is refused below, in one line.
        inputs = dict(processor.tokenizer(texts, return_tensors="pt", verbose=False)) if texts else {}
        inputs["pixel_values"] = self.generation_pixels(processor, images, features)
        inputs = {k: v.to(model_device(model)) for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype(self.vision_tower(model)))
        # BLIP's generate() drops the tokenizer's trailing [SEP] and starts from [DEC] alone without a prompt.
        prompt_length = inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1
        generate_kwargs["max_new_tokens"] = self.new_token_budget(model, prompt_length, generate_kwargs.get("max_new_tokens"), prompt)
        output = model.generate(**inputs, **generate_kwargs)
        return [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------
# Module surgery owned by this family: SDPA attention (its frozen tower is models/base.FrozenPooledVisionTower).


class _SdpaVisionAttention:
    """BlipAttention (vision) through scaled_dot_product_attention: same maths as the eager code, fused kernel."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=dropout, scale=self.scale)
        return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


class _SdpaTextSelfAttention:
    """BlipTextSelfAttention (self- and cross-attention of the decoder) through scaled_dot_product_attention.
    The key/value cache handling is the eager code's; only the attention core changes."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.cache_utils import EncoderDecoderCache

        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross else attention_mask
        layer_cache, reuse = cache, False
        if cache is not None and isinstance(cache, EncoderDecoderCache):
            reuse = is_cross and bool(cache.is_updated.get(self.layer_idx))
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if reuse:
            key, value = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        else:
            source = encoder_hidden_states if is_cross else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.attention_head_size)
            key = self.key(source).view(kv_shape).transpose(1, 2)
            value = self.value(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        if mask is not None and mask.dtype != torch.bool:
            # Additive float mask built in fp32; SDPA wants the query's dtype (clamped so fp16 keeps no -inf rows).
            mask = mask.to(query.device).clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        dropout = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
        return context, None


def use_sdpa_attention(model: torch.nn.Module) -> None:
    """Swap every BLIP attention module's class for its SDPA twin (weights and state dict keys unchanged)."""
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    for module in model.modules():
        if isinstance(module, BlipAttention):
            swap_class(module, _SdpaVisionAttention)
        elif isinstance(module, BlipTextSelfAttention):
            swap_class(module, _SdpaTextSelfAttention)

