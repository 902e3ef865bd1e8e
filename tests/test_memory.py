"""The memory plan (caption_train/memory.py): exact byte counts of weights, gradients and optimizer state; the CPU
activation estimate against a real step's peak RSS; --gradient_checkpointing auto/true/false and --memory_budget
through the train command; the probe leaves the run unchanged; a real out-of-memory at step 1 answered in one line."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from caption_train import resume
from caption_train.adapters import wrap_model
from caption_train.checkpoint import rng_states
from caption_train.cli import main
from caption_train.config import load_train_config, parse_memory_size, to_toml_dict
from caption_train.errors import UserError
from caption_train.memory import Capacity, MemoryPlan, Probe, StateBytes, count_state, format_bytes, probe_step
from caption_train.models import resolve_family
from caption_train.optim import build_optimizer
from caption_train.tracking import read_metrics

from conftest import REPO, base_args
from tiny_every_family import BUILDERS

HELPERS = Path(__file__).resolve().parent


def load_lora(model_dir: Path, model_config: dict | None = None):
    """The model as training loads it: the family's load, LoRA on its default targets, the frozen tower frozen."""
    family, _ = resolve_family(str(model_dir))
    model, processor = family.load(str(model_dir), model_config or {})
    model = wrap_model(model, family, "LoRA", {})
    family.freeze_vision_tower(model)
    return family, model, processor


def run_train(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["train", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def config_of(final: str) -> dict:
    return tomllib.loads((Path(final.strip().splitlines()[-1]) / "config.toml").read_text())


def mib(pattern: str, text: str) -> float:
    """A size printed by the plan (format_bytes), in bytes."""
    match = re.search(pattern, text)
    assert match, (pattern, text)
    number, unit = float(match.group(1)), match.group(2)
    return number * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


SIZE = r"([0-9.]+) (KiB|MiB|GiB)"


# ---------------------------------------------------------------------------------------------
# Weights, gradients and optimizer state: exact bytes


@pytest.mark.parametrize("model_config, bytes_per_weight", [({}, 4), ({"dtype": "bfloat16"}, 2)], ids=["fp32", "bf16"])
def test_weights_and_adapter_are_exact_bytes(tiny_blip, model_config, bytes_per_weight):
    family, model, _ = load_lora(tiny_blip, model_config)
    state = count_state(model, "AdamW", {}, 1e-4)
    # Independently: every weight the model file holds (its tied output layer once), at the dtype asked for, plus
    # the buffers the model makes itself (BLIP's position ids).
    with safe_open(str(tiny_blip / "model.safetensors"), "pt") as weights:
        stored = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert state.weights == stored * bytes_per_weight + buffers
    # LoRA r=16 on query/key/value of the text decoder's self- and cross-attention, 2 layers: 12 modules of
    # r x (64 in + 64 out), in fp32 whatever the frozen weights' dtype (peft keeps adapters in fp32).
    adapter = 12 * 16 * (64 + 64)
    assert state.trainable == state.gradients == adapter * 4
    assert state.describe_weights().endswith("fp32" if bytes_per_weight == 4 else "bf16")


@pytest.mark.parametrize("optimizer, args", [("AdamW", {}), ("AdamW", {"amsgrad": True}), ("Prodigy", {})])
def test_optimizer_state_equals_the_real_optimizers(tiny_blip, optimizer, args):
    """The plan's optimizer bytes equal what the optimizer holds after a real step on the model's trainable
    parameters (Prodigy's p0 is a scalar for LoRA's B, which starts at zero: counted so)."""
    _, model, _ = load_lora(tiny_blip)
    state = count_state(model, optimizer, args, 1.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    real = build_optimizer(optimizer, trainable, lr=1e-4 if optimizer == "AdamW" else 1.0, args=args)
    for p in trainable:
        p.grad = torch.full_like(p, 1e-3)
    real.step()
    held = sum(v.numel() * v.element_size() for p in trainable for v in real.state[p].values() if isinstance(v, torch.Tensor))
    assert state.optimizer == held
    if optimizer == "AdamW":  # two fp32 moments (three with amsgrad) and a 4-byte step count per parameter
        moments = 3 if args else 2
        assert held == moments * state.trainable + 4 * len(trainable)
        expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if args else set())
    else:
        expected = {"s", "p0", "exp_avg", "exp_avg_sq"}
    assert set(state.optimizer_note.removeprefix(f"{optimizer}: ").split(", ")) == expected


# ---------------------------------------------------------------------------------------------
# Activations on a CPU, against a real step's peak RSS


def build_wide_vocab_blip(tiny_blip: Path, out: Path, vocab: int = 32000) -> Path:
    """The tiny BLIP with a 32k-row output layer (the extra rows unused by its tokenizer): a step's memory is then
    mostly logits and their gradients, hundreds of MiB at batch 32, far above what the allocator keeps around."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    config = BlipConfig.from_pretrained(tiny_blip)
    config.text_config.vocab_size = vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(out)
    BlipProcessor.from_pretrained(tiny_blip).save_pretrained(out)
    return out


def long_caption_dataset(out: Path, n: int = 32, words: int = 28) -> Path:
    """n tiny images, each with a caption of `words` words the tiny tokenizer knows (one token each): every row of
    every batch is as long as the longest, so a real batch has the probe's shape."""
    vocabulary = "a red blue green circle square triangle".split()
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 7 % 255, 80, 120)).save(out / f"{i:02d}.png")
        (out / f"{i:02d}.txt").write_text(" ".join(rng.choice(vocabulary) for _ in range(words)))
    return out


