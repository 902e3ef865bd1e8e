"""Training speed: caption-train against the standard BLIP + peft recipe, same model, data and steps.

    python benchmarks/train_speed.py --workdir /tmp/speed          # about 8 minutes on 2 CPU cores

Builds a BLIP-base-architecture model from its config (random weights: ViT-B/16 at 384 px, 12-layer text decoder,
a 30.5k WordPiece vocabulary written locally) and 32 captioned images, then runs, one process at a time:
  1. caption-train, 1 epoch (train2.py with its defaults, plus the shared settings below),
  2. the standard recipe, 1 epoch (its own copy below: processor pads to max_length, labels = input_ids, fp32),
  3. caption-train, 4 epochs.
Shared settings: batch 4, LoRA r16 on query/value, AdamW lr 1e-4, no validation split.
Printed: whole-process seconds, time to the first optimizer step, samples/s, peak RSS, caption-train's own time
breakdown, the padding fraction of each recipe's labels, achieved GFLOP/s against this machine's measured matmul
peak (fp32 and bf16), the vision tower's forward with eager vs SDPA attention, and the ratios the issue targets.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH, LR, IMAGES = 4, 1e-4, 32
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"]}


# ---------------------------------------------------------------------------------------------
# The model and data


def build_blip_base(out: Path) -> Path:
    """BLIP-base's architecture (BlipConfig defaults) with random weights and a locally written 30.5k vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from caption_train.tiny import COLORS, SHAPES

    out.mkdir(parents=True)
    # Whole words for the captions' words, every printable character (and its ## continuation) for the rest,
    # padded to BERT's 30,524 entries so the LM head has BLIP's real size. (transformers 5's BertTokenizerFast
    # ignores vocab_file=, so the WordPiece model is built from the vocabulary directly.)
    words = sorted({w for c in COLORS for s in SHAPES for w in f"a {c} {s} picture of centered plain light background simple flat drawing".split()})
    chars = [chr(c) for c in range(33, 127)]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *(f"##{c}" for c in chars)]))
    vocab += [f"[unused{i}]" for i in range(30523 - len(vocab))]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = BertTokenizerFast(tokenizer_object=backend, do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    assert len(tokenizer) == 30524 and "[UNK]" not in tokenizer.tokenize("a red circle, centered"), "benchmark tokenizer is broken"
    config = BlipConfig()
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.sep_token_id = tokenizer.sep_token_id
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer).save_pretrained(out)
    return out


def make_data(folder: Path) -> None:
    from caption_train.tiny import make_shapes_dataset

    pairs = make_shapes_dataset(folder, IMAGES, seed=0, size=256, subfolders=0)
    for path, caption in pairs:  # tag-style captions of a realistic length
        path.with_suffix(".txt").write_text(f"{caption}, centered, plain light background, simple flat drawing\n")


# ---------------------------------------------------------------------------------------------
# The standard recipe (what the widely copied BLIP fine-tuning notebooks do), run as its own process


def standard_recipe(model_dir: str, data_dir: str, epochs: int) -> None:
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = get_peft_model(BlipForConditionalGeneration.from_pretrained(model_dir), LoraConfig(**LORA))
    images = sorted(Path(data_dir).glob("*.png"))

    class Captions(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            encoding = processor(images=Image.open(images[i]).convert("RGB"), text=images[i].with_suffix(".txt").read_text().strip(),
                                 padding="max_length", return_tensors="pt")
            return {k: v.squeeze(0) for k, v in encoding.items()}

    loader = torch.utils.data.DataLoader(Captions(), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    for epoch in range(epochs):
        for step, batch in enumerate(loader):
            outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["input_ids"])
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"epoch {epoch} step {step + 1} loss {outputs.loss.item():.4f}", flush=True)
    model.save_pretrained(Path(data_dir).parent / "standard-out")


# ---------------------------------------------------------------------------------------------
# Running and measuring one process


