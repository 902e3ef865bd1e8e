"""Peak memory of one chat-VLM LoRA training step at real widths, per switch of issue 15's items, extrapolated to the full model.

    python benchmarks/vlm_memory.py --workdir /tmp/vlm-memory            # Qwen2.5-VL-7B, JoyCaption, SmolVLM-256M slices
    python benchmarks/vlm_memory.py --workdir /tmp/vlm-memory --quick    # SmolVLM-256M only: a few GB, minutes
    python benchmarks/vlm_memory.py --workdir /tmp/vm --models qwen2.5-vl-7b --settings defaults "bf16 weights off"
    python benchmarks/vlm_memory.py --workdir /tmp/vm --compare /path/to/checkout-before-issue-15   # before/after

Models (benchmarks/vlm_slices.py, shapes from benchmarks/model_sizes.py): real-width slices of Qwen2.5-VL-7B,
JoyCaption (LLaVA: SigLIP so400m + Llama-3.1-8B) and SmolVLM-256M with 2 and 4 decoder layers (full vision tower,
real hidden sizes, heads and vocabulary), random weights, a locally written tokenizer and processor with a chat
template, saved with save_pretrained. Data: 448 px images (256 / 729 / 64 image tokens per image) with ~80-token
captions of different lengths (so a batch has padding).

Each measurement is one process running caption-train's training (`caption_train.train.train` on a config file:
what `train2.py --config_file` runs) for exactly one optimizer step: a dataset of `batch` images, batch `batch`,
one epoch, LoRA with the family's defaults, and whatever each setting's row overrides. A training hook records
memory when set-up ends (model loaded and wrapped, optimizer built) and when the first step ends:
  - on a CPU: the process's peak RSS (VmHWM) at the end of set-up ("load"), then, after resetting the peak
    (/proc/self/clear_refs), the peak RSS during the step ("step": resident weights + adapter + optimizer state +
    activations + logits; the load's transient file pages are not in it);
  - on a GPU: torch.cuda.max_memory_allocated the same way (peak reset after set-up).
Runs go one at a time (the 4-layer Qwen2.5-VL slice takes ~11 GB in fp32); a run that would not fit in the memory
available now is skipped with one line. Per (model, setting, batch), the step peak at 2 and 4 layers gives
peak(L) = a + b*L, printed for the full depth beside the memory plan's own estimate (the start-up line
`memory: about X GiB peak (...)`, extrapolated the same way) when caption-train prints one.

Settings are rows of train-config overrides in SETTINGS below (one place). An item whose switch does not exist yet
has a placeholder (None), and its rows are skipped with one line; a row naming an option this caption-train does not
have is skipped the same way. Fill them in when the items land. `--compare PATH` also runs every row with the
caption-train at PATH (e.g. a checkout from before the items), as "before: <row>".

Targets (issue 15), printed pass/fail:
  - Qwen2.5-VL-7B and JoyCaption LoRA, batch 1, defaults: estimated full-model step peak <= 20 GiB, for the run the
    defaults make on a 24 GB card (23.5 GiB free): --gradient_checkpointing auto turns checkpointing on when the
    plan's full-model estimate without it is over that, so the target then reads the "checkpointing on" row;
  - the plan's estimate within 15% of the measured extrapolation;
  - logits memory per sample down by the caption's share of the row: the step peak per sample with the loss at the
    targets only is lower than with logits at every position by at least 90% of one fp32 logits tensor's
    non-caption part ((row - caption tokens) x vocabulary x 4 B).
Every figure is printed with the CPU (model name, AVX512-BF16 or not) or GPU it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

GIB = 2**30

# ---------------------------------------------------------------------------------------------
# What every run shares, and the rows (train-config keys as a user writes them in a --config_file)

COMMON = {
    "epochs": 1,  # with `batch` images and batch size `batch`: exactly one optimizer step
    "max_length": 4096,  # room for 729 image tokens + ~80-token captions (the default 128 would cut the captions)
    "num_sample_captions": 0,  # no probe captions after the epoch (generation is not the step being measured)
    "save_every_n_epochs": 0,
    "log_with": "none",
    "num_workers": 0,  # image loading in the measured process (workers would hold their own copies)
}

# One row per switch position of issue 15's items 1-3. None: the item has no switch in caption-train yet (the row
# is skipped with one line); write the overrides here when it lands.
SETTINGS: dict[str, dict[str, Any] | None] = {
    "defaults": {},
    # Item 1 (frozen weights in bf16 where compute is bf16). An explicit model_config.dtype overrides the plan.
    "bf16 weights off": {"model_config": {"dtype": "float32"}},
    "bf16 weights on": {"model_config": {"dtype": "bfloat16"}},  # before item 1: every weight in bf16, the closest setting
    # Item 2 (output layer and loss at the target positions only; on by default, --full_logits scores every position).
    "loss at targets off": {"full_logits": True},
    "loss at targets on": {"full_logits": False},
    # Item 3 (batches without padding waste): packing, as the issue names it. Its length-grouped sampler changes which
    # rows share a batch, not one batch's memory, so a one-step benchmark has no row for it.
    "packing off": {"packing": "off"},
    "packing on": {"packing": "on"},
    # Item 4: what --gradient_checkpointing auto (the default) turns on when the plan says the run would not fit.
    "checkpointing on": {"gradient_checkpointing": True},
    # Items 1-3 all off: the step as it was before issue 15 (fp32 frozen weights, logits at every position, padded rows).
    "items 1-3 off": {"model_config": {"dtype": "float32"}, "full_logits": True, "packing": "off"},
}
LOGITS_PAIR = ("loss at targets off", "loss at targets on")  # the rows the logits target compares
TARGET_MODELS = ("qwen2.5-vl-7b", "joycaption")
TARGET_GIB = 20.0
CARD_FREE_GIB = 23.5  # a 24 GB card's free memory (issue 15's example line): where auto decides on checkpointing
TARGET_BATCH_SETTINGS = ("defaults", "checkpointing on")  # the rows also run at --target_batch
PLAN_TOLERANCE = 0.15
PLAN_LINE = re.compile(r"memory: about ([\d.]+) GiB peak")
QUICK = {"models": ["smolvlm-256m"]}


# ---------------------------------------------------------------------------------------------
# Where a figure was measured


def device_description() -> str:
    """The GPU (name, memory) when CUDA is there, else the CPU's model name and whether it has AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU {props.name} ({props.total_memory / GIB:.0f} GiB)"
    return cpu_description()


