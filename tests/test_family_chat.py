"""The generic chat-VLM family on tiny local models of each architecture (tests/tiny_families_chat.py): registry,
labels token by token, bad input, adapter targets, training through the real CLI, captioning, merge, review."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from caption_train.adapters import wrap_model
from caption_train.cli import main
from caption_train.errors import UserError
from caption_train.models import resolve_family
from caption_train.models.chat_vlm import IGNORE_INDEX, ChatVlmFamily, chat_turns
from caption_train.tiny import make_shapes_dataset
from caption_train.tracking import read_metrics

from conftest import VOCAB_TEXTS, base_args
from tiny_families_chat import BUILDERS, END_TOKENS, HAS_NUM2WORDS

ARCHS = sorted(BUILDERS)
CAPTIONS = ["a red circle", "a very long caption about a blue square on a yellow background", "a"]
# Different sizes give different image-token counts (dynamic resolution), so prompts differ in length per row.
SIZES = [(32, 32), (64, 40), (40, 64)]


@pytest.fixture(scope="session", params=ARCHS)
def chat_model(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param), VOCAB_TEXTS)


@pytest.fixture(scope="session")
def loaded(chat_model):
    family, config = resolve_family(str(chat_model))
    model, processor = family.load(str(chat_model), {})
    return family, model, processor, config.model_type


@pytest.fixture(scope="session")
def eight_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eight")
    make_shapes_dataset(out, 8, seed=2, size=56)
    return out


def images(sizes=SIZES) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i % 255, 120, 60)) for i, size in enumerate(sizes)]


@pytest.fixture
def padding_side(loaded, request):
    tokenizer = loaded[2].tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = request.param
    yield request.param
    tokenizer.padding_side = before


# ---------------------------------------------------------------------------------------------
# registry and labels


def test_registry_falls_back_to_the_chat_family(loaded):
    family, _, _, model_type = loaded
    assert isinstance(family, ChatVlmFamily) and model_type in BUILDERS


def test_unsupported_model_type_names_the_fallback(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model type 'bert' is not a supported image-to-text family .*chat template"):
        resolve_family(str(tmp_path))


@pytest.mark.parametrize("padding_side", ["right", "left"], indirect=True)
@pytest.mark.parametrize("prompt", [None, "Describe this image in one short line, please."])
def test_only_caption_and_end_token_are_targets(loaded, padding_side, prompt):
    family, _, processor, model_type = loaded
    tokenizer = processor.tokenizer
    batch = family.collate(processor, images(), CAPTIONS, max_length=256, prompt=prompt)
    turns = chat_turns(processor, prompt or family.default_prompt)
    end = END_TOKENS[model_type]
    assert tokenizer.convert_ids_to_tokens(turns.end_id) == end
    for row, (image, caption) in enumerate(zip(images(), CAPTIONS)):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row].bool()
        targets = labels != IGNORE_INDEX
        # Exactly the caption and the end-of-turn token, nothing else (decoded from the target positions only).
        assert tokenizer.decode(labels[targets]) == turns.before + caption + end
        assert (ids[targets] == labels[targets]).all()
        # The masked part of the row is the prompt exactly as generation tokenizes it (image tokens expanded).
        prompt_ids = processor(images=[[image]], text=[turns.prompt_text], return_tensors="pt")["input_ids"][0].tolist()
        real = ids[mask].tolist()
        assert real[: len(prompt_ids)] == prompt_ids and int(targets.sum()) == len(real) - len(prompt_ids)
        # Targets are the last real tokens; padding sits on the tokenizer's side and is never a target.
        last_real = mask.nonzero().max()
        assert targets[last_real] and not (targets & ~mask).any()
        pads = (~mask).nonzero().flatten().tolist()
        if pads:
            assert pads == (list(range(len(pads))) if padding_side == "left" else list(range(len(ids) - len(pads), len(ids))))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and batch["input_ids"].shape[1] == int(lengths.max())


def test_loss_is_the_same_with_left_and_right_padding(loaded):
    family, model, processor, _ = loaded
    tokenizer = processor.tokenizer
    losses = []
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = family.collate(processor, images(), CAPTIONS, max_length=256)
        with torch.no_grad():
            losses.append(float(model(**batch).loss))
    tokenizer.padding_side = "right"
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_truncation_keeps_the_end_token(loaded):
    family, _, processor, model_type = loaded
    turns = chat_turns(processor, family.default_prompt)
    prompt_length = len(processor(images=[images()[:1]], text=[turns.prompt_text])["input_ids"][0])
    batch = family.collate(processor, images()[:1], ["a red circle " * 20], max_length=prompt_length + 4)
    labels = batch["labels"][0]
    assert batch["input_ids"].shape[1] == prompt_length + 4
    assert int((labels != IGNORE_INDEX).sum()) == 4 and processor.tokenizer.convert_ids_to_tokens(int(labels[-1])) == END_TOKENS[model_type]


def test_bad_input_is_one_clear_line(loaded, chat_model, tmp_path):
    family, _, processor, _ = loaded
    with pytest.raises(UserError, match="leaving no room for a caption"):
        family.collate(processor, images()[:1], ["a red circle"], max_length=8)
    with pytest.raises(UserError, match="caption '  ' tokenizes to nothing"):
        family.collate(processor, images()[:2], ["a red circle", "  "], max_length=256)
    # The same model, its processor without a chat template.
    bare = tmp_path / "bare"
    shutil.copytree(chat_model, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match=r"model .*bare: its processor has no chat template"):
        family.load(str(bare), {})


def test_processor_settings_cap_the_image_tokens(loaded, chat_model):
    """model_config.processor reaches the processor: a smaller image budget gives fewer image tokens."""
    family, _, processor, model_type = loaded
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        pytest.skip("size = {longest_edge = pixels} is Qwen2-VL's image budget")
    big = [Image.new("RGB", (112, 112))]
    turns = chat_turns(processor, family.default_prompt)
    default = len(processor(images=[big], text=[turns.prompt_text])["input_ids"][0])
    _, capped = family.load(str(chat_model), {"processor": {"size": {"longest_edge": 28 * 28, "shortest_edge": 28 * 28}}})
    assert len(capped(images=[big], text=[turns.prompt_text])["input_ids"][0]) < default


def test_lora_targets_the_language_model_only(chat_model):
    family, _ = resolve_family(str(chat_model))
    model, _ = family.load(str(chat_model), {})
    model = wrap_model(model, family, "LoRA", {})
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(p.requires_grad for p in family.vision_tower(model).parameters())
    assert all(".language_model." in name or ".text_model." in name for name in adapted)


# ---------------------------------------------------------------------------------------------
# end to end through the real commands


def train(out: Path, model: Path, dataset: Path, *extra: str) -> Path:
    args = base_args(dataset, model, out, "--save_every_n_epochs", "0", "--num_sample_captions", "0", "--max_length", "64", *extra)
    assert main(["train", *args]) == 0
    (final,) = out.glob("*/final")
    return final


def losses(final: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in row]


@pytest.mark.parametrize("peft, lr, extra", [("LoRA", "1e-2", ()), ("none", "1e-3", ()), ("IA3", "1e-1", ()), ("LoRA", "1e-2", ("--gradient_checkpointing",))],
                         ids=["lora", "full", "ia3", "lora-checkpointing"])
def test_two_training_steps_lower_the_loss(tmp_path, chat_model, eight_shapes, peft, lr, extra, capsys):
    # 8 images in one batch: both steps see the same batch, so the second loss is comparable to the first.
    final = train(tmp_path, chat_model, eight_shapes, "--epochs", "2", "--peft_module", peft, "--lr", lr, "--optimizer", "AdamW", *extra)
    out = capsys.readouterr().out
    assert "(chat-vlm)" in out
    if peft == "LoRA":  # the default targets, printed at start-up: the language model's attention and MLP (2 layers)
        assert "adapter targets: 14 modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)" in out
    if peft == "IA3":  # keys, values and the MLP's down projection of the language model
        assert "adapter targets: 6 modules (k_proj, v_proj, down_proj)" in out
    first, second = losses(final)
    assert second < first


# ---------------------------------------------------------------------------------------------
# the feature cache: what get_image_features returns, one [image tokens, width] tensor per image


@pytest.fixture
def frozen(chat_model):
    """A fresh model with LoRA on its language model (the image side frozen, as in training) and its processor."""
    family, _ = resolve_family(str(chat_model))
    model, processor = family.load(str(chat_model), {})
    model = wrap_model(model, family, "LoRA", {"r": 4, "lora_alpha": 8})
    family.freeze_vision_tower(model)
    return family, model, processor


def tower_calls(family, model) -> list[int]:
    """A counter of the vision tower's forward calls."""
    calls = [0]
    family.vision_tower(model).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def chat_batch(family, processor, paths, captions):
    from caption_train.data.images import load_rgb

    batch = family.collate(processor, [load_rgb(p) for p in paths], captions, max_length=256)
    batch["pixel_rows"] = torch.arange(len(paths))
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cached_step_gives_the_uncached_loss_and_logits(frozen, eight_shapes, tmp_path, dtype):
    """A batch through the cache (computed, then read from memory, then from disk in a new cache) gives the loss
    and logits the model gives computing its tower in the forward; reading never runs the tower; another image's
    features give other logits (the check can see wrong features)."""
    from caption_train.features import DiskStore, FeatureCache

    family, model, processor = frozen
    model.eval()
    paths = sorted(eight_shapes.rglob("*.png"))[:3]
    captions = ["a red circle", "a blue square", "a green triangle"]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # noqa: E731
    with autocast(), torch.no_grad():
        reference = model(**{k: v for k, v in chat_batch(family, processor, paths, captions).items() if k != "pixel_rows"})
    strs = [str(p) for p in paths]
    memory, disk = FeatureCache(dtype), FeatureCache(dtype, DiskStore(tmp_path / "cache", dtype))
    reread = FeatureCache(dtype, DiskStore(tmp_path / "cache", dtype))
    calls = tower_calls(family, model)
    for store, computes in ((memory, True), (memory, False), (disk, True), (reread, False)):
        before = calls[0]
        inputs = store.model_inputs(chat_batch(family, processor, paths, captions), strs, model=model, family=family, processor=processor, autocast=autocast)
        assert "pixel_values" not in inputs and "mm_encoder_outputs" in inputs
        with autocast(), torch.no_grad():
            output = model(**inputs)
        assert (calls[0] > before) == computes
        assert abs(output.loss.item() - reference.loss.item()) < 1e-5, (output.loss, reference.loss)
        torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=0)
    assert (memory.misses, memory.hits, disk.misses, reread.hits, reread.misses) == (3, 3, 3, 3, 0)
    width = family.image_feature_width(model)
    counts = family.image_token_counts(model, chat_batch(family, processor, paths, captions)["input_ids"])
    assert [tuple(memory.memory[p].shape) for p in strs] == [(n, width) for n in counts] and all(f.dtype == dtype for f in memory.memory.values())
    memory.memory = {path: features * 4 + 1 for path, features in memory.memory.items()}  # wrong features
    with autocast(), torch.no_grad():
        swapped = model(**memory.model_inputs(chat_batch(family, processor, paths, captions), strs, model=model, family=family, processor=processor, autocast=autocast))
    assert not torch.allclose(swapped.logits, reference.logits, atol=1e-4)