def run_measured(cmd: list[str], first_step: re.Pattern, env: dict[str, str]) -> dict:
    """Run `cmd`; return whole seconds, seconds to the first optimizer step (first output matching `first_step`),
    peak RSS of the process and its children (MB), and its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    first, chunks, buffer = None, [], b""
    while True:
        data = os.read(proc.stdout.fileno(), 4096)
        if not data:
            break
        chunks.append(data)
        buffer = (buffer + data)[-4096:]
        if first is None and first_step.search(buffer.decode("utf-8", "replace")):
            first = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    output = b"".join(chunks).decode("utf-8", "replace")
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return {"seconds": seconds, "first_step": first, "rss_mb": usage.ru_maxrss / 1024, "output": output}


def ours(model_dir: Path, data_dir: Path, runs: Path, epochs: int, env: dict[str, str]) -> dict:
    import json

    cmd = [sys.executable, "train2.py", "--dataset_dir", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(runs),
           "--epochs", str(epochs), "--batch_size", str(BATCH), "--lr", str(LR), "--peft_args", json.dumps(LORA)]
    result = run_measured(cmd, re.compile(r"training:\s+\d+%\|[^|]*\|\s+1/\d+"), env)
    result["breakdown"] = next((line for line in result["output"].splitlines() if line.startswith("time: ")), "")
    training = re.search(r"training ([\d.]+) s", result["breakdown"])
    result["samples_per_s"] = IMAGES * epochs / float(training.group(1)) if training else float("nan")
    for key in ("precision: ", "image features: "):
        result[key] = next((line for line in result["output"].splitlines() if line.startswith(key)), "")
    return result


def standard(model_dir: Path, data_dir: Path, env: dict[str, str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "standard", "--model", str(model_dir), "--data", str(data_dir)]
    result = run_measured(cmd, re.compile(r"step 1 loss"), env)
    steps = IMAGES // BATCH
    result["samples_per_s"] = IMAGES / max(1e-9, result["seconds"] - result["first_step"]) * (steps - 1) / steps
    return result


# ---------------------------------------------------------------------------------------------
# In-process measurements


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def step_flops(model_dir: Path, data_dir: Path) -> tuple[float, float]:
    """(vision forward FLOPs, text forward+backward FLOPs) of one batch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from caption_train.adapters import wrap_model
    from caption_train.data.images import load_rgb
    from caption_train.models.blip import BlipFamily

    family = BlipFamily()
    model, processor = family.load(str(model_dir), {})
    model = wrap_model(model, family, "LoRA", LORA)
    family.freeze_vision_tower(model)
    paths = sorted(data_dir.glob("*.png"))[:BATCH]
    batch = family.collate(processor, [load_rgb(p) for p in paths], [p.with_suffix(".txt").read_text().strip() for p in paths], max_length=512)
    with FlopCounterMode(display=False) as vision:
        features = family.image_features(model, batch["pixel_values"])
    batch = batch | family.feature_inputs(features)
    with FlopCounterMode(display=False) as text:
        family.caption_loss(model, batch).loss.backward()  # the trainer's loss: logits at the caption tokens only
    return float(vision.get_total_flops()), float(text.get_total_flops())


def vision_attention_seconds(model_dir: Path, data_dir: Path, bf16: bool) -> dict[str, float]:
    """Seconds for one batch through the vision tower, eager vs SDPA attention, fp32 and (where native) bf16 autocast."""
    from caption_train.data.images import load_rgb
    from caption_train.models.blip import BlipFamily

    family = BlipFamily()
    paths = sorted(data_dir.glob("*.png"))[:BATCH]
    results = {}
    for attention in ("eager", "sdpa"):
        model, processor = family.load(str(model_dir), {"attn_implementation": attention})
        pixels = family.pixel_inputs(processor, [load_rgb(p) for p in paths])["pixel_values"]
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))[: 2 if bf16 else 1]:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                model.vision_model(pixel_values=pixels)
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    model.vision_model(pixel_values=pixels)
                    times.append(time.perf_counter() - start)
            results[f"{attention} {name}"] = min(times)
    return results