@pytest.fixture(scope="module")
def wide(tiny_blip, tmp_path_factory) -> tuple[Path, Path]:
    model = build_wide_vocab_blip(tiny_blip, tmp_path_factory.mktemp("wide"))
    return model, long_caption_dataset(tmp_path_factory.mktemp("long"))


WIDE_RUN = ("--batch_size", "32", "--mixed_precision", "bf16", "--num_sample_captions", "0", "--save_every_n_epochs", "0")


@pytest.mark.slow
def test_cpu_activation_estimate_matches_a_real_steps_peak_rss(wide, tmp_path, capsys):
    """The plan line's activations (tensor bytes alive at once, measured at 1 and 2 rows and extrapolated to 32)
    against the kernel's peak-RSS mark over a real step at 32 rows in a fresh process: within 15%. bf16 autocast (as
    asked, whatever the CPU), so that a part of the memory does not grow with the rows."""
    model, data = wide
    code, out, _ = run_train(base_args(data, model, tmp_path, *WIDE_RUN), capsys)
    assert code == 0
    estimate = mib(rf"activations {SIZE} at batch 32, 30 tokens", out)
    result = subprocess.run([sys.executable, str(HELPERS / "memory_rss_step.py"), str(model), str(data), "32", "bf16"],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result.returncode == 0, result.stderr
    measured = int(re.search(r"step_rss_bytes (\d+)", result.stdout).group(1))
    assert measured > 200 * (1 << 20)  # the step's memory is what is measured, not the allocator's noise
    assert abs(estimate - measured) / measured < 0.15, (format_bytes(estimate), format_bytes(measured))


def test_two_rows_extrapolate_to_the_batch(wide):
    """The CPU probe's straight line through 1 and 2 rows lands on what a probe of all 8 rows measures. Under bf16
    autocast part of a step's memory does not grow with its rows (the bf16 copies of the fp32 weights saved for
    backward): one row times 8 would be far off."""
    import functools

    from caption_train.data.scan import scan_dataset
    from caption_train.memory import longest_row, measure_step
    from caption_train.train import collate_batch

    model_dir, data = wide
    family, model, processor = load_lora(model_dir)
    collate = functools.partial(collate_batch, family=family, processor=processor, max_length=128, prompt=None)
    row = longest_row(scan_dataset(data).samples, family, processor, collate)
    assert row.tokens == 30  # [DEC] + 28 words + [SEP]
    kwargs = dict(batch_size=8, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16), device=torch.device("cpu"))
    line, whole, one = (measure_step(model, family, row, collate, sizes=sizes, **kwargs) for sizes in ([1, 2], [8], [1]))
    assert whole.peak > 50 * (1 << 20)
    assert abs(line.peak - whole.peak) / whole.peak < 0.02, (line.peak, whole.peak)
    assert one.peak * 8 > whole.peak * 1.1  # what a proportional guess from one row would say


# ---------------------------------------------------------------------------------------------
# gradient checkpointing auto / true / false and --memory_budget, through the train command


