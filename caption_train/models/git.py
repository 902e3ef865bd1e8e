"""GIT (`microsoft/git-base`, `microsoft/git-large-coco`, ...): loading, labels, adapter targets, generation.

    family = GitFamily()
    model, processor = family.load("microsoft/git-base", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64)
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)

GIT is one decoder over [image tokens | text tokens]: the image tokens come first inside the model, `input_ids`
and `labels` hold the text only, and forward() shifts labels by one internally (logits at text position t are
scored against labels[t + 1]). So labels line up with input_ids, like a causal LM's.
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
    model_device,
    model_dtype,
    pop_load_kwargs,
    register,
    swap_class,
    unwrap_peft,
)

# The text decoder's layers (BERT-style names) under git.encoder; the CLIP vision tower under git.image_encoder
# uses q_proj/k_proj/v_proj/out_proj/fc1/fc2, so these regexes leave it alone.
_TEXT_LAYER = r".*git\.encoder\.layer\.\d+\."
_LORA_TARGETS = _TEXT_LAYER + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)$"
_IA3_TARGETS = _TEXT_LAYER + r"(attention\.self\.(key|value)|output\.dense)$"
# IA3 scales the *input* of feed-forward modules: the MLP's down projection (layer.N.output.dense).
_IA3_FEEDFORWARD = _TEXT_LAYER + r"output\.dense$"


@register
class GitFamily(ModelFamily):
    name = "git"
    model_types = ("git",)
    supports_feature_cache = True

    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import GitForCausalLM

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("vision_config",))
        processor = load_processor(name_or_path)  # first: a folder without it fails before the weights load
        tokenizer = processor.tokenizer
        if tokenizer.cls_token_id is None or tokenizer("a")["input_ids"][0] != tokenizer.cls_token_id:
            # collate() trains from the tokenizer's leading [CLS], the token generate() starts from.
            raise UserError(f"model {name_or_path}: its tokenizer does not start texts with [CLS] (GIT's start token); save the BERT-style tokenizer that belongs to this model beside it")
        model = GitForCausalLM.from_pretrained(name_or_path, config=config, **load_kwargs)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        # Only text tokens take position embeddings; the image tokens in front of them do not count.
        return int(config.max_position_embeddings)

    def lora_targets(self) -> str:
        # Attention (query/key/value/output) and MLP (intermediate/output) of the text decoder; vision tower frozen.
        return _LORA_TARGETS

    def ia3_targets(self) -> tuple[str, str]:
        return _IA3_TARGETS, _IA3_FEEDFORWARD

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).git.image_encoder

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).git.encoder

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        # It sees [image tokens | text]; the loss takes the text's positions (the last labels.shape[1]).
        return unwrap_peft(model).output

    def packing_refusal(self, model: torch.nn.Module) -> str:
        return "GIT puts each row's image tokens before its text and builds its own attention mask over them"

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        swap_class(self.vision_tower(model), _FrozenImageEncoder)

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, int]:
        # The image encoder's output, before git.visual_projection (which stays in the step: it may be trained).
        vision = unwrap_peft(model).config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size  # patches + [CLS]

    def feature_inputs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        # GitModel only passes 4-D (image) or 5-D (video) pixel_values to its image encoder: features go in as
        # [batch, 1, tokens, width], which _FrozenImageEncoder tells from [batch, channels, height, width].
        return {"pixel_values": features.unsqueeze(1)}

    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        tokenizer = processor.tokenizer
        encoded = tokenizer(
            list(captions),
            padding="longest",
            # Right padding always: GIT numbers text positions from the first text token, and generation starts
            # [CLS] at position 0 right after the image tokens. Left pads would shift every caption's positions.
            padding_side="right",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"]  # [CLS] caption [SEP] [PAD]... (load() checked the [CLS])
        # Targets: caption tokens and the [SEP] after them. [CLS] is the given start (never predicted) and pads
        # are not text: both -100.
        labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}
        return batch | self.pixel_inputs(processor, images)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        tokenizer = processor.tokenizer
        device = model_device(model)
        pixel_values = self.generation_pixels(processor, images, features).to(device, model_dtype(self.vision_tower(model)))
        # Start from [CLS], as training does (GIT's own config.bos_token_id is [CLS] too; passing it makes the
        # start token independent of the generation config). A prompt (conditional captioning) follows it and,
        # as with BLIP, stays in the caption.
        start = [tokenizer.cls_token_id]
        if prompt:
            start += tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]  # (too long: refused below)
        input_ids = torch.tensor([start] * len(images), device=device)
        generate_kwargs["max_new_tokens"] = self.new_token_budget(model, input_ids.shape[1], generate_kwargs.get("max_new_tokens"), prompt)
        generate_kwargs.setdefault("eos_token_id", tokenizer.sep_token_id)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = model.generate(pixel_values=pixel_values, input_ids=input_ids, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


class _FrozenImageEncoder(FrozenVisionTower):
    """GIT's frozen image encoder: takes features as [batch, 1, tokens, width] (see GitFamily.feature_inputs)."""

    def cached_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        if pixel_values.dim() == 4 and pixel_values.shape[1] == 1 != self.config.num_channels:
            return pixel_values[:, 0]
        return None
