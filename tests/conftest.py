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
