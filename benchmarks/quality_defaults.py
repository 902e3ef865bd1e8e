"""The defaults, measured offline: LoRA targets (text side only vs text + vision tower) and precision (bf16 vs fp32).

    python benchmarks/quality_defaults.py --workdir /tmp/defaults        # about 6 minutes on 2 CPU cores

A tiny BLIP is first trained from scratch to say "a red circle" (the "pretrained" base), then LoRA-fine-tuned to a
new caption style ("a picture of a red circle", as in label_ablation.py) in each variant, same seed, data, LR and
epochs. Reported per variant: held-out exact-match accuracy in the new style, the last training loss, and the
training wall time (the text-only variants can cache the frozen vision tower's features).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from label_ablation import STYLE, pretrain, restyle

from caption_train.config import resolve
from caption_train.demo import MODEL_SHAPE
from caption_train.inference import caption_paths, load_for_inference
from caption_train.tiny import make_shapes_dataset, shape_caption_accuracy
from caption_train.tracking import read_metrics
from caption_train.train import train

TEXT, TEXT_AND_VISION = ["query", "key", "value"], ["query", "key", "value", "qkv", "projection"]
VARIANTS = {  # name: (LoRA target modules, mixed_precision)
    "text only, bf16 (default)": (TEXT, "bf16"),
    "text + vision, bf16 (old targets)": (TEXT_AND_VISION, "bf16"),
    "text only, fp32": (TEXT, "no"),
    "text + vision, fp32": (TEXT_AND_VISION, "no"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/caption-train-defaults")
    parser.add_argument("--images", type=int, default=800, help="images to pretrain the tiny base model on")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--restyle_images", type=int, default=240)
    parser.add_argument("--restyle_epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--base_model", help="skip pretraining: a tiny BLIP saved by an earlier run (<workdir>/base-model)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; pass a new --workdir")
    base_model = Path(args.base_model) if args.base_model else pretrain(workdir, args.images, args.epochs)

    make_shapes_dataset(workdir / "restyle", args.restyle_images, seed=1, size=MODEL_SHAPE["image_size"])
    restyle(workdir / "restyle")
    heldout = make_shapes_dataset(workdir / "heldout", 96, seed=2, size=MODEL_SHAPE["image_size"], subfolders=0)
    paths, truths = [p for p, _ in heldout], [STYLE.format(c.removeprefix("a ")) for _, c in heldout]

    rows = []
    for name, (targets, precision) in VARIANTS.items():
        cfg = resolve({}, {"mixed_precision": precision, "dataset_dir": str(workdir / "restyle"), "model_name_or_path": str(base_model),
                           "output_dir": str(workdir / "runs-restyle"), "training_name": "restyle", "peft_module": "LoRA",
                           "peft_args": {"target_modules": targets}, "lr": args.lr, "lr_scheduler": "OneCycleLR",
                           "epochs": args.restyle_epochs, "batch_size": 32, "save_every_n_epochs": 0, "num_workers": 0,
                           "log_with": "none", "num_sample_captions": 0, "seed": 0})
        start = time.perf_counter()
        final = train(cfg)
        seconds = time.perf_counter() - start
        losses = [r["train/loss"] for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r]
        model, processor, family = load_for_inference(final)
        accuracy = shape_caption_accuracy(caption_paths(model, processor, family, paths), truths)
        rows.append((name, accuracy, losses[-1], seconds))

    print(f"\nLoRA restyle of a tiny pretrained BLIP to '{STYLE.format('<color> <shape>')}': {args.restyle_images} images x "
          f"{args.restyle_epochs} epochs, lr {args.lr}, 96 held-out images, same seed")
    print(f"{'LoRA targets, precision':<44}{'accuracy':>10}{'last loss':>11}{'train s':>9}")
    for name, accuracy, loss, seconds in rows:
        print(f"{name:<44}{accuracy:>10.1%}{loss:>11.4f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