def test_generation_from_cached_features_equals_generation_from_images(frozen, eight_shapes):
    """The probe panel's path: captions generated from the cached features equal those from the images, and the
    tower does not run."""
    from caption_train.data.images import load_rgb
    from caption_train.features import FeatureCache

    family, model, processor = frozen
    model.eval()
    paths = [str(p) for p in sorted(eight_shapes.rglob("*.png"))[:3]]
    images = [load_rgb(p) for p in paths]
    expected = family.generate(model, processor, images, max_new_tokens=6, do_sample=False)
    cache = FeatureCache(torch.float32)
    features = cache.features_for(paths, model=model, family=family, processor=processor, autocast=contextlib.nullcontext)
    calls = tower_calls(family, model)
    assert family.generate(model, processor, images, features=features, max_new_tokens=6, do_sample=False) == expected
    assert calls[0] == 0 and cache.misses == 3
    cache.features_for(paths, model=model, family=family, processor=processor, autocast=contextlib.nullcontext)
    assert cache.hits == 3 and calls[0] == 0


def test_training_with_the_cache_gives_the_losses_of_training_without(tmp_path, chat_model, eight_shapes, capsys):
    """Two epochs through the CLI, --cache_image_features memory vs off: the same losses; the start-up line says
    what was cached, and the second epoch reads every image's features from the cache."""
    runs = {}
    for mode in ("memory", "off"):
        args = base_args(eight_shapes, chat_model, tmp_path / mode, "--max_length", "64", "--epochs", "2", "--batch_size", "4",
                         "--lr", "1e-2", "--mixed_precision", "no", "--cache_image_features", mode)
        assert main(["train", *args]) == 0
        out = capsys.readouterr().out
        runs[mode] = losses(next((tmp_path / mode).glob("*/final")))
        if mode == "memory":
            assert re.search(r"image features: vision tower frozen, no flips: caching in memory \(8 x about [\d.]+ [KMG]?B float32\)", out), out
            assert "image features: 12 read from the cache, 8 computed" in out  # epoch 2 and the 2 probe images, twice
    assert runs["memory"] == pytest.approx(runs["off"], abs=1e-5)


