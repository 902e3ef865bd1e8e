"""The benchmarks' real-width chat-VLM slices (benchmarks/vlm_slices.py) have their checkpoints' real shapes.

vlm_memory.py extrapolates a full model's memory from 2- and 4-layer slices, which is only as good as the slices'
widths, heads, vision tower and vocabulary: each builder's config, at the checkpoint's full depth, must count the
parameters benchmarks/model_sizes.py counts for that checkpoint (itself checked against the published size), and
its tokenizer must have the real vocabulary's size while captions stay short token sequences.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from vlm_slices import SLICES  # noqa: E402

CAPTIONS = ["a red circle, centered on a plain light background, simple flat drawing, item 3",
            "a blue square on a green triangle, soft warm light, item 12"]


def counted(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # ~10-20 s per model: a real-size tokenizer each (152k / 128k / 49k entries)
@pytest.mark.parametrize("key", sorted(SLICES))
def test_a_full_depth_slice_has_the_checkpoints_parameter_count_and_vocabulary(key):
    from transformers import AutoModelForImageTextToText

    from model_sizes import build_on_meta

    spec = SLICES[key]
    config, processor = spec.build(copy.deepcopy(spec.checkpoint.config), spec.full_layers, CAPTIONS, None)
    with torch.device("meta"):
        built = counted(AutoModelForImageTextToText.from_config(config))
    assert built == counted(build_on_meta(spec.checkpoint)), f"{key}: the slice builder changed a shape of {spec.hub_id}"
    tokenizer = processor.tokenizer
    assert len(tokenizer) == config.get_text_config().vocab_size == spec.vocab_size
    ids = tokenizer(" " + CAPTIONS[0], add_special_tokens=False)["input_ids"]
    assert len(ids) < 25, "captions must be short token sequences (trained words), not bytes"
    assert tokenizer.decode(ids).strip() == CAPTIONS[0]