def parent_device_description() -> str:
    """device_description() without starting CUDA in the parent (a CUDA context would hold GPU memory the measured
    children need): nvidia-smi names the GPU."""
    gpu = _nvidia_smi("name,memory.total")
    if gpu:
        name, total = gpu.split(",")[:2]
        return f"GPU {name.strip()} ({float(total) / 1024:.0f} GiB)"
    return cpu_description()


def _nvidia_smi(fields: str) -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def cpu_description() -> str:
    name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), name)
    except OSError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
        bf16 = "avx512_bf16: yes" if "avx512_bf16" in flags else "avx512_bf16: no"
    except OSError:
        bf16 = "avx512_bf16: unknown"
    return f"CPU {name} ({bf16}, {os.cpu_count()} cores)"


def available_bytes() -> int:
    """What a new process may use now: free GPU memory (nvidia-smi) on a GPU machine, else MemAvailable."""
    free = _nvidia_smi("memory.free")
    if free:
        return int(float(free) * 2**20)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 60


# ---------------------------------------------------------------------------------------------
# Data: 448 px images with ~80-token captions of different lengths

_WORDS = ("soft warm light falls across the scene while a quiet shadow rests near the lower edge of the frame and "
          "the background shows a plain pale wall with faint texture subtle grain gentle gradient muted tones "
          "small highlights along the outline crisp edges smooth surface matte finish slightly rounded corners "
          "balanced composition centered subject clean studio setting neutral colors flat illustration style "
          "simple geometric form viewed straight on from eye level with even exposure and no visible text").split()


def long_caption(index: int, subject: str) -> str:
    """A tag-and-sentence caption of 62-78 words (~80 tokens), its length varying with `index`."""
    rng = random.Random(index)
    words = [rng.choice(_WORDS) for _ in range(62 + (index * 5) % 17)]
    parts = [" ".join(words[i:i + 7]) for i in range(0, len(words), 7)]
    return f"{subject}, " + ", ".join(parts)