def test_false_with_a_tight_budget_warns_and_trains_auto_turns_on_only_when_needed(tiny_blip, shapes_dir, tmp_path, capsys):
    base = base_args(shapes_dir, tiny_blip, tmp_path, "--num_sample_captions", "0")
    # false, budget far below the estimate: a warning with what would fit, and the run trains all the same.
    code, out, _ = run_train([*base, "--gradient_checkpointing", "false", "--memory_budget", "1KiB"], capsys)
    assert code == 0 and config_of(out)["gradient_checkpointing"] is False
    assert "gradient checkpointing: off (--gradient_checkpointing false)" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: memory:"))
    assert "more than the 1.0 KiB budget; it may run out of memory at step 1: try --gradient_checkpointing true (about" in warning
    assert "--batch_size 1 --gradient_accumulation_steps 8 (the same 8 images per optimizer step" in warning
    without = mib(rf"memory: about {SIZE} peak", out)
    saving = mib(rf"--gradient_checkpointing true \(about {SIZE} less\)", warning)
    assert 0 < saving < without

    # auto, with a budget between the estimates with and without checkpointing: on, and it says why.
    budget = int(without - saving / 2)
    code, out, _ = run_train([*base, "--memory_budget", f"{budget}B"], capsys)
    assert code == 0 and config_of(out)["gradient_checkpointing"] is True
    assert f"gradient checkpointing: on (auto: without it about {format_bytes(without)}, more than the {format_bytes(budget)} budget)" in out
    assert "warning: memory" not in out  # with checkpointing it fits
    assert mib(rf"memory: about {SIZE} peak", out) == pytest.approx(without - saving, rel=0.02)

    # auto, with room to spare: off.
    code, out, _ = run_train([*base, "--memory_budget", f"{int(without * 2)}B"], capsys)
    assert code == 0 and config_of(out)["gradient_checkpointing"] is False
    assert "gradient checkpointing: off (auto: the run fits without it)" in out


def test_true_and_no_plan(tiny_blip, shapes_dir, tmp_path, capsys):
    # fp32 compute, so the weights are fp32 on any CPU (under bf16 autocast they would load in bf16)
    base = base_args(shapes_dir, tiny_blip, tmp_path, "--num_sample_captions", "0", "--mixed_precision", "no")
    code, out, _ = run_train([*base, "--gradient_checkpointing"], capsys)  # the seed flag, bare: on
    assert code == 0 and config_of(out)["gradient_checkpointing"] is True
    assert "gradient checkpointing: on (--gradient_checkpointing true)" in out
    line = next(line for line in out.splitlines() if line.startswith("memory:"))
    # BLIP's longest caption row: [DEC], the caption's tokens, [SEP]
    assert re.fullmatch(rf"memory: about {SIZE} peak \(weights {SIZE} fp32, adapter\+optimizer {SIZE}, activations {SIZE} at batch 8, \d+ tokens\); "
                        rf"RAM has {SIZE} available; plan [0-9.]+ s", line), line
    code, out, _ = run_train([*base, "--memory_plan", "false", "--memory_budget", "1KiB"], capsys)
    assert code == 0 and config_of(out)["gradient_checkpointing"] is False  # auto without a plan: off
    assert "memory:" not in out and "gradient checkpointing" not in out


# ---------------------------------------------------------------------------------------------
# The probe leaves the run as it was


STOCHASTIC = ("--batch_size", "4", "--gradient_accumulation_steps", "2", "--epochs", "1", "--validation_split", "0.25",
              "--shuffle_captions", "--caption_dropout", "0.2", "--random_flip", "0.5", "--lr", "3e-3",
              "--peft_args", "{lora_dropout = 0.2}", "--num_sample_captions", "1")


def test_probe_leaves_losses_and_weights_unchanged(tiny_blip, shapes_dir, tmp_path, capsys):
    """Dropout, caption shuffles/dropout and flips all draw random numbers: a run with the plan has exactly the
    losses of a run without one. Under false with a tight budget the plan takes four probe steps (one and two rows,
    without and with checkpointing, which it then turns off again): everything a plan ever does."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("no plan", ("--memory_plan", "false")), ("plan", ("--gradient_checkpointing", "false", "--memory_budget", "1KiB"))):
        code, out, _ = run_train(base_args(shapes_dir, tiny_blip, tmp_path / name.replace(" ", "_"), *STOCHASTIC, *extra), capsys)
        assert code == 0 and ("warning: memory:" in out) == (name == "plan")
        final = Path(out.strip().splitlines()[-1])
        rows = read_metrics(final.parent / "metrics.jsonl")
        runs[name] = ([r["train/loss"] for r in rows if "train/loss" in r], [r["val/loss"] for r in rows if "val/loss" in r],
                      load_file(str(final / "adapter_model.safetensors")))
    reference = runs.pop("no plan")
    for name, (losses, val, weights) in runs.items():
        assert losses == reference[0] and val == reference[1], name
        assert all(torch.equal(weights[k], reference[2][k]) for k in weights), name


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def every_family(request, tmp_path_factory):
    return load_lora(BUILDERS[request.param](tmp_path_factory.mktemp(request.param)))


def test_probe_step_changes_nothing_in_any_family(every_family):
    family, model, processor = every_family
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 56), (30, 30, 200))]
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=64, prompt=family.training_prompt(None))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = rng_states()
    peak, error = probe_step(model, family, batch, autocast=lambda: torch.autocast("cpu", enabled=False), device=torch.device("cpu"))
    assert error is None and peak > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    again = rng_states()
    assert torch.equal(rng["torch"], again["torch"]) and rng["python"] == again["python"]
    assert all((a == b).all() if hasattr(a, "all") else a == b for a, b in zip(rng["numpy"], again["numpy"]))


# ---------------------------------------------------------------------------------------------
# A real out-of-memory error at step 1


def limited_train(limit: int, args: list[str]) -> subprocess.CompletedProcess:
    """The train command in a subprocess under an address-space limit. One malloc arena: glibc reserves 64 MiB of
    address space per arena for threads that allocate, which made a run's VmPeak vary by a whole arena."""
    return subprocess.run([sys.executable, str(HELPERS / "memory_limited_train.py"), str(limit), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "MALLOC_ARENA_MAX": "1"})


