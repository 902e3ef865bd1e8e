"""Typed training config: built-in defaults < TOML config file < flags given on the command line.

    cfg = load_train_config(["--dataset_dir", "data", "--config_file", "config.toml"])

Every field of `TrainConfig` is a flag (`--name`) and a top-level TOML key of the same name.
Dict fields (`optimizer_args`, `scheduler_args`, `peft_args`, `model_config`) are TOML tables, and on the
command line take a TOML inline table or JSON: `--scheduler_args '{max_lr = 1e-3}'`.
All problems are collected and reported at once, as one line, via `UserError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from caption_train.errors import UserError

OPTIMIZERS = ("AdamW", "Prodigy")
SCHEDULERS = ("CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR")
PEFT_MODULES = ("LoRA", "IA3", "none")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CACHE_MODES = ("auto", "off", "memory", "disk")
GROUPING_MODES = ("auto", "on", "off")
PACKING_MODES = ("auto", "on", "off")
TRACKERS = ("wandb", "none")
QUANTIZE_MODES = ("none", "4bit", "8bit")
AUTO_BOOL = ("auto", "true", "false")
AutoBool = typing.Union[bool, str]  # True, False or "auto" (a field type: TOML true/false or "auto")

# Keys accepted in a config file (or on the command line) as other names for a field.
ALIASES = {"train_dir": "dataset_dir", "learning_rate": "lr"}


def _field(default: Any, help: str | Callable[[], str], **meta: Any) -> Any:
    """A dataclass field carrying its help text (or a function making it) and argparse hints, so the CLI is built from
    one place."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _prompt_help() -> str:
    """--prompt's help, naming the families from the registry (imported only when the parser is built)."""
    from caption_train.models.base import prompt_family_names
    from caption_train.text import join_words

    taking, refusing = prompt_family_names()
    return (f"Instruction or task prompt, for the families that take one ({join_words(taking)}; default: the family's own). "
            f"The {join_words(refusing)} families train without one and refuse it.")


