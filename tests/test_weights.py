"""Frozen weights in bf16 where compute is bf16 (caption_train/weights.py), through the commands a user types.

Under `--mixed_precision bf16` the train command's model holds its frozen weights in bf16 and what trains and the
normalization layers in fp32; its steps give the losses of fp32 weights under the same autocast and it learns as
they do; resume, the feature cache, probe captions and the page work on it; `caption` / `evaluate` load in the
dtype they print; `merge` folds the adapter's fp32 delta into a bf16 base and rounds once. bf16 is forced in every
test: `auto` gives fp32 on CPUs without native bf16 (where the fp32 path, checked here too, is today's).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caption_train.cli import main
from caption_train.config import load_train_config
from caption_train.models.base import unwrap_peft
from caption_train.precision import describe_inference_dtype
from caption_train.tiny import build_tiny_blip, make_shapes_dataset
from caption_train.tracking import read_metrics
from caption_train.train import TrainingHooks, TrainingStopped, train

from conftest import VOCAB_TEXTS, base_args
from tiny_every_family import BUILDERS as EVERY_FAMILY
from tiny_families_chat import build_tiny_qwen2_vl

BF16 = ("--mixed_precision", "bf16")
FP32_WEIGHTS = ("--model_config", '{dtype = "float32"}')  # the load before bf16 weights: fp32, cast at every matmul
QUIET = ("--save_every_n_epochs", "0", "--max_length", "64", "--peft_args", "{lora_dropout = 0.0}")
# Normalization layers told apart by their module's name (norm1, post_layernorm, LayerNorm, input_layernorm, ln_q,
# q_norm ...) or torch class (GIT's projection is Sequential(Linear, LayerNorm)), independently of weights.is_norm,
# which these tests check.
NORM_NAME = re.compile(r"norm|^ln", re.IGNORECASE)
WEIGHTS_LINE = re.compile(r"^weights: .*$", re.MULTILINE)


def is_norm_layer(name: str, module: torch.nn.Module) -> bool:
    return bool(NORM_NAME.search(name.rsplit(".", 1)[-1])) or isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm))


class CaptureWeights(TrainingHooks):
    """The trained model's parameters as setup left them: {name: (dtype, trains, bytes)}, and the modules the model
    itself keeps in fp32 (transformers' _keep_in_fp32_modules, e.g. BLIP-2's Q-Former)."""

    def on_setup(self, run):
        model = unwrap_peft(run.model)  # the hook protocol's model is already unwrapped from accelerate
        self.params = {name: (p.dtype, p.requires_grad, p.numel() * p.element_size()) for name, p in model.named_parameters()}
        self.norms = {f"{name}.{key}" for name, module in model.named_modules() if is_norm_layer(name, module)
                      for key, _ in module.named_parameters(recurse=False)}
        self.kept_fp32 = {name for module in model.modules() for name in getattr(module, "_keep_in_fp32_modules", None) or ()}


def dtypes_by_role(capture: CaptureWeights) -> dict[str, set[torch.dtype]]:
    """{trainable, norms, frozen, kept fp32 by the model}: the dtypes each role's parameters have."""
    roles: dict[str, set[torch.dtype]] = defaultdict(set)
    for name, (dtype, trains, _) in capture.params.items():
        kept = any(part in capture.kept_fp32 for part in name.split("."))
        role = "trainable" if trains else "norms" if name in capture.norms else "kept fp32" if kept else "frozen"
        roles[role].add(dtype)
    return dict(roles)


def frozen_bytes(capture: CaptureWeights) -> int:
    return sum(size for _, trains, size in capture.params.values() if not trains)


def losses(final: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in row]


def run_train(args: list[str]) -> tuple[Path, CaptureWeights, str]:
    """train(), as the train command runs it, with its stdout and its model's weights as set up."""
    capture, out = CaptureWeights(), io.StringIO()
    with contextlib.redirect_stdout(out):
        final = train(load_train_config(args), hooks=capture)
    return final, capture, out.getvalue()