def make_data(root: Path, count: int) -> list[str]:
    """`count` captioned 448 px images in root/all; returns the captions."""
    from caption_train.tiny import make_shapes_dataset

    pairs = make_shapes_dataset(root / "all", count, seed=0, size=448, subfolders=0)
    captions = []
    for i, (path, subject) in enumerate(pairs):
        captions.append(long_caption(i, subject))
        path.with_suffix(".txt").write_text(captions[-1] + "\n", encoding="utf-8")
    return captions


def batch_folder(root: Path, batch: int) -> Path:
    """A dataset of the first `batch` images: one epoch at batch size `batch` is one optimizer step."""
    folder = root / f"batch{batch}"
    if not folder.exists():
        folder.mkdir()
        for image in sorted((root / "all").glob("*.png"))[:batch]:
            shutil.copy(image, folder / image.name)
            shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    return folder


# ---------------------------------------------------------------------------------------------
# Child process 1: build a slice (and measure its rows' token counts)


def build_role(args: argparse.Namespace) -> int:
    from vlm_slices import SLICES, build_slice

    spec = SLICES[args.model]
    captions = json.loads(Path(args.captions).read_text())
    build_slice(spec, Path(args.out), layers=args.layers, texts=captions)
    if args.shape:
        Path(args.shape).write_text(json.dumps(row_shape(Path(args.out), Path(args.data), spec.image_tokens)))
    return 0


def row_shape(model_dir: Path, data: Path, expected_image_tokens: int) -> dict[str, Any]:
    """Tokens per row as the chat-vlm family collates them (with its default prompt): length, caption targets, image
    tokens; checks the image-token count the slice is meant to have."""
    from transformers import AutoConfig

    from caption_train.data.images import load_rgb
    from caption_train.models import resolve_family
    from caption_train.models.chat_vlm import _image_token_id, load_processor

    family, config = resolve_family(str(model_dir))
    processor = load_processor(str(model_dir), config.model_type, {})
    paths = sorted(data.glob("*.png"))
    batch = family.collate(processor, [load_rgb(p) for p in paths], [p.with_suffix(".txt").read_text().strip() for p in paths],
                           max_length=COMMON["max_length"], prompt=family.default_prompt)
    image_tokens = (batch["input_ids"] == _image_token_id(AutoConfig.from_pretrained(model_dir))).sum(dim=1).tolist()
    if any(n != expected_image_tokens for n in image_tokens):
        raise SystemExit(f"{model_dir}: {image_tokens} image tokens per row, expected {expected_image_tokens}")
    return {"lengths": batch["attention_mask"].sum(dim=1).tolist(), "targets": (batch["labels"] != -100).sum(dim=1).tolist(),
            "image_tokens": image_tokens[0], "padded_length": int(batch["input_ids"].shape[1]),
            "vocab": int(config.get_text_config().vocab_size)}


# ---------------------------------------------------------------------------------------------
# Child process 2: one training step of caption-train, with a hook reading memory


class Memory:
    """Peak and current memory of this process (CPU: RSS from /proc; GPU: torch.cuda's allocator counts)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.resettable = True

    def _status(self, key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def peak(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    def now(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated()
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the peak RSS to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False


def step_role(args: argparse.Namespace) -> int:
    import tomllib

    from caption_train.config import field_names, load_train_config
    from caption_train.errors import UserError
    from caption_train.train import train

    try:  # the hook protocol's own module where this caption-train has one, else the loop's
        from caption_train.hooks import TrainingHooks
    except ImportError:
        from caption_train.train import TrainingHooks

    overrides = tomllib.loads(Path(args.config).read_text())
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        print(f"skipped: this caption-train has no option {', '.join(unknown)}", flush=True)
        return 3
    memory, result = Memory(), {"device": device_description()}

    class MemoryProbe(TrainingHooks):
        def on_setup(self, run: Any) -> None:
            result["load_peak"], result["load_now"] = memory.peak(), memory.now()
            memory.reset_peak()

        def on_step_end(self, run: Any, epoch: int) -> None:
            if "step_peak" not in result:
                result["step_peak"] = memory.peak()
                result["step_includes_load"] = not memory.resettable

    try:
        train(load_train_config(["--config_file", args.config]), hooks=MemoryProbe())
    except UserError as err:
        print(f"error: {err}", flush=True)
        return 2
    Path(args.result).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: build, run one step per row, extrapolate, report


@dataclass
class Run:
    model: str
    layers: int
    setting: str
    batch: int
    code: str  # "" for this checkout, else the --compare path
    status: str = "ok"  # ok / skipped: ... / failed: ...
    load_peak: float = float("nan")  # GiB
    step_peak: float = float("nan")
    plan: float = float("nan")
    device: str = ""
    precision: str = ""
    seconds: float = 0.0

    @property
    def row(self) -> str:
        return f"before: {self.setting}" if self.code else self.setting


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, str, float]:
    """Run `cmd` with its output in `log`; (exit status, output, seconds)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return status, log.read_text(errors="replace"), time.perf_counter() - start


