"""Run directories and self-describing checkpoint folders, written atomically; finding one to resume from.

    run_dir = new_run_dir(Path("runs"), "caption-train")          # runs/caption-train-20261126-210000/
    tmp = begin_checkpoint(run_dir / "epoch-1")                    # hidden temp folder beside the target
    write_rng_state(tmp, rank)                                     # every process
    finish_checkpoint(tmp, run_dir / "epoch-1", model, processor, config, state)   # main process
    latest = find_resumable(Path("runs"), "caption-train")         # for --resume auto

A checkpoint folder holds what is needed to use it alone: the peft adapter (or full model), the processor,
the resolved `config.toml`, `training_state.pt` (optimizer, step counters, position in the epoch) and one
`rng_state_<rank>.pt` per process.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch

from caption_train.errors import UserError
from caption_train.files import give_default_modes
from caption_train.models.base import quiet_transformers_bars

CONFIG_NAME = "config.toml"
STATE_NAME = "training_state.pt"
TMP_MARK = ".tmp-"
CHECKPOINT_NAME = re.compile(r"^(epoch|step)-(\d+)$|^final$")


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


# ---------------------------------------------------------------------------------------------
# RNG state, per process


def rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.pt"


# ---------------------------------------------------------------------------------------------
# Atomic writes: temp folder beside the target, fsync, rename


def temp_dir_for(target: Path) -> Path:
    # Deterministic (no pid) so every process of a multi-process run agrees on it.
    return target.parent / f".{target.name}{TMP_MARK}save"


def begin_checkpoint(target: Path) -> Path:
    """Create the empty temp folder for `target` (main process), clearing our own leftover from a crash."""
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite a checkpoint")
    tmp = temp_dir_for(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # a half-written checkpoint of this run from a crash; never user data
    tmp.mkdir(parents=True)
    return tmp


def write_rng_state(tmp: Path, rank: int) -> None:
    torch.save(rng_states(), rng_file(tmp, rank))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@quiet_transformers_bars()  # the training bar and the run's lines cover it
def finish_checkpoint(tmp: Path, target: Path, model: torch.nn.Module, processor: Any, config: dict[str, Any], state: dict[str, Any],
                      *, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Fill the temp folder, flush it to disk, and rename it into place: a crash leaves the old state or the new one.
    `weights`: the model's full state dict where the model itself holds only a shard (FSDP)."""
    model.save_pretrained(tmp, state_dict=weights)  # None: the model's own state dict
    processor.save_pretrained(tmp)
    write_config(tmp / CONFIG_NAME, config)
    torch.save(state, tmp / STATE_NAME)
    give_default_modes(tmp)  # transformers writes model.safetensors 0600 through a temp file
    _fsync_tree(tmp)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def is_complete(folder: Path) -> bool:
    """A checkpoint we can resume from: renamed into place, with state and weights."""
    has_weights = any((folder / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"))
    return folder.is_dir() and CHECKPOINT_NAME.match(folder.name) is not None and (folder / STATE_NAME).is_file() and has_weights


def checkpoints_in(run_dir: Path) -> list[tuple[int, Path]]:
    """(global_step, folder) of the complete checkpoints of a run, oldest first; temp leftovers ignored."""
    found = []
    for folder in run_dir.iterdir() if run_dir.is_dir() else []:
        if folder.name.startswith(".") or not is_complete(folder):
            continue
        try:
            step = checkpoint_step(folder)
        except Exception:  # noqa: BLE001 - an unreadable state file means "not resumable", whatever the cause
            continue
        found.append((step, folder))
    # At equal steps prefer final/ > epoch-N/ > step-N/ (same weights; final means "done").
    rank = {"final": 2, "epoch": 1, "step": 0}
    return sorted(found, key=lambda item: (item[0], rank[item[1].name.split("-")[0]]))


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint was saved at. Memory-mapped: the optimizer state in the same file is not read."""
    return int(torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def run_dirs(output_dir: Path, training_name: str) -> list[Path]:
    """Runs named `<training_name>-<YYYYmmdd-HHMMSS>[-N]` in output_dir, oldest first."""
    pattern = re.compile(rf"^{re.escape(training_name)}-(\d{{8}}-\d{{6}})(?:-(\d+))?$")
    runs = []
    for folder in output_dir.iterdir() if output_dir.is_dir() else []:
        match = pattern.match(folder.name)
        if match and folder.is_dir():
            runs.append(((match.group(1), int(match.group(2) or 1)), folder))
    return [folder for _, folder in sorted(runs)]


def find_resumable(output_dir: Path, training_name: str) -> Path | None:
    """The newest complete checkpoint of the newest run of this name that has one (None if there is none)."""
    for run_dir in reversed(run_dirs(output_dir, training_name)):
        checkpoints = checkpoints_in(run_dir)
        if checkpoints:
            return checkpoints[-1][1]
    return None


def prune_step_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step-N/ checkpoints of this run (epoch-N/ and final/ are kept)."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in run_dir.glob("step-*") if CHECKPOINT_NAME.match(p.name))
    removed = [path for _, path in steps[: max(0, len(steps) - keep)]]
    for path in removed:
        # Renamed out of the way first: a crash mid-delete must not leave a partial step-N/ under its final name.
        doomed = path.parent / f".{path.name}{TMP_MARK}delete"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        try:
            shutil.rmtree(doomed)
        except OSError as err:
            # What is left is hidden (never listed, resumed from or pruned as a checkpoint): not worth ending a run for.
            from tqdm.auto import tqdm

            tqdm.write(f"warning: --save_total_limit could not delete all of {path.name}/ ({err.strerror or err}: {err.filename}); "
                       f"the rest is in {doomed}, delete it by hand", file=sys.stderr)
    return removed