def save_in_bf16(model_dir: Path) -> Path:
    """Re-save a tiny model's weights in bf16, as most large checkpoints are shipped (config.json says bfloat16)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    return model_dir


# ---------------------------------------------------------------------------------------------
# The train command: dtypes, bytes, losses, learning, probe captions (BLIP and a chat VLM)


MODELS = {
    "blip": lambda out: build_tiny_blip(out, VOCAB_TEXTS, image_size=32, patch_size=16, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32),
    # Qwen2.5-VL: RMSNorms in the vision tower too (an fp32 norm's output reaches a bf16 layer: only autocast
    # makes that work, also where setup runs the tower to size the feature cache); Qwen2-VL is in EVERY_FAMILY.
    "qwen2_5_vl": lambda out: build_tiny_qwen2_vl(out, VOCAB_TEXTS, model_type="qwen2_5_vl"),
}
EPOCHS = 4  # 8 images in one batch: one optimizer step per epoch, every step on the same batch


@pytest.fixture(scope="module", params=sorted(MODELS))
def runs(request, tmp_path_factory) -> dict[str, tuple[Path, CaptureWeights, str]]:
    """The same LoRA run with bf16 frozen weights, with fp32 weights under the same bf16 autocast, and in fp32."""
    root = tmp_path_factory.mktemp(request.param)
    model = MODELS[request.param](root / "model")
    make_shapes_dataset(root / "data", 8, seed=2, size=56)
    variants = {"bf16": (str(EPOCHS), *BF16), "fp32 weights": (str(EPOCHS), *BF16, *FP32_WEIGHTS), "fp32": ("1", "--mixed_precision", "no")}
    return {name: run_train(base_args(root / "data", model, root / name, "--lr", "1e-2", *QUIET, "--epochs", *extra))
            for name, extra in variants.items()}


def test_frozen_weights_are_bf16_what_trains_and_the_norms_fp32(runs):
    final, capture, out = runs["bf16"]
    roles = dtypes_by_role(capture)
    assert roles == {"trainable": {torch.float32}, "norms": {torch.float32}, "frozen": {torch.bfloat16}}, roles
    assert all(".lora_" in name for name, (_, trains, _) in capture.params.items() if trains)
    # The start-up line, beside the precision line.
    assert re.search(r"^precision: bf16 autocast \(as asked\)\nweights: frozen [\d.]+ [kMG]B in bf16, norms [\d.]+ [kMG]B in fp32, "
                     r"trainable [\d.]+ [kMG]B in fp32 \(bf16 autocast: frozen weights need no fp32 copy\)$", out, re.MULTILINE), out
    # Probe captions after every epoch ran on these weights.
    samples = [json.loads(line) for line in (final.parent / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * EPOCHS and all(isinstance(row["prediction"], str) for row in samples)
    assert {tensor.dtype for tensor in load_file(str(final / "adapter_model.safetensors")).values()} == {torch.float32}


def test_fp32_where_compute_is_fp32_or_the_model_config_asks(runs):
    for name, reason in (("fp32 weights", "as model_config.dtype asks"), ("fp32", "fp32 compute")):
        _, capture, out = runs[name]
        assert {dtype for dtype, _, _ in capture.params.values()} == {torch.float32}, name
        assert WEIGHTS_LINE.search(out).group().endswith(f"in fp32 ({reason})"), out


def test_frozen_weights_take_half_the_memory(runs):
    bf16, fp32 = runs["bf16"][1], runs["fp32 weights"][1]
    assert frozen_bytes(bf16) < 0.52 * frozen_bytes(fp32)  # half, plus the norms held in fp32
    trainable = lambda capture: sum(size for _, trains, size in capture.params.values() if trains)  # noqa: E731
    assert trainable(bf16) == trainable(fp32) > 0


def test_steps_give_the_losses_of_fp32_weights_under_the_same_autocast_and_learn_as_much(runs):
    bf16, fp32_weights = losses(runs["bf16"][0]), losses(runs["fp32 weights"][0])
    # Step 1 is the base model's loss, step 2 follows one optimizer step: equal within bf16's rounding.
    assert bf16[:2] == pytest.approx(fp32_weights[:2], rel=1e-2)
    # The learning check: the loss falls over the run, by as much as with fp32 weights.
    assert bf16[-1] < bf16[0]
    assert bf16[0] - bf16[-1] > 0.8 * (fp32_weights[0] - fp32_weights[-1]), (bf16, fp32_weights)


def test_a_full_fine_tune_keeps_every_weight_in_fp32(tmp_path, tiny_blip, shapes_dir):
    _, capture, out = run_train(base_args(shapes_dir, tiny_blip, tmp_path, "--peft_module", "none", "--num_sample_captions", "0", *QUIET[:4], *BF16))
    assert {dtype for dtype, _, _ in capture.params.values()} == {torch.float32}
    assert WEIGHTS_LINE.search(out).group().endswith("(full fine-tune: every weight trains)"), out


@pytest.mark.parametrize("name", sorted(set(EVERY_FAMILY) - set(MODELS)))
def test_every_family_trains_on_bf16_frozen_weights(tmp_path, name):
    """Every other family (BLIP is above): two LoRA steps on the same batch lower the loss; frozen
    weights bf16 (except what the model itself keeps in fp32: BLIP-2's Q-Former), norms and adapters fp32."""
    model = EVERY_FAMILY[name](tmp_path / "model")
    make_shapes_dataset(tmp_path / "data", 4, seed=2, size=40, subfolders=0)
    final, capture, _ = run_train(base_args(tmp_path / "data", model, tmp_path / "runs", "--epochs", "2", "--batch_size", "4", "--lr", "1e-2",
                                            "--num_sample_captions", "1", *QUIET, *BF16))
    roles = dtypes_by_role(capture)
    assert roles["trainable"] == roles["norms"] == {torch.float32} and roles["frozen"] == {torch.bfloat16}, roles
    first, second = losses(final)
    assert second < first


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.slow
def test_resume_with_bf16_weights_continues_exactly(tmp_path, tiny_blip, shapes_dir):
    from test_resume import STOCHASTIC, StopAtStep, assert_same_weights

    shorter = (*STOCHASTIC, "--epochs", "2", *BF16)  # 2 epochs x 3 steps; stopped in the second epoch
    args = base_args(shapes_dir, tiny_blip, tmp_path / "resumed", *shorter)
    uninterrupted = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path / "full", *shorter)))
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(4))
    final, capture, _ = run_train([*args, "--resume", "auto"])
    assert dtypes_by_role(capture) == {"trainable": {torch.float32}, "norms": {torch.float32}, "frozen": {torch.bfloat16}}
    assert losses(final) == pytest.approx(losses(uninterrupted), rel=1e-5)
    assert_same_weights(final, uninterrupted)


