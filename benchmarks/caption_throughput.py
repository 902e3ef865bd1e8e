"""Captioning throughput: the `caption` command's path vs a plain per-image `generate` loop, same model and folder.

    python benchmarks/caption_throughput.py --workdir /tmp/caption-bench                 # tiny random BLIP, 256 images
    python benchmarks/caption_throughput.py --model runs/x/final --images_dir photos/      # your model and folder

The plain loop is what a user writes by hand: open each image, run the processor, `model.generate`, decode, write
the .txt. The command path decodes images in DataLoader workers, generates in batches, and merges an adapter first.
Both are timed without model loading, after a short warm-up, with greedy decoding; captions are checked to agree.
Numbers are comparable only within one run (and on a quiet machine, or with --threads 1 on a busy one).
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from PIL import Image

from caption_train.captioning import caption_path_for, find_images
from caption_train.cli import main as cli
from caption_train.inference import load_for_inference
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset


def plain_loop(model_path: str, paths: list[Path], max_new_tokens: int) -> tuple[float, list[str]]:
    """The hand-written baseline: one image at a time, the model as loaded (an adapter stays a PeftModel)."""
    model, processor, _ = load_for_inference(model_path)
    for path in paths[:4]:  # warm-up
        model.generate(**processor(images=Image.open(path).convert("RGB"), return_tensors="pt"), max_new_tokens=max_new_tokens)
    texts = []
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
            output = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=max_new_tokens)
            text = processor.decode(output[0], skip_special_tokens=True).strip()
            caption_path_for(path).write_text(text, encoding="utf-8")
            texts.append(text)
    return time.perf_counter() - start, texts


def command_path(model_path: str, images_dir: Path, paths: list[Path], max_new_tokens: int, batch_size: int, num_workers: int) -> tuple[float, list[str]]:
    """`caption-train caption MODEL IMAGES_DIR --overwrite ...` in-process; its own summary line gives the time."""
    args = [model_path, str(images_dir), "--overwrite", "--max_new_tokens", str(max_new_tokens), "--batch_size", str(batch_size),
            "--num_workers", str(num_workers), "--device", "cpu"]
    with redirect_stdout(io.StringIO()):  # warm-up on a copy of a few images
        warm = images_dir.parent / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        warm.mkdir()
        for path in paths[:batch_size]:
            shutil.copy(path, warm / path.name)
        cli(["caption", model_path, str(warm), "--max_new_tokens", str(max_new_tokens), "--batch_size", str(batch_size), "--num_workers", "0"])
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli(["caption", *args]) == 0
    summary = buffer.getvalue().strip().splitlines()[-1]
    seconds = float(summary.split(" in ")[1].split(" s ")[0])
    return seconds, [caption_path_for(p).read_text(encoding="utf-8") for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/caption-throughput")
    parser.add_argument("--model", default=None, help="model or run final/ to use (default: build a tiny random BLIP in --workdir)")
    parser.add_argument("--images_dir", default=None, help="folder of images (default: generate --images shapes images in --workdir)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice). On a shared CPU use 1: "
                        "OpenMP threads that compete with another process for the cores slow small models down ~20x")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(args.workdir)
    model = args.model
    if model is None:
        model_dir = workdir / "tiny-blip"
        if not model_dir.exists():
            # The demo's model size (64 px, 128 wide, 3+3 layers), random weights: every caption runs to max_new_tokens.
            build_tiny_blip(model_dir, [f"a {c} {s}" for c in COLORS for s in SHAPES], image_size=64, patch_size=16, hidden_size=128,
                            num_layers=3, num_heads=4, max_position_embeddings=32)
        model = str(model_dir)
    if args.images_dir is None:
        source = workdir / "images"
        if not source.exists():
            make_shapes_dataset(source, args.images, seed=0, size=64)
    else:
        source = Path(args.images_dir)
    # Work on a copy, so the benchmark never writes captions into the user's folder.
    images_dir = workdir / "bench-images"
    shutil.rmtree(images_dir, ignore_errors=True)
    shutil.copytree(source, images_dir, ignore=shutil.ignore_patterns("*.txt", "*.jsonl"))
    paths = find_images(images_dir)

    loop_seconds, loop_texts = plain_loop(model, paths, args.max_new_tokens)
    command_seconds, command_texts = command_path(model, images_dir, paths, args.max_new_tokens, args.batch_size, args.num_workers)
    same = sum(a == b for a, b in zip(loop_texts, command_texts))

    print(f"model {model}; {len(paths)} images; greedy, max_new_tokens={args.max_new_tokens}; torch threads {torch.get_num_threads()}")
    print(f"{'path':<44} {'seconds':>8} {'images/s':>9} {'speed-up':>9}")
    print(f"{'plain per-image generate loop':<44} {loop_seconds:>8.2f} {len(paths) / loop_seconds:>9.1f} {1.0:>9.2f}")
    label = f"caption command (batch {args.batch_size}, {args.num_workers} workers)"
    print(f"{label:<44} {command_seconds:>8.2f} {len(paths) / command_seconds:>9.1f} {loop_seconds / command_seconds:>9.2f}")
    print(f"identical captions: {same}/{len(paths)}")


if __name__ == "__main__":
    main()
