"""Optimizers and LR schedulers built from names + argument tables, with step arithmetic done once, here.

    optimizer = build_optimizer("AdamW", params, lr=1e-4, args={"weight_decay": 0.01})
    scheduler = build_scheduler("OneCycleLR", optimizer, lr=1e-4, total_steps=100, steps_per_epoch=20, args={})

Schedulers are stepped once per *optimizer* step (not per batch), so `total_steps` is
epochs * ceil(batches_per_epoch / gradient_accumulation_steps).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from caption_train.config import optimizer_class, scheduler_class
from caption_train.errors import UserError


def optimizer_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    # accelerate steps the optimizer on the last batch of an epoch even mid-accumulation, hence ceil.
    return max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps))


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, args: dict[str, Any]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient (check peft_args.target_modules)")
    if name == "AdamW" and all(p.is_cuda for p in params) and not {"fused", "foreach"} & set(args):
        args = {**args, "fused": True}  # one kernel for the whole update on a GPU instead of several per tensor
    try:
        return optimizer_class(name)(params, lr=lr, **args)
    except (TypeError, ValueError) as err:
        raise UserError(f"optimizer_args for {name}: {err}") from None


def scheduler_defaults(name: str, *, lr: float, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """Arguments that make each schedule span the run; the user's scheduler_args override any of them."""
    if name == "CosineAnnealingLR":
        return {"T_max": total_steps, "eta_min": 0.0}
    if name == "CosineAnnealingWarmRestarts":
        return {"T_0": steps_per_epoch, "T_mult": 1, "eta_min": 0.0}  # restart at every epoch
    if name == "CyclicLR":
        # Momentum cycling needs SGD-style momentum; Adam-family optimizers keep their betas.
        return {"base_lr": lr / 10, "max_lr": lr, "step_size_up": max(1, steps_per_epoch // 2), "cycle_momentum": False}
    if name == "OneCycleLR":
        return {"max_lr": lr, "total_steps": total_steps}
    raise UserError(f"unknown lr_scheduler {name!r}")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, lr: float, total_steps: int, steps_per_epoch: int, args: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    kwargs = {**scheduler_defaults(name, lr=lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch), **args}
    try:
        return scheduler_class(name)(optimizer, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"scheduler_args for {name}: {err}") from None


def current_lr(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR now in force; for Prodigy also its adaptive step size d and the effective d*lr."""
    group = optimizer.param_groups[0]
    values = {"lr": float(group["lr"])}
    if "d" in group:
        values["prodigy_d"] = float(group["d"])
        values["effective_lr"] = float(group["d"]) * float(group["lr"])
    return values
