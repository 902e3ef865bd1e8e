"""Continue a run: pick the checkpoint, check the config still fits it, restore optimizer / schedule / RNG.

    resume_dir = resolve_resume(cfg)                      # --resume auto|PATH -> checkpoint folder or None
    state = load_state(resume_dir)
    check_config_compatible(cfg, resume_dir)               # errors for structural changes, notes for the rest
    restore_optimizer(optimizer, state, lr=1e-4, args={})  # then build the scheduler and fast_forward() it

The schedule is rebuilt from the *current* config and fast-forwarded to the resumed step (instead of loading
its saved state), so an lr or epochs change on resume takes effect from that step on, and an unchanged config
reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch

from caption_train import checkpoint
from caption_train.config import TrainConfig, to_toml_dict
from caption_train.errors import UserError
from caption_train.files import write_text_atomic

# Changing these would make the checkpoint's weights, optimizer state or data order meaningless.
STRUCTURAL_KEYS = ("model_name_or_path", "peft_module", "peft_args", "model_config", "dataset_dir", "optimizer",
                   "batch_size", "gradient_accumulation_steps", "validation_split", "seed",
                   "kohya_repeats",  # the epoch's length and order: the position within it would mean other batches
                   "freeze_vision_tower")  # which parameters train: the optimizer state would not fit
# Bookkeeping that may differ freely and is not worth a message.
QUIET_KEYS = ("output_dir", "num_workers", "log_with", "wandb_project", "interactive",
              "group_by_length")  # the checkpoint's batch order wins; data/batching.plan_grouping refuses a contradiction


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder to continue from, or None for a fresh run."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return checkpoint.find_resumable(Path(cfg.output_dir), cfg.training_name)
    folder = Path(cfg.resume)
    if not folder.is_dir():
        raise UserError(f"--resume {cfg.resume}: no such folder; pass a checkpoint folder (runs/<run>/step-N, epoch-N or final) or 'auto'")
    if not checkpoint.is_complete(folder):
        raise UserError(f"--resume {cfg.resume}: not a complete checkpoint (needs {checkpoint.STATE_NAME} and weights); pick another or use 'auto'")
    return folder


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / checkpoint.STATE_NAME, map_location="cpu", weights_only=False)


def saved_config(folder: Path) -> dict[str, Any]:
    with (folder / checkpoint.CONFIG_NAME).open("rb") as handle:
        return tomllib.load(handle)


def given_prompt(cfg: TrainConfig, folder: Path | None) -> tuple[str | None, str]:
    """(the prompt to train with before the family's default applies, where it came from): --prompt, else the one
    the resumed checkpoint recorded (a later version's default must not change a run halfway), else None."""
    if cfg.prompt is not None:
        return cfg.prompt, "--prompt"
    recorded = saved_config(folder).get("prompt") if folder is not None else None
    if isinstance(recorded, str):
        return recorded, f"kept from {folder / checkpoint.CONFIG_NAME}"
    return None, ""


# Values that may be local paths: equal when they name the same file or folder (a relative dataset_dir recorded by
# an older version, or a symlink, against today's absolute one).
PATH_KEYS = ("dataset_dir", "output_dir", "model_name_or_path")


# Keys whose `auto` is decided again at every start (the saved config holds what it decided): auto matches any
# saved value of them.
DECIDED_AT_START = ("gradient_checkpointing",)


def same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in DECIDED_AT_START and new == "auto":
        return True
    if key not in PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    try:
        return os.path.samefile(Path(old).expanduser(), Path(new).expanduser())
    except OSError:  # either one does not exist (a hub id, a moved folder): only equal strings are the same
        return False


def check_config_compatible(cfg: TrainConfig, folder: Path) -> list[str]:
    """Raise for structural differences; return one note per other difference, saying the new value wins."""
    old, new = saved_config(folder), to_toml_dict(cfg)
    changed = [key for key in sorted(set(old) | set(new)) if not same_value(key, old.get(key), new.get(key)) and key not in QUIET_KEYS]
    structural = [key for key in changed if key in STRUCTURAL_KEYS]
    if structural:
        details = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in structural)
        raise UserError(f"--resume {folder}: cannot change {details} when resuming; use the checkpoint's values or start a new run")
    return [f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r} (the new value wins from the resumed step on)" for key in changed]


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], *, lr: float, args: dict[str, Any]) -> None:
    """Load moments/step counts, then apply the current lr and optimizer_args (the config wins over the checkpoint)."""
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr  # what a freshly built scheduler takes as its base
        group.update(args)


def fast_forward(scheduler: Any, steps: int) -> None:
    """Advance a freshly built schedule to `steps`, as if it had been stepped along with training."""
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": expected here, we are replaying the schedule.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def restore_rng(folder: Path, rank: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for this rank (process count changed)."""
    path = checkpoint.rng_file(folder, rank)
    if not path.is_file():
        return False
    checkpoint.restore_rng_states(torch.load(path, map_location="cpu", weights_only=False))
    return True


def truncate_metrics(metrics_path: Path, rows: int) -> None:
    """Keep the first `rows` lines of metrics.jsonl: what was logged up to the checkpoint.

    Lines logged after it (by the run that crashed or was stopped) are replayed by the resumed run.
    """
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) > rows:
        write_text_atomic(metrics_path, "".join(lines[:rows]))
