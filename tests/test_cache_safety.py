"""The feature cache never hands an image another image's features: each safety check fed exactly its bad case.

    python -m pytest -q tests/test_cache_safety.py

- rows computed in a batch that loaded more images than it had to compute (some rows were already cached: a
  kohya-repeated image, a half-filled cache) take their own pixels, not the batch's first ones;
- the disk cache's folder is named by the image processor's config and the storage dtype, besides the tower's
  weights: a changed normalisation (same feature shape) or another precision is another folder, never a read;
- an entry is named by its image file's bytes, not its name: an image replaced under the same name is recomputed;
- an entry of the wrong shape or dtype on disk is recomputed (and counted), not fed to the model.
Through the `train` command where it is cheap: its "N read from the cache, M computed" line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from caption_train.adapters import wrap_model
from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.features import DiskStore, FeatureCache, plan_feature_cache
from caption_train.models import resolve_family
from caption_train.tiny import build_tiny_blip, make_shapes_dataset
from caption_train.tracking import read_metrics

from conftest import VOCAB_TEXTS, base_args

CAPTIONS = ["a red circle", "a blue square on a green triangle", "a red", "a yellow square"]
FIXED_SHAPE_FAMILIES = {  # family: (builder module, builder name, options)
    "blip": ("caption_train.tiny", "build_tiny_blip", {"image_size": 32, "hidden_size": 64, "num_layers": 2, "num_heads": 2}),
    "git": ("tiny_families_git", "build_tiny_git", {}),
    "blip2": ("tiny_families_git", "build_tiny_blip2", {}),
    "florence2": ("tiny_families_git", "build_tiny_florence2", {"tie_word_embeddings": False}),
    "paligemma": ("tiny_families_chat", "build_tiny_paligemma", {}),
}
NO_AUTOCAST = contextlib.nullcontext


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    """5 different pictures; the fifth is never in a batch below (a replacement image)."""
    folder = tmp_path_factory.mktemp("pictures")
    return [path for path, _ in make_shapes_dataset(folder, 5, seed=3, size=32, subfolders=0)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("blip"), VOCAB_TEXTS, image_size=32, patch_size=16, hidden_size=64,
                           num_layers=2, num_heads=2, max_position_embeddings=32)


def frozen(model_dir: Path):
    """The model with LoRA on its text side and its vision tower frozen, as training with the cache has it."""
    family, _ = resolve_family(str(model_dir))
    model, processor = family.load(str(model_dir), {})
    model = wrap_model(model, family, "LoRA", {})
    family.freeze_vision_tower(model)
    return family, model.eval(), processor


# ---------------------------------------------------------------------------- computed rows -> their own pixels


@pytest.mark.parametrize("layout", ["half-filled", "repeated"])
@pytest.mark.parametrize("name", sorted(FIXED_SHAPE_FAMILIES))
def test_rows_computed_in_a_batch_that_loaded_more_images_take_their_own_pixels(tmp_path, pictures, name, layout):
    """Every image of the batch was decoded (the loader decides at the start of an epoch), but some rows' features
    were cached meanwhile: by an earlier batch of the epoch (half-filled) or because the same image comes twice
    (a kohya repeat folder). The rows still missing are computed from their own rows of pixel_values, so the step
    gives the uncached step's loss and logits; giving them the batch's first pixels would not."""
    module, builder, options = FIXED_SHAPE_FAMILIES[name]
    family, model, processor = frozen(getattr(importlib.import_module(module), builder)(tmp_path / "model", VOCAB_TEXTS, **options))
    if layout == "half-filled":
        paths, cached = [str(p) for p in pictures[:4]], [0, 2]
    else:  # image 0 twice in the batch; it was cached by an earlier batch of this epoch
        paths, cached = [str(pictures[0]), str(pictures[1]), str(pictures[0]), str(pictures[2])], [0]
    prompt = family.training_prompt(None)
    batch = family.collate(processor, [load_rgb(p) for p in paths], CAPTIONS, max_length=80, prompt=prompt)
    with torch.no_grad():
        reference = model(**batch)

    cache = FeatureCache(torch.float32)
    cache.features_for([paths[row] for row in cached], model=model, family=family, processor=processor, autocast=NO_AUTOCAST)
    inputs = cache.model_inputs(dict(batch, pixel_rows=torch.arange(len(paths))), paths, model=model, family=family,
                                processor=processor, autocast=NO_AUTOCAST)
    known = {paths[row] for row in cached}
    hits = sum(path in known for path in paths)
    assert (cache.hits, cache.misses) == (hits, len(known) + len(paths) - hits) and len(paths) - hits < len(paths)
    with torch.no_grad():
        output = model(**inputs)
    assert abs(output.loss.item() - reference.loss.item()) < 1e-5, (output.loss, reference.loss)
    torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=0)
    # The check can see wrong features: each row given the next row's features changes the logits.
    features = family.image_features(model, family.pixel_inputs(processor, [load_rgb(p) for p in paths])["pixel_values"])
    with torch.no_grad():
        swapped = model(**{k: v for k, v in inputs.items() if k != "pixel_values"}, **family.feature_inputs(features.roll(1, 0)))
    assert (swapped.logits - reference.logits).abs().max() > 1e-4


def step_losses(run_parent: Path) -> list[float]:
    (metrics,) = run_parent.glob("*/metrics.jsonl")
    return [row["train/loss"] for row in read_metrics(metrics) if "train/loss" in row]


def test_a_kohya_repeat_folder_trains_the_same_with_the_cache(capsys, tmp_path, tiny_model):
    """Through `train`: a 3_name/ repeat folder serves each image 3 times an epoch, so later batches of the first
    epoch hold decoded images whose features an earlier batch cached. The cached run's step losses are the
    uncached run's (fp32); a row given another row's pixels would change them."""
    dataset = tmp_path / "data"
    make_shapes_dataset(dataset / "3_shapes", 5, seed=4, size=32, subfolders=0)
    common = ("--epochs", "1", "--batch_size", "4", "--lr", "1e-3", "--mixed_precision", "no", "--num_sample_captions", "0",
              "--save_every_n_epochs", "0")
    losses = {}
    for mode in ("off", "memory"):
        assert main(["train", *base_args(dataset, tiny_model, tmp_path / mode, *common, "--cache_image_features", mode)]) == 0
        losses[mode] = step_losses(tmp_path / mode)
    out = capsys.readouterr().out
    assert "5 training (15 with repeats)" in out
    # Every image computed at least once (twice when it comes twice in a batch before it is cached); the rest read.
    read, computed = map(int, re.search(r"image features: (\d+) read from the cache, (\d+) computed", out).groups())
    assert read + computed == 15 and read >= 5 and computed >= 5
    assert len(losses["memory"]) == 4 and losses["memory"] == pytest.approx(losses["off"], rel=1e-6, abs=0)


# ---------------------------------------------------------------------------- the disk cache's folder (fingerprint)


def disk_plan(family, model, processor, tmp_path: Path, mixed_precision: str = "no"):
    return plan_feature_cache(requested="disk", family=family, model=model, processor=processor, n_images=4, random_flip=0.0,
                              mixed_precision=mixed_precision, cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / "data"))


@pytest.mark.parametrize("change", [{"image_mean": [0.4, 0.5, 0.6]}, {"image_std": [0.2, 0.3, 0.4]}, {"do_normalize": False},
                                    {"resample": 0}])
def test_a_changed_image_processor_gets_another_cache_folder(tmp_path, tiny_model, change):
    """Same tower weights, another image processor config whose features have the same shape (so no shape check
    could tell): another fingerprint, so the entries computed from differently processed pixels are never read."""
    family, model, processor = frozen(tiny_model)
    before = disk_plan(family, model, processor, tmp_path)
    shape = family.image_feature_shape(model, processor)
    for key, value in change.items():
        setattr(processor.image_processor, key, value)
    assert family.image_feature_shape(model, processor) == shape
    after = disk_plan(family, model, processor, tmp_path)
    assert after.fingerprint != before.fingerprint and after.cache_dir == before.cache_dir


def test_another_precision_gets_another_cache_folder(tmp_path, tiny_model):
    """fp32 and bf16 entries of the same images live in separate folders: a bf16 run neither reads nor replaces
    the fp32 run's entries."""
    family, model, processor = frozen(tiny_model)
    fp32, bf16 = disk_plan(family, model, processor, tmp_path, "no"), disk_plan(family, model, processor, tmp_path, "bf16")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert fp32.fingerprint != bf16.fingerprint
    assert disk_plan(family, model, processor, tmp_path, "no").fingerprint == fp32.fingerprint  # and stable


