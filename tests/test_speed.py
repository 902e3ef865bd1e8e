"""The fast paths are also correct: precision choice, SDPA attention vs eager, and the frozen-vision feature cache
(same losses as computing the tower every step, in memory and on disk, with bad cache folders and entries)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from caption_train.adapters import wrap_model
from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.errors import UserError
from caption_train.features import FeatureCache, plan_feature_cache
from caption_train.models.blip import BlipFamily
from caption_train.precision import inference_dtype, resolve_precision
from caption_train.tiny import make_shapes_dataset
from caption_train.tracking import read_metrics

from conftest import base_args

CAPTIONS = ["a red circle", "a blue square on a green triangle", "a red", "a yellow square"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    return [path for path, _ in make_shapes_dataset(folder, 4, seed=3, size=32, subfolders=0)]


def no_fast_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


# ---------------------------------------------------------------------------- precision


def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", use_cuda=False).mode == "bf16"
    assert inference_dtype("auto", torch.device("cpu")) == torch.bfloat16
    no_fast_bf16(monkeypatch)
    choice = resolve_precision("auto", use_cuda=False)
    assert choice.mode == "no" and "no native bf16" in choice.describe()
    assert inference_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", use_cuda=False).mode == "bf16"  # asked for: given, even where slow


def test_fp16_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", use_cuda=False)


def test_training_prints_the_precision_it_chose(capsys, tmp_path, tiny_blip, shapes_dir, monkeypatch):
    no_fast_bf16(monkeypatch)
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--num_sample_captions", "0")]) == 0
    out = capsys.readouterr().out
    assert "precision: fp32 (auto: this CPU has no native bf16 matmul" in out
    assert "time: set-up" in out and "training" in out and "saving" in out  # the end-of-run breakdown


# ---------------------------------------------------------------------------- SDPA


@pytest.mark.parametrize("train_mode", [False, True])
def test_sdpa_attention_matches_eager(tiny_blip, pictures, train_mode):
    family = BlipFamily()
    eager, processor = family.load(str(tiny_blip), {"attn_implementation": "eager"})
    sdpa, _ = family.load(str(tiny_blip), {})
    assert type(sdpa.vision_model.encoder.layers[0].self_attn).__mro__[1].__name__ == "_SdpaVisionAttention"
    assert type(eager.vision_model.encoder.layers[0].self_attn).__mro__[1].__name__ != "_SdpaVisionAttention"
    batch = family.collate(processor, [load_rgb(p) for p in pictures], CAPTIONS, max_length=32)  # padded rows
    eager.train(train_mode), sdpa.train(train_mode)  # dropout is 0 in this config: train mode must agree too
    with torch.no_grad():
        a, b = eager(**batch), sdpa(**batch)
        vision_a = eager.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        vision_b = sdpa.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    assert torch.allclose(a.logits, b.logits, atol=1e-4, rtol=0) and abs(a.loss.item() - b.loss.item()) < 1e-4
    assert torch.allclose(vision_a, vision_b, atol=1e-5, rtol=0)  # the tower alone: random text weights barely read it
    images = [load_rgb(p) for p in pictures]
    assert family.generate(eager.eval(), processor, images) == family.generate(sdpa.eval(), processor, images)


def test_unknown_attention_implementation_is_a_clear_error(tiny_blip):
    with pytest.raises(UserError, match="attn_implementation 'flash_attention_2'"):
        BlipFamily().load(str(tiny_blip), {"attn_implementation": "flash_attention_2"})


# ---------------------------------------------------------------------------- the feature cache, one step


def frozen_lora(tiny_blip):
    family = BlipFamily()
    model, processor = family.load(str(tiny_blip), {})
    model = wrap_model(model, family, "LoRA", {})  # default targets: text side only
    family.freeze_vision_tower(model)
    return family, model, processor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_step_gives_the_uncached_loss(tiny_blip, pictures, dtype):
    family, model, processor = frozen_lora(tiny_blip)
    model.train()
    paths = [str(p) for p in pictures]
    collated = family.collate(processor, [load_rgb(p) for p in pictures], CAPTIONS, max_length=32)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # noqa: E731
    with autocast():
        reference = model(**collated).loss  # the tower computed inside the forward, as without a cache
    cache = FeatureCache(dtype)
    losses = []
    for _ in range(2):  # first pass computes and stores, second reads
        batch = dict(collated, pixel_rows=torch.arange(len(paths)))
        inputs = cache.model_inputs(batch, paths, model=model, family=family, processor=processor, autocast=autocast)
        assert inputs["pixel_values"].dim() == 3  # features, not pixels
        with autocast():
            losses.append(model(**inputs).loss)
    assert (cache.misses, cache.hits) == (4, 4)
    for loss in losses:
        assert abs(loss.item() - reference.item()) < 1e-5
    losses[1].backward()  # the cached features feed a normal autograd graph into the LoRA weights
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_cache_entry_unreadable_at_step_time_is_recomputed_from_the_file(tiny_blip, pictures, tmp_path):
    """The loader skipped decoding (the entry existed), then the entry turned out corrupt: load and recompute."""
    from caption_train.features import DiskStore

    family, model, processor = frozen_lora(tiny_blip)
    store = DiskStore(tmp_path / "cache", torch.float32)
    cache = FeatureCache(torch.float32, store)
    paths = [str(p) for p in pictures[:2]]
    full = family.collate(processor, [load_rgb(p) for p in pictures[:2]], CAPTIONS[:2], max_length=32)
    first = cache.model_inputs(dict(full, pixel_rows=torch.arange(2)), paths, model=model, family=family, processor=processor, autocast=torch.no_grad)
    entry = store.entry(store.key_for(paths[0]))
    entry.write_bytes(b"not a safetensors file")
    text_only = {k: v for k, v in full.items() if k != "pixel_values"}
    again = cache.model_inputs(dict(text_only, pixel_rows=torch.zeros(0, dtype=torch.long)), paths, model=model, family=family, processor=processor, autocast=torch.no_grad)
    assert torch.allclose(first["pixel_values"], again["pixel_values"])
    assert cache.misses == 3 and cache.hits == 1


# ---------------------------------------------------------------------------- the feature cache, whole runs


def run_losses(capsys, tmp_path: Path, tiny_blip, dataset, name: str, *extra: str) -> tuple[list[float], str]:
    args = base_args(dataset, tiny_blip, tmp_path / name, "--epochs", "3", "--batch_size", "6", "--shuffle_captions", "true",
                     "--caption_dropout", "0.2", "--num_sample_captions", "0", "--save_every_n_epochs", "0",
                     "--validation_split", "0.25", *extra)
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    (metrics,) = (tmp_path / name).glob("*/metrics.jsonl")
    rows = read_metrics(metrics)
    return [r["train/loss"] for r in rows if "train/loss" in r] + [r["val/loss"] for r in rows if "val/loss" in r], out


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.slow
def test_cache_on_and_off_train_the_same(capsys, tmp_path, tiny_blip, shapes_dir):
    before = listing(shapes_dir)
    off, out_off = run_losses(capsys, tmp_path, tiny_blip, shapes_dir, "off", "--cache_image_features", "off", "--num_workers", "2")
    memory, out_mem = run_losses(capsys, tmp_path, tiny_blip, shapes_dir, "memory", "--num_workers", "2")  # auto
    assert "image features: not cached (--cache_image_features off)" in out_off
    assert "caching in memory (24 x" in out_mem
    # 18 training + 6 validation images: computed once each, then read for 2 more epochs (+ validation each epoch).
    assert "image features: 48 read from the cache, 24 computed" in out_mem
    assert len(off) == len(memory) == 3 * 3 + 3  # 3 steps per epoch + a validation loss per epoch
    # bf16 autocast (this CPU's default): the same to its rounding after a few optimizer steps.
    assert memory == pytest.approx(off, rel=1e-4)

    cache_dir = tmp_path / "feature-cache"
    disk1, out1 = run_losses(capsys, tmp_path, tiny_blip, shapes_dir, "disk1", "--cache_image_features", "disk", "--cache_dir", str(cache_dir))
    disk2, out2 = run_losses(capsys, tmp_path, tiny_blip, shapes_dir, "disk2", "--cache_image_features", "disk", "--cache_dir", str(cache_dir))
    assert "caching on disk in" in out1 and "24 computed" in out1
    assert "72 read from the cache, 0 computed" in out2  # the second run reuses the first run's entries
    assert disk1 == pytest.approx(off, rel=1e-4) and disk2 == pytest.approx(off, rel=1e-4)
    entries = list(cache_dir.rglob("*.safetensors"))
    assert len(entries) == 24

    # A corrupt entry and a truncated one: one warning each, recomputed, same losses.
    entries[0].write_bytes(b"garbage")
    entries[1].write_bytes(entries[1].read_bytes()[:100])
    disk3, out3 = run_losses(capsys, tmp_path, tiny_blip, shapes_dir, "disk3", "--cache_image_features", "disk", "--cache_dir", str(cache_dir))
    assert disk3 == pytest.approx(off, rel=1e-4)
    assert "2 computed" in out3
    assert listing(shapes_dir) == before  # nothing written into the dataset


def test_probe_captions_come_from_cached_features(capsys, tmp_path, tiny_blip, shapes_dir):
    """The per-epoch sample captions read the probe images' features from the cache (no vision forward) and
    caption exactly as the uncached path does (fp32, greedy)."""
    import json

    def samples(name: str, cache: str) -> tuple[list[str], str]:
        args = base_args(shapes_dir, tiny_blip, tmp_path / name, "--epochs", "2", "--batch_size", "6", "--num_sample_captions", "2",
                         "--save_every_n_epochs", "0", "--mixed_precision", "no", "--cache_image_features", cache)
        assert main(["train", *args]) == 0
        (jsonl,) = (tmp_path / name).glob("*/samples.jsonl")
        return [json.loads(line)["prediction"] for line in jsonl.read_text().splitlines()], capsys.readouterr().out

    cached, out = samples("memory", "memory")
    computed, _ = samples("off", "off")
    assert len(cached) == 4 and cached == computed
    # 24 training images computed in epoch 1 and read in epoch 2, plus the 2 probe images read after each epoch.
    assert "image features: 28 read from the cache, 24 computed" in out


CACHED_FAMILIES = {  # family: (builder module, builder name, options)
    "blip": ("caption_train.tiny", "build_tiny_blip", {"image_size": 32, "hidden_size": 64, "num_layers": 2, "num_heads": 2}),
    "git": ("tiny_families_git", "build_tiny_git", {}),
    "blip2": ("tiny_families_git", "build_tiny_blip2", {}),
    "florence2": ("tiny_families_git", "build_tiny_florence2", {"tie_word_embeddings": False}),
    "paligemma": ("tiny_families_chat", "build_tiny_paligemma", {}),
}


@pytest.mark.parametrize("name", sorted(CACHED_FAMILIES))
def test_every_cached_family_captions_the_same_from_features(tmp_path, pictures, name):
    """What the probe panel does after each epoch: generate from the frozen tower's cached output instead of the
    images, without running the tower; the captions must be the images' own (5 tokens forced, so a random model
    says something; these random models barely look at the image, so the features' effect on the text is checked
    by check_cached_step in each family's tests)."""
    import importlib

    from caption_train.models import resolve_family
    from conftest import VOCAB_TEXTS

    module, builder, options = CACHED_FAMILIES[name]
    model_dir = getattr(importlib.import_module(module), builder)(tmp_path / "model", VOCAB_TEXTS, **options)
    family, _ = resolve_family(str(model_dir))
    assert family.supports_feature_cache
    model, processor = family.load(str(model_dir), {})
    family.freeze_vision_tower(model)
    model.eval()
    images = [load_rgb(p) for p in pictures]
    features = family.image_features(model, family.pixel_inputs(processor, images)["pixel_values"])
    forced = {"max_new_tokens": 5, "min_new_tokens": 5}
    # The tower's patch embedding (a convolution in every family's tower) runs for images, not for features.
    patches = [m for m in family.vision_tower(model).modules() if isinstance(m, torch.nn.Conv2d)]
    calls: list[int] = []
    for module in patches:
        module.register_forward_hook(lambda *_: calls.append(1))
    from_images = family.generate(model, processor, images, **forced)
    assert patches and calls
    calls.clear()
    assert family.generate(model, processor, images, features=features, **forced) == from_images
    assert not calls