def test_full_fine_tune_with_a_frozen_tower_caches_only_when_nothing_after_it_trains(tmp_path, chat_model, loaded, eight_shapes, capsys):
    """--freeze_vision_tower in a full fine-tune: Qwen2-VL's merger is part of its tower, so everything that makes
    the image tokens is frozen and cached; the others' projector / connector lies outside the tower and trains,
    so asking for the cache is one line."""
    family, model = loaded[0], loaded[1]
    projector_trains = len(family.feature_modules(model)) > 1
    assert projector_trains == (loaded[3] not in ("qwen2_vl", "qwen2_5_vl"))
    args = base_args(eight_shapes, chat_model, tmp_path / "runs", "--max_length", "64", "--peft_module", "none",
                     "--freeze_vision_tower", "true", "--cache_image_features", "memory")
    assert main(["train", *args]) == (2 if projector_trains else 0)
    captured = capsys.readouterr()
    if projector_trains:
        assert "the projector that turns the vision tower's output into image tokens has trainable parameters" in captured.err
        assert not (tmp_path / "runs").exists()
    else:
        assert "image features: vision tower frozen, no flips: caching in memory" in captured.out


def caption_dir(model: Path, images_dir: Path, out: Path, *extra: str) -> dict[str, str]:
    jsonl = out / f"captions-{len(list(out.glob('captions-*.jsonl')))}.jsonl"  # a new file each time: the command resumes an existing one
    assert not jsonl.exists()
    assert main(["caption", str(model), str(images_dir), "--output_jsonl", str(jsonl), "--num_workers", "0", "--device", "cpu", "--dtype", "float32", *extra]) == 0
    return {json.loads(line)["file_name"]: json.loads(line)["text"] for line in jsonl.read_text().splitlines()}


