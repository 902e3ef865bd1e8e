"""One tiny local model per family (and per BLIP-2 language model), for tests that every command works with every
family: name -> builder(out_dir) -> model folder written with save_pretrained."""

from __future__ import annotations

from caption_train.tiny import build_tiny_blip

from conftest import VOCAB_TEXTS
from tiny_families_chat import build_tiny_paligemma, build_tiny_qwen2_vl
from tiny_families_git import build_tiny_blip2, build_tiny_blip2_t5, build_tiny_florence2, build_tiny_git

BUILDERS = {
    "blip": lambda out: build_tiny_blip(out, VOCAB_TEXTS, image_size=32, patch_size=16, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32),
    "git": lambda out: build_tiny_git(out, VOCAB_TEXTS),
    "blip2-opt": lambda out: build_tiny_blip2(out, VOCAB_TEXTS),
    "blip2-t5": lambda out: build_tiny_blip2_t5(out, VOCAB_TEXTS),
    "florence2": lambda out: build_tiny_florence2(out, VOCAB_TEXTS),
    "paligemma": lambda out: build_tiny_paligemma(out, VOCAB_TEXTS),
    "qwen2_vl": lambda out: build_tiny_qwen2_vl(out, VOCAB_TEXTS),
}
