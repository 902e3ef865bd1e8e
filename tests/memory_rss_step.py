"""Subprocess helper for tests/test_memory.py: the peak RSS growth of one real training step, an independent measure
of what the memory plan estimates on a CPU.

    MALLOC_MMAP_THRESHOLD_=131072 python tests/memory_rss_step.py MODEL DATASET BATCH_SIZE [bf16]   # prints: step_rss_bytes N

Loads the model as training does (LoRA, frozen vision tower), takes one warm-up step on two rows (thread pools and
lazy initialisation), resets the kernel's peak-RSS mark (/proc/self/clear_refs 5), runs forward and backward on
BATCH_SIZE rows of the dataset's first images (under bf16 autocast with `bf16`), and prints VmHWM less the RSS before the step. A fixed mmap threshold
makes glibc hand every large buffer back on free, so the peak follows the bytes alive at once.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

from caption_train.adapters import wrap_model
from caption_train.data.images import load_rgb
from caption_train.data.scan import scan_dataset
from caption_train.models import resolve_family
from caption_train.train import collate_batch


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(model_dir: str, dataset: str, batch_size: int, bf16: bool) -> None:
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    family, _ = resolve_family(model_dir)
    model, processor = family.load(model_dir, {})
    model = wrap_model(model, family, "LoRA", {})
    family.freeze_vision_tower(model)
    model.train()
    collate = functools.partial(collate_batch, family=family, processor=processor, max_length=128, prompt=family.training_prompt(None))
    items = [(load_rgb(s.image_path), s.caption, str(s.image_path)) for s in scan_dataset(dataset).samples[:batch_size]]

    def batch_of(rows: list) -> dict:
        batch = collate(rows)
        batch.pop("image_paths"), batch.pop("pixel_rows")
        return batch

    with autocast():
        loss = model(**batch_of(items[:2])).loss
    loss.backward()  # warm-up
    for p in model.parameters():
        p.grad = None
    batch = batch_of(items)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    print(f"step_rss_bytes {status('VmHWM') - before}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["bf16"])
