"""Do the mislabelled captions come first? Recall@k of the review queue on a colored-shapes set with swapped words.

    python benchmarks/mislabel_recall.py --workdir /tmp/recall --families blip      # ~5 minutes on a quiet 2-core CPU
    python benchmarks/mislabel_recall.py --workdir /tmp/recall2                     # BLIP and Qwen2-VL (much longer: its base)
    python benchmarks/mislabel_recall.py --workdir /tmp/recall-q --quick            # smoke run: small, learns little
    python benchmarks/mislabel_recall.py --workdir /tmp/recall2 --families blip --base_model blip=/tmp/recall/blip/base-model

The check of issue 16's acceptance, offline, per family (--families): a tiny model is first trained from scratch
to say "a red circle" (the "pretrained" base: label_ablation.pretrain, full fine-tune). A fresh colored-shapes
training set is written in a new caption style ("a picture of a red circle"), and in 5% of its captions
(--swap_fraction) one key word is swapped for another of the same kind: a colour for another colour, a shape for
another shape (k = how many). That set is trained with the train command a user types (`caption-train train`:
its defaults plus LoRA, with --lr, --epochs and --batch_size given here), which writes <run>/sample_losses.jsonl.

Reported per family:
  - recall@k read at each epoch: the share of the swapped images among the first k of ranking.suspect_order, the
    order the page and `review` show by default, given the losses up to that epoch (suspect_order ranks by the
    latest epoch it is given), and the rank of the last swapped image found (k = all found in the first k);
  - the page: the first k cards of `review --losses RUN`'s default view, fetched from the real page server;
  - held-out exact-match accuracy of the trained model's greedy captions in the new style (96 unseen images; the
    issue asks for >= 95% for BLIP, so that the model has learned the task it is asked to judge captions by);
  - seconds spent in train.record_epoch_losses (writing the epoch's lines) against the whole training run, timed
    in this process: indicative only on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO), str(REPO / "tests")):  # label_ablation, vlm_memory, caption_train, tiny_families_chat
    if path not in sys.path:
        sys.path.insert(0, path)

from label_ablation import STYLE, pretrain, restyle  # noqa: E402
from vlm_memory import cpu_description  # noqa: E402

from caption_train.demo import MODEL_SHAPE  # noqa: E402
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset  # noqa: E402

HELDOUT = 96


def build_blip(out_dir: Path, texts: list[str], patch_size: int = MODEL_SHAPE["patch_size"]) -> Path:
    """The demo's tiny BLIP; patch_size 8 instead of its 16 gives the vision tower 8 x 8 patches of a 64 px image
    instead of 4 x 4, enough to tell a circle's edge from a square's corner."""
    return build_tiny_blip(out_dir, texts, seed=0, **(MODEL_SHAPE | {"patch_size": patch_size}))


def build_qwen2_vl(out_dir: Path, texts: list[str]) -> Path:
    from tiny_families_chat import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(out_dir, texts, hidden_size=128, num_layers=3, max_pixels=56 * 56)


def build_smolvlm(out_dir: Path, texts: list[str]) -> Path:
    from tiny_families_chat import build_tiny_idefics3

    return build_tiny_idefics3(out_dir, texts, hidden_size=128, num_layers=3)


FAMILIES: dict[str, Callable[[Path, list[str]], Path]] = {"blip": build_blip, "qwen2-vl": build_qwen2_vl, "idefics3": build_smolvlm}


# ---------------------------------------------------------------------------------------------
# the mislabelled copy


def swap_captions(folder: Path, fraction: float, seed: int) -> dict[str, tuple[str, str]]:
    """Swap one key word in `fraction` of the folder's captions for another word of the same kind (colour or shape,
    alternately); returns {image path relative to the folder: (caption before, caption after)}."""
    rng = random.Random(seed)
    images = sorted(p for p in folder.rglob("*.png"))
    chosen = rng.sample(images, max(1, round(fraction * len(images))))
    swapped = {}
    for i, image in enumerate(sorted(chosen)):
        txt = image.with_suffix(".txt")
        before = txt.read_text().strip()
        words = before.split()
        kind = tuple(COLORS) if i % 2 == 0 else SHAPES
        at = next(j for j, word in enumerate(words) if word in kind)
        words[at] = rng.choice([word for word in kind if word != words[at]])
        after = " ".join(words)
        txt.write_text(after + "\n")
        swapped[image.relative_to(folder).as_posix()] = (before, after)
    return swapped


# ---------------------------------------------------------------------------------------------
# training through the command a user types


@contextmanager
def timed_recording() -> Iterator[list[float]]:
    """Seconds of each train.record_epoch_losses call (the function is wrapped, not replaced: it still runs)."""
    from caption_train import train as train_module

    original, seconds = train_module.record_epoch_losses, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    train_module.record_epoch_losses = timed
    try:
        yield seconds
    finally:
        train_module.record_epoch_losses = original


def train_lora(data: Path, base_model: Path, runs: Path, args: argparse.Namespace) -> tuple[Path, float, float]:
    """(run folder, training seconds, seconds in record_epoch_losses): `caption-train train` with its defaults
    (LoRA, AdamW, cosine schedule, auto precision) and this benchmark's lr, epochs and batch size."""
    from caption_train.cli import main

    argv = ["train", "--dataset_dir", str(data), "--model_name_or_path", str(base_model), "--output_dir", str(runs),
            "--training_name", "recall", "--peft_module", "LoRA", "--lr", str(args.lr), "--epochs", str(args.epochs),
            "--batch_size", str(args.batch_size), "--save_every_n_epochs", "0", "--num_workers", "0", "--log_with", "none",
            "--num_sample_captions", "0", "--seed", "0"]
    print("caption-train " + " ".join(argv), flush=True)
    with timed_recording() as recording:
        start = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"train exited with {code}")
    (run_dir,) = runs.glob("recall-*")
    return run_dir, seconds, sum(recording)