@pytest.fixture(scope="session")
def overfit(tmp_path_factory, chat_model, eight_shapes) -> Path:
    """A full fine-tune that memorises 8 captions (a few dozen steps)."""
    out = tmp_path_factory.mktemp("overfit")
    return train(out, chat_model, eight_shapes, "--epochs", "150", "--lr", "2e-3", "--optimizer", "AdamW", "--peft_module", "none")


def relative_captions(captions: dict[str, str], root: Path) -> dict[str, str]:
    return {Path(name).relative_to(root).as_posix() if Path(name).is_absolute() else Path(name).as_posix(): text for name, text in captions.items()}


@pytest.mark.slow
def test_overfit_captions_exactly_then_merge_matches(overfit, chat_model, eight_shapes, tmp_path):
    """Labels and generation agree (prompt, start, stopping): the memorised captions come back exactly."""
    expected = {p.relative_to(eight_shapes).with_suffix(".png").as_posix(): p.read_text().strip() for p in eight_shapes.rglob("*.txt")}
    tuned = caption_dir(overfit, eight_shapes, tmp_path)
    assert relative_captions(tuned, eight_shapes) == expected
    assert main(["merge", str(overfit), str(tmp_path / "merged1"), "--alpha", "1"]) == 0
    assert main(["merge", str(overfit), str(tmp_path / "merged0"), "--alpha", "0"]) == 0
    assert caption_dir(tmp_path / "merged1", eight_shapes, tmp_path) == tuned
    assert caption_dir(tmp_path / "merged0", eight_shapes, tmp_path) == caption_dir(chat_model, eight_shapes, tmp_path)


