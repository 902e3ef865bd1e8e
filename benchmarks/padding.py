"""Padding in the batches a chat VLM trains on: random batches, length-grouped batches, packed rows (token counts).

    python benchmarks/padding.py --workdir /tmp/padding-bench                 # 160 images, batch 8
    python benchmarks/padding.py --workdir /tmp/padding-bench --images 400 --batch_size 4

Writes a dataset of images of mixed sizes and aspect ratios (256 to 1280 px a side, as photos come) with captions
of 3 to 60 words, and a tiny random Qwen2-VL whose processor resizes as Qwen2.5-VL-7B's does at max_pixels 448x448
(patch 14, 2x2 merge: 64 to 256 image tokens per image, following its size). Then it trains one epoch three ways
with `python train2.py` (--group_by_length off --packing off, --group_by_length on --packing off, --packing on) and
reads each run's `padding: ...` line: pad token positions / all token positions in the batches the model was given
(image tokens count as real tokens). Token counts, not time: the numbers do not depend on the machine.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"padding: ([\d.]+)% of the ([\d,]+) token positions")
WORDS = ("red blue green yellow purple orange circle square triangle star small large bright dark soft photo of a "
         "the with on in near over under sky water tree house road person dog cat car flower field mountain light").split()
MODES = {"random batches (before)": ("--group_by_length", "off", "--packing", "off"),
         "grouped by length": ("--group_by_length", "on", "--packing", "off"),
         "packed": ("--packing", "on")}


def make_dataset(out: Path, n: int, seed: int) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        width, height = rng.randint(256, 1280), rng.randint(256, 1280)
        image = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 240, 240))
        image.save(out / f"img_{i:04d}.jpg", quality=80)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        (out / f"img_{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from tiny_families_chat import build_tiny_qwen2_vl

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    make_dataset(work / "data", args.images, args.seed)
    model = build_tiny_qwen2_vl(work / "qwen2-vl", WORDS, max_pixels=448 * 448)
    print(f"{args.images} images (256-1280 px a side), captions of 3-60 words, tiny Qwen2-VL at max_pixels 448x448, batch {args.batch_size}, 1 epoch")
    print("| batches | pad positions / all positions | token positions the model was given |")
    print("|---|---|---|")
    for name, flags in MODES.items():
        run = subprocess.run([sys.executable, str(REPO / "train2.py"), "--dataset_dir", str(work / "data"), "--model_name_or_path", str(model),
                              "--output_dir", str(work / "runs"), "--epochs", "1", "--batch_size", str(args.batch_size), "--max_length", "512",
                              "--num_workers", "0", "--log_with", "none", "--num_sample_captions", "0", "--save_every_n_epochs", "0",
                              "--seed", str(args.seed), *flags], capture_output=True, text=True, cwd=work)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        found = LINE.search(run.stdout + run.stderr)
        grouping = next((line for line in run.stdout.splitlines() if line.startswith("batches: ")), "")
        print(f"| {name} | {found.group(1)}% | {found.group(2)} |" + (f"  <!-- {grouping} -->" if "estimated" in grouping else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