def vm_peak(result: subprocess.CompletedProcess) -> int:
    return int(re.search(r"vm_peak_bytes (\d+)", result.stderr).group(1))


@pytest.mark.slow
def test_out_of_memory_at_step_1_is_one_line(wide, tmp_path):
    """Under an address-space limit that loading and a one-row step fit in but a 32-row step does not, the first
    step's allocation fails for real: one line with what to do, exit code 2, no traceback, no checkpoint."""
    model, data = wide
    args = base_args(data, model, tmp_path, *WIDE_RUN)
    two = tmp_path / "two-images"  # the reference: loading, set-up and one-row steps of the same model and rows
    two.mkdir()
    for path in sorted(data.iterdir())[:4]:
        shutil.copy(path, two / path.name)
    reference = limited_train(0, [*base_args(two, model, tmp_path / "reference", *WIDE_RUN), "--batch_size", "1", "--memory_plan", "false"])
    assert reference.returncode == 0, reference.stderr
    unlimited = limited_train(0, [*base_args(data, model, tmp_path / "unlimited", *WIDE_RUN), "--memory_plan", "false"])  # the same run without a limit: its peak
    assert unlimited.returncode == 0, unlimited.stderr
    gap = vm_peak(unlimited) - vm_peak(reference)  # ~170 MiB: what the 32-row step needs beyond a one-row run
    assert gap > 64 * (1 << 20), gap
    limit = vm_peak(reference) + gap // 2  # halfway: loading and set-up fit, the 32-row step does not
    for extra in (("--memory_plan", "false"), ()):
        result = limited_train(limit, [*args, *extra])
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert errors[0].startswith("error: out of memory at step 1") and "can't allocate memory" in errors[0], errors[0]
        if extra:  # without a plan: the general advice
            assert "try --gradient_checkpointing true, a smaller --batch_size" in errors[0]
        else:  # the plan saw the limit coming (RLIMIT_AS counts as the RAM available) and says what would fit
            assert "warning: memory:" in result.stdout and "gradient checkpointing: on (auto: without it" in result.stdout
            assert re.search(r"the plan estimated about .* try --batch_size \d+ --gradient_accumulation_steps \d+", errors[0]), errors[0]
    run_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("caption-train-")]
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert not [p.name for p in run_dir.iterdir() if p.is_dir()], run_dir  # no step-N/, epoch-N/ or final/, nor a temp folder


# ---------------------------------------------------------------------------------------------
# The suggestions' arithmetic, on given numbers


def plan_of(activations_per_row: float, fixed: int, batch: int, *, image_tokens: int | None = None, tokens: int = 100,
            budget: int, hint=None, other: int | None = None) -> MemoryPlan:
    state = StateBytes(frozen={"bf16": 10 << 30}, trainable=1 << 30, gradients=1 << 30, optimizer=2 << 30, optimizer_note="AdamW")
    peak = int(fixed + activations_per_row * batch + state.gradients)
    return MemoryPlan(state=state, batch_size=batch, accumulation=2, tokens=tokens, image_tokens=image_tokens,
                      capacity=Capacity("GPU", 80 << 30, budget), probe=Probe(peak, activations_per_row, 1.0),
                      other=None if other is None else Probe(other + state.gradients, None, 1.0), processor_hint=hint)


