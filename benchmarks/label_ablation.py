"""Why the labels matter: train the same tiny BLIP four ways and compare held-out caption accuracy.

    python benchmarks/label_ablation.py --images 800 --epochs 30 --workdir /tmp/ablation

Variants (all else equal: data, seed, optimizer, schedule, steps):
  correct        input_ids[:, 0] = [DEC] (what generate() starts from), pads masked with -100, dynamic padding
  naive_start    keeps the tokenizer's [CLS] as the first token (the widely copied recipe), pads masked
  naive_padding  [DEC] start, but pads every caption to the model's max length and trains on the pads
  naive_both     the widely copied recipe: [CLS] start, padded to max length, labels = input_ids
Prints one table; numbers are comparable only within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from caption_train.demo import demo_train_config, prepare
from caption_train.inference import caption_paths, load_for_inference
from caption_train.models.blip import BlipFamily
from caption_train.tiny import shape_caption_accuracy
from caption_train.tracking import read_metrics
from caption_train.train import train

CORRECT_COLLATE = BlipFamily.collate


def naive_collate(*, keep_cls: bool, pad_to_max: bool):
    def collate(self, processor, images, captions, *, max_length):
        encoded = processor(
            images=list(images), text=list(captions), return_tensors="pt", truncation=True, max_length=max_length,
            padding="max_length" if pad_to_max else "longest",
        )
        input_ids = encoded["input_ids"].clone()
        if not keep_cls:
            input_ids[:, 0] = processor.tokenizer.bos_token_id
        labels = input_ids.clone() if pad_to_max else input_ids.masked_fill(encoded["attention_mask"] == 0, -100)
        return {"pixel_values": encoded["pixel_values"], "input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}

    return collate


VARIANTS = {
    "correct": CORRECT_COLLATE,
    "naive_start": naive_collate(keep_cls=True, pad_to_max=False),
    "naive_padding": naive_collate(keep_cls=False, pad_to_max=True),
    "naive_both": naive_collate(keep_cls=True, pad_to_max=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/caption-train-ablation")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    model_dir, data_dir, pairs = prepare(workdir, args.images, 96, seed=0)
    paths, truths = [p for p, _ in pairs], [c for _, c in pairs]
    results = []
    for name in args.variants.split(","):
        BlipFamily.collate = VARIANTS[name]
        start = time.perf_counter()
        final = train(demo_train_config(model_dir, data_dir, workdir / f"runs-{name}", args.epochs, seed=0))
        seconds = time.perf_counter() - start
        BlipFamily.collate = CORRECT_COLLATE
        model, processor, family = load_for_inference(final)
        predictions = caption_paths(model, processor, family, paths)
        val = [r["val/loss"] for r in read_metrics(final.parent / "metrics.jsonl") if "val/loss" in r][-1]
        results.append((name, shape_caption_accuracy(predictions, truths), val, seconds, predictions[:2]))
    print(f"\nheld-out exact-match accuracy, {len(pairs)} images, {args.images} training images x {args.epochs} epochs")
    print(f"{'variant':<15}{'accuracy':>10}{'val loss*':>11}{'train s':>9}  examples")
    for name, accuracy, val, seconds, examples in results:
        print(f"{name:<15}{accuracy:>10.1%}{val:>11.4f}{seconds:>9.1f}  {examples}")
    print("* validation loss under each variant's own labels (pads included for naive_padding), so not comparable across rows")


if __name__ == "__main__":
    main()