@pytest.mark.slow
def test_batched_generation_equals_one_by_one(overfit, eight_shapes):
    """Prompts of different lengths in one batch (images of different sizes: Qwen2-VL's image tokens vary) are
    left-padded, so each row's caption is what the image alone gives."""
    from caption_train.inference import load_for_inference

    model, processor, family = load_for_inference(str(overfit), device="cpu")
    pictures = [Image.open(path).convert("RGB").resize(size) for path, size in zip(sorted(eight_shapes.rglob("*.png")), [(56, 56), (112, 84), (84, 112)])]
    alone = [family.generate(model, processor, [picture], num_beams=1, do_sample=False)[0] for picture in pictures]
    assert family.generate(model, processor, pictures, num_beams=1, do_sample=False) == alone


@pytest.mark.slow
def test_lora_merge_alpha_one_is_the_adapter_alpha_zero_the_base(tmp_path, chat_model, eight_shapes):
    adapter = train(tmp_path / "run", chat_model, eight_shapes, "--epochs", "6", "--lr", "2e-2", "--optimizer", "AdamW")
    assert (adapter / "adapter_config.json").is_file()
    tuned, base = caption_dir(adapter, eight_shapes, tmp_path), caption_dir(chat_model, eight_shapes, tmp_path)
    assert tuned != base  # else the comparisons below would prove nothing
    assert main(["merge", str(adapter), str(tmp_path / "merged1"), "--alpha", "1"]) == 0
    assert main(["merge", str(adapter), str(tmp_path / "merged0"), "--alpha", "0"]) == 0
    assert caption_dir(tmp_path / "merged1", eight_shapes, tmp_path) == tuned
    assert caption_dir(tmp_path / "merged0", eight_shapes, tmp_path) == base


@pytest.mark.slow
def test_review_with_a_chat_model_captions(tmp_path, chat_model):
    from test_interactive_api import review_caption_now

    data = tmp_path / "data"
    make_shapes_dataset(data, 2, seed=5, size=32)
    caption = review_caption_now(data, chat_model, tmp_path / "state")
    family, _ = resolve_family(str(chat_model))
    model, processor = family.load(str(chat_model), {})
    direct = family.generate(model, processor, [Image.open(data / "part0" / "img_0000.png").convert("RGB")], num_beams=1, do_sample=False)
    assert caption["text"] and " ".join(caption["text"].split()) == " ".join(direct[0].split())


def test_the_page_captions_with_the_runs_prompt(tmp_path, loaded):
    """--interactive: the page's "caption now" uses the prompt the run trains with, not the family default."""
    from caption_train.data.scan import Sample
    from caption_train.iterative.hooks import caption_images
    from caption_train.iterative.store import Workspace

    family, model, processor, _ = loaded
    pairs = make_shapes_dataset(tmp_path / "data", 1, seed=5, size=32, subfolders=0)
    workspace = Workspace(tmp_path / "data", [Sample(p, c) for p, c in pairs], state_dir=tmp_path / "state")
    prompt = "Describe this image in one short line, please."
    image = Image.open(pairs[0][0]).convert("RGB")
    with_prompt = family.generate(model, processor, [image], prompt=prompt)[0]
    assert with_prompt != family.generate(model, processor, [image])[0]  # else this test could not tell them apart
    (image_id,) = workspace.entries
    caption_images(workspace, model, processor, family, [image_id], step=3, prompt=prompt)
    assert workspace.model_captions[image_id].text == with_prompt


@pytest.mark.skipif(HAS_NUM2WORDS, reason="checks the message of a machine without num2words")
def test_smolvlm2_without_num2words_says_what_to_install(capsys, tmp_path):
    from tiny_families_chat import build_tiny_smolvlm2

    model = build_tiny_smolvlm2(tmp_path / "smolvlm2", VOCAB_TEXTS)
    dataset = tmp_path / "data"
    make_shapes_dataset(dataset, 2, seed=1, size=32)
    out = tmp_path / "runs"
    assert main(["train", *base_args(dataset, model, out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model {model}: its processor needs the num2words package, which is not installed: pip install num2words")
    assert not out.exists()
