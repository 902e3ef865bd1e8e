"""Offline demo: build a tiny BLIP and a colored-shapes dataset, caption held-out images, train, caption again.

    caption-train demo                 # a few minutes on a CPU (see DURATION), nothing downloaded
    caption-train demo --resume auto   # continue a demo stopped with Ctrl-C, in the same --workdir
    caption-train demo --images 300 --epochs 5 --workdir /tmp/demo   # a quick check that it runs; learns little

The model starts from random weights, so "before" captions are gibberish; after training it should name
the color and shape of images it has never seen. The workdir records the settings its model and data were built
with (demo.json), so `--resume auto` reuses them and continues the training run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caption_train.config import resolve
from caption_train.errors import UserError
from caption_train.files import write_text_atomic
from caption_train.text import plural
from caption_train.inference import caption_paths, load_for_inference
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset, shape_caption_accuracy

# Measured on 2 CPU cores: this size learns the shapes task from scratch in a few minutes.
MODEL_SHAPE = dict(image_size=64, patch_size=16, hidden_size=128, num_layers=3, num_heads=4, max_position_embeddings=32)
# How long the default demo takes: one wording for --help and README. Runs on 2-core machines of this project took
# from about 2 minutes (quiet, AVX512-BF16) to over 8 (busy); the CPU and its load decide.
DURATION = "a few minutes: about 2-4 on a quiet 2-core CPU, longer on a slower or busy one"
# What the workdir was built with; a resumed demo must use the same model and data.
SETTINGS_FILE = "demo.json"
BUILT_WITH = ("images", "heldout", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="caption-train demo", description=__doc__.split("\n")[0],
        epilog=f"The default run takes {DURATION}; nothing is downloaded. Ctrl-C stops training with a checkpoint: "
               "run the same command plus --resume auto to continue it. A workdir that already holds a demo is refused "
               "without --resume (the demo never overwrites files).",
    )
    parser.add_argument("--workdir", default="demo", help="folder for the model, data and runs (default: ./demo; must not hold an earlier demo's data unless --resume)")
    parser.add_argument("--images", type=int, default=1200, help="training images to generate (default: 1200; at least 12)")
    parser.add_argument("--heldout", type=int, default=48, help="held-out images captioned before and after (default: 48)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model's random weights, the generated images and training (default: 0)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue the demo in --workdir: reuse its model and data and resume training from its newest checkpoint "
                             "(auto) or from a checkpoint folder; pass the --images, --heldout and --seed it was started with")
    args = parser.parse_args(argv)
    if args.images < 12 or args.heldout < 1 or args.epochs < 1:
        raise UserError("demo: need --images >= 12, --heldout >= 1 and --epochs >= 1")
    return args


def demo_folders(workdir: Path) -> tuple[Path, Path, Path]:
    """(model dir, training data dir, held-out dir) inside the workdir."""
    return workdir / "tiny-blip", workdir / "shapes", workdir / "heldout"


def check_workdir_is_folder(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"demo: --workdir {workdir} is a file; pass a folder")


def check_workdir(workdir: Path) -> None:
    """Refuse a workdir that is a file or already holds a demo's model or data: before anything is built."""
    check_workdir_is_folder(workdir)
    for folder in demo_folders(workdir):
        if folder.exists():
            raise UserError(f"demo: {folder} already exists; continue that demo with --resume auto, or pass a new --workdir "
                            "(the demo never overwrites files)")


def built_demo(workdir: Path, args: argparse.Namespace) -> bool:
    """--resume: True when the workdir holds a finished build with these settings, False when it holds nothing yet
    (the demo then starts afresh, as `train --resume auto` does without a checkpoint); refuses anything else."""
    check_workdir_is_folder(workdir)
    settings = workdir / SETTINGS_FILE
    if not settings.is_file():
        if any(folder.exists() for folder in demo_folders(workdir)):
            raise UserError(f"demo: {workdir} holds a demo whose model and data were never finished (stopped while building); "
                            "delete that folder, or pass a new --workdir")
        return False
    try:
        recorded = json.loads(settings.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"demo: {settings}: cannot read it ({err}); pass a new --workdir") from None
    wanted = {key: getattr(args, key) for key in BUILT_WITH}
    if not isinstance(recorded, dict) or any(recorded.get(key) != value for key, value in wanted.items()):
        shown = " ".join(f"--{key} {recorded.get(key)}" for key in BUILT_WITH) if isinstance(recorded, dict) else "other settings"
        raise UserError(f"demo: {workdir} was built with {shown}; resume with those, or pass a new --workdir")
    return True