# ---------------------------------------------------------------------------- entries: content key, shape, dtype


def disk_cache(tmp_path: Path, dtype=torch.float32) -> FeatureCache:
    return FeatureCache(dtype, DiskStore(tmp_path / "cache", dtype))


def test_an_image_replaced_under_the_same_name_is_recomputed(tmp_path, tiny_model, pictures):
    """The entry is named by the file's bytes: another picture saved under the same name has no entry yet, so
    its features are computed from it; the old picture's entry is not read."""
    family, model, processor = frozen(tiny_model)
    image = tmp_path / "data" / "photo.png"
    image.parent.mkdir()
    shutil.copyfile(pictures[0], image)
    cache = disk_cache(tmp_path)
    features = lambda: cache.features_for([str(image)], model=model, family=family, processor=processor, autocast=NO_AUTOCAST)  # noqa: E731
    old = features()
    shutil.copyfile(pictures[4], image)  # another picture, the same name
    assert not cache.skip_predicate()(str(image))  # the loader decodes it (its features are unknown)
    new = features()
    assert cache.misses == 2 and cache.hits == 0
    expected = family.image_features(model, family.pixel_inputs(processor, [load_rgb(pictures[4])])["pixel_values"])
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=0)
    assert (new - old).abs().max() > 1e-3
    shutil.copyfile(pictures[0], image)  # the first picture again: its entry is still there, and read
    torch.testing.assert_close(features(), old, atol=0, rtol=0)
    assert cache.hits == 1


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_an_entry_of_the_wrong_shape_or_dtype_is_recomputed(tmp_path, tiny_model, pictures, capfd, bad):
    """An entry on disk whose shape or dtype is not what this model and precision give (a stale layout, a file
    from another tool) is not fed to the model: it is counted as computed, warned about, and replaced."""
    from safetensors.torch import load_file, save_file

    family, model, processor = frozen(tiny_model)
    cache = disk_cache(tmp_path)
    path = str(pictures[1])
    good = cache.features_for([path], model=model, family=family, processor=processor, autocast=NO_AUTOCAST)[0]
    entry = cache.disk.entry(cache.disk.key_for(path))
    wrong = good[:-1].clone() if bad == "shape" else good.to(torch.float16)  # one token short / half precision
    save_file({"features": wrong.contiguous()}, str(entry))

    again = cache.features_for([path], model=model, family=family, processor=processor, autocast=NO_AUTOCAST)[0]
    assert (cache.hits, cache.misses) == (0, 2)
    assert again.dtype == torch.float32 and again.shape == good.shape
    torch.testing.assert_close(again, good, atol=1e-6, rtol=0)
    assert f"feature cache: entry {entry} has shape {tuple(wrong.shape)} {wrong.dtype}, expected" in capfd.readouterr().err
    stored = load_file(str(entry))["features"]
    assert stored.dtype == torch.float32 and stored.shape == good.shape  # replaced by the right one


