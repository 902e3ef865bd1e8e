"""The PaliGemma family on a tiny local PaliGemma (tests/tiny_families_chat.py): labels token by token through the
processor's `suffix=`, bad input, adapter targets, training through the real CLI, captioning, merge, review."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from caption_train.adapters import wrap_model
from caption_train.cli import main
from caption_train.errors import UserError
from caption_train.models import resolve_family
from caption_train.models.paligemma import IGNORE_INDEX, PaliGemmaFamily
from caption_train.tiny import make_shapes_dataset

from conftest import VOCAB_TEXTS, assert_trains_with_cached_features, check_cached_step
from test_family_chat import caption_dir, losses, relative_captions, train
from tiny_families_chat import build_tiny_paligemma

CAPTIONS = ["a red circle", "a very long caption about a blue square on a yellow background", "a"]


@pytest.fixture(scope="session")
def paligemma(tmp_path_factory) -> Path:
    return build_tiny_paligemma(tmp_path_factory.mktemp("paligemma"), VOCAB_TEXTS)


@pytest.fixture(scope="module")
def eight_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eight")
    make_shapes_dataset(out, 8, seed=2, size=56)
    return out


@pytest.fixture(scope="session")
def loaded(paligemma):
    family, _ = resolve_family(str(paligemma))
    model, processor = family.load(str(paligemma), {})
    return family, model, processor


def images(n: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (32 + 8 * i, 32), (40 * i % 255, 120, 60)) for i in range(n)]


def test_registry_picks_paligemma(loaded):
    assert isinstance(loaded[0], PaliGemmaFamily)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", [None, "describe en in one short line please"])
def test_only_caption_and_eos_are_targets(loaded, side, prompt):
    family, _, processor = loaded
    tokenizer = processor.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        batch = family.collate(processor, images(), CAPTIONS, max_length=128, prompt=prompt)
    finally:
        tokenizer.padding_side = before
    prefix = processor(images=images(1), text=[processor.image_token + (prompt or family.default_prompt)], return_tensors="pt")["input_ids"][0].tolist()
    for row, caption in enumerate(CAPTIONS):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row].bool()
        targets = labels != IGNORE_INDEX
        assert tokenizer.decode(labels[targets]) == caption + "<eos>"
        assert (ids[targets] == labels[targets]).all()
        real = ids[mask].tolist()
        # The masked part is the prefix exactly as generation tokenizes it: image tokens, <bos>, prompt, "\n".
        assert real[: len(prefix)] == prefix and int(targets.sum()) == len(real) - len(prefix)
        assert targets[mask.nonzero().max()] and not (targets & ~mask).any()
        # The prefix is token type 0 (bidirectional), the caption type 1.
        assert batch["token_type_ids"][row][targets].eq(1).all() and batch["token_type_ids"][row][mask & ~targets].eq(0).all()
        pads = (~mask).nonzero().flatten().tolist()
        if pads:
            assert pads == (list(range(len(pads))) if side == "left" else list(range(len(ids) - len(pads), len(ids))))


def test_loss_is_the_same_with_left_and_right_padding(loaded):
    family, model, processor = loaded
    result = []
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        with torch.no_grad():
            result.append(float(model(**family.collate(processor, images(), CAPTIONS, max_length=128)).loss))
    processor.tokenizer.padding_side = "right"
    assert result[0] == pytest.approx(result[1], rel=1e-4)


def test_truncation_keeps_eos_and_bad_input_is_one_line(loaded):
    family, _, processor = loaded
    prefix = len(processor(images=images(1), text=[processor.image_token + family.default_prompt])["input_ids"][0])
    batch = family.collate(processor, images(1), ["a red circle " * 20], max_length=prefix + 4)
    labels = batch["labels"][0]
    assert batch["input_ids"].shape[1] == prefix + 4 and int((labels != IGNORE_INDEX).sum()) == 4
    assert processor.tokenizer.convert_ids_to_tokens(int(labels[-1])) == "<eos>"
    with pytest.raises(UserError, match="leaving no room for a caption"):
        family.collate(processor, images(1), ["a red circle"], max_length=prefix)
    with pytest.raises(UserError, match="caption '' tokenizes to nothing"):
        family.collate(processor, images(2), ["a red circle", " "], max_length=128)


def test_lora_targets_the_language_model_only(paligemma):
    family, _ = resolve_family(str(paligemma))
    model, _ = family.load(str(paligemma), {})
    model = wrap_model(model, family, "LoRA", {})
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".language_model." in name for name in adapted)
    assert not any(p.requires_grad for p in family.vision_tower(model).parameters())


@pytest.mark.parametrize("peft, lr", [("LoRA", "1e-2"), ("none", "1e-3"), ("IA3", "1e-1")])
def test_two_training_steps_lower_the_loss(tmp_path, paligemma, eight_shapes, peft, lr, capsys):
    final = train(tmp_path, paligemma, eight_shapes, "--epochs", "2", "--peft_module", peft, "--lr", lr, "--optimizer", "AdamW")
    assert "(paligemma)" in capsys.readouterr().out
    first, second = losses(final)
    assert second < first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_step_gives_the_uncached_loss_and_logits(paligemma, eight_shapes, dtype):
    """SigLIP's output is cached; the projector runs in the step. Cached rows are collated without their image."""
    family = PaliGemmaFamily()
    model, processor = family.load(str(paligemma), {})
    model = wrap_model(model, family, "LoRA", {})
    paths = sorted(eight_shapes.rglob("*.png"))[:3]
    check_cached_step(family, model, paths, CAPTIONS, processor, dtype=dtype, max_length=64)


