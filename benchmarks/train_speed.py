"""Training speed: caption-train against the standard BLIP + peft recipe, and a chat VLM against TRL's SFTTrainer.

    python benchmarks/train_speed.py --workdir /tmp/speed                 # BLIP: about 8 minutes on 2 CPU cores
    python benchmarks/train_speed.py --vs trl --workdir /tmp/speed-trl    # chat VLM vs TRL (pip install -e '.[bench]')
    python benchmarks/train_speed.py --vs trl --quick --workdir /tmp/t    # the same at smoke scale (8 images, 2 layers)

--vs standard (the default). Builds a BLIP-base-architecture model from its config (random weights: ViT-B/16 at
384 px, 12-layer text decoder, a 30.5k WordPiece vocabulary written locally) and 32 captioned images, then runs,
one process at a time:
  1. caption-train, 1 epoch (train2.py with its defaults, plus the shared settings below),
  2. the standard recipe, 1 epoch (its own copy below: processor pads to max_length, labels = input_ids, fp32),
  3. caption-train, 4 epochs.
Shared settings: batch 4, LoRA r16 on query/value, AdamW lr 1e-4, no validation split.
Printed: whole-process seconds, time to the first optimizer step, samples/s, peak RSS, caption-train's own time
breakdown, the padding fraction of each recipe's labels, achieved GFLOP/s against this machine's measured matmul
peak (fp32 and bf16), the vision tower's forward with eager vs SDPA attention, and the ratios the issue targets.

--vs trl. Builds a scaled SmolVLM (Idefics3: SmolVLM-256M's vision tower and widths, 8 of its 30 text layers, its
49,280-entry vocabulary; benchmarks/vlm_slices.py) and 64 captioned 512 px images, then alternates, one process at
a time: caption-train 1 epoch, TRL 1 epoch, caption-train 3 epochs, TRL 3 epochs (--rounds repeats it).
Shared: the model folder, images and captions, batch 4, LoRA r16 alpha 16 dropout 0 on the chat-vlm family's
targets (passed to TRL as a regex), AdamW lr 1e-4 with weight decay 0.01, cosine decay to 0 over the run, max grad
norm 1, seed 42, the precision (--precision; auto = caption-train's choice for this machine, given to TRL as bf16 or
not). TRL gets prompt-completion data (so its completion-only loss: prompt and image tokens are not targets) and
its own defaults otherwise, printed: gradient checkpointing on, fused AdamW, no DataLoader workers, its fused LM
head. caption-train runs with its own defaults otherwise (probe captions and a checkpoint every epoch).
Same order: a hook records the images of every caption-train training batch (by each caption's unique last words),
and TRL is given a dataset holding them in that order, read sequentially. The loss of every step of both is
printed side by side: equal at step 1 (same data, same LoRA init); afterwards apart by rounding only (smoke run,
8 images x 2 epochs: fp32 equal to 1e-6 at every step; bf16 autocast up to 2e-4 from step 2 on, as TRL's fused LM
head accumulates the logits in fp32 where caption-train's autocast rounds them to bf16 first). Printed also: whole-process seconds, time to the first step, samples/s (caption-train's over
its `training` time, TRL's over its train_runtime), peak RSS, and the issue's targets: at least 2.5x TRL's
samples/s on 1 epoch and 4x on 3 epochs. Skipped with one line when TRL is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # vlm_slices, vlm_memory
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
        model(**batch).loss.backward()
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
# The chat-VLM comparison with TRL's SFTTrainer (--vs trl)

VLM_IMAGES, VLM_LAYERS, VLM_EPOCHS = 64, 8, (1, 3)
VLM_QUICK = (8, 2, (1, 2))  # --quick: images, text layers, epoch counts (a smoke run: minutes)
VLM_TARGETS = {1: 2.5, 3: 4.0}  # epochs -> caption-train's samples/s at least this many times TRL's
# Dropout 0: the two implementations draw dropout masks differently, and equal losses are the check that both train
# the same thing. r and alpha are caption-train's defaults; the targets are the chat-vlm family's (passed to TRL too).
VLM_LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0}
VLM_WEIGHT_DECAY = 0.01  # caption-train's AdamW default (torch's); TRL's is 0.0, so TRL is given this one
# SmolVLM's template shape, except that the assistant turn ends at <end_of_utterance> instead of
# "<end_of_utterance>\n": TRL's completion-only loss trains every token of the completion the template writes, the
# newline too, while caption-train trains the caption and the end-of-turn token. Without that newline both train
# exactly the same tokens, so their losses can be compared step by step.
SMOLVLM_TEMPLATE_TURN_END = (
    "<|im_start|>{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>{% endfor %}"
    "{% if add_generation_prompt %}{{ '\nAssistant:' }}{% endif %}"
)
ITEM = re.compile(r"item (\d+)")  # each caption's unique last words, by which a recorded batch names its images


def make_vlm_data(folder: Path, count: int) -> list[str]:
    """`count` captioned 512 px images (one SmolVLM tile each); every caption unique (it ends with `item <index>`)."""
    from caption_train.tiny import make_shapes_dataset

    captions = []
    for i, (path, subject) in enumerate(make_shapes_dataset(folder, count, seed=0, size=512, subfolders=0)):
        captions.append(f"{subject}, centered on a plain light background, simple flat drawing, item {i}")
        path.with_suffix(".txt").write_text(captions[-1] + "\n", encoding="utf-8")
    return captions


def build_scaled_smolvlm(out: Path, captions: list[str], layers: int) -> Path:
    """Idefics3 with SmolVLM-256M's vision tower and widths, `layers` of its 30 text layers, its 49,280-entry
    vocabulary; fp32 weights (what both trainers load by default)."""
    from vlm_slices import SLICES, build_slice

    return build_slice(SLICES["smolvlm-256m"], out, layers=layers, texts=captions, dtype="float32", chat_template=SMOLVLM_TEMPLATE_TURN_END)


def vlm_ours_child(train_args: list[str], order_out: str) -> None:
    """caption-train's training (what train2.py runs) with a hook that records each training forward's input_ids,
    so the TRL run can be fed the same images in the same order; writes the order (image indices) to `order_out`."""
    from transformers import AutoTokenizer

    from caption_train.config import load_train_config
    from caption_train.train import train

    try:  # the hook protocol's own module where this caption-train has one, else the loop's
        from caption_train.hooks import TrainingHooks
    except ImportError:
        from caption_train.train import TrainingHooks

    batches: list[list[list[int]]] = []

    class RecordBatches(TrainingHooks):
        def on_setup(self, run) -> None:
            def record(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if module.training and ids is not None:  # not the probe captions' generate (eval mode)
                    batches.append(ids.tolist())

            run.model.register_forward_pre_hook(record, with_kwargs=True)

    cfg = load_train_config(train_args)
    train(cfg, hooks=RecordBatches())
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    # A row's text ends with its caption's "item N" (a packed row holds several captions, in order).
    order = [[int(n) for row in batch for n in ITEM.findall(tokenizer.decode(row, skip_special_tokens=True))] for batch in batches]
    Path(order_out).write_text(json.dumps(order))


def vlm_trl_child(model_dir: str, data_dir: str, order_file: str, bf16: bool, out_dir: str) -> None:
    """TRL's SFTTrainer on the same model folder, images and captions, in caption-train's order: prompt-completion
    data (completion-only loss), TRL's defaults except what must match (named in `trl settings:`)."""
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from caption_train.models.chat_vlm import LORA_TARGETS, ChatVlmFamily

    batches = json.loads(Path(order_file).read_text())
    paths = [Path(data_dir) / f"img_{i:04d}.png" for batch in batches for i in batch]
    image_list = getattr(datasets, "List", None) or datasets.Sequence
    dataset = datasets.Dataset.from_dict({
        "images": [[str(path)] for path in paths],
        "prompt": [[{"role": "user", "content": ChatVlmFamily.default_prompt}] for _ in paths],
        "completion": [[{"role": "assistant", "content": path.with_suffix(".txt").read_text(encoding="utf-8").strip()}] for path in paths],
    }).cast_column("images", image_list(datasets.Image()))
    config = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        num_train_epochs=1,  # over the dataset above: every epoch of caption-train's run, one after the other
        train_sampling_strategy="sequential",  # caption-train's order, as the dataset holds it
        lr_scheduler_type="cosine",  # caption-train's CosineAnnealingLR to 0 over the run (TRL's default: linear)
        weight_decay=VLM_WEIGHT_DECAY,
        logging_steps=1,  # every step's loss (TRL's default: every 10)
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),  # what TRL asks for on a machine without a GPU
    )

    class PrintLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"trl step {state.global_step} loss {float(logs['loss'])!r}", flush=True)

    trainer = SFTTrainer(model=model_dir, args=config, train_dataset=dataset,
                         peft_config=LoraConfig(target_modules=LORA_TARGETS, **VLM_LORA), callbacks=[PrintLoss()])
    args = trainer.args

    def name(value):  # enums (OptimizerNames, SchedulerType) by their value
        return getattr(value, "value", value)

    print(f"trl settings: gradient_checkpointing {args.gradient_checkpointing}"
          + (f" {args.gradient_checkpointing_kwargs}" if args.gradient_checkpointing_kwargs else "")
          + f", optim {name(args.optim)}, bf16 {args.bf16}, completion_only_loss {trainer.completion_only_loss}, loss_type {args.loss_type}, "
          f"max_length {args.max_length}, dataloader_num_workers {args.dataloader_num_workers}, max_grad_norm {args.max_grad_norm}, "
          f"seed {args.seed}, lr_scheduler {name(args.lr_scheduler_type)}, weight_decay {args.weight_decay}, "
          f"report_to {args.report_to or 'none'}, use_cpu {args.use_cpu}", flush=True)
    metrics = trainer.train().metrics
    trainer.save_model(out_dir)
    print("trl metrics: " + json.dumps(metrics), flush=True)


