"""Why the labels matter, measured offline on tiny BLIPs: the start token and the padding mask.

    python benchmarks/label_ablation.py --workdir /tmp/ablation            # about 6 minutes on 2 CPU cores

Part 1, start token. A tiny BLIP is first trained from scratch to say "a red circle" (the "pretrained" base, with
correct labels). It is then LoRA-fine-tuned to a new caption style, "a picture of a red circle", two ways that
differ only in the first input token: `[DEC]` (what `generate()` starts from; caption-train) and the tokenizer's
`[CLS]` (the widely copied recipe). Reported: exact-match accuracy of greedy captions in the new style on
held-out images, and the teacher-forced loss of the generation-time input (starting from [DEC]).

Part 2, padding. One forward+backward of a BLIP with BLIP-base's 512 text positions, on a batch of real-length
captions, padded per batch (caption-train) vs to max_length (the copied recipe), in the same process; plus the
share of label positions that are padding, i.e. trained on when pads are not masked.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from caption_train.config import resolve
from caption_train.demo import MODEL_SHAPE, demo_train_config
from caption_train.inference import caption_paths, load_for_inference
from caption_train.models.blip import BlipFamily
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset, shape_caption_accuracy
from caption_train.train import train

CORRECT_COLLATE = BlipFamily.collate
STYLE = "a picture of {}"


def cls_start_collate(self, processor, images, captions, *, max_length):
    """The copied recipe's start token: labels from the processor's input_ids, which start with [CLS]."""
    batch = CORRECT_COLLATE(self, processor, images, captions, max_length=max_length)
    batch["input_ids"][:, 0] = processor.tokenizer.cls_token_id
    batch["labels"][:, 0] = processor.tokenizer.cls_token_id
    return batch


def restyle(folder: Path) -> None:
    """Rewrite a shapes dataset's captions in the new style (only the benchmark's own generated files)."""
    for txt in folder.rglob("*.txt"):
        txt.write_text(STYLE.format(txt.read_text().strip().removeprefix("a ")) + "\n")


@torch.no_grad()
def generation_time_loss(final: Path, pairs: list[tuple[Path, str]]) -> float:
    """Teacher-forced loss with the input generate() uses ([DEC] first), whatever the model was trained with."""
    from caption_train.data.images import load_rgb

    model, processor, family = load_for_inference(final)
    batch = CORRECT_COLLATE(family, processor, [load_rgb(p) for p, _ in pairs], [c for _, c in pairs], max_length=32)
    return float(model(**batch).loss)


def pretrain(workdir: Path, images: int, epochs: int, build=None) -> Path:
    """The "pretrained" base: a tiny model trained from scratch on "a <color> <shape>" (vocabulary of both styles),
    saved as <workdir>/base-model. `build(out_dir, texts) -> model dir` makes the random-weight model (default: the
    demo's tiny BLIP; mislabel_recall.py passes a chat VLM's builder)."""
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES] + [STYLE.format(f"{c} {s}") for c in COLORS for s in SHAPES]
    if build is None:
        model_dir = build_tiny_blip(workdir / "tiny-blip", texts, seed=0, **MODEL_SHAPE)
    else:
        model_dir = build(workdir / "tiny-model", texts)
    make_shapes_dataset(workdir / "pretrain", images, seed=0, size=MODEL_SHAPE["image_size"])
    final = train(demo_train_config(model_dir, workdir / "pretrain", workdir / "runs-pretrain", epochs, seed=0))
    base_model = workdir / "base-model"
    model, processor, _ = load_for_inference(final)
    model.save_pretrained(base_model)
    processor.save_pretrained(base_model)
    return base_model


def start_token_experiment(workdir: Path, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    # --base_model: reuse a base pretrained by an earlier run of this script
    base_model = Path(args.base_model) if args.base_model else pretrain(workdir, args.images, args.epochs)

    make_shapes_dataset(workdir / "restyle", args.restyle_images, seed=1, size=MODEL_SHAPE["image_size"])
    restyle(workdir / "restyle")
    heldout = make_shapes_dataset(workdir / "heldout", 96, seed=2, size=MODEL_SHAPE["image_size"], subfolders=0)
    restyle(workdir / "heldout")
    pairs = [(p, STYLE.format(c.removeprefix("a "))) for p, c in heldout]
    paths, truths = [p for p, _ in pairs], [c for _, c in pairs]
    model, processor, family = load_for_inference(base_model)
    print(f"\nbase model in the new style before fine-tuning: {shape_caption_accuracy(caption_paths(model, processor, family, paths), truths):.1%}")

    results = []
    for name, collate in (("[DEC] start (caption-train)", CORRECT_COLLATE), ("[CLS] start (copied recipe)", cls_start_collate)):
        BlipFamily.collate = collate
        try:
            cfg = resolve({}, {"dataset_dir": str(workdir / "restyle"), "model_name_or_path": str(base_model),
                               "output_dir": str(workdir / "runs-restyle"), "training_name": "restyle", "peft_module": args.restyle_peft,
                               "lr": args.restyle_lr, "lr_scheduler": "OneCycleLR", "epochs": args.restyle_epochs, "batch_size": 32,
                               "save_every_n_epochs": 0, "num_workers": 0, "log_with": "none", "num_sample_captions": 0, "seed": 0})
            final = train(cfg)
        finally:
            BlipFamily.collate = CORRECT_COLLATE
        model, processor, family = load_for_inference(final)
        predictions = caption_paths(model, processor, family, paths)
        results.append((name, shape_caption_accuracy(predictions, truths), generation_time_loss(final, pairs[:48]), predictions[:3]))
    return results


def padding_experiment(workdir: Path, repeats: int = 10) -> tuple[float, float, float]:
    """(seconds per step padded per batch, seconds per step padded to max_length, share of pad labels)."""
    from caption_train.data.images import load_rgb

    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    model_dir = build_tiny_blip(workdir / "blip-512", texts, seed=0, image_size=64, patch_size=16, hidden_size=128, num_layers=3, num_heads=4, max_position_embeddings=512)
    family = BlipFamily()
    model, processor = family.load(str(model_dir), {})
    pairs = make_shapes_dataset(workdir / "pad-batch", 16, seed=3, size=64, subfolders=0)
    images = [load_rgb(p) for p, _ in pairs]
    captions = [f"{c}, centered, plain light background, simple flat drawing" for _, c in pairs]  # tag-style length
    dynamic = family.collate(processor, images, captions, max_length=512)
    encoded = processor(images=images, text=captions, padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    padded = {"pixel_values": encoded["pixel_values"], "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": encoded["input_ids"]}
    pad_share = float((encoded["attention_mask"] == 0).float().mean())

    def step_time(batch) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch).loss.backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    model.train()
    return step_time(dynamic), step_time(padded), pad_share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/caption-train-ablation")
    parser.add_argument("--images", type=int, default=800, help="images to pretrain the tiny base model on")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--restyle_images", type=int, default=240)
    parser.add_argument("--restyle_epochs", type=int, default=15)
    parser.add_argument("--restyle_peft", default="none", help="LoRA, IA3 or none for the restyle fine-tune")
    parser.add_argument("--restyle_lr", type=float, default=3e-4)
    parser.add_argument("--base_model", help="skip pretraining: a tiny BLIP saved by an earlier run (<workdir>/base-model)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; pass a new --workdir")

    results = start_token_experiment(workdir, args)
    dynamic, padded, pad_share = padding_experiment(workdir)

    print(f"\nstart token: {args.restyle_peft} fine-tune (lr {args.restyle_lr}) of a tiny pretrained BLIP to '{STYLE.format('<color> <shape>')}', "
          f"{args.restyle_images} images x {args.restyle_epochs} epochs, 96 held-out images")
    print(f"{'variant':<30}{'accuracy':>10}{'loss from [DEC]':>17}  examples")
    for name, accuracy, loss, examples in results:
        print(f"{name:<30}{accuracy:>10.1%}{loss:>17.4f}  {examples}")
    print(f"\npadding (512 text positions, batch 16 of tag-style captions, same process): "
          f"{pad_share:.1%} of label positions are padding when padded to max_length;")
    print(f"forward+backward {dynamic * 1000:.0f} ms padded per batch vs {padded * 1000:.0f} ms padded to 512 "
          f"({padded / dynamic:.1f}x slower)")


if __name__ == "__main__":
    main()