@pytest.mark.slow
def test_unwritable_cache_folder_warns_once_and_trains(capfd, tmp_path, tiny_blip, shapes_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--epochs", "2", "--num_sample_captions", "0",
                     "--cache_image_features", "disk", "--cache_dir", str(blocker / "cache"))
    assert main(["train", *args]) == 0
    err = capfd.readouterr().err
    assert err.count("feature cache: cannot write to") == 1
    assert "computing image features without storing them" in err


def test_disk_cache_with_flips_or_a_trainable_tower_is_a_clear_error(capsys, tmp_path, tiny_blip, shapes_dir):
    flips = base_args(shapes_dir, tiny_blip, tmp_path / "a", "--cache_image_features", "disk", "--random_flip", "0.5")
    assert main(["train", *flips]) == 2
    assert "random_flip = 0.5 changes the pixels" in capsys.readouterr().err
    vision = base_args(shapes_dir, tiny_blip, tmp_path / "b", "--cache_image_features", "memory",
                       "--peft_args", "{target_modules = ['query', 'value', 'qkv']}")
    assert main(["train", *vision]) == 2
    assert "the vision tower has trainable parameters" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_auto_says_why_it_does_not_cache(capsys, tmp_path, tiny_blip, shapes_dir):
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--random_flip", "0.5", "--num_sample_captions", "0")
    assert main(["train", *args]) == 0
    assert "image features: computed every step, not cached: random_flip = 0.5" in capsys.readouterr().out