def vlm_ours(model_dir: Path, data_dir: Path, workdir: Path, epochs: int, images: int, mixed_precision: str, env: dict[str, str], tag: str) -> dict:
    order_file = workdir / f"order-{tag}.json"
    train_args = ["--dataset_dir", str(data_dir), "--model_name_or_path", str(model_dir), "--output_dir", str(workdir / "runs"),
                  "--training_name", tag, "--epochs", str(epochs), "--batch_size", str(BATCH), "--lr", str(LR),
                  "--peft_args", json.dumps(VLM_LORA), "--mixed_precision", mixed_precision]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "vlm-ours", "--order_out", str(order_file), "--train_args", json.dumps(train_args)]
    result = run_measured(cmd, re.compile(r"training:\s+\d+%\|[^|]*\|\s+1/\d+"), env)
    result["breakdown"] = next((line for line in result["output"].splitlines() if line.startswith("time: ")), "")
    training = re.search(r"training ([\d.]+) s", result["breakdown"])
    result["samples_per_s"] = images * epochs / float(training.group(1)) if training else float("nan")
    # (contract) the trainer's last line is final/'s path; anything a library prints at exit may follow it
    final = next(line.strip() for line in reversed(result["output"].splitlines()) if line.strip().endswith("final") and Path(line.strip()).is_dir())
    run_dir = Path(final).parent
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result["losses"] = [row["train/loss"] for row in rows if "train/loss" in row]
    result["order_file"] = order_file
    for key in ("precision: ", "image features: "):
        result[key] = next((line for line in result["output"].splitlines() if line.startswith(key)), "")
    return result


