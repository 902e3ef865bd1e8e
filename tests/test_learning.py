"""Proof that training works: a tiny BLIP trained from random weights with train2.py learns to caption
held-out colored shapes it has never seen. Slow (about a minute and a half on 2 CPU cores)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caption_train.inference import caption_paths, load_for_inference
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset, shape_caption_accuracy

from conftest import REPO


@pytest.mark.slow
def test_tiny_blip_learns_shapes(tmp_path):
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    model_dir = build_tiny_blip(tmp_path / "model", texts, image_size=64, patch_size=16, hidden_size=128, num_layers=3, num_heads=4, max_position_embeddings=32)
    make_shapes_dataset(tmp_path / "train", 800, seed=0)
    heldout = make_shapes_dataset(tmp_path / "heldout", 48, seed=12345, subfolders=0)
    paths, truths = [p for p, _ in heldout], [c for _, c in heldout]

    model, processor, family = load_for_inference(model_dir)
    before = shape_caption_accuracy(caption_paths(model, processor, family, paths), truths)

    result = subprocess.run(
        [sys.executable, str(REPO / "train2.py"), "--dataset_dir", str(tmp_path / "train"), "--model_name_or_path", str(model_dir),
         "--output_dir", str(tmp_path / "runs"), "--peft_module", "none", "--optimizer", "AdamW", "--lr", "6e-4",
         "--lr_scheduler", "OneCycleLR", "--epochs", "40", "--batch_size", "32", "--validation_split", "0.05",
         "--save_every_n_epochs", "0", "--num_workers", "0", "--log_with", "none", "--seed", "0"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = Path(result.stdout.strip().splitlines()[-1])

    model, processor, family = load_for_inference(final)
    predictions = caption_paths(model, processor, family, paths)
    after = shape_caption_accuracy(predictions, truths)
    print(f"held-out exact-match accuracy: before {before:.1%}, after {after:.1%}")
    assert before < 0.1
    assert after >= 0.8, list(zip(truths, predictions))