# ---------------------------------------------------------------------------- through `train`: a second run


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """8 images, one epoch with the disk cache (fp32): (the dataset, the cache folder its features went to)."""
    root = tmp_path_factory.mktemp("first-run")
    make_shapes_dataset(root / "data", 8, seed=5, size=32, subfolders=0)
    out = train_with_disk_cache(root / "data", tiny_model, root / "runs", root / "cache")
    assert "image features: 0 read from the cache, 8 computed" in out, out
    return root / "data", root / "cache"


def train_with_disk_cache(dataset: Path, model: Path, output: Path, cache: Path, *extra: str) -> str:
    """One epoch of `train` with --cache_image_features disk; its stdout."""
    import io
    from contextlib import redirect_stdout

    args = base_args(dataset, model, output, "--num_sample_captions", "0", "--save_every_n_epochs", "0", "--mixed_precision", "no",
                     "--cache_image_features", "disk", "--cache_dir", str(cache), *extra)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(["train", *args]) == 0
    return buffer.getvalue()


def copies(tmp_path: Path, first_run) -> tuple[Path, Path]:
    """The first run's dataset and cache, copied: each test changes its own."""
    dataset, cache = first_run
    return Path(shutil.copytree(dataset, tmp_path / "data")), Path(shutil.copytree(cache, tmp_path / "cache"))


