"""The `caption-train` command: subcommand name -> function, each taking its own argv.

    caption-train train --dataset_dir data --epochs 5      (same as: python train2.py --dataset_dir data ...)
    caption-train demo                                       (offline demo: tiny BLIP + generated shapes dataset)

`train` is the one command that wires two parts together: the loop (caption_train.train) and, with
--interactive, the page's hooks (caption_train.iterative), which know each other only through caption_train.hooks.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import TYPE_CHECKING, Callable

from caption_train.errors import UserError

if TYPE_CHECKING:
    from caption_train.config import TrainConfig
    from caption_train.hooks import TrainingHooks


def train_main(argv: list[str] | None = None) -> int:
    from caption_train.config import load_train_config
    from caption_train.train import train

    cfg = load_train_config(argv)
    train(cfg, hooks=make_hooks(cfg))
    return 0


def make_hooks(cfg: "TrainConfig") -> "TrainingHooks":
    """The training hooks a TrainConfig asks for: the interactive page's with --interactive (they bind the port
    now, so a busy port fails before anything is written), else none. Here, not in the loop: train.py knows the
    hook protocol (caption_train.hooks), never the page."""
    if cfg.interactive is None:
        from caption_train.hooks import TrainingHooks

        return TrainingHooks()
    from caption_train.iterative import InteractiveHooks, parse_interactive

    return InteractiveHooks(*parse_interactive(cfg.interactive))


def module_main(module: str) -> Callable[[list[str] | None], int]:
    """A subcommand whose module has `main(argv) -> int`, imported only when run (keeps `--help` fast)."""

    def run(argv: list[str] | None = None) -> int:
        return importlib.import_module(module).main(argv)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str] | None], int], str]] = {
    "train": (train_main, "fine-tune a captioning model on a folder of images with .txt captions"),
    "demo": (module_main("caption_train.demo"), "offline demo: build a tiny BLIP and a shapes dataset, train, show captions before/after"),
    "review": (module_main("caption_train.iterative.review"), "browse and fix a dataset's captions in the interactive page, with a model's captions beside them"),
    "caption": (module_main("caption_train.captioning"), "caption a folder of images with a trained model: writes <image>.txt beside each"),
    "evaluate": (module_main("caption_train.evaluate"), "caption a folder of captioned images and score against the .txt files (table, report.json, report.html)"),
    "merge": (module_main("caption_train.merge"), "merge an adapter into a standalone model, optionally WiSE-FT interpolated (--alpha, --alpha_sweep)"),
    "suspects": (module_main("caption_train.suspects"), "rank a dataset's captions by their loss under a trained model, highest first: the captions to check first"),
    "lint": (module_main("caption_train.lint"), "check a dataset before training: unreadable images, missing/empty captions, duplicates, what training truncates, tags, diffusion checks"),
}


def usage() -> str:
    lines = ["usage: caption-train COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `caption-train COMMAND --help` for a command's options."]
    return "\n".join(lines)


def run_command(function: Callable[[list[str] | None], int], argv: list[str]) -> int:
    """Run a subcommand; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    # Quiet, deterministic tokenizers in DataLoader workers (forked after the tokenizer is used).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft probes a deprecated transformers property on every wrap; the warning is noise for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    try:
        return function(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`caption-train train --help | head`): stop quietly, as other command-line tools do.
        # stdout now points at /dev/null, so Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
