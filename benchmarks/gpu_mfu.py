"""Achieved TFLOP/s and MFU of caption-train's training step on a GPU (prints a note and exits on a machine without one).

    python benchmarks/gpu_mfu.py --model Salesforce/blip-image-captioning-base --steps 20
    python benchmarks/gpu_mfu.py            # BLIP-base architecture with random weights, nothing downloaded

One training step = what the trainer runs per batch: with the feature cache warm, the text decoder's forward and
backward on cached image features; cold, the vision tower's forward as well. FLOPs are counted by torch's
FlopCounterMode on the real step; the peak is measured with a large bf16 matmul on the same GPU (the dense peak the
hardware reaches in practice, lower than the datasheet's), so MFU = achieved / measured peak.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def measured_peak(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model id or folder (default: BLIP-base architecture, random weights)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="torch.compile the text decoder, as --compile does")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (see benchmarks/train_speed.py for the CPU benchmark)")
        return

    from torch.utils.flop_counter import FlopCounterMode

    from caption_train.adapters import wrap_model
    from caption_train.models import resolve_family
    from caption_train.precision import enable_fast_gpu_matmul
    from caption_train.tiny import make_shapes_dataset
    from train_speed import LORA, build_blip_base

    enable_fast_gpu_matmul()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-mfu-"))
    model_id = args.model or str(build_blip_base(workdir / "blip-base-arch"))
    family, _ = resolve_family(model_id)
    model, processor = family.load(model_id, {})
    model = wrap_model(model, family, "LoRA", LORA).cuda()
    family.freeze_vision_tower(model)
    if args.compile:
        family.text_model(model).compile()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    pairs = make_shapes_dataset(workdir / "data", args.batch_size, seed=0, size=384, subfolders=0)
    from caption_train.data.images import load_rgb

    batch = family.collate(processor, [load_rgb(p) for p, _ in pairs], [f"{c}, centered, plain background" for _, c in pairs], max_length=64)
    batch = {k: v.cuda() for k, v in batch.items()}
    peak = measured_peak(torch.bfloat16)

    def vision() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return family.image_features(model, batch["pixel_values"])

    features = vision()
    text_inputs = {k: v for k, v in batch.items() if k != "pixel_values"} | family.feature_inputs(features)

    def text_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = family.caption_loss(model, text_inputs).loss  # the trainer's loss: logits at the caption tokens only
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        vision()
    vision_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        text_step()
    text_flops = counter.get_total_flops()

    for name, work, flops in (("vision forward (cold cache)", vision, vision_flops), ("text step (warm cache)", text_step, text_flops)):
        for _ in range(3):
            work()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            work()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        achieved = flops / seconds
        print(f"{name}: {seconds * 1000:.1f} ms per batch of {args.batch_size}, {achieved / 1e12:.1f} TFLOP/s, "
              f"MFU {achieved / peak:.0%} of the measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