@dataclass
class TrainConfig:
    """Everything a training run needs. Saved, resolved, as `config.toml` in every checkpoint."""

    # ---- data
    dataset_dir: str | None = _field(None, "Folder of images with .txt captions beside them (searched recursively). Alias: train_dir.")
    validation_split: float = _field(0.0, "Fraction of the dataset held out for validation loss and sample captions (0 = none).")
    max_length: int = _field(128, "Captions longer than this many tokens are truncated (capped at the model's own limit).")
    shuffle_captions: bool = _field(False, "Shuffle the comma-separated parts of each caption, per sample per epoch.")
    frozen_parts: int = _field(0, "Keep the first N comma-separated caption parts in place when shuffling or dropping.")
    caption_dropout: float = _field(0.0, "Drop each non-frozen caption part with this probability (never the whole caption).")
    random_flip: float = _field(0.0, "Probability of flipping an image horizontally (off by default: flips break 'left'/'right' captions).")
    kohya_repeats: bool = _field(True, "Top-level folders named N_name (e.g. 30_mystyle/) repeat their images N times per epoch, as in kohya; false = every image once per epoch.")
    num_workers: int = _field(2, "DataLoader worker processes for image loading (0 = load in the training process).")
    group_by_length: str = _field("auto", "Batch rows of similar length together (less padding; the batches are still shuffled): auto (on when at least a twentieth of random batches would be padding; off when rows are packed), on or off.", choices=GROUPING_MODES)
    # ---- model
    model_name_or_path: str = _field("Salesforce/blip-image-captioning-base", "Hub id or local folder of the model to fine-tune.")
    model_config: dict = _field({}, "Overrides for the model config, e.g. {hidden_dropout_prob = 0.1} or {text_config = {...}, dtype = 'bfloat16'}.")
    prompt: str | None = _field(None, _prompt_help)
    label_smoothing: float = _field(0.0, "Label smoothing of the caption loss (original BLIP used 0.1).")
    full_logits: bool = _field(False, "Compute the output layer (vocabulary logits) at every position, as the models' own loss does, instead of at the caption's target tokens only: the same loss with more memory, for comparison and debugging.")
    peft_module: str = _field("LoRA", "Adapter to train: LoRA, IA3, or none (full fine-tune).", choices=PEFT_MODULES)
    peft_args: dict = _field({}, "Keyword arguments for the peft config, e.g. {r = 16, lora_alpha = 32, target_modules = ['query', 'value']}.")
    quantize: str = _field("none", "QLoRA: load the base model quantized with bitsandbytes (CUDA only; pip install bitsandbytes): none, 4bit (NF4, double quantization) or 8bit. Needs an adapter (peft_module LoRA or IA3).", choices=QUANTIZE_MODES)
    gradient_checkpointing: AutoBool = _field("auto", "Recompute activations in backward to save memory: auto (on only when the memory plan says the run will not fit without it), true or false. A bare --gradient_checkpointing means true.", choices=AUTO_BOOL)
    memory_plan: bool = _field(True, "Before the first step, estimate the run's peak memory (weights, adapter and optimizer state, activations measured on probe steps at the longest rows) and print it beside the device's free memory; false skips the probe (then gradient_checkpointing auto stays off).")
    memory_budget: str | None = _field(None, "Plan against at most this much memory instead of the device's free memory, e.g. 20GiB or 512MiB (a shared GPU, or leaving room for other work).")
    freeze_vision_tower: bool = _field(False, "Full fine-tune (peft_module none): keep the vision tower's weights fixed and train the text side only (lets image features be cached).")
    cache_image_features: str = _field("auto", "Compute a frozen vision tower once per image: auto (memory when it fits, else disk; off when the tower trains or images are flipped), off, memory or disk.", choices=CACHE_MODES)
    cache_dir: str | None = _field(None, "Folder of the on-disk image-feature cache (default: ~/.cache/caption-train/features; never inside the dataset).")
    packing: str = _field("auto", "Train on each batch's rows concatenated into one sequence without padding (positions restarting per row): auto (where the model can take it: chat VLMs such as Qwen2-VL, LLaVA, Idefics3/SmolVLM, and PaliGemma; the start-up line says why not elsewhere), on (an error where it cannot) or off.", choices=PACKING_MODES)
    compile: bool = _field(False, "torch.compile the text decoder (worth it on a GPU for long runs; the first steps are slow while it compiles).")
    # ---- optimization
    epochs: int = _field(5, "Number of passes over the training set.")
    batch_size: int = _field(8, "Images per batch per process.")
    gradient_accumulation_steps: int = _field(1, "Batches accumulated per optimizer step.")
    lr: float | None = _field(None, "Learning rate (default: 1.0 for Prodigy, 1e-4 for AdamW). Alias: --learning_rate.")
    optimizer: str = _field("AdamW", "Optimizer: AdamW or Prodigy.", choices=OPTIMIZERS)
    optimizer_args: dict = _field({}, "Keyword arguments for the optimizer, e.g. {weight_decay = 0.01}.")
    lr_scheduler: str = _field("CosineAnnealingLR", "LR schedule, stepped once per optimizer step.", choices=SCHEDULERS)
    scheduler_args: dict = _field({}, "Keyword arguments for the scheduler, overriding the computed ones, e.g. {eta_min = 1e-6}.")
    max_grad_norm: float = _field(1.0, "Clip the gradient norm to this value (0 = no clipping).")
    mixed_precision: str = _field("auto", "Autocast precision: auto (bf16 where the GPU/CPU runs it natively, else fp32), no (fp32), fp16 (GPU only, with a grad scaler) or bf16. What trains and its optimizer state stay fp32; under bf16 an adapter run holds its frozen weights in bf16 (norms fp32).", choices=MIXED_PRECISION)
    seed: int = _field(42, "Random seed for weights init of adapters, data order, caption transforms and the split.")
    # ---- output
    output_dir: str = _field("runs", "Runs are written to <output_dir>/<training_name>-<timestamp>/.")
    training_name: str = _field("caption-train", "Name of the run (folder prefix and tracker run name).")
    save_every_n_epochs: int = _field(1, "Save epoch-N/ every N epochs (0 = only final/).")
    save_every_n_steps: int = _field(0, "Also save step-N/ every N optimizer steps (0 = never).")
    save_total_limit: int = _field(0, "Keep only the newest N step-N/ checkpoints (0 = keep all; epoch-N/ and final/ are always kept).")
    resume: str | None = _field(None, "Continue a run: 'auto' (newest checkpoint of the newest run named training_name in output_dir) or a checkpoint folder.")
    max_nonfinite_steps: int = _field(10, "Stop (after saving the last good state) when this many optimizer steps in a row have a non-finite loss.")
    eval_every_n_epochs: int = _field(0, "Every N epochs, caption the validation split and log BLEU-4, ROUGE-L, CIDEr-D, exact match (and tag P/R/F1 for tag captions) as val/* (0 = never; needs validation_split > 0).")
    eval_max_images: int = _field(0, "Caption at most this many validation images for eval_every_n_epochs (0 = all).")
    num_sample_captions: int = _field(4, "Images captioned and printed/logged after every epoch (0 = none), each up to the longest training caption's length and a quarter more.")
    log_with: str = _field("wandb", "Tracker besides metrics.jsonl: wandb (offline when not logged in) or none.", choices=TRACKERS)
    wandb_project: str = _field("caption-train", "wandb project name.")
    interactive: str | None = _field(None, "[HOST:]PORT of the interactive caption page (host defaults to 127.0.0.1; port 0 picks a free one).")
    config_file: str | None = _field(None, "TOML file with any of these options as top-level keys (flags given on the command line win).")


