"""Captioning stops on the token training ends every caption with, whatever the checkpoint's generation config says.

    python -m pytest -q tests/test_generation_stop.py

Training teaches GIT to end a caption with [SEP], Florence-2 / BLIP-2 (OPT) with </s>, PaliGemma with <eos> and a
chat VLM with its template's end-of-turn token (<|im_end|>, <end_of_utterance>, <end_of_turn>, ...). A checkpoint's
generation config may name another end token, or none (Qwen2-VL's base checkpoints stop on <|endoftext|> only), so
each family passes its own to `generate`. Here each tiny model's generation config names no end token (or the
pad token), its output
layer is biased so that the end token is the first one written, and the real `model.generate` is observed: it
must receive that token as eos_token_id and stop after one step, instead of writing until max_new_tokens.
"""

from __future__ import annotations

import pytest
from PIL import Image

from caption_train.models import resolve_family

from conftest import VOCAB_TEXTS
from tiny_families_chat import BUILDERS, END_TOKENS, build_tiny_paligemma
from tiny_families_git import build_tiny_blip2, build_tiny_florence2, build_tiny_git

FAMILIES = {  # name: (builder, the token training ends a caption with)
    "git": (build_tiny_git, "[SEP]"),
    "florence2": (build_tiny_florence2, "</s>"),
    "blip2": (build_tiny_blip2, "</s>"),
    "paligemma": (build_tiny_paligemma, "<eos>"),
} | {arch: (builder, END_TOKENS[arch]) for arch, builder in BUILDERS.items()}
MAX_NEW_TOKENS = 6


@pytest.mark.parametrize("configured", ["nothing", "the pad token"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_stops_on_the_token_that_ends_training_captions(tmp_path, name, configured):
    builder, end_token = FAMILIES[name]
    model_dir = builder(tmp_path / name, VOCAB_TEXTS)
    family, _ = resolve_family(str(model_dir))
    model, processor = family.load(str(model_dir), {})
    model.eval()
    end_id = processor.tokenizer.convert_tokens_to_ids(end_token)
    assert end_id != processor.tokenizer.unk_token_id
    # A checkpoint whose generation config names no end token, or another one.
    pad_id = processor.tokenizer.pad_token_id
    assert pad_id not in (None, end_id)
    model.generation_config.eos_token_id = None if configured == "nothing" else pad_id

    steps: list[int] = []  # one per forward of the output layer: one per generated token

    def end_token_first(module, args, logits):
        steps.append(1)
        logits = logits.clone()
        logits[..., end_id] += 1e4
        return logits

    model.get_output_embeddings().register_forward_hook(end_token_first)
    calls: list[dict] = []
    real_generate = model.generate

    def observed_generate(*args, **kwargs):  # the real generate, its keyword arguments recorded
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    model.generate = observed_generate
    images = [Image.new("RGB", (32, 32), (200, 40 * i, 30)) for i in range(2)]
    captions = family.generate(model, processor, images, max_new_tokens=MAX_NEW_TOKENS)

    (kwargs,) = calls
    stop = kwargs.get("eos_token_id")
    assert end_id in ([stop] if isinstance(stop, int) else list(stop or [])), (name, stop, end_id)
    assert len(steps) == 1, f"{name}: wrote {len(steps)} tokens, not stopping at {end_token}"
    assert captions == ["", ""]  # the end token is not part of the caption