# ---------------------------------------------------------------------------------------------
# reading the ranking


def recall_by_epoch(run_dir: Path, data: Path, swapped: set[str]) -> tuple[list[tuple[int, float, int]], list[str]]:
    """([(epoch, recall@k, rank of the last swapped image)], the last epoch's first k) with the queue as
    suspect_order gives it from the losses up to each epoch."""
    from caption_train.iterative.ranking import suspect_order
    from caption_train.sample_losses import LOSSES_FILE, read_sample_losses

    history = read_sample_losses(run_dir / LOSSES_FILE)
    captions = {image: (data / image).with_suffix(".txt").read_text().strip() for image in history}
    epochs = sorted({row.epoch for rows in history.values() for row in rows})
    k, table = len(swapped), []
    for epoch in epochs:
        upto = {image: [row for row in rows if row.epoch <= epoch] for image, rows in history.items()}
        order = suspect_order(upto, captions)
        ranks = [order.index(image) + 1 for image in swapped]
        table.append((epoch, len(swapped & set(order[:k])) / k, max(ranks)))
    return table, order[:k]


def page_top(data: Path, run_dir: Path, state_dir: Path, k: int) -> list[str]:
    """The first k cards of the page's default view (`review DATASET --losses RUN`), from the real server."""
    from caption_train.iterative.review import Review

    review = Review(data, losses=run_dir, state_dir=state_dir)
    try:
        url = review.start()
        base, _, token = url.partition("?token=")
        with urllib.request.urlopen(f"{base.rstrip('/')}/api/images?view=suspects&limit={k}&token={token}", timeout=60) as reply:
            return [info["path"] for info in json.loads(reply.read())["images"]]
    finally:
        review.close()


def heldout_accuracy(final: Path, pairs: list[tuple[Path, str]]) -> tuple[float, list[tuple[str, str]]]:
    """(exact-match accuracy, the first wrong (truth, prediction) pairs) of the model's greedy captions."""
    from caption_train.inference import caption_paths, load_for_inference
    from caption_train.tiny import shape_caption_accuracy

    model, processor, family = load_for_inference(final)
    predictions = caption_paths(model, processor, family, [p for p, _ in pairs])
    truths = [c for _, c in pairs]
    wrong = [(t, p) for t, p in zip(truths, predictions) if p.strip().lower() != t][:4]
    return shape_caption_accuracy(predictions, truths), wrong


# ---------------------------------------------------------------------------------------------