def test_cache_dir_inside_the_dataset_is_refused(capsys, tmp_path, tiny_blip, shapes_dir):
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--cache_dir", str(shapes_dir / "cache"))
    assert main(["train", *args]) == 2
    assert "cache_dir" in capsys.readouterr().err and not (shapes_dir / "cache").exists()


def test_full_finetune_with_frozen_tower_caches_and_keeps_the_tower(capsys, tmp_path, tiny_blip, shapes_dir):
    from safetensors.torch import load_file

    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--peft_module", "none", "--freeze_vision_tower", "true",
                     "--epochs", "2", "--lr", "1e-3", "--num_sample_captions", "0", "--save_every_n_epochs", "0")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "caching in memory" in out and "24 read from the cache, 24 computed" in out
    final = Path(out.strip().splitlines()[-1])
    before, after = load_file(tiny_blip / "model.safetensors"), load_file(final / "model.safetensors")
    vision = [k for k in before if k.startswith("vision_model.")]
    text = [k for k in before if k.startswith("text_decoder.") and "weight" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_planning_sizes_the_cache_and_picks_disk_when_memory_is_short(tiny_blip, tmp_path, monkeypatch):
    from caption_train import features

    family, model, processor = frozen_lora(tiny_blip)
    common = dict(requested="auto", family=family, model=model, processor=processor, random_flip=0.0,
                  mixed_precision="bf16", cache_dir=str(tmp_path / "c"), dataset_dir=str(tmp_path / "data"))
    plan = plan_feature_cache(n_images=10, **common)
    assert plan.mode == "memory" and plan.dtype == torch.bfloat16
    monkeypatch.setattr(features, "physical_memory", lambda: 1000)
    plan = plan_feature_cache(n_images=10, **common)
    assert plan.mode == "disk" and plan.cache_dir == tmp_path / "c" and len(plan.fingerprint) == 32
    # The fingerprint follows the vision weights: a changed tower gets another folder.
    with torch.no_grad():
        family.vision_tower(model).post_layernorm.bias.add_(1.0)
    assert plan_feature_cache(n_images=10, **common).fingerprint != plan.fingerprint
    assert not os.path.exists(tmp_path / "c")  # planning writes nothing


@pytest.mark.slow
def test_compile_trains_the_compiled_text_decoder_to_the_same_losses(capsys, tmp_path, tiny_blip, shapes_dir):
    """--compile compiles the text decoder in place (torch.compile; on this CPU through inductor and the C compiler):
    the run is the same run, and checkpoints keep their parameter names (they load with peft as usual)."""
    from caption_train.inference import load_for_inference

    common = ("--epochs", "1", "--num_sample_captions", "0", "--save_every_n_epochs", "0", "--mixed_precision", "no")
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "eager", *common)]) == 0
    eager_out = capsys.readouterr().out
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "compiled", *common, "--compile", "true")]) == 0
    compiled_out = capsys.readouterr().out
    (eager,) = (tmp_path / "eager").glob("*/metrics.jsonl")
    (compiled,) = (tmp_path / "compiled").glob("*/metrics.jsonl")
    losses = [[r["train/loss"] for r in read_metrics(p) if "train/loss" in r] for p in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert "compiled: text decoder (torch.compile" in compiled_out and "compiled:" not in eager_out
    load_for_inference(Path(compiled_out.strip().splitlines()[-1]))  # the adapter's names are the usual ones


def collate_where(items: list) -> tuple[bool, list]:
    """(made in a worker process?, items)."""
    return torch.utils.data.get_worker_info() is not None, items


def test_loader_goes_in_process_once_every_image_is_cached(tiny_blip, pictures):
    """Worker processes only decode images; when every image's features are cached, batches are made in-process."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from caption_train.data.dataset import CaptionDataset
    from caption_train.data.scan import Sample
    from caption_train.train import reset_accelerator_state, skip_cached_images

    def epoch(loader) -> tuple[set[bool], list[bool]]:
        batches = list(loader)
        return {in_worker for in_worker, _ in batches}, sorted(item[0] is None for _, items in batches for item in items)

    reset_accelerator_state()
    dataset = CaptionDataset([Sample(p, "a red circle") for p in pictures])
    loader = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_where))
    cache = FeatureCache(torch.float32)
    run = SimpleNamespace(features=cache, cfg=SimpleNamespace(num_workers=2), family=BlipFamily())
    skip_cached_images(run, loader)
    assert epoch(loader) == ({True}, [False] * len(pictures))
    for path in pictures[:-1]:
        cache.memory[str(path)] = torch.zeros(1)
    skip_cached_images(run, loader)
    assert epoch(loader) == ({True}, [False] + [True] * (len(pictures) - 1))  # one image still to decode: workers
    cache.memory[str(pictures[-1])] = torch.zeros(1)
    skip_cached_images(run, loader)
    assert epoch(loader) == ({False}, [True] * len(pictures))  # nothing to decode: in-process


def test_ia3_defaults_keep_the_feature_cache_on(capsys, tmp_path, tiny_blip, shapes_dir):
    """IA3's default targets are on the text side, like LoRA's: the start-up line says the features are cached."""
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--peft_module", "IA3", "--num_sample_captions", "0", "--save_every_n_epochs", "0")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "image features: vision tower frozen, no flips, fits in memory" in out and "caching in memory (24 x" in out
    assert "adapter targets: " in out and "qkv" not in out and "fc2" not in out


def test_probe_captions_are_as_long_as_the_longest_training_caption_allows(capsys, tmp_path, tiny_blip, shapes_dir):
    """The probe panel lets the model write the longest training caption's tokens and a quarter more (at least 8),
    not a fixed 40: an untrained model that does not stop yet costs a caption's worth of decoding per image."""
    import json

    from caption_train.inference import load_for_inference
    from caption_train.train import probe_new_tokens

    assert probe_new_tokens(None) is None and probe_new_tokens([3, 5]) == 8 and probe_new_tokens([12, 40]) == 50
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--epochs", "1", "--num_sample_captions", "4",
                     "--save_every_n_epochs", "0", "--mixed_precision", "no")
    assert main(["train", *args]) == 0
    (jsonl,) = (tmp_path / "runs").glob("*/samples.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # The probe ran with the final weights (one epoch, nothing after it): caption its images again, both ways.
    (final,) = (tmp_path / "runs").glob("*/final")
    model, processor, family = load_for_inference(final)
    captions = [path.read_text().strip() for path in shapes_dir.rglob("*.txt")]
    limit = probe_new_tokens([len(ids) for ids in processor.tokenizer(captions)["input_ids"]])
    images = [load_rgb(row["image"]) for row in rows]
    assert [row["prediction"] for row in rows] == family.generate(model, processor, images, max_new_tokens=limit)
    assert [row["prediction"] for row in rows] != family.generate(model, processor, images)  # 40: this model does not stop
