"""Tiny offline models of the GIT / Florence-2 / BLIP-2 families, saved with save_pretrained (no hub needed).

    from tiny_families_git import build_tiny_git
    model_dir = build_tiny_git(tmp_path / "git", ["a red circle", "a blue square"])
    # GitForCausalLM.from_pretrained(model_dir), GitProcessor.from_pretrained(model_dir)

Each builder trains its tokenizer on `texts`, builds a random-weight model from a small config and writes both
like a hub checkpoint, so the families load them through the ordinary from_pretrained path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from caption_train.files import give_default_modes
from caption_train.tiny import _quiet_progress_bars, build_tokenizer


def _save(out_dir: Path, model, processor) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    give_default_modes(out_dir)
    return out_dir


def _seeded(seed: int, make):
    """make() under a forked, seeded torch RNG, so building a model leaves the caller's random state alone."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# ----------------------------------------------------------------------------
# GIT: a BERT WordPiece tokenizer ([CLS] caption [SEP]) and a CLIP-style image processor, like microsoft/git-base


def build_tiny_git(out_dir, texts: Iterable[str], *, image_size: int = 32, patch_size: int = 16, hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 32, seed: int = 0) -> Path:
    from transformers import GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    # build_tokenizer also adds BLIP's [DEC] as bos_token; GIT never uses it, which keeps the family honest:
    # GIT starts from [CLS] (config.bos_token_id), not from whatever the tokenizer calls bos.
    tokenizer = build_tokenizer(texts, max_length=max_position_embeddings)
    config = GitConfig(
        vision_config=dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size),
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = _seeded(seed, lambda: GitForCausalLM(config).eval())
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return _save(Path(out_dir), model, GitProcessor(image_processor, tokenizer))