# ---------------------------------------------------------------------------------------------
# A bf16 checkpoint: the feature cache, merge, caption / evaluate


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory) -> Path:
    return save_in_bf16(MODELS["blip"](tmp_path_factory.mktemp("bf16-base")))


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eight")
    make_shapes_dataset(out, 8, seed=2, size=32)
    return out


@pytest.fixture(scope="module")
def bf16_lora(tmp_path_factory, bf16_base, eight) -> tuple[Path, Path, str]:
    """A LoRA run on bf16 frozen weights with the disk feature cache: (final/, cache folder, stdout)."""
    out = tmp_path_factory.mktemp("lora")
    args = base_args(eight, bf16_base, out / "runs", "--epochs", "2", "--lr", "3e-2", "--num_sample_captions", "0",
                     "--cache_image_features", "disk", "--cache_dir", str(out / "cache"), *QUIET, *BF16)
    final, _, stdout = run_train(args)
    return final, out / "cache", stdout


def test_the_feature_cache_of_bf16_weights_is_not_read_with_fp32_weights(tmp_path, bf16_lora, bf16_base, eight):
    """The checkpoint holds bf16 values, so fp32 and bf16 loads hold the same numbers, but the fp32-weights tower
    computes its features otherwise (its residual stream is fp32): they live in another cache folder."""
    _, cache, first = bf16_lora
    assert "image features: 8 read from the cache, 8 computed" in first  # epoch 2 read epoch 1's entries
    outputs = {}
    for name, extra in (("fp32 weights", FP32_WEIGHTS), ("bf16 again", ())):
        args = base_args(eight, bf16_base, tmp_path / name, "--epochs", "1", "--num_sample_captions", "0",
                         "--cache_image_features", "disk", "--cache_dir", str(cache), *QUIET, *BF16, *extra)
        outputs[name] = run_train(args)[2]
    assert "image features: 0 read from the cache, 8 computed" in outputs["fp32 weights"]
    assert "image features: 8 read from the cache, 0 computed" in outputs["bf16 again"]
    folders = {re.search(r"caching on disk in (\S+)", text).group(1) for text in (first, *outputs.values())}
    assert len(folders) == 2


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """{base weight name: B @ A * scaling}, in fp32, from the saved adapter alone."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # adapters are saved in fp32
    scaling = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = (b @ a) * scaling
    return deltas


@pytest.mark.parametrize("alpha, dtype", [("1", "float32"), ("0.5", "bfloat16")])
def test_merge_folds_the_fp32_delta_into_a_bf16_base_at_the_dtype_asked(tmp_path, bf16_lora, bf16_base, alpha, dtype):
    """merged = base + alpha * delta, computed in fp32 and rounded once to --dtype: a delta rounded to bf16 first,
    or added to bf16 weights before alpha scales it, would miss it by more than these tolerances."""
    adapter = bf16_lora[0]
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--alpha", alpha, "--dtype", dtype]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(bf16_base / "model.safetensors"))
    deltas = lora_deltas(adapter)
    assert deltas and all(base[name].dtype == torch.bfloat16 for name in deltas)
    for name, delta in deltas.items():
        expected = base[name].float() + float(alpha) * delta
        assert merged[name].dtype == getattr(torch, dtype)
        if dtype == "float32":
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
        else:  # rounded once: within half a bf16 step of the exact value (a step at the nearest power of two below)
            step = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(1e-30)))) * 2.0 ** -7
            assert ((merged[name].float() - expected).abs() <= step / 2 + 1e-12).all(), name
        assert not torch.equal(merged[name].float(), base[name].float()), name  # the delta shows


def test_caption_and_evaluate_load_in_the_dtype_they_print(tmp_path, bf16_lora, bf16_base, eight, capsys):
    from caption_train.inference import load_for_inference

    adapter = bf16_lora[0]
    assert main(["caption", str(adapter), str(eight), "--output_jsonl", str(tmp_path / "c.jsonl"), "--num_workers", "0",
                 "--device", "cpu", "--dtype", "bfloat16", "--max_new_tokens", "4"]) == 0
    assert "weights: bfloat16 (as --dtype asks)" in capsys.readouterr().out
    assert main(["evaluate", str(adapter), str(eight), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0",
                 "--device", "cpu", "--max_new_tokens", "4"]) == 0
    assert describe_inference_dtype("auto", torch.device("cpu")) in capsys.readouterr().out  # auto, whichever it picks here

    # from_pretrained loads in bf16 (its config records the dtype it was loaded in; a float32 load cast afterwards
    # would still say float32), and the adapter's delta is folded in fp32 and rounded once.
    model, _, _ = load_for_inference(adapter, dtype=torch.bfloat16, merge_adapter=True)
    assert model.config.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    weights, base = model.state_dict(), load_file(str(bf16_base / "model.safetensors"))
    for name, delta in lora_deltas(adapter).items():
        assert torch.equal(weights[name], (base[name].float() + delta).to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------------
# The interactive page


@pytest.mark.slow
def test_the_page_captions_with_the_runs_bf16_weights(tmp_path):
    """--interactive on bf16 frozen weights (Qwen2.5-VL: fp32 RMSNorms beside bf16 layers): paused after step 1,
    "caption now" answers what the family generates with the run's weights under the run's autocast."""
    from PIL import Image

    from caption_train.models import resolve_family
    from test_interactive_api import caption_now_on_a_paused_run

    model_dir = MODELS["qwen2_5_vl"](tmp_path / "model")
    data, names, page, hooks, thread, _, captions = caption_now_on_a_paused_run(model_dir, tmp_path, "bf16")
    # The run's weights as they are at step 1 (paused), captioned directly by the family under the run's autocast
    # (family and processor found from the model folder; no --prompt, so the family's own).
    family, _ = resolve_family(str(model_dir))
    _, processor = family.load(str(model_dir), {})
    model = hooks.run.model.eval()
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16, torch.float32}  # frozen bf16, norms fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = family.generate(model, processor, [Image.open(data / name).convert("RGB") for name in names])
    model.train()
    assert [c["step"] for c in captions] == [1] * 4 and any(c["text"] for c in captions)
    assert [" ".join(c["text"].split()) for c in captions] == [" ".join(d.split()) for d in direct]
    page.send("resume", {})
    thread.join(300)
    assert not thread.is_alive() and thread.error is None, thread.error