def prepare(workdir: Path, images: int, heldout: int, seed: int) -> tuple[Path, Path, list[tuple[Path, str]]]:
    """(model dir, training data dir, held-out pairs); refuses to reuse a workdir that already has them. The
    settings file is written last: its presence means the build finished."""
    check_workdir(workdir)
    model_dir, data_dir, heldout_dir = demo_folders(workdir)
    texts = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    build_tiny_blip(model_dir, texts, seed=seed, **MODEL_SHAPE)
    make_shapes_dataset(data_dir, images, seed=seed, size=MODEL_SHAPE["image_size"])
    pairs = make_shapes_dataset(heldout_dir, heldout, seed=seed + 10_000, size=MODEL_SHAPE["image_size"], subfolders=0)
    write_text_atomic(workdir / SETTINGS_FILE, json.dumps({"images": images, "heldout": heldout, "seed": seed}) + "\n")
    return model_dir, data_dir, pairs


def heldout_pairs(workdir: Path) -> list[tuple[Path, str]]:
    """The held-out (image, caption) pairs of a built workdir, as prepare() returned them."""
    _, _, heldout_dir = demo_folders(workdir)
    return [(path, path.with_suffix(".txt").read_text(encoding="utf-8").strip()) for path in sorted(heldout_dir.glob("*.png"))]


def demo_train_config(model_dir: Path, data_dir: Path, runs_dir: Path, epochs: int, seed: int, resume: str | None = None):
    """The settings that work for a from-scratch tiny model: full fine-tune, AdamW, one-cycle LR."""
    # Absolute already: the model folder may not exist yet, and only existing local models are made absolute.
    return resolve({}, {
        "dataset_dir": str(data_dir.resolve()),
        "model_name_or_path": str(model_dir.resolve()),
        "output_dir": str(runs_dir),
        "training_name": "demo",
        "peft_module": "none",
        "optimizer": "AdamW",
        "lr": 6e-4,
        "lr_scheduler": "OneCycleLR",
        "epochs": epochs,
        "batch_size": 32,
        "validation_split": 0.05,
        "save_every_n_epochs": 0,
        "num_workers": 0,
        "log_with": "none",
        "seed": seed,
        "resume": resume,
    })


def show(title: str, pairs: list[tuple[Path, str]], predictions: list[str], limit: int = 8) -> float:
    accuracy = shape_caption_accuracy(predictions, [caption for _, caption in pairs])
    print(f"\n{title}: {accuracy:.0%} of {plural(len(pairs), 'held-out caption')} exactly right")
    for (path, truth), prediction in list(zip(pairs, predictions))[:limit]:
        mark = "ok " if prediction.strip().lower() == truth else "   "
        print(f"  {mark}{path.name}: truth {truth!r:<20} model {prediction!r}")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    # A used workdir is refused (or, with --resume, checked) at once, not after a model is built.
    if args.resume:
        built = built_demo(workdir, args)
    else:
        check_workdir(workdir)
        built = False
    model_dir, data_dir, _ = demo_folders(workdir)
    train_config = demo_train_config(model_dir, data_dir, workdir / "runs", args.epochs, args.seed, args.resume)  # validated up front too

    from caption_train.train import train

    if built:
        print(f"continuing the demo in {workdir}/ (its tiny BLIP and shapes images are reused)", flush=True)
        pairs = heldout_pairs(workdir)
    else:
        print(f"building a tiny BLIP and {args.images} + {args.heldout} shapes images in {workdir}/ ...", flush=True)
        model_dir, data_dir, pairs = prepare(workdir, args.images, args.heldout, args.seed)
    paths = [path for path, _ in pairs]

    model, processor, family = load_for_inference(model_dir)
    show("before training", pairs, caption_paths(model, processor, family, paths))

    final_dir = train(train_config)

    model, processor, family = load_for_inference(final_dir)
    accuracy = show("after training", pairs, caption_paths(model, processor, family, paths))
    print(f"\ntrained model: {final_dir}\nheld-out accuracy: {accuracy:.1%}")
    return 0