DICT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type in ("dict", dict))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _base_type(annotation: str) -> str:
    """'float | None' -> 'float'."""
    return annotation.replace("| None", "").strip()


# ---------------------------------------------------------------------------------------------
# Parsing one value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_dict(text: str) -> dict:
    """A dict flag value: a TOML inline table `{a = 1}` or JSON `{"a": 1}`."""
    try:
        return dict(tomllib.loads(f"v = {text}")["v"])
    except (tomllib.TOMLDecodeError, TypeError, ValueError):
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"expected a TOML inline table like {{max_lr = 1e-3}} or JSON, got {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a table/object, got {text!r}")
    return value


# What a TOML value of each field type must be (bool is an int in Python, hence its own check).
_TOML_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "AutoBool": (bool, str)}
_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "a table", "AutoBool": "auto, true or false"}


def _toml_kind(value: Any) -> str:
    """The TOML name of a parsed value's type, for messages."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"), (dict, "a table"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"  # dates and times


def _check_toml_type(name: str, value: Any) -> None:
    """A config file's value must already have the field's type: `batch_size = "8"` is a mistake worth naming
    (only command-line values, which are always strings, are parsed)."""
    kind = _base_type({f.name: f.type for f in dataclasses.fields(TrainConfig)}[name])
    allowed = _TOML_TYPES[kind]
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        raise ValueError(f"expected {_EXPECTED[kind]}, got {_toml_kind(value)}")


def _coerce(name: str, value: Any) -> Any:
    """Check/convert a value from a config file or the command line to the field's type."""
    annotation = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    optional = "None" in annotation
    kind = _base_type(annotation)
    if value is None and optional:
        return None
    if kind == "dict":
        if isinstance(value, str):
            return parse_dict(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {value!r}")
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value)
        raise ValueError(f"expected true or false, got {value!r}")
    if kind == "AutoBool":  # a bool, or "auto" (left for start-up to decide)
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except ValueError:
                raise ValueError(f"expected auto, true or false, got {value!r}") from None
        raise ValueError(f"expected auto, true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind == "str":
        if isinstance(value, (dict, list, bool)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled field type {annotation} for {name}")


def _canonical_choice(name: str, value: str) -> str:
    """Case-insensitive match against a field's choices ('adamw' -> 'AdamW')."""
    choices = _metadata(name).get("choices")
    if not choices:
        return value
    for choice in choices:
        if choice.lower() == value.lower():
            return choice
    raise ValueError(f"unknown value {value!r}; choose one of {', '.join(choices)}")


def _metadata(name: str) -> dict:
    return dict({f.name: f for f in dataclasses.fields(TrainConfig)}[name].metadata)


def _unknown_key_message(key: str, where: str) -> str:
    valid = field_names() + list(ALIASES)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: unknown key {key!r}{hint}"


# ---------------------------------------------------------------------------------------------
# Sources: config file and command line


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Raw key -> value mapping from a TOML file; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config_file {path}: no such file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: TOML syntax error: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line UserError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see --help)")


def build_arg_parser(prog: str = "caption-train train") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Fine-tune an image-to-text model on a folder of images with .txt captions.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    # So `--lr -1e-3` reaches validation as a value ("lr must be > 0") instead of looking like a flag.
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == f.name]
        kind = _base_type(f.type)
        help_text = f.metadata["help"]
        if callable(help_text):  # a help text made from something else (the model registry) when it is shown
            help_text = help_text()
        default = getattr(defaults, f.name)
        if kind != "dict" and default is not None:
            help_text += f" (default: {default})"
        if kind in ("bool", "AutoBool"):
            # `--flag` alone means true; `--flag false` is accepted too so config-file values can be overridden.
            metavar = "{" + ",".join(f.metadata["choices"]) + "}" if kind == "AutoBool" else "BOOL"
            parser.add_argument(*flags, dest=f.name, nargs="?", const="true", metavar=metavar, help=help_text)
        else:
            metavar = "TABLE" if kind == "dict" else f.name.upper()
            if f.metadata.get("choices"):
                metavar = "{" + ",".join(f.metadata["choices"]) + "}"
            parser.add_argument(*flags, dest=f.name, metavar=metavar, help=help_text)
    return parser


