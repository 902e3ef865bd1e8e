"""Wrap a model for training: peft LoRA / IA3 from the family's default targets plus user overrides, or full fine-tune.

    model = wrap_model(model, family, "LoRA", {"r": 8})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from caption_train.errors import UserError
from caption_train.models import ModelFamily

LORA_DEFAULTS = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05}


def peft_config(family: ModelFamily, peft_module: str, peft_args: dict[str, Any]) -> Any:
    """The peft config for `peft_module`, family defaults overridden by `peft_args` (None for a full fine-tune)."""
    from peft import IA3Config, LoraConfig

    if peft_module == "none":
        if peft_args:
            raise UserError(f"peft_args {sorted(peft_args)} given but peft_module is none (full fine-tune); remove them or pick LoRA/IA3")
        return None
    if peft_module == "LoRA":
        config_class, args = LoraConfig, {**LORA_DEFAULTS, "target_modules": family.lora_targets()}
    else:
        targets, feedforward = family.ia3_targets()
        config_class, args = IA3Config, {"target_modules": targets, "feedforward_modules": feedforward}
    args.update(peft_args)
    try:
        return config_class(**args)
    except (TypeError, ValueError) as err:
        raise UserError(f"peft_args for {peft_module}: {err}") from None


def wrap_model(model: torch.nn.Module, family: ModelFamily, peft_module: str, peft_args: dict[str, Any]) -> torch.nn.Module:
    config = peft_config(family, peft_module, peft_args)
    if config is None:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as err:
        # Typically "Target modules {...} not found in the base model".
        raise UserError(f"peft_args.target_modules for {peft_module}: {str(err).splitlines()[0]}") from None


def load_adapter_for_training(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Put a saved peft adapter (a checkpoint's) back on the base model, trainable, to continue training it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def describe_adapters(model: torch.nn.Module) -> str | None:
    """One line naming the modules the LoRA/IA3 layers sit on (None for a full fine-tune), printed at start-up so
    the default targets are visible."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not names:
        return None
    leaves = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))  # in model order
    return f"adapter targets: {len(names)} modules ({', '.join(leaves)}); override with peft_args.target_modules"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