def test_suggestions_keep_the_effective_batch_and_size_the_image_budget():
    # 14 GiB of weights and training state; 1 GiB fixed + 1 GiB per row at batch 8: 23 GiB, over a 20 GiB budget.
    plan = plan_of(1 << 30, 1 << 30, 8, image_tokens=60, tokens=100, budget=20 << 30, hint=("max_pixels", 784), other=2 << 30)
    assert plan.total() == 23 << 30 and not plan.fits
    text = plan.suggestions()
    assert "--gradient_checkpointing true (about 7.0 GiB less)" in text
    # 6 GiB of room: 1 GiB fixed + 4 rows; 16 images per optimizer step are kept (4 x 4).
    assert "--batch_size 4 --gradient_accumulation_steps 4 (the same 16 images per optimizer step; about 4.0 GiB less)" in text
    # 9 GiB of activations for 100 tokens, 6 GiB of room: ~66 tokens, so the image's 60 tokens must lose 34: 26 left.
    assert "model_config.processor {max_pixels = 20384} (the longest row's image is 60 of its 100 tokens; about 26 would fit)" in text
    assert "--quantize" not in text  # not offered off CUDA (quantizable is 0)


def test_out_of_memory_message_is_one_line_with_the_plan():
    plan = plan_of(1 << 30, 1 << 30, 8, budget=20 << 30)
    message = plan.out_of_memory_message(1)
    assert "\n" not in message and message.startswith("out of memory at step 1 (batch 8, rows up to 100 tokens; the plan estimated about 23.0 GiB of 20.0 GiB): try ")


# ---------------------------------------------------------------------------------------------
# Config: the seed flag's meaning kept, the new values, the budget, resume


def test_gradient_checkpointing_values(tmp_path):
    assert load_train_config(["--dataset_dir", "d"]).gradient_checkpointing == "auto"
    assert load_train_config(["--dataset_dir", "d", "--gradient_checkpointing"]).gradient_checkpointing is True
    assert load_train_config(["--dataset_dir", "d", "--gradient_checkpointing", "false"]).gradient_checkpointing is False
    assert load_train_config(["--dataset_dir", "d", "--gradient_checkpointing", "AUTO"]).gradient_checkpointing == "auto"
    for line, value in (("gradient_checkpointing = true", True), ("gradient_checkpointing = false", False), ('gradient_checkpointing = "auto"', "auto")):
        (tmp_path / "c.toml").write_text(f'dataset_dir = "d"\n{line}\n')
        loaded = load_train_config(["--config_file", str(tmp_path / "c.toml")]).gradient_checkpointing
        assert loaded == value and type(loaded) is type(value)
    with pytest.raises(UserError, match=r"--gradient_checkpointing: expected auto, true or false, got 'maybe'"):
        load_train_config(["--dataset_dir", "d", "--gradient_checkpointing", "maybe"])
    (tmp_path / "c.toml").write_text('dataset_dir = "d"\ngradient_checkpointing = 1\n')
    with pytest.raises(UserError, match=r"gradient_checkpointing = 1: expected auto, true or false, got an integer"):
        load_train_config(["--config_file", str(tmp_path / "c.toml")])


@pytest.mark.parametrize("text, size", [("20GiB", 20 << 30), ("20 GB", 20 * 10**9), ("512MiB", 512 << 20), ("24G", 24 << 30), ("1.5GiB", 3 << 29)])
def test_memory_budget_sizes(text, size):
    assert parse_memory_size(text) == size
    assert load_train_config(["--dataset_dir", "d", "--memory_budget", text]).memory_budget == text


@pytest.mark.parametrize("text, message", [("20", "not a size with a unit"), ("20 apples", "unknown unit 'apples'"), ("0GiB", "must be more than 0")])
def test_bad_memory_budget_is_one_line(text, message):
    with pytest.raises(UserError, match=rf"memory_budget: .*{message}"):
        load_train_config(["--dataset_dir", "d", "--memory_budget", text])


def test_resume_takes_a_stored_bool_under_auto(tmp_path):
    """A checkpoint records what auto decided (true/false; older runs recorded their bool): resuming with auto is
    no change at all, while an explicit other value is a note, never a refusal."""
    from caption_train.checkpoint import write_config

    saved = load_train_config(["--dataset_dir", str(tmp_path), "--gradient_checkpointing", "true"])
    write_config(tmp_path / "config.toml", to_toml_dict(saved))
    assert resume.check_config_compatible(load_train_config(["--dataset_dir", str(tmp_path)]), tmp_path) == []
    notes = resume.check_config_compatible(load_train_config(["--dataset_dir", str(tmp_path), "--gradient_checkpointing", "false"]), tmp_path)
    assert notes == ["gradient_checkpointing: checkpoint True, now False (the new value wins from the resumed step on)"]
