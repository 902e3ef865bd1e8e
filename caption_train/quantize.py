"""QLoRA: load the base model 4- or 8-bit quantized with bitsandbytes (CUDA only) and train an adapter on it.

    check_quantize_runnable("4bit")                        # a one-line UserError on a machine that cannot
    overrides = cfg.model_config | quantization_load_kwargs("4bit")
    model, processor = family.load(name, overrides)        # pop_load_kwargs hands quantization_config to from_pretrained
    model = prepare_quantized_for_training(model)          # then wrap with LoRA / IA3

Only the base weights are quantized; the adapter and its optimizer state stay fp32. bitsandbytes is an optional
dependency (`pip install bitsandbytes`, or the `quantize` extra).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from caption_train.config import QUANTIZE_MODES
from caption_train.errors import UserError


def quantize_problem(mode: str, *, has_cuda: bool, has_bitsandbytes: bool) -> str | None:
    """Why `--quantize mode` cannot run on a machine like this one (None when it can, or when mode is none)."""
    if mode == "none":
        return None
    if not has_cuda:
        return f"--quantize {mode} needs a CUDA GPU (bitsandbytes); this machine has none: drop --quantize or run on a GPU"
    if not has_bitsandbytes:
        return f"--quantize {mode} needs the bitsandbytes package, which is not installed: pip install 'bitsandbytes>=0.46.1' (or pip install 'caption-train[quantize]')"
    return None


def check_quantize_runnable(mode: str) -> None:
    """Raise the `quantize_problem` of this machine, before any model is loaded."""
    problem = quantize_problem(mode, has_cuda=torch.cuda.is_available(),
                               has_bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)
    if problem:
        raise UserError(problem)


def compute_dtype() -> torch.dtype:
    """The dtype 4-bit matmuls compute in: bf16 where the GPU supports it, else fp16."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(mode: str, *, dtype: torch.dtype | None = None) -> Any:
    """transformers' BitsAndBytesConfig for `mode` (None for none): 4bit is QLoRA's NF4 with double quantization
    (the quantization constants quantized too, ~0.4 bit per weight saved); 8bit is LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if mode == "none":
        return None
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype or compute_dtype())
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")


def quantization_load_kwargs(mode: str) -> dict[str, Any]:
    """What to add to a family's `load` overrides (model_config) so from_pretrained quantizes ({} for none)."""
    config = quantization_config(mode)
    return {} if config is None else {"quantization_config": config}


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """peft's preparation of a k-bit model for adapter training (base frozen, layer norms and the rest in fp32);
    a model that is not quantized is returned as it is. Gradient checkpointing is left to the trainer, which
    enables it without hooking the input embeddings (train.enable_gradient_checkpointing)."""
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def describe_quantization(mode: str) -> str | None:
    """The start-up line for a quantized run (None for none)."""
    if mode == "none":
        return None
    if mode == "4bit":
        return f"quantized: base weights 4-bit NF4 with double quantization (bitsandbytes), compute {str(compute_dtype()).removeprefix('torch.')}; adapter fp32"
    return "quantized: base weights 8-bit LLM.int8() (bitsandbytes); adapter fp32"