def child_env(code: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=code or str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
                TOKENIZERS_PARALLELISM="false")


def measure(run: Run, model_dir: Path, data: Path, workdir: Path) -> Run:
    overrides = SETTINGS[run.setting]
    if overrides is None:
        run.status = "skipped: no switch for this in caption-train yet (fill SETTINGS in benchmarks/vlm_memory.py)"
        return run
    import tomli_w

    name = f"{run.model}-L{run.layers}-b{run.batch}-{re.sub(r'[^a-z0-9]+', '-', run.row)}"
    config = workdir / "configs" / f"{name}.toml"
    config.parent.mkdir(exist_ok=True)
    table = COMMON | {"dataset_dir": str(data), "model_name_or_path": str(model_dir), "output_dir": str(workdir / "runs"),
                      "training_name": name, "batch_size": run.batch} | overrides
    config.write_text(tomli_w.dumps(table))
    result = workdir / "results" / f"{name}.json"
    result.parent.mkdir(exist_ok=True)
    log = workdir / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "step", "--config", str(config), "--result", str(result)]
    status, output, run.seconds = run_child(cmd, child_env(run.code), log)
    if status == 3:
        run.status = next((line for line in output.splitlines() if line.startswith("skipped:")), "skipped")
        return run
    if status != 0 or not result.exists():
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        run.status = f"failed (exit {status}): {last[:160]} (log: {log})" if status > 0 else f"killed by signal {-status} (out of memory?); log: {log}"
        return run
    data_out = json.loads(result.read_text())
    run.load_peak, run.step_peak, run.device = data_out["load_peak"] / GIB, data_out["step_peak"] / GIB, data_out["device"]
    if data_out.get("step_includes_load"):
        run.status = "ok (step peak includes the load: the peak could not be reset here)"
    if match := PLAN_LINE.search(output):
        run.plan = float(match.group(1))
    precision = next((line[len("precision: "):] for line in output.splitlines() if line.startswith("precision: ")), "")
    run.precision = precision.split(" (")[0]  # "bf16 autocast", "fp32": the reason is in the log
    return run


def fit(points: dict[int, float]) -> tuple[float, float] | None:
    """Least squares a + b*L through (L, value) points; None with fewer than two finite points."""
    pts = [(layers, value) for layers, value in points.items() if value == value]
    if len(pts) < 2:
        return None
    n = len(pts)
    mean_l, mean_v = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((l - mean_l) * (v - mean_v) for l, v in pts) / sum((l - mean_l) ** 2 for l, _ in pts)
    return mean_v - slope * mean_l, slope