def padding_fractions(model_dir: Path, data_dir: Path) -> tuple[float, float]:
    """Share of label positions that are padding: padded per batch with pads masked (caption-train: trained on
    none of them, this is just the waste) vs padded to max_length with pads as labels (standard recipe)."""
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    captions = [p.read_text().strip() for p in sorted(data_dir.glob("*.txt"))]
    dynamic = [processor.tokenizer(captions[i : i + BATCH], padding="longest", return_tensors="pt")["attention_mask"] for i in range(0, len(captions), BATCH)]
    padded = processor.tokenizer(captions, padding="max_length", return_tensors="pt")["attention_mask"]
    share = sum(float((m == 0).sum()) for m in dynamic) / sum(m.numel() for m in dynamic)
    return share, float((padded == 0).float().mean())


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/caption-train-speed")
    parser.add_argument("--role", default="bench", choices=["bench", "standard"])
    parser.add_argument("--model")
    parser.add_argument("--data")
    args = parser.parse_args()
    if args.role == "standard":
        standard_recipe(args.model, args.data, epochs=1)
        return

    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; pass a new --workdir")
    model_dir, data_dir = build_blip_base(workdir / "blip-base-arch"), workdir / "data"
    make_data(data_dir)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XDG_CACHE_HOME=str(workdir / "cache"), PYTHONPATH=str(REPO))

    one = ours(model_dir, data_dir, workdir / "runs", 1, env)
    std = standard(model_dir, data_dir, env)
    four = ours(model_dir, data_dir, workdir / "runs", 4, env)

    from caption_train.precision import resolve_precision

    native_bf16 = resolve_precision("auto").mode == "bf16"  # else bf16 is emulated here: slow, and not what training uses
    fp32_peak = matmul_peak(torch.float32)
    bf16_peak = matmul_peak(torch.bfloat16) if native_bf16 else float("nan")
    vision_flops, text_flops = step_flops(model_dir, data_dir)
    steps = IMAGES // BATCH
    attention = vision_attention_seconds(model_dir, data_dir, native_bf16)
    dynamic_pad, max_pad = padding_fractions(model_dir, data_dir)

    print(f"\nBLIP-base architecture, {IMAGES} images, batch {BATCH}, LoRA r16 query/value, AdamW; one process at a time on this machine")
    print(f"{'run':<34}{'whole s':>9}{'1st step s':>11}{'samples/s':>11}{'peak RSS MB':>13}")
    for name, r in (("caption-train, 1 epoch", one), ("standard recipe, 1 epoch", std), ("caption-train, 4 epochs", four)):
        print(f"{name:<34}{r['seconds']:>9.1f}{r['first_step'] or float('nan'):>11.1f}{r['samples_per_s']:>11.2f}{r['rss_mb']:>13.0f}")
    print(f"caption-train 1 epoch: {one['precision: ']}; {one['image features: ']}")
    print(f"caption-train 1 epoch {one['breakdown']}")
    print(f"caption-train 4 epochs {four['breakdown']}")
    extra_epoch = (four["seconds"] - one["seconds"]) / 3
    print(f"\nspeed-up, 1 epoch whole process: {std['seconds'] / one['seconds']:.2f}x the standard recipe (target >= 4x)")
    print(f"each epoch after the first: {extra_epoch:.1f} s = {extra_epoch / one['seconds']:.0%} of a whole 1-epoch run (target <= 25%)")
    print(f"\npadding: {max_pad:.1%} of label positions are pads when padded to max_length (standard recipe, trained on); "
          f"{dynamic_pad:.1%} padded per batch (caption-train, masked)")
    print(f"matmul peak on this machine: fp32 {fp32_peak:.0f} GFLOP/s, " + (f"bf16 {bf16_peak:.0f} GFLOP/s" if native_bf16 else "bf16 not native here (not measured)"))
    print(f"FLOPs per batch of {BATCH}: vision forward {vision_flops / 1e9:.0f} G, text forward+backward {text_flops / 1e9:.0f} G (standard recipe's text side is padded to 512: more)")
    epoch1_flops = steps * (vision_flops + text_flops)
    training1 = float(re.search(r"training ([\d.]+) s", one["breakdown"]).group(1))
    achieved = epoch1_flops / training1 / 1e9
    print(f"caption-train epoch 1: {achieved:.0f} GFLOP/s achieved in training ("
          + (f"{achieved / bf16_peak:.0%} of the bf16 peak, " if native_bf16 else "") + f"{achieved / fp32_peak:.0%} of the fp32 peak)")
    print(f"standard recipe: {steps * vision_flops / std['seconds'] / 1e9:.0f} GFLOP/s of vision work alone over the whole process (fp32 peak {fp32_peak:.0f})")
    print("vision tower forward, batch of 4: " + ", ".join(f"{k} {v:.2f} s" for k, v in attention.items()) + "; SDPA speed-up "
          + ", ".join(f"{name} {attention[f'eager {name}'] / attention[f'sdpa {name}']:.2f}x" for name in ("fp32", "bf16") if f"eager {name}" in attention))
    if torch.cuda.is_available():
        print("(a GPU is present: see benchmarks/gpu_mfu.py for TFLOP/s and MFU on it)")
    print("one run each, alternating ours / standard / ours; timing on a shared 2-core machine varies by ~10%")


if __name__ == "__main__":
    main()