def test_train_caches_image_features(tmp_path, paligemma, eight_shapes, capsys):
    train(tmp_path, paligemma, eight_shapes, "--epochs", "3", "--cache_image_features", "memory")
    assert_trains_with_cached_features(capsys.readouterr().out, 8, 3)


@pytest.mark.slow
def test_overfit_captions_exactly_then_merge_matches(tmp_path, paligemma, eight_shapes):
    final = train(tmp_path / "run", paligemma, eight_shapes, "--epochs", "300", "--lr", "5e-3", "--optimizer", "AdamW", "--peft_module", "none")
    expected = {p.relative_to(eight_shapes).with_suffix(".png").as_posix(): p.read_text().strip() for p in eight_shapes.rglob("*.txt")}
    tuned = caption_dir(final, eight_shapes, tmp_path)
    assert relative_captions(tuned, eight_shapes) == expected
    assert main(["merge", str(final), str(tmp_path / "merged1"), "--alpha", "1"]) == 0
    assert main(["merge", str(final), str(tmp_path / "merged0"), "--alpha", "0"]) == 0
    assert caption_dir(tmp_path / "merged1", eight_shapes, tmp_path) == tuned
    assert caption_dir(tmp_path / "merged0", eight_shapes, tmp_path) == caption_dir(paligemma, eight_shapes, tmp_path)


@pytest.mark.slow
def test_lora_merge_alpha_one_is_the_adapter_alpha_zero_the_base(tmp_path, paligemma, eight_shapes):
    adapter = train(tmp_path / "run", paligemma, eight_shapes, "--epochs", "6", "--lr", "2e-2", "--optimizer", "AdamW")
    tuned, base = caption_dir(adapter, eight_shapes, tmp_path), caption_dir(paligemma, eight_shapes, tmp_path)
    assert tuned != base
    assert main(["merge", str(adapter), str(tmp_path / "merged1"), "--alpha", "1"]) == 0
    assert main(["merge", str(adapter), str(tmp_path / "merged0"), "--alpha", "0"]) == 0
    assert caption_dir(tmp_path / "merged1", eight_shapes, tmp_path) == tuned
    assert caption_dir(tmp_path / "merged0", eight_shapes, tmp_path) == base


@pytest.mark.slow
def test_review_with_paligemma_captions(tmp_path, paligemma):
    from test_interactive_api import review_caption_now

    data = tmp_path / "data"
    make_shapes_dataset(data, 2, seed=5, size=32)
    caption = review_caption_now(data, paligemma, tmp_path / "state")
    family, _ = resolve_family(str(paligemma))
    model, processor = family.load(str(paligemma), {})
    direct = family.generate(model, processor, [Image.open(data / "part0" / "img_0000.png").convert("RGB")], num_beams=1, do_sample=False)
    assert caption["text"] is not None and " ".join(caption["text"].split()) == " ".join(direct[0].split())
