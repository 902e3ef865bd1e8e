"""BLIP family: registry lookup, labels ([DEC] start, -100 on padding), config overrides, adapters, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from caption_train.adapters import peft_config, wrap_model
from caption_train.errors import UserError
from caption_train.models import resolve_family
from caption_train.models.base import unwrap_peft
from caption_train.models.blip import IGNORE_INDEX, BlipFamily
from caption_train.train import enable_gradient_checkpointing


@pytest.fixture(scope="module")
def loaded(tiny_blip):
    family, _ = resolve_family(str(tiny_blip))
    model, processor = family.load(str(tiny_blip), {})
    return family, model, processor


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (i * 20 % 255, 100, 50)) for i in range(n)]


def test_registry_picks_family_from_config(tiny_blip):
    family, config = resolve_family(str(tiny_blip))
    assert isinstance(family, BlipFamily) and config.model_type == "blip"


def test_non_captioning_model_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model type 'bert' is not a supported image-to-text family"):
        resolve_family(str(tmp_path))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        resolve_family(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_family(str(tmp_path))


def test_collate_starts_from_bos_and_masks_only_padding(loaded):
    family, model, processor = loaded
    captions = ["a red circle", "a very long caption about a blue square on a yellow background", "a"]
    batch = family.collate(processor, images(3), captions, max_length=64)
    bos = processor.tokenizer.bos_token_id
    assert bos == model.config.text_config.bos_token_id
    assert (batch["input_ids"][:, 0] == bos).all()
    mask = batch["attention_mask"]
    assert ((batch["labels"] == IGNORE_INDEX) == (mask == 0)).all()  # -100 exactly where padding is
    assert (batch["labels"][mask == 1] == batch["input_ids"][mask == 1]).all()
    # Dynamic padding: as long as the longest caption in the batch, not the tokenizer's max length.
    longest = max(len(processor.tokenizer(c)["input_ids"]) for c in captions)
    assert batch["input_ids"].shape[1] == longest
    # Each caption still ends with [SEP], which teaches the model to stop.
    sep = processor.tokenizer.sep_token_id
    for row, length in zip(batch["input_ids"], mask.sum(1)):
        assert row[length - 1] == sep


def test_collate_truncates_at_max_length(loaded):
    family, _, processor = loaded
    batch = family.collate(processor, images(2), ["a red circle " * 20, "a"], max_length=8)
    assert batch["input_ids"].shape[1] == 8
    assert batch["input_ids"][0, -1] == processor.tokenizer.sep_token_id


def test_forward_loss_ignores_padding(loaded):
    """Padding a batch longer must not change the loss: pads are out of it."""
    family, model, processor = loaded
    model.eval()
    short = family.collate(processor, images(1), ["a red circle"], max_length=64)
    padded = family.collate(processor, images(2), ["a red circle", "a blue square on a green circle and a red triangle"], max_length=64)
    with torch.no_grad():
        loss_short = model(**short).loss
        first_only = {k: v[:1] for k, v in padded.items()}
        loss_padded = model(**first_only).loss
    assert torch.allclose(loss_short, loss_padded, atol=1e-5)


def test_model_config_overrides_reach_sub_configs(tiny_blip):
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {"hidden_dropout_prob": 0.3, "vision_config": {"attention_dropout": 0.2}})
    assert model.config.text_config.hidden_dropout_prob == 0.3
    assert model.config.vision_config.attention_dropout == 0.2
    with pytest.raises(UserError, match="unknown key 'hidden_dropout'"):
        family.load(str(tiny_blip), {"hidden_dropout": 0.3})
    with pytest.raises(UserError, match="not a torch dtype"):
        family.load(str(tiny_blip), {"dtype": "float33"})


@pytest.mark.parametrize("module", ["LoRA", "IA3"])
def test_adapters_default_targets(tiny_blip, module):
    """LoRA and IA3 adapt the text decoder only by default (README, "Default adapter targets"), which keeps the
    vision tower frozen and its features cacheable."""
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    wrapped = wrap_model(model, family, module, {})
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("text_decoder" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)
    assert all(("lora_" in n) or ("ia3_" in n) for n in trainable)


def test_ia3_defaults_rescale_text_keys_values_and_feed_forward(tiny_blip):
    from peft.tuners.ia3 import IA3Layer

    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    wrapped = wrap_model(model, family, "IA3", {})
    layers = {name.split("text_decoder.", 1)[1]: module for name, module in wrapped.named_modules() if isinstance(module, IA3Layer)}
    # per decoder layer: self- and cross-attention key and value, and the feed-forward down projection
    layers_per_block = {name.split(".layer.", 1)[1].split(".", 1)[1] for name in layers}
    assert layers_per_block == {"attention.self.key", "attention.self.value", "crossattention.self.key",
                                "crossattention.self.value", "output.dense"}
    feedforward = {name for name, module in layers.items() if module.is_feedforward}
    assert feedforward and all(name.endswith(".output.dense") and ".attention." not in name for name in feedforward)


def test_ia3_feedforward_is_subset_of_targets(tiny_blip):
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    wrapped = wrap_model(model, family, "IA3", {})
    names = [n for n, _ in wrapped.named_modules()]
    assert any(n.endswith("attention.self.key") for n in names)
    config = peft_config(family, "IA3", {})
    assert config.feedforward_modules


def test_bad_peft_args(tiny_blip):
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    with pytest.raises(UserError, match="peft_args for LoRA"):
        wrap_model(model, family, "LoRA", {"rank": 4})
    with pytest.raises(UserError, match="target_modules"):
        wrap_model(model, family, "LoRA", {"target_modules": ["no_such_module"]})


def test_full_finetune_trains_everything(tiny_blip):
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    wrapped = wrap_model(model, family, "none", {})
    assert all(p.requires_grad for p in wrapped.parameters())


def test_checkpointing_keeps_frozen_vision_tower_out_of_backward(tiny_blip):
    """Text-only LoRA + gradient checkpointing: the vision tower's output must not require grad."""
    family = BlipFamily()
    model, processor = family.load(str(tiny_blip), {})
    model = wrap_model(model, family, "LoRA", {"target_modules": ["query", "value"]})
    # Restrict to the text decoder: vision has no 'query'/'value' modules, so it is fully frozen.
    assert not any(p.requires_grad for p in family.vision_tower(model).parameters())
    enable_gradient_checkpointing(model)
    assert family.vision_tower(model).encoder.gradient_checkpointing
    seen = {}
    family.vision_tower(model).register_forward_hook(lambda m, i, out: seen.update(requires_grad=out.last_hidden_state.requires_grad))
    model.train()
    batch = family.collate(processor, images(2), ["a red circle", "a blue square"], max_length=32)
    loss = model(**batch).loss
    loss.backward()
    assert seen["requires_grad"] is False
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_generate_caps_length_to_position_limit(loaded):
    """Asked for 500 tokens, generation stops at the text model's position limit (32 here, the first taken by the
    start token) instead of indexing past the position embeddings. The special tokens (the end token among them)
    are suppressed, so the random model cannot stop early. Each generated token is one text-decoder forward call
    (with the cache), which counts them exactly (decoded WordPiece text does not re-tokenize to the same count)."""
    family, model, processor = loaded
    tokenizer = processor.tokenizer
    steps = []
    hook = unwrap_peft(model).text_decoder.register_forward_hook(lambda module, inputs, output: steps.append(1))

    def generated_tokens(max_new_tokens: int) -> int:
        steps.clear()
        captions = family.generate(model.eval(), processor, images(2), max_new_tokens=max_new_tokens, suppress_tokens=tokenizer.all_special_ids)
        assert len(captions) == 2 and all(captions)
        return len(steps)

    try:
        room = model.config.text_config.max_position_embeddings - 1
        assert generated_tokens(500) == room
        assert generated_tokens(5) == 5  # a smaller request is kept as asked
    finally:
        hook.remove()


def test_adapter_config_records_base_model(tiny_blip, tmp_path):
    family = BlipFamily()
    model, _ = family.load(str(tiny_blip), {})
    wrap_model(model, family, "LoRA", {}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_blip)
