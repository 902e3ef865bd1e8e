"""Florence-2 (`florence-community/Florence-2-base` / `-large`, native transformers class): loading, labels,
adapter targets, generation.

    family = Florence2Family()
    model, processor = family.load("florence-community/Florence-2-base", {})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64, prompt="<CAPTION>")
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)

An encoder-decoder: the encoder reads [image tokens | <s> task prompt </s>] (the processor expands `<CAPTION>`
into its sentence), the BART decoder writes the caption. The decoder starts from `</s> <s>` (BART's
decoder_start_token_id, then bos) in training and in generation; its targets are the caption and `</s>` only.
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

# The BART language model's attention (self and cross) and MLP; the DaViT vision tower also has fc1/fc2 and
# qkv/proj, so the patterns are anchored on language_model.
_LM_LAYER = r".*language_model\.(encoder|decoder)\.layers\.\d+\."
_LORA_TARGETS = _LM_LAYER + r"((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)$"
_IA3_TARGETS = _LM_LAYER + r"((self_attn|encoder_attn)\.(k_proj|v_proj)|fc2)$"
_IA3_FEEDFORWARD = _LM_LAYER + r"fc2$"  # IA3 scales the input of the MLP's down projection


@register
class Florence2Family(ModelFamily):
    name = "florence2"
    model_types = ("florence2",)
    supports_feature_cache = True  # DaViT's feature map is cached; the multi-modal projector runs every step
    default_prompt = "<CAPTION>"  # or <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, or any text

    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import Florence2ForConditionalGeneration

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        apply_config_overrides(config, overrides, sub_configs=("text_config", "vision_config"))
        processor = load_processor(name_or_path)  # first: a folder without it fails before the weights load
        start, eos = config.text_config.decoder_start_token_id, processor.tokenizer.eos_token_id
        if start != eos:
            # collate() starts the decoder from the tokenizer's </s> (BART's convention); generation from the config's.
            raise UserError(f"model {name_or_path}: text_config.decoder_start_token_id is {start} but the tokenizer's </s> is {eos}; the Florence-2 family expects them equal (BART layout)")
        model = Florence2ForConditionalGeneration.from_pretrained(name_or_path, config=config, **load_kwargs)
        return model, processor

    def text_length_limit(self, config: Any) -> int:
        return int(config.text_config.max_position_embeddings)

    def lora_targets(self) -> str:
        return _LORA_TARGETS

    def ia3_targets(self) -> tuple[str, str]:
        return _IA3_TARGETS, _IA3_FEEDFORWARD

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).model.vision_tower

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).model.language_model

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).lm_head

    def label_shift(self, model: torch.nn.Module) -> int:
        return 0  # the decoder reads `</s> <s> caption` (collate's decoder_input_ids): labels are its next tokens

    def packing_refusal(self, model: torch.nn.Module) -> str:
        return "Florence-2 is an encoder-decoder: its caption decoder cross-attends to one encoded image and prompt per sequence"

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        swap_class(self.vision_tower(model), _FrozenVisionBackbone)

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, int, int]:
        """DaViT's output: a [channels, height, width] feature map, its size that of the processor's pixels
        after each stage's strided convolution."""
        vision = unwrap_peft(model).config.vision_config
        image_processor = processor.image_processor
        size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if not height or not width:
            raise UserError(f"the Florence-2 image processor resizes to {size}, not to a fixed height and width, "
                            "so its feature maps differ in size (--cache_image_features auto or off computes them every step)")
        for kernel, stride, padding in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
            height, width = ((n + 2 * padding - kernel) // stride + 1 for n in (height, width))
        return vision.embed_dim[-1], height, width

    # ---- data

    def encoder_inputs(self, processor: Any, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / pixel_values of the encoder: image tokens, then the task prompt."""
        prompt = prompt or self.default_prompt
        try:
            return dict(processor(images=list(images), text=[prompt] * len(images), padding=True, return_tensors="pt"))
        except ValueError as err:  # e.g. "Task token <CAPTION> should be the only content in the prompt."
            raise UserError(f"--prompt {prompt!r}: Florence-2's processor refuses it ({err})") from None

    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        tokenizer = processor.tokenizer
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        # The caption's own tokens, cut to leave room for <s> and </s> (the decoder's max_length in all).
        words = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
        sequences = [[bos, *ids, eos] for ids in words]
        width = max(len(sequence) for sequence in sequences)
        decoder_input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        decoder_attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            # Decoder reads `</s> <s> caption` (right-padded) and predicts `<s> caption </s>` one step ahead. The
            # <s> is given (generate() starts from `</s> <s>` too), so its label is -100: targets are caption + </s>.
            n = len(sequence)
            decoder_input_ids[row, :n] = torch.tensor([eos, *sequence[:-1]])
            decoder_attention_mask[row, :n] = 1
            labels[row, 1:n] = torch.tensor(sequence[1:])
        batch = {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask, "labels": labels}
        # The encoder's text does not depend on the pixels (a fixed number of image tokens): an image whose features
        # are cached (None) is stood in for by a blank one, and its pixel_values are dropped.
        stand_in = Image.new("RGB", (16, 16))  # not 1x1, whose channel layout numpy-based processors misread
        encoder = self.encoder_inputs(processor, [stand_in if image is None else image for image in images], prompt)
        rows = [row for row, image in enumerate(images) if image is not None]
        pixels = encoder.pop("pixel_values")
        if rows:
            encoder["pixel_values"] = pixels[rows]
        return encoder | batch

    # ---- inference

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        tokenizer = processor.tokenizer
        device = model_device(model)
        inputs = {k: v.to(device) for k, v in self.encoder_inputs(processor, images, prompt).items()}
        if features is not None:  # the frozen backbone's cached output, taken in place of the pixels
            inputs["pixel_values"] = self.feature_inputs(features)["pixel_values"].to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype(self.vision_tower(model)))
        start = unwrap_peft(model).config.text_config.decoder_start_token_id
        prefix = torch.tensor([[start, tokenizer.bos_token_id]] * len(images), device=device)  # as collate() trains
        room = self.max_text_length(model) - prefix.shape[1]
        generate_kwargs["max_new_tokens"] = max(1, min(generate_kwargs.get("max_new_tokens") or 40, room))
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output = model.generate(**inputs, decoder_input_ids=prefix, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(output[:, prefix.shape[1]:], skip_special_tokens=True)]


class _FrozenVisionBackbone(FrozenVisionTower):
    """Florence-2's frozen DaViT: takes its own output, a [batch, channels, height, width] feature map, in place of
    [batch, 3, height, width] pixels (told apart by the channel count)."""

    def cached_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        if pixel_values.dim() == 4 and pixel_values.shape[1] == self.config.embed_dim[-1] != self.config.in_channels:
            return pixel_values
        return None