# ---------------------------------------------------------------------------------------------
# Validation


def _check_ranges(cfg: TrainConfig, skip: set[str] = frozenset()) -> list[str]:
    """Range and cross-field checks, nested tables included; fields in `skip` were rejected already."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need("dataset_dir" in skip or cfg.dataset_dir is not None and cfg.dataset_dir.strip() != "", "dataset_dir is required: pass --dataset_dir DIR (a folder of images with .txt captions)")
    if cfg.dataset_dir and _inside(Path(cfg.output_dir), Path(cfg.dataset_dir)):
        problems.append(f"output_dir {cfg.output_dir} is inside dataset_dir {cfg.dataset_dir}: checkpoints would be read as data; put runs elsewhere")
    if cfg.dataset_dir and cfg.cache_dir and _inside(Path(cfg.cache_dir), Path(cfg.dataset_dir)):
        problems.append(f"cache_dir {cfg.cache_dir} is inside dataset_dir {cfg.dataset_dir}: nothing is written into a dataset; put the cache elsewhere")
    need(not cfg.freeze_vision_tower or cfg.peft_module == "none", f"freeze_vision_tower is for full fine-tunes (peft_module none); with {cfg.peft_module}, the vision tower trains only if peft_args.target_modules names its modules")
    need(cfg.quantize == "none" or cfg.peft_module != "none", f"quantize {cfg.quantize} trains an adapter on quantized base weights, which cannot be trained themselves; with peft_module none (full fine-tune) drop quantize, or pick LoRA/IA3")
    need(cfg.lr is None or cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.gradient_accumulation_steps >= 1, f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    need(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {cfg.max_grad_norm}")
    need(cfg.frozen_parts >= 0, f"frozen_parts must be >= 0, got {cfg.frozen_parts}")
    need(0.0 <= cfg.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
    need(0.0 <= cfg.random_flip <= 1.0, f"random_flip must be in [0, 1], got {cfg.random_flip}")
    need(0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(0.0 <= cfg.validation_split < 1.0, f"validation_split must be in [0, 1), got {cfg.validation_split}")
    need(cfg.max_length >= 2, f"max_length must be >= 2, got {cfg.max_length}")
    need(cfg.num_workers >= 0, f"num_workers must be >= 0, got {cfg.num_workers}")
    need(cfg.save_every_n_epochs >= 0, f"save_every_n_epochs must be >= 0, got {cfg.save_every_n_epochs}")
    need(cfg.save_every_n_steps >= 0, f"save_every_n_steps must be >= 0, got {cfg.save_every_n_steps}")
    need(cfg.save_total_limit >= 0, f"save_total_limit must be >= 0, got {cfg.save_total_limit}")
    if cfg.memory_budget is not None:
        try:
            parse_memory_size(cfg.memory_budget)
        except ValueError as err:
            problems.append(f"memory_budget: {err}")
    need(cfg.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1, got {cfg.max_nonfinite_steps}")
    need(cfg.eval_every_n_epochs >= 0, f"eval_every_n_epochs must be >= 0, got {cfg.eval_every_n_epochs}")
    need(cfg.eval_max_images >= 0, f"eval_max_images must be >= 0, got {cfg.eval_max_images}")
    need(cfg.eval_every_n_epochs == 0 or cfg.validation_split > 0, "eval_every_n_epochs needs a validation split: set validation_split (e.g. 0.05)")
    need(cfg.num_sample_captions >= 0, f"num_sample_captions must be >= 0, got {cfg.num_sample_captions}")
    need(cfg.group_by_length != "on" or cfg.batch_size >= 2, "group_by_length on needs batch_size 2 or more (a batch of one row has no padding to save)")
    need(cfg.training_name.strip() != "" and "/" not in cfg.training_name and "\\" not in cfg.training_name,
         f"training_name must be a non-empty folder name without slashes, got {cfg.training_name!r}")
    if cfg.interactive is not None:
        from caption_train.address import parse_interactive  # light: no aiohttp/torch import

        try:
            parse_interactive(cfg.interactive)
        except UserError as err:
            problems.append(str(err))
    if not skip & {"optimizer", "optimizer_args"}:
        problems += _check_call_args("optimizer_args", optimizer_class(cfg.optimizer), cfg.optimizer_args, reserved={"params"})
    if not skip & {"lr_scheduler", "scheduler_args"}:
        problems += _check_call_args("scheduler_args", scheduler_class(cfg.lr_scheduler), cfg.scheduler_args, reserved={"optimizer"})
    if cfg.peft_args and not skip & {"peft_module", "peft_args"}:
        problems += _check_peft_args(cfg.peft_module, cfg.peft_args)
    return problems


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """Bytes in a size like '20GiB', '20 GB' (10^9), '512MiB' or '24G' (binary, as ulimit and nvidia-smi mean it)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or not match.group(2):
        raise ValueError(f"{text!r} is not a size with a unit; write e.g. 20GiB, 512MiB or 24GB")
    unit = match.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r}: unknown unit {match.group(2)!r}; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return size