def vlm_trl(model_dir: Path, data_dir: Path, order_file: Path, bf16: bool, workdir: Path, env: dict[str, str], tag: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "vlm-trl", "--model", str(model_dir), "--data", str(data_dir),
           "--order", str(order_file), "--out", str(workdir / tag)] + (["--bf16"] if bf16 else [])
    result = run_measured(cmd, re.compile(r"trl step 1 loss"), env)
    lines = result["output"].splitlines()
    metrics = json.loads(next(line for line in lines if line.startswith("trl metrics: "))[len("trl metrics: "):])
    samples = sum(len(batch) for batch in json.loads(order_file.read_text()))
    result["samples_per_s"] = samples / metrics["train_runtime"]
    result["losses"] = [float(m.group(1)) for m in re.finditer(r"trl step \d+ loss (\S+)", result["output"])]
    result["settings"] = next((line for line in lines if line.startswith("trl settings: ")), "")
    return result


def trl_comparison(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        print("skipped: the TRL comparison needs TRL, which is not installed here (pip install -e '.[bench]')")
        return
    import trl

    from caption_train.precision import resolve_precision

    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; pass a new --workdir")
    images, layers, epoch_counts = VLM_QUICK if args.quick else (VLM_IMAGES, VLM_LAYERS, VLM_EPOCHS)
    # caption-train gets "auto" itself when asked for it (its default); TRL gets what that resolves to here.
    mixed = {"auto": "auto", "fp32": "no", "bf16": "bf16"}[args.precision]
    bf16 = (resolve_precision("auto").mode if mixed == "auto" else mixed) == "bf16"
    data_dir = workdir / "data"
    model_dir = build_scaled_smolvlm(workdir / f"smolvlm-256m-{layers}-layers", make_vlm_data(data_dir, images), layers)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XDG_CACHE_HOME=str(workdir / "cache"), PYTHONPATH=str(REPO))
    results = []  # (epochs, ours, theirs), alternating: ours 1 epoch, TRL 1 epoch, ours 3 epochs, TRL 3 epochs, ...
    for round_ in range(args.rounds):
        for epochs in epoch_counts:
            tag = f"{epochs}ep-r{round_ + 1}"
            print(f"caption-train, {epochs} epoch(s) (round {round_ + 1}) ...", flush=True)
            ours = vlm_ours(model_dir, data_dir, workdir, epochs, images, mixed, env, f"ours-{tag}")
            print(f"TRL, {epochs} epoch(s) (round {round_ + 1}) ...", flush=True)
            theirs = vlm_trl(model_dir, data_dir, ours["order_file"], bf16, workdir, env, f"trl-{tag}")
            results.append((epochs, ours, theirs))

    import transformers

    from vlm_memory import cpu_description

    device = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu_description()
    print(f"\nchat VLM: Idefics3 with SmolVLM-256M's vision tower and widths, {layers} of its 30 text layers, 49,280-entry vocabulary, "
          f"random fp32 weights; {images} images (512 px: 64 image tokens), batch {BATCH}, LoRA r16 alpha 16 dropout 0 on the language "
          f"model's attention and MLP, AdamW lr {LR} weight decay {VLM_WEIGHT_DECAY}, cosine to 0, {'bf16 autocast' if bf16 else 'fp32'}; "
          f"measured on {device}; TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"TRL's own defaults otherwise: {results[0][2]['settings'][len('trl settings: '):]}")
    print(f"caption-train: its defaults otherwise ({results[0][1]['precision: ']}; probe captions after every epoch, epoch checkpoints)")
    print(f"{'run':<32}{'whole s':>9}{'1st step s':>11}{'samples/s':>11}{'peak RSS MB':>13}")
    for epochs, ours, theirs in results:
        for name, r in ((f"caption-train, {epochs} epoch(s)", ours), (f"TRL SFTTrainer, {epochs} epoch(s)", theirs)):
            print(f"{name:<32}{r['seconds']:>9.1f}{r['first_step'] or float('nan'):>11.1f}{r['samples_per_s']:>11.3f}{r['rss_mb']:>13.0f}")
        print(f"  caption-train {ours['breakdown']}; {ours['image features: ']}")
    print("samples/s: caption-train's from its `training` time (the epochs' steps), TRL's from its train_runtime (trainer.train())")
    for epochs, ours, theirs in results:
        worst = max((abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])), default=float("nan"))
        print(f"\nloss at every step, {epochs} epoch(s) (same images in the same order; largest difference {worst:.2e}):")
        print(f"{'step':>6}{'caption-train':>16}{'TRL':>16}{'difference':>13}")
        for step, (a, b) in enumerate(zip(ours["losses"], theirs["losses"]), 1):
            print(f"{step:>6}{a:>16.6f}{b:>16.6f}{a - b:>13.2e}")
        if len(ours["losses"]) != len(theirs["losses"]):
            print(f"  step counts differ: caption-train {len(ours['losses'])}, TRL {len(theirs['losses'])}")
    for epochs, target in VLM_TARGETS.items():
        ratios = [ours["samples_per_s"] / theirs["samples_per_s"] for e, ours, theirs in results if e == epochs]
        if ratios:
            verdict = "PASS" if min(ratios) >= target else "FAIL"
            print(f"target: caption-train at {', '.join(f'{r:.2f}x' for r in ratios)} TRL's samples/s on {epochs} epoch(s) (>= {target}x): {verdict}  [{device}]")
        else:
            print(f"target: {epochs} epoch(s) >= {target}x TRL's samples/s: not measured in this run (--quick measures {', '.join(map(str, epoch_counts))})")
    print("alternated in one run (caption-train, then TRL, per epoch count); timing on a busy machine varies: run it on a quiet one")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/caption-train-speed")
    parser.add_argument("--vs", default="standard", choices=["standard", "trl"],
                        help="standard: BLIP-base vs the standard BLIP + peft recipe; trl: a scaled SmolVLM vs TRL's SFTTrainer (needs the bench extra)")
    parser.add_argument("--quick", action="store_true", help=f"--vs trl: {VLM_QUICK[0]} images, {VLM_QUICK[1]} text layers, epochs {VLM_QUICK[2]} (a smoke run)")
    parser.add_argument("--rounds", type=int, default=1, help="--vs trl: repeat the whole alternation this many times")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="--vs trl: both trainers' precision (auto: caption-train's choice for this machine, given to TRL too)")
    parser.add_argument("--role", default="bench", choices=["bench", "standard", "vlm-ours", "vlm-trl"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--data", "--order", "--order_out", "--out", "--train_args"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "standard":
        standard_recipe(args.model, args.data, epochs=1)
        return
    if args.role == "vlm-ours":
        vlm_ours_child(json.loads(args.train_args), args.order_out)
        return
    if args.role == "vlm-trl":
        vlm_trl_child(args.model, args.data, args.order, args.bf16, args.out)
        return
    if args.vs == "trl":
        trl_comparison(args)
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
