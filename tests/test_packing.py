"""Padding-free packing (packing.py): a packed batch gives the padded batch's per-row losses and gradients (fp32, 1e-5)
for every family that packs, with rows of different image sizes and caption lengths, also from cached image features;
the families that cannot pack say why (auto) or refuse (on); and the train command trains the same packed as padded.

Per-row losses are computed here from the model's own logits (decoder-only: position i predicts label i + 1), summed
per row through the packed batch's row index: what is checked is the packed forward, whatever loss uses it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.data.scan import scan_dataset
from caption_train.errors import UserError
from caption_train.features import FeatureCache
from caption_train.models import registered_families, resolve_family
from caption_train.models.base import IGNORE_INDEX
from caption_train.packing import PackedBatch, pack_rows, packed_rows, plan_packing
from caption_train.tracking import read_metrics

from conftest import VOCAB_TEXTS, base_args
from mixed_dataset import make_mixed_dataset
from tiny_families_chat import BUILDERS, build_tiny_paligemma

PACKED = ["qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "paligemma"] + (["smolvlm"] if "smolvlm" in BUILDERS else [])
# Qwen's image token count follows the image's size: up to 112 x 112 px here (16 image tokens), so rows differ by it.
BUILD_ARGS = {"qwen2_vl": {"max_pixels": 112 * 112}, "qwen2_5_vl": {"max_pixels": 112 * 112}}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    make_mixed_dataset(out, 12, seed=3)
    return out


def build(name: str, out: Path) -> Path:
    builder = build_tiny_paligemma if name == "paligemma" else BUILDERS[name]
    return builder(out / name, VOCAB_TEXTS, **BUILD_ARGS.get(name, {}))


def load_with_lora(model_dir: Path):
    from caption_train.adapters import wrap_model

    family, _ = resolve_family(str(model_dir))
    model, processor = family.load(str(model_dir), {})
    model = wrap_model(model, family, "LoRA", {"lora_dropout": 0.0, "init_lora_weights": False})  # non-zero B: gradients reach A
    return family, model.eval(), processor  # eval: no dropout anywhere, so both forwards compute the same function


def first_rows(mixed_dir: Path, n: int = 5) -> tuple[list[Path], list[str]]:
    """n samples, the shortest caption first: the first packed row is shorter than the later ones."""
    samples = sorted(scan_dataset(mixed_dir, probe=False).samples, key=lambda s: str(s.image_path))[:n]
    samples.sort(key=lambda s: len(s.caption))
    return [s.image_path for s in samples], [s.caption for s in samples]


def row_losses(model, batch) -> dict[str, torch.Tensor]:
    """The batch's mean token cross-entropy (and the model's own loss), each row's summed cross-entropy and target
    count, in fp32: a padded batch's rows are its batch rows, a packed batch's come from its row index."""
    output = model(**batch)
    labels = batch["labels"]
    rows = packed_rows(batch)
    if rows is None:
        rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)
    logits, labels, rows = output.logits[:, :-1].float(), labels[:, 1:], rows[:, 1:]
    keep = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    n = int(rows.max()) + 1
    return {"loss": nll.mean(), "model_loss": output.loss, "row_sum": torch.zeros(n).index_add(0, rows[keep], nll),
            "row_tokens": torch.bincount(rows[keep], minlength=n)}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    result = row_losses(model, batch)
    result["loss"].backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return result, grads


def assert_same(result, grads, reference, reference_grads):
    for key in ("loss", "model_loss", "row_sum"):
        torch.testing.assert_close(result[key], reference[key], rtol=1e-5, atol=1e-5, msg=key)
    assert result["row_tokens"].tolist() == reference["row_tokens"].tolist()
    assert grads.keys() == reference_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", PACKED)
def test_packed_batch_gives_the_padded_rows_losses_and_gradients(tmp_path, mixed_dir, name):
    """Rows of different image sizes and caption lengths, fp32, LoRA: the packed batch (positions restarting per row,
    Qwen's M-RoPE positions per row, no attention mask, no padding) gives each row the loss and target count it has
    in the padded batch, the same mean loss and the same gradients, to 1e-5; also with the images' features from the
    feature cache (computed on a first pass, read on a second) in place of the vision tower."""
    family, model, processor = load_with_lora(build(name, tmp_path))
    paths, captions = first_rows(mixed_dir)
    prompt = family.training_prompt(None)
    batch = family.collate(processor, [load_rgb(p) for p in paths], captions, max_length=256, prompt=prompt)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) >= 3, lengths  # rows of different lengths: the padded batch has padding to leave out
    reference, reference_grads = loss_and_grads(model, batch)

    plan = plan_packing("auto", family, model, batch_size=len(paths))
    assert plan.on, plan.message
    packed = plan.pack(model, dict(batch))
    assert isinstance(packed, PackedBatch) and packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed.rows.tolist() == [[row for row, n in enumerate(lengths) for _ in range(n)]]
    result, grads = loss_and_grads(model, packed)
    assert_same(result, grads, reference, reference_grads)
    # The training loss (family.caption_loss) finds the packed batch's samples from its row index by itself.
    caption = family.caption_loss(model, packed)
    torch.testing.assert_close(caption.row_loss_sum, reference["row_sum"], rtol=1e-5, atol=1e-5)
    assert caption.row_tokens.tolist() == reference["row_tokens"].tolist()
    torch.testing.assert_close(caption.loss, reference["loss"], rtol=1e-5, atol=1e-5)

    if family.supports_feature_cache:
        family.freeze_vision_tower(model)
        cache = FeatureCache(torch.float32)
        strs = [str(p) for p in paths]
        for loaded in (True, False):  # computed from the batch's pixels, then read from the cache
            images = [load_rgb(p) for p in paths] if loaded or family.variable_image_features else [None] * len(paths)
            collated = family.collate(processor, images, captions, max_length=256, prompt=prompt)
            collated["pixel_rows"] = torch.tensor([row for row, image in enumerate(images) if image is not None], dtype=torch.long)
            inputs = cache.model_inputs(collated, strs, model=model, family=family, processor=processor, autocast=contextlib.nullcontext)
            result, grads = loss_and_grads(model, plan.pack(model, inputs))
            assert_same(result, grads, reference, reference_grads)
        assert cache.misses == len(paths) and cache.hits == len(paths)


def test_gemma3_is_not_packed_because_transformers_masks_its_packed_rows_wrongly(tmp_path, mixed_dir):
    """Gemma 3: `auto` stays unpacked and says why, `on` is an error. The reason is real (a canary: if this starts
    failing, transformers builds Gemma 3's packed masks right and gemma3 can join PACKED_MODEL_TYPES): its sliding-window
    layers look up image tokens at each token's position within its row, so in a packed batch a row longer than the
    first row's image offset gets bidirectional attention among its caption tokens, and its loss differs."""
    family, model, processor = load_with_lora(build("gemma3", tmp_path))
    plan = plan_packing("auto", family, model, batch_size=5)
    assert not plan.on and "Gemma 3's sliding-window layers" in plan.message
    with pytest.raises(UserError, match="--packing on: transformers 5.25 masks Gemma 3"):
        plan_packing("on", family, model, batch_size=5)
    paths, captions = first_rows(mixed_dir)
    batch = family.collate(processor, [load_rgb(p) for p in paths], captions, max_length=256, prompt=family.training_prompt(None))
    with torch.no_grad():
        padded = row_losses(model, batch)["row_sum"]
        packed = row_losses(model, pack_rows(batch, family.row_position_ids(model, batch)))["row_sum"]
    lengths = batch["attention_mask"].sum(dim=1)
    assert torch.allclose(padded[lengths == lengths[0]], packed[lengths == lengths[0]], atol=1e-5)  # rows as long as the first: right
    assert (padded - packed).abs().max() > 1e-3  # longer rows: wrong


@pytest.mark.parametrize("name", ["blip", "git", "blip-2", "florence2"])
def test_families_that_cannot_pack_say_why(name):
    """BLIP, GIT, BLIP-2 and Florence-2 read each row's image inside the sequence's own attention (cross-attention,
    prefix tokens, an encoder): their refusal names the reason, which the start-up line and the `on` error carry."""
    family = registered_families()[name]
    refusal = family.packing_refusal(None)
    assert refusal
    plan = plan_packing("auto", family, None, batch_size=8)
    assert not plan.on and plan.message == f"packing: off ({refusal}): rows padded to their batch's longest"
    with pytest.raises(UserError, match=r"^--packing on: .* use --packing auto or off$"):
        plan_packing("on", family, None, batch_size=8)


def test_eager_attention_is_not_packed_by_auto(tmp_path):
    """Eager attention keeps the whole packed batch's attention weights: `auto` leaves it padded, `on` packs."""
    from caption_train.adapters import wrap_model

    model_dir = build("llava", tmp_path)
    family, _ = resolve_family(str(model_dir))
    model, _ = family.load(str(model_dir), {"attn_implementation": "eager"})
    model = wrap_model(model, family, "LoRA", {})
    assert "eager attention" in plan_packing("auto", family, model, batch_size=4).message
    assert plan_packing("on", family, model, batch_size=4).on
    assert not plan_packing("auto", family, model, batch_size=1).on


# ---------------------------------------------------------------------------------------------
# Through the train command


def run_losses(run_dir: Path, key: str) -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if key in row]


def test_train_packed_matches_padded(capsys, tmp_path, mixed_dir):
    """Qwen2-VL on rows of mixed image sizes and caption lengths, fp32, the same random batches (grouping off), no
    dropout: a packed run's training and validation losses are the padded run's (to 1e-5), with the image features
    cached in epoch 1 and read in epoch 2; the start-up says it packs, and no position the model saw was padding."""
    model_dir = build("qwen2_vl", tmp_path)
    common = ("--batch_size", "4", "--epochs", "2", "--validation_split", "0.25", "--num_sample_captions", "0", "--mixed_precision", "no",
              "--group_by_length", "off", "--peft_args", "{lora_dropout = 0.0}", "--lr", "1e-3")
    runs = {}
    for packing in ("auto", "off"):
        assert main(["train", *base_args(mixed_dir, model_dir, tmp_path / packing, *common, "--packing", packing)]) == 0
        out = capsys.readouterr().out
        runs[packing] = Path(out.strip().splitlines()[-1]).parent
        assert "image features: 12 read from the cache, 12 computed" in out  # 9 training + 3 validation images
        if packing == "auto":
            assert "packing: on (auto): each batch's rows in one sequence without padding, positions restarting per row (sdpa with a per-row mask)" in out
            assert "padding: 0.0% of the " in out and "(packed, random batches)" in out
        else:
            assert "packing: off (--packing off)" in out
    assert run_losses(runs["auto"], "train/padding_fraction") == [0.0] and run_losses(runs["off"], "train/padding_fraction")[0] > 0.05
    for key in ("train/loss", "val/loss"):
        assert run_losses(runs["auto"], key) == pytest.approx(run_losses(runs["off"], key), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("packing, code, message", [
    ("on", 2, "error: --packing on: BLIP's text decoder cross-attends to one image per sequence; use --packing auto or off"),
    ("auto", 0, "packing: off (BLIP's text decoder cross-attends to one image per sequence): rows padded to their batch's longest"),
])
def test_train_packing_on_a_family_that_cannot(capsys, tmp_path, tiny_blip, shapes_dir, packing, code, message):
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--num_sample_captions", "0", "--packing", packing)]) == code
    captured = capsys.readouterr()
    assert message in (captured.err if code else captured.out)
    if code:
        assert captured.err.strip().splitlines()[-1] == message and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_process_training_packs(tmp_path, mixed_dir):
    """torchrun, 2 CPU processes (DDP): each process packs its own batches; the run finishes with one start-up line
    and a padding line of 0% over both processes' batches."""
    import subprocess
    import sys

    from conftest import REPO
    from test_train import free_port

    model_dir = build("qwen2_vl", tmp_path)
    out = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "train2.py"), *base_args(mixed_dir, model_dir, out, "--batch_size", "3", "--epochs", "2", "--num_sample_captions", "0")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("packing: on (auto)") == 1 and result.stdout.count("padding: 0.0% of the ") == 1
    (run_dir,) = out.iterdir()
    # 12 images / (3 per batch x 2 processes) -> 2 optimizer steps per epoch.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4]
    assert run_losses(run_dir, "train/padding_fraction") == [0.0]