def _field_type(name: str) -> str:
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (reported later by the scan)
        return False


def optimizer_class(name: str) -> type:
    if name == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    import torch

    return getattr(torch.optim, name)


def scheduler_class(name: str) -> type:
    import torch

    return getattr(torch.optim.lr_scheduler, name)


def _check_peft_args(peft_module: str, peft_args: dict) -> list[str]:
    if peft_module == "none":
        return [f"peft_args {sorted(peft_args)} given but peft_module is none (full fine-tune); remove them or pick LoRA/IA3"]
    from peft import IA3Config, LoraConfig  # only when there are peft_args: peft takes seconds to import

    # peft_type/task_type are set by us, the rest by peft itself when it saves the adapter.
    reserved = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
    return _check_call_args("peft_args", LoraConfig if peft_module == "LoRA" else IA3Config, peft_args, reserved=reserved)


def _check_call_args(key: str, target: type, args: dict, *, reserved: set[str]) -> list[str]:
    """Names in `args` that `target` does not accept, found before anything is loaded or written."""
    accepted = [p for p in inspect.signature(target).parameters if p not in reserved and p not in ("self", "args", "kwargs")]
    problems = []
    for name in args:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; it accepts {', '.join(accepted)}"
        problems.append(f"{key}: {target.__name__} does not accept {name!r}{hint}")
    return problems


