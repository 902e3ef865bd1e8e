"""Run directories and self-describing checkpoint folders, written atomically (temp dir + rename).

    run_dir = new_run_dir(Path("runs"), "caption-train")          # runs/caption-train-20261126-210000/
    save_checkpoint(run_dir / "epoch-1", model, processor, config_dict, state)

A checkpoint folder holds what is needed to use it alone: the peft adapter (or full model), the processor,
the resolved `config.toml`, and `training_state.pt` (optimizer, scheduler, step counters, RNG states).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

from caption_train.errors import UserError

CONFIG_NAME = "config.toml"
STATE_NAME = "training_state.pt"


def new_run_dir(output_dir: Path, training_name: str) -> Path:
    """Create `<output_dir>/<training_name>-<YYYYmmdd-HHMMSS>/`; never reuse an existing folder."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output_dir {output_dir}: cannot create it ({err.strerror}); pass a writable folder") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output_dir {output_dir}: not writable; pass a writable folder")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = output_dir / f"{training_name}-{stamp}"
    suffix = 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            # Two runs started in the same second: keep both.
            suffix += 1
            candidate = output_dir / f"{training_name}-{stamp}-{suffix}"


def write_config(path: Path, config: dict[str, Any]) -> None:
    with path.open("wb") as handle:
        tomli_w.dump(config, handle)


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(target: Path, model: torch.nn.Module, processor: Any, config: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write the checkpoint into a hidden temp folder beside `target`, then rename it into place.

    A crash mid-write leaves only a `.tmp-` folder, never a half-written `target`.
    """
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite a checkpoint")
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from this process id; nothing of the user's
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_config(tmp / CONFIG_NAME, config)
    torch.save({**state, "rng": rng_states()}, tmp / STATE_NAME)
    os.replace(tmp, target)
    return target
