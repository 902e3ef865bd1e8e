"""Tests for caption_train.tiny: the offline shapes dataset, tokenizer and tiny BLIP that other tests build on.

    python -m pytest tests/test_tiny.py -q
"""

import collections
import math
import time

import pytest
import torch
from PIL import Image

from caption_train.tiny import (
    COLORS,
    SHAPES,
    build_tiny_blip,
    build_tokenizer,
    make_shapes_dataset,
    shape_caption_accuracy,
)

ALL_CAPTIONS = [f"a {c} {s}" for c in COLORS for s in SHAPES]
BUILD_SECONDS = {}  # filled by the tiny_blip_dir fixture, checked by test_tiny_blip_builds_fast


# ----------------------------------------------------------------------------
# dataset


def _tree_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_same_seed_gives_identical_bytes(tmp_path):
    make_shapes_dataset(tmp_path / "a", 13, seed=3)
    make_shapes_dataset(tmp_path / "b", 13, seed=3)
    make_shapes_dataset(tmp_path / "c", 13, seed=4)
    a, b, c = (_tree_bytes(tmp_path / d) for d in "abc")
    assert len(a) == 26  # 13 images + 13 captions
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_dataset_captions_are_balanced_and_match_sidecars(tmp_path):
    pairs = make_shapes_dataset(tmp_path, 2 * len(ALL_CAPTIONS) + 5)
    counts = collections.Counter(caption for _, caption in pairs)
    assert set(counts) == set(ALL_CAPTIONS)
    assert max(counts.values()) - min(counts.values()) <= 1
    for path, caption in pairs:
        assert path.suffix == ".png" and path.is_file()
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == caption


def test_dataset_is_nested_in_subfolders(tmp_path):
    pairs = make_shapes_dataset(tmp_path, 10, subfolders=3)
    assert {p.parent.name for p, _ in pairs} == {"part0", "part1", "part2"}
    assert all(p.parent.parent == tmp_path for p, _ in pairs)
    assert sorted(tmp_path.rglob("*.png")) == sorted(p for p, _ in pairs)

    flat = make_shapes_dataset(tmp_path / "flat", 4, subfolders=0)
    assert all(p.parent == tmp_path / "flat" for p, _ in flat)


def test_dataset_image_shows_the_captioned_color(tmp_path):
    for path, caption in make_shapes_dataset(tmp_path, len(ALL_CAPTIONS), size=48):
        image = Image.open(path)
        assert image.size == (48, 48) and image.mode == "RGB"
        color = caption.split()[1]
        # Backgrounds are light (every channel >= 232); the most common other color is the shape's fill.
        count, pixel = max((n, rgb) for n, rgb in image.getcolors(48 * 48) if min(rgb) < 232)
        assert pixel == COLORS[color] and count > 48 * 48 * 0.05


def test_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n=-1"):
        make_shapes_dataset(tmp_path, -1)
    with pytest.raises(ValueError, match="size=8"):
        make_shapes_dataset(tmp_path, 1, size=8)


def test_shape_caption_accuracy():
    assert shape_caption_accuracy([" A Red Circle ", "a blue square"], ["a red circle", "a red square"]) == 0.5
    assert shape_caption_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        shape_caption_accuracy(["a"], [])


# ----------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ALL_CAPTIONS, max_length=32)


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer("a red circle")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tokenizer.decode(tokenizer("A Yellow TRIANGLE")["input_ids"], skip_special_tokens=True) == (
        "a yellow triangle"
    )


def test_tokenizer_wraps_in_cls_sep_and_has_dec_bos(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a green square")["input_ids"])
    assert tokens == ["[CLS]", "a", "green", "square", "[SEP]"]
    assert tokenizer.bos_token == "[DEC]"
    assert tokenizer.bos_token_id == len(tokenizer) - 1
    assert [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id] == [0, 2, 3]
    assert tokenizer.model_max_length == 32


def test_tokenizer_keeps_prompt_words_whole(tokenizer):
    # Prompts such as "a photography of" must not fall apart into characters or [UNK].
    assert tokenizer.tokenize("a photography of a blue circle") == ["a", "photography", "of", "a", "blue", "circle"]


# ----------------------------------------------------------------------------
# tiny BLIP, through the real from_pretrained path


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    from transformers import BlipConfig  # noqa: F401  (import outside the timed build)

    out = tmp_path_factory.mktemp("tiny-blip")
    start = time.perf_counter()
    assert build_tiny_blip(out, ALL_CAPTIONS) == out
    BUILD_SECONDS["default"] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module")
def loaded(tiny_blip_dir):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    processor = BlipProcessor.from_pretrained(tiny_blip_dir)
    return model, processor


def test_tiny_blip_builds_fast(tiny_blip_dir):
    assert BUILD_SECONDS["default"] < 10


def test_tiny_blip_loads_with_auto_classes(tiny_blip_dir):
    from transformers import AutoConfig, AutoProcessor, BlipProcessor

    assert AutoConfig.from_pretrained(tiny_blip_dir).model_type == "blip"
    assert isinstance(AutoProcessor.from_pretrained(tiny_blip_dir), BlipProcessor)


def test_tiny_blip_ids_agree(loaded):
    model, processor = loaded
    tok, text_config = processor.tokenizer, model.config.text_config
    assert tok.bos_token_id == tok.convert_tokens_to_ids("[DEC]") == text_config.bos_token_id
    assert text_config.pad_token_id == tok.pad_token_id
    assert text_config.sep_token_id == text_config.eos_token_id == tok.sep_token_id
    assert text_config.vocab_size == len(tok)
    assert model.config.vision_config.image_size == 64
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_tiny_blip_generates_from_bos(loaded):
    model, processor = loaded
    images = [Image.new("RGB", (90, 70), COLORS["red"]), Image.new("RGB", (64, 64), COLORS["blue"])]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] <= 5
    assert (out[:, 0] == processor.tokenizer.bos_token_id).all()
    assert all(isinstance(text, str) for text in processor.batch_decode(out, skip_special_tokens=True))


def test_tiny_blip_forward_with_labels_gives_finite_loss(loaded, tmp_path):
    model, processor = loaded
    pairs = make_shapes_dataset(tmp_path, 4)
    batch = processor(
        images=[Image.open(p) for p, _ in pairs],
        text=[c for _, c in pairs],
        padding=True,
        return_tensors="pt",
    )
    input_ids = batch["input_ids"].clone()
    input_ids[:, 0] = processor.tokenizer.bos_token_id
    labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    out = model(
        pixel_values=batch["pixel_values"],
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        labels=labels,
    )
    model.eval()
    assert math.isfinite(out.loss.item())
    # Random weights: the loss is near uniform over the vocabulary, not degenerate.
    assert 0.5 * math.log(len(processor.tokenizer)) < out.loss.item() < 2 * math.log(len(processor.tokenizer))


def test_tiny_blip_is_seeded_and_leaves_global_rng_alone(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_blip(tmp_path / "a", ["a red circle"], hidden_size=32, num_layers=1, num_heads=2, seed=7)
    assert torch.equal(torch.rand(3), expected)

    build_tiny_blip(tmp_path / "b", ["a red circle"], hidden_size=32, num_layers=1, num_heads=2, seed=7)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_blip_rejects_patch_that_does_not_tile(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_tiny_blip(tmp_path, ["a red circle"], image_size=60, patch_size=16)