# ---------------------------------------------------------------------------------------------
# Putting it together


def resolve(file_values: dict[str, Any], cli_values: dict[str, Any], *, file_label: str = "config file") -> TrainConfig:
    """Merge defaults < file < CLI into a validated TrainConfig, reporting every problem at once.

    Values from the file must have the field's TOML type; values from the command line are strings to parse
    (or, from Python callers, already typed values).
    """
    problems: list[str] = []
    merged: dict[str, Any] = {}
    failed: set[str] = set()  # fields whose value was rejected: later checks must not judge their default instead
    valid = set(field_names())
    for values, label in ((file_values, file_label), (cli_values, "command line")):
        from_file = values is file_values
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in valid:
                problems.append(_unknown_key_message(key, label))
                continue
            if name == "config_file" and from_file:
                problems.append(f"{label}: config_file cannot be set inside a config file")
                continue
            try:
                if from_file:
                    _check_toml_type(name, value)
                value = _coerce(name, value)
                if isinstance(value, str) and _metadata(name).get("choices") and _base_type(_field_type(name)) != "AutoBool":
                    value = _canonical_choice(name, value)
            except ValueError as err:
                where = f"{key} = {_show_toml(value)}" if from_file else f"--{key}"
                problems.append(f"{label}: {where}: {err}")
                failed.add(name)
                continue
            merged[name] = value
            failed.discard(name)  # a valid command-line value replaces a bad file value
    cfg = TrainConfig(**merged)
    make_paths_absolute(cfg)
    problems += _check_ranges(cfg, skip=failed)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def _show_toml(value: Any) -> str:
    """A config-file value as it would be spelled in TOML (near enough for a message)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


# Fields that name local folders. The saved config.toml (and adapters, which record their base model) must mean
# the same folders from any working directory, so they are kept absolute.
PATH_FIELDS = ("dataset_dir", "output_dir", "config_file")


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: keep it unresolved, the dataset scan reports it by name
        return os.path.abspath(path)


def make_paths_absolute(cfg: TrainConfig) -> None:
    """Resolve the path fields (and model_name_or_path when it is a local folder, not a hub id) in place."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value is not None and value.strip():
            setattr(cfg, name, _absolute(value))
    if Path(cfg.model_name_or_path).expanduser().is_dir():
        cfg.model_name_or_path = str(Path(cfg.model_name_or_path).expanduser().resolve())


def load_train_config(argv: list[str] | None) -> TrainConfig:
    """Parse the command line (and the --config_file it names) into a validated TrainConfig."""
    cli_values = vars(build_arg_parser().parse_args(argv))
    file_values: dict[str, Any] = {}
    label = "config file"
    if cli_values.get("config_file"):
        file_values = read_config_file(cli_values["config_file"])
        label = str(cli_values["config_file"])
    return resolve(file_values, cli_values, file_label=label)


def resolved_lr(cfg: TrainConfig) -> float:
    """The learning rate in force: Prodigy estimates the step size itself, so its lr is a multiplier (1.0)."""
    if cfg.lr is not None:
        return cfg.lr
    return 1.0 if cfg.optimizer == "Prodigy" else 1e-4


def to_toml_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as TOML-writable data (None values are left out: TOML has no null)."""
    data = dataclasses.asdict(cfg)
    data["lr"] = resolved_lr(cfg)
    data.pop("config_file", None)
    data.pop("resume", None)  # a saved config must not make its next user resume by accident
    data.pop("interactive", None)  # ...nor open a server
    return {k: v for k, v in data.items() if v is not None}