def run_family(name: str, workdir: Path, args: argparse.Namespace, base_model: Path | None) -> dict:
    print(f"\n=== {name} ===", flush=True)
    if base_model is None:
        started = time.perf_counter()
        base_model = pretrain(workdir, args.images, args.pretrain_epochs, build=FAMILIES[name])
        print(f"{name}: pretrained base in {time.perf_counter() - started:.0f} s: {base_model}", flush=True)
    data = workdir / "mislabelled"
    make_shapes_dataset(data, args.train_images, seed=1, size=MODEL_SHAPE["image_size"])
    restyle(data)
    swapped = swap_captions(data, args.swap_fraction, seed=args.seed)
    heldout = make_shapes_dataset(workdir / "heldout", HELDOUT, seed=2, size=MODEL_SHAPE["image_size"], subfolders=0)
    pairs = [(p, STYLE.format(c.removeprefix("a "))) for p, c in heldout]
    base_accuracy, _ = heldout_accuracy(base_model, heldout)  # in the base's own style: what its vision can tell apart

    run_dir, seconds, recording = train_lora(data, base_model, workdir / "runs", args)
    table, ranked_top = recall_by_epoch(run_dir, data, set(swapped))
    page = page_top(data, run_dir, workdir / "review-state", len(swapped))
    accuracy, wrong = heldout_accuracy(run_dir / "final", pairs)
    result = {"family": name, "base_model": str(base_model), "run": str(run_dir), "k": len(swapped), "images": args.train_images, "swapped": swapped,
              "recall": table, "page_recall": len(set(page) & set(swapped)) / len(swapped), "page_top": page,
              "page_is_suspect_order": page == ranked_top, "base_accuracy": base_accuracy, "heldout_accuracy": accuracy, "wrong": wrong, "train_s": seconds, "record_s": recording}
    (workdir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def print_results(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmislabelled colored shapes, '{STYLE.format('<color> <shape>')}': {args.train_images} training images, "
          f"{args.swap_fraction:.0%} with a colour or shape swapped; `caption-train train` defaults + LoRA, lr {args.lr}, "
          f"batch {args.batch_size}, {args.epochs} epochs, seed 0; base: tiny model trained from scratch on 'a <color> <shape>' "
          f"({args.images} images x {args.pretrain_epochs} epochs; BLIP patch size {args.blip_patch_size}); {cpu_description()}")
    for result in results:
        k = result["k"]
        print(f"\n{result['family']}: k = {k}; held-out accuracy {result['heldout_accuracy']:.1%} of {HELDOUT} "
              f"(the base, in its own style: {result['base_accuracy']:.1%})"
              + (f" (wrong, e.g. {result['wrong']})" if result["wrong"] else ""))
        print(f"{'epoch read':>10}{'recall@k':>10}{'last swapped at rank':>22}")
        for epoch, recall, last in result["recall"]:
            print(f"{epoch:>10}{recall:>10.2f}{last:>22}")
        print(f"page (review --losses RUN), first {k} cards: recall {result['page_recall']:.2f}, "
              f"{'the same list as' if result['page_is_suspect_order'] else 'NOT the same list as'} suspect_order's; "
              f"record_epoch_losses {result['record_s']:.2f} s of {result['train_s']:.0f} s training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/caption-train-recall")
    parser.add_argument("--families", nargs="+", default=["blip", "qwen2-vl"], choices=sorted(FAMILIES))
    parser.add_argument("--images", type=int, default=1200, help="images to pretrain each tiny base model on (800: a base that confuses more shapes)")
    parser.add_argument("--pretrain_epochs", type=int, default=30)
    parser.add_argument("--train_images", type=int, default=300, help="images of the mislabelled training set")
    parser.add_argument("--swap_fraction", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="LoRA's lr (the train default, 1e-4, is for real models; "
                        "at 1e-3 the tiny BLIP had not learned the new style after 5 epochs)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which captions are swapped, and for what")
    parser.add_argument("--base_model", nargs="*", default=[], metavar="FAMILY=PATH",
                        help="skip pretraining: a base saved by an earlier run (<workdir>/<family>/base-model)")
    parser.add_argument("--blip_patch_size", type=int, default=MODEL_SHAPE["patch_size"],
                        help="the tiny BLIP's patch size (8: 64 patches per 64 px image instead of 16, a base that sees shapes better)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 pretraining images x 4 epochs, 120 training images x 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.images, args.pretrain_epochs, args.train_images, args.epochs = 200, 4, 120, 2
    bases = dict(item.split("=", 1) for item in args.base_model)
    FAMILIES["blip"] = functools.partial(build_blip, patch_size=args.blip_patch_size)
    workdir = Path(args.workdir)
    if workdir.exists():
        raise SystemExit(f"{workdir} exists; pass a new --workdir")
    results = [run_family(name, workdir / name, args, Path(bases[name]) if name in bases else None) for name in args.families]
    print_results(results, args)


if __name__ == "__main__":
    main()