def gib(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def report_model(key: str, runs: list[Run], shape: dict | None, layers: list[int], device: str) -> list[str]:
    """The model's table and its targets' lines (also returned, for the summary at the end)."""
    from vlm_slices import SLICES

    spec = SLICES[key]
    full = spec.full_layers
    device = next((run.device for run in runs if run.device), device)  # where the runs measured (--report_only may be elsewhere)
    print(f"\n== {spec.label}: slices of {', '.join(map(str, layers))} of its {full} decoder layers, random weights, LoRA r16 (family defaults)")
    if shape:
        lengths, targets = shape["lengths"], shape["targets"]
        print(f"   rows: {shape['image_tokens']} image tokens + prompt/template + caption; lengths {min(lengths)}-{max(lengths)} tokens "
              f"(caption targets {min(targets)}-{max(targets)}), vocabulary {shape['vocab']:,}")
    print(f"   measured on: {device}; GiB (2^30 B); step = peak during the one training step, load = peak by the end of set-up")
    head = "".join(f"{'L=' + str(l) + ' load':>11}{'step':>7}" for l in layers)
    print(f"   {'setting':<28}{'batch':>6}{head}{'per layer':>11}{f'full L={full}':>11}{'plan full':>11}  precision")
    groups: dict[tuple[str, int], dict[int, Run]] = {}
    for run in runs:
        groups.setdefault((run.row, run.batch), {})[run.layers] = run
    estimates: dict[tuple[str, int], tuple[float, float]] = {}
    for (row, batch), by_layer in groups.items():
        done = [r for r in by_layer.values() if r.status.startswith("ok")]
        if not done:
            first = next(iter(by_layer.values()))
            print(f"   {row:<28}{batch:>6}  {first.status}")
            continue
        cells = "".join(f"{gib(by_layer[l].load_peak) if l in by_layer else '-':>11}{gib(by_layer[l].step_peak) if l in by_layer else '-':>7}" for l in layers)
        line = fit({l: r.step_peak for l, r in by_layer.items()})
        plan_line = fit({l: r.plan for l, r in by_layer.items()})
        measured_full = line[0] + line[1] * full if line else float("nan")
        plan_full = plan_line[0] + plan_line[1] * full if plan_line else float("nan")
        estimates[(row, batch)] = (measured_full, plan_full)
        print(f"   {row:<28}{batch:>6}{cells}{gib(line[1]) if line else '-':>11}{gib(measured_full):>11}"
              f"{gib(plan_full) if plan_line else 'n/a':>11}  {done[0].precision}")
        for r in by_layer.values():
            if r.status != "ok":
                print(f"     L={r.layers}: {r.status}")
    if not any(r.plan == r.plan for r in runs):
        print("   plan: not available (no `memory: about X GiB peak` line at start-up)")
    return target_lines(key, spec, groups, estimates, shape, device)


def target_lines(key: str, spec: Any, groups: dict, estimates: dict, shape: dict | None, device: str) -> list[str]:
    lines = []
    if key in TARGET_MODELS:
        row, auto = default_row_on_card(estimates)
        measured, plan = estimates.get((row, 1), (float("nan"), float("nan")))
        if measured != measured:
            lines.append(f"target {spec.label} batch 1 defaults <= {TARGET_GIB:g} GiB: not measured (needs the {row!r} row at batch 1, two layer counts)")
        else:
            verdict = "PASS" if measured <= TARGET_GIB else "FAIL"
            lines.append(f"target {spec.label} batch 1 defaults on a 24 GB card: {auto}; estimated full-model step peak "
                         f"{measured:.1f} GiB <= {TARGET_GIB:g} GiB: {verdict}  [{device}]")
            if plan != plan:
                lines.append(f"target {spec.label} plan within {PLAN_TOLERANCE:.0%}: plan: not available")
            else:
                off = plan / measured - 1
                verdict = "PASS" if abs(off) <= PLAN_TOLERANCE else "FAIL"
                lines.append(f"target {spec.label} plan within {PLAN_TOLERANCE:.0%}: plan {plan:.1f} vs measured {measured:.1f} GiB ({off:+.0%}): {verdict}  [{device}]")
    if shape:
        lines.append(logits_target(spec, groups, shape, device))
    for line in lines:
        print("   " + line)
    return lines


def default_row_on_card(estimates: dict) -> tuple[str, str]:
    """The row the defaults run as on a 24 GB card, and why: --gradient_checkpointing auto turns checkpointing on
    when the plan's estimate (here: the defaults row's, extrapolated to the full model) is over the free memory."""
    plan = estimates.get(("defaults", 1), (float("nan"), float("nan")))[1]
    if plan != plan:
        return "defaults", "no plan estimate, so checkpointing as measured"
    if plan > CARD_FREE_GIB:
        return "checkpointing on", f"the plan's {plan:.1f} GiB without checkpointing is over {CARD_FREE_GIB:g} GiB free, so auto turns it on"
    return "defaults", f"the plan's {plan:.1f} GiB fits {CARD_FREE_GIB:g} GiB free, so auto leaves checkpointing off"


def logits_target(spec: Any, groups: dict, shape: dict, device: str) -> str:
    """Per-sample step-peak saving of the loss at the targets against logits everywhere, vs the non-caption part of
    one fp32 logits tensor."""
    padded, vocab = shape["padded_length"], shape["vocab"]
    caption = sum(shape["targets"]) / len(shape["targets"])
    full = padded * vocab * 4 / GIB
    expected = (1 - caption / padded) * full
    head = (f"logits per sample, {spec.label}: all {padded} positions {full:.2f} GiB (fp32), the ~{caption:.0f} caption targets "
            f"{caption / padded:.0%} of it")
    pairs = [LOGITS_PAIR, ("before: bf16 weights off", "bf16 weights off"), ("before: defaults", "defaults")]
    for off_row, on_row in pairs:
        savings = []
        for batch in sorted({b for _, b in groups}, reverse=True):
            off, on = groups.get((off_row, batch), {}), groups.get((on_row, batch), {})
            savings += [(off[l].step_peak - on[l].step_peak) / batch for l in off if l in on
                        and off[l].status.startswith("ok") and on[l].status.startswith("ok")]
        if savings:
            saving = sum(savings) / len(savings)
            verdict = "PASS" if saving >= 0.9 * expected else "FAIL"
            note = "" if (off_row, on_row) == LOGITS_PAIR else " (before/after the whole change: other items differ too)"
            return f"{head}; measured saving per sample ({off_row!r} - {on_row!r}){note}: {saving:.2f} GiB, target >= {0.9 * expected:.2f}: {verdict}  [{device}]"
    return f"{head}; measured saving: not available (needs the rows {LOGITS_PAIR[0]!r} and {LOGITS_PAIR[1]!r}, or --compare)"


def plan_runs(settings: list[str], batch: int, target_batch: int, codes: list[str]) -> list[tuple[str, int, str]]:
    """(setting, batch, code) for one slice: every setting at `batch`, TARGET_BATCH_SETTINGS also at `target_batch`."""
    runs = [(setting, batch, code) for code in codes for setting in settings]
    if target_batch and target_batch != batch:
        runs += [(setting, target_batch, code) for code in codes for setting in settings if setting in TARGET_BATCH_SETTINGS]
    return runs


def needed_bytes(key: str, layers: int) -> int:
    """A generous guess at a run's peak, to skip what cannot fit: fp32 weights, the bf16 file read while loading,
    and 2 GiB for activations, logits and the runtime."""
    from vlm_slices import SLICES, parameter_count

    return parameter_count(SLICES[key], layers) * 6 + 2 * GIB


def report(workdir: Path, models: list[str], layers: list[int], device: str) -> None:
    """The tables and targets from `workdir`'s results.jsonl (every run so far) and the models' row shapes."""
    runs = [Run(**json.loads(line)) for line in (workdir / "results.jsonl").read_text().splitlines() if line.strip()]
    summary = []
    for key in models:
        shape_file = workdir / "models" / f"{key}-shape.json"
        mine = [run for run in runs if run.model == key and run.layers in layers]
        if mine:
            summary += report_model(key, mine, json.loads(shape_file.read_text()) if shape_file.exists() else None, layers, device)
    print("\nsummary:")
    for line in summary:
        print("  " + line)
    print(f"(every run: {workdir / 'results.jsonl'}; logs: {workdir / 'logs'})")


def finished_runs(records: Path) -> set[tuple]:
    """(model, layers, setting, batch, code) of every run results.jsonl records as measured."""
    if not records.exists():
        return set()
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return {(r["model"], r["layers"], r["setting"], r["batch"], r["code"]) for r in rows if r["status"].startswith("ok")}


def bench(args: argparse.Namespace) -> int:
    from vlm_slices import SLICES

    unknown = [m for m in args.models if m not in SLICES] + [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown --models/--settings: {', '.join(unknown)} (models: {', '.join(SLICES)}; settings: {', '.join(SETTINGS)})")
    workdir = Path(args.workdir)
    if workdir.exists() and not args.resume:
        raise SystemExit(f"{workdir} exists; pass a new --workdir (or --resume to reuse its models and data)")
    workdir.mkdir(parents=True, exist_ok=True)
    device = parent_device_description()
    print(f"vlm_memory: {device}; models {', '.join(args.models)}; layers {args.layers}; settings {', '.join(args.settings)}; "
          f"batch {args.batch}" + (f" (defaults also at {args.target_batch})" if args.target_batch else "") + (f"; also with the caption-train at {args.compare}" if args.compare else ""), flush=True)
    data_root = workdir / "data"
    if not (data_root / "captions.json").exists():
        captions = make_data(data_root, max(args.batch, args.target_batch or 1))
        (data_root / "captions.json").write_text(json.dumps(captions))
    codes = [""] + ([str(Path(args.compare).resolve())] if args.compare else [])
    records = workdir / "results.jsonl"
    finished = finished_runs(records)
    for key in args.models:
        for layers in args.layers:
            model_dir = workdir / "models" / f"{key}-L{layers}"
            need, have = needed_bytes(key, layers), available_bytes()
            if need > have and not args.force:
                print(f"skipped {key} L={layers}: needs about {need / GIB:.0f} GiB, {have / GIB:.0f} GiB available now (--force runs it anyway)", flush=True)
                continue
            shape_file = workdir / "models" / f"{key}-shape.json"
            if not (model_dir / "config.json").exists():
                shutil.rmtree(model_dir, ignore_errors=True)
                model_dir.parent.mkdir(exist_ok=True)
                print(f"building {key} with {layers} decoder layers ...", flush=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "build", "--model", key, "--layers", str(layers),
                       "--out", str(model_dir), "--captions", str(data_root / "captions.json"), "--data", str(batch_folder(data_root, args.batch)),
                       "--shape", "" if shape_file.exists() else str(shape_file)]
                status, output, seconds = run_child(cmd, child_env(""), workdir / f"build-{key}-L{layers}.log")
                if status != 0:
                    raise SystemExit(f"building {key} L={layers} failed:\n{output[-3000:]}")
                print(f"  built in {seconds:.0f} s", flush=True)
            for setting, batch, code in plan_runs(args.settings, args.batch, args.target_batch, codes):
                if (key, layers, setting, batch, code) in finished:
                    continue  # --resume: measured already
                run = measure(Run(key, layers, setting, batch, code), model_dir, batch_folder(data_root, batch), workdir)
                with records.open("a") as handle:
                    handle.write(json.dumps(run.__dict__) + "\n")
                print(f"  {key} L={layers} batch {batch} {run.row}: " + (f"load {gib(run.load_peak)} GiB, step {gib(run.step_peak)} GiB"
                      + (f", plan {run.plan:.1f} GiB" if run.plan == run.plan else "") + f" ({run.seconds:.0f} s)" if run.status.startswith("ok") else run.status), flush=True)
            if not args.keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
    report(workdir, args.models, args.layers, device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/caption-train-vlm-memory")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-vl-7b", "joycaption", "smolvlm-256m"])
    parser.add_argument("--layers", nargs="+", type=int, default=[2, 4], help="decoder layers of each slice (two or more: the slope)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="rows of SETTINGS to run (default: all)")
    parser.add_argument("--batch", type=int, default=4, help="batch size every setting runs at")
    parser.add_argument("--target_batch", type=int, default=1, help="batch size the defaults also run at (the targets'; 0 = none)")
    parser.add_argument("--quick", action="store_true", help="SmolVLM-256M only (a few GB): a smoke run")
    parser.add_argument("--compare", default=None, help="also run every row with the caption-train checkout at this path (rows 'before: ...')")
    parser.add_argument("--keep_models", action="store_true", help="keep the built slices (default: delete each after its runs)")
    parser.add_argument("--resume", action="store_true", help="reuse an existing --workdir (its data and any kept models)")
    parser.add_argument("--force", action="store_true", help="run slices that look too large for the memory available now")
    parser.add_argument("--report_only", action="store_true", help="print the tables and targets from --workdir's results.jsonl, running nothing")
    parser.add_argument("--role", default="bench", choices=["bench", "build", "step"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--out", "--captions", "--data", "--shape", "--config", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = QUICK["models"]
    if args.role == "build":
        args.layers = args.layers[0]
        return build_role(args)
    if args.role == "step":
        return step_role(args)
    if args.report_only:
        report(Path(args.workdir), args.models, args.layers, parent_device_description())
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