def fingerprint_folders(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir()}


def test_train_reuses_the_cache_and_recomputes_after_an_image_processor_change(tmp_path, tiny_model, first_run):
    """A second run on the same data reads every feature; a run with the same weights but another normalisation
    in the saved processor config (the same feature shape) computes every feature again, in another folder."""
    dataset, cache = copies(tmp_path, first_run)
    assert "image features: 8 read from the cache, 0 computed" in train_with_disk_cache(dataset, tiny_model, tmp_path / "same", cache)
    changed = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    config_file = changed / "processor_config.json"  # transformers 5 saves the image processor's config in here
    config = json.loads(config_file.read_text())
    config["image_processor"]["image_mean"] = [0.3, 0.4, 0.5]
    config_file.write_text(json.dumps(config))
    before = fingerprint_folders(cache)
    out = train_with_disk_cache(dataset, changed, tmp_path / "changed", cache)
    assert "image features: 0 read from the cache, 8 computed" in out, out
    assert len(fingerprint_folders(cache) - before) == 1


def test_train_in_another_precision_leaves_the_fp32_entries_alone(tmp_path, tiny_model, first_run):
    """A bf16 run computes its own (bf16) entries in its own folder; the next fp32 run still reads every entry."""
    dataset, cache = copies(tmp_path, first_run)
    out = train_with_disk_cache(dataset, tiny_model, tmp_path / "bf16", cache, "--mixed_precision", "bf16")
    assert "bfloat16)" in out, out  # the start-up line: bf16 entries
    assert "image features: 0 read from the cache, 8 computed" in out, out
    assert len(fingerprint_folders(cache)) == 2
    assert "image features: 8 read from the cache, 0 computed" in train_with_disk_cache(dataset, tiny_model, tmp_path / "fp32", cache)


def test_train_recomputes_an_image_replaced_under_its_name(tmp_path, tiny_model, pictures):
    """Two runs on one dataset folder; between them one image is replaced by another picture under its own name.
    The second run computes that one and reads the other seven."""
    make_shapes_dataset(tmp_path / "data", 8, seed=5, size=32, subfolders=0)
    first = train_with_disk_cache(tmp_path / "data", tiny_model, tmp_path / "runs", tmp_path / "cache")
    assert "image features: 0 read from the cache, 8 computed" in first, first
    shutil.copyfile(pictures[4], tmp_path / "data" / "img_0000.png")
    out = train_with_disk_cache(tmp_path / "data", tiny_model, tmp_path / "runs", tmp_path / "cache")
    assert "image features: 7 read from the cache, 1 computed" in out, out


def test_train_recomputes_entries_of_the_wrong_shape_or_dtype(tmp_path, tiny_model, first_run):
    """In a copy of the first run's cache, one entry rewritten one token short and one in fp16: the next run
    computes those two again and reads the other six."""
    from safetensors.torch import load_file, save_file

    dataset, cache = copies(tmp_path, first_run)
    images = sorted(dataset.glob("*.png"))
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    store = DiskStore(folder, torch.float32)
    for image, change in zip(images[:2], (lambda t: t[:-1], lambda t: t.to(torch.float16))):
        entry = store.entry(store.key_for(str(image)))
        save_file({"features": change(load_file(str(entry))["features"]).contiguous()}, str(entry))
    out = train_with_disk_cache(dataset, tiny_model, tmp_path / "again", cache)
    assert "image features: 6 read from the cache, 2 computed" in out, out
