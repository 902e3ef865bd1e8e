"""Shared fixtures: a tiny BLIP built locally (saved with save_pretrained) and a generated shapes dataset.

Nothing here downloads anything: tests run offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB_TEXTS = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A random-weight 2-layer, 64-wide BLIP at 32 px (patch 16): fast enough for many short runs."""
    out = tmp_path_factory.mktemp("tiny-blip")
    return build_tiny_blip(out, VOCAB_TEXTS, image_size=32, patch_size=16, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """24 shapes images with captions, in nested folders. Tests must not write into it."""
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, 24, seed=1, size=32)
    return out


def base_args(dataset: Path, model: Path, output: Path, *extra: str) -> list[str]:
    """train2.py arguments for a fast CPU run on the tiny model."""
    return [
        "--dataset_dir", str(dataset),
        "--model_name_or_path", str(model),
        "--output_dir", str(output),
        "--epochs", "1",
        "--batch_size", "8",
        "--num_workers", "0",
        "--log_with", "none",
        "--num_sample_captions", "2",
        *extra,
    ]


def check_cached_step(family, model, paths: list[Path], captions: list[str], processor, *, prompt: str | None = None,
                      dtype=None, max_length: int = 32) -> None:
    """One batch with the vision tower computed in the forward (no cache) gives the loss and logits it gives
    through a FeatureCache: a first pass computes the features from the batch's pixels and stores them, a second
    collates without loading any image and reads them, a third collates every other image (the rest are cached), and
    a fourth has a new cache but no image loaded, so all are loaded from their files through `family.pixel_inputs`
    (an entry that turned out unreadable). The model's vision tower must be
    frozen (adapters on the text side); `dtype` bfloat16 runs under bf16 autocast with a bf16 cache. Tiny random
    models barely read the image into the loss, so logits are compared too, and the same batch with each row given
    another row's features must differ (the check can see wrong features). Gradients reach the adapter."""
    import torch

    from caption_train.data.images import load_rgb
    from caption_train.features import FeatureCache

    dtype = dtype or torch.float32
    family.freeze_vision_tower(model)
    model.eval()  # the text side's dropout off; the frozen tower is in eval mode whatever the model's mode
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # noqa: E731
    loaded = family.collate(processor, [load_rgb(p) for p in paths], captions, max_length=max_length, prompt=prompt)
    with autocast(), torch.no_grad():
        reference = model(**loaded)
    cache, mixed, reloaded = FeatureCache(dtype), FeatureCache(dtype), FeatureCache(dtype)
    strs = [str(p) for p in paths]
    passes = [(cache, [load_rgb(p) for p in paths]), (cache, [None] * len(paths)),
              (mixed, [load_rgb(p) if row % 2 == 0 else None for row, p in enumerate(paths)]), (reloaded, [None] * len(paths))]
    for store, images in passes:
        if store is mixed:  # odd rows cached (and not loaded), even rows computed from the batch's pixels
            mixed.memory = {path: cache.memory[path] for row, path in enumerate(strs) if row % 2}
        batch = family.collate(processor, images, captions, max_length=max_length, prompt=prompt)
        rows = [row for row, image in enumerate(images) if image is not None]
        assert ("pixel_values" in batch) == bool(rows) and (not rows or batch["pixel_values"].shape[0] == len(rows))
        batch["pixel_rows"] = torch.tensor(rows, dtype=torch.long)
        inputs = store.model_inputs(batch, strs, model=model, family=family, processor=processor, autocast=autocast)
        with autocast():
            output = model(**inputs)
        assert abs(output.loss.item() - reference.loss.item()) < 1e-5, (output.loss, reference.loss)
        torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=0)
    assert (cache.misses, cache.hits, mixed.misses, reloaded.misses) == (len(paths), len(paths), (len(paths) + 1) // 2, len(paths))
    shape = tuple(family.image_feature_shape(model, processor))
    assert all(tuple(f.shape) == shape and f.dtype == dtype for f in cache.memory.values())
    output.loss.backward()  # the cached features feed a normal autograd graph into the adapter
    assert all(p.grad is not None for name, p in model.named_parameters() if p.requires_grad)
    features = torch.stack([cache.memory[path] for path in strs]).roll(1, 0)
    with autocast(), torch.no_grad():
        swapped = model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, **family.feature_inputs(features))
    assert (swapped.logits.float() - reference.logits.float()).abs().max() > 1e-4  # 10x the tolerance above


def assert_trains_with_cached_features(out: str, n_images: int, epochs: int) -> None:
    """A run's output with --cache_image_features memory: the start-up line says so, every image's features were
    computed once and read in every later epoch."""
    assert f"caching in memory ({n_images} x" in out, out
    assert f"image features: {n_images * (epochs - 1)} read from the cache, {n_images} computed" in out, out
