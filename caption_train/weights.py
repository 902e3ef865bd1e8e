"""Which dtype the model's weights are held in: under bf16 autocast, frozen weights in bf16; what trains and norms in fp32.

    plan = plan_weights(precision.mode, peft_module="LoRA", quantize="none", model_config={})
    model, processor = family.load(name, plan.load_overrides(model_config))   # from_pretrained(dtype=bfloat16)
    model = wrap_model(model, ...)                                            # peft: adapters in fp32
    keep_in_fp32(model, plan)          # trainable parameters and normalization layers back in fp32
    print(describe_weights(model, plan))
    # Qwen2.5-VL-7B: weights: frozen 16.58 GB in bf16, norms 1.1 MB in fp32, trainable 161.5 MB in fp32 (bf16 autocast: ...)

Why: bf16 autocast casts every weight to bf16 at every matmul, so a frozen weight held in fp32 costs twice the
memory for nothing; only what the optimizer updates needs fp32 (its small steps would vanish in bf16 rounding).
Normalization layers compute in fp32 whatever their input (autocast keeps them there); their weights are few, so
they stay in fp32 as loaded. A full fine-tune (everything trains), fp32 or fp16 compute, a quantized base
(bitsandbytes keeps its own dtypes) and an explicit `model_config.dtype` keep what they load today.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class WeightsPlan:
    """How the trainer loads the base model's weights."""

    dtype: torch.dtype | None  # what from_pretrained loads in; None: what model_config / --quantize say
    reason: str  # why, for the start-up line
    keep_fp32: bool = False  # after loading in `dtype`: trainable parameters and norms back in fp32

    def load_overrides(self, model_config: dict[str, Any]) -> dict[str, Any]:
        """`model_config` with the load dtype added (models/base.pop_load_kwargs hands it to from_pretrained)."""
        if self.dtype is None:
            return dict(model_config)
        return {**model_config, "dtype": str(self.dtype).removeprefix("torch.")}


def plan_weights(mixed_precision: str, *, peft_module: str, quantize: str = "none", model_config: dict[str, Any] | None = None,
                 sharded: bool = False) -> WeightsPlan:
    """The weights' dtype for a run computing in `mixed_precision` (accelerate's name: no, bf16, fp16)."""
    model_config = model_config or {}
    if "dtype" in model_config or "torch_dtype" in model_config:
        return WeightsPlan(None, "as model_config.dtype asks")
    if quantize != "none":
        return WeightsPlan(None, f"--quantize {quantize}")
    if mixed_precision != "bf16":
        compute = {"no": "fp32", "fp16": "fp16 autocast"}.get(mixed_precision, mixed_precision)
        return WeightsPlan(torch.float32, f"{compute} compute")
    if peft_module == "none":
        return WeightsPlan(torch.float32, "full fine-tune: every weight trains")
    if sharded:
        return WeightsPlan(torch.float32, "FSDP shards fp32 weights")
    return WeightsPlan(torch.bfloat16, "bf16 autocast: frozen weights need no fp32 copy", keep_fp32=True)


# ---------------------------------------------------------------------------------------------
# Normalization layers

_TORCH_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
# transformers defines an RMSNorm (or LayerNorm) class per model (LlamaRMSNorm, Qwen2RMSNorm, Gemma3RMSNorm,
# T5LayerNorm ...) with no common base class: they are known by their class name.
_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def is_norm(module: torch.nn.Module) -> bool:
    """Whether `module` is a layer or RMS normalization (its own parameters: one-dimensional scales and shifts)."""
    if not isinstance(module, _TORCH_NORMS) and not type(module).__name__.endswith(_NORM_SUFFIXES):
        return False
    return all(p.dim() <= 1 for p in module.parameters(recurse=False))


def keep_in_fp32(model: torch.nn.Module, plan: WeightsPlan) -> None:
    """Under a plan that loads in bf16: every trainable parameter (adapters; peft already keeps its own in fp32,
    this also covers modules_to_save) and every normalization layer's weights in fp32. Call after wrapping the
    model with its adapters and before building the optimizer."""
    if not plan.keep_fp32:
        return
    for module in model.modules():
        norm = is_norm(module)
        for param in module.parameters(recurse=False):
            if (norm or param.requires_grad) and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()


# ---------------------------------------------------------------------------------------------
# What the start-up line says


def weight_bytes(model: torch.nn.Module) -> dict[tuple[str, torch.dtype], int]:
    """Parameter bytes by (role, dtype); role is trainable, norms (frozen normalization weights) or frozen.
    Tied parameters count once."""
    sizes: dict[tuple[str, torch.dtype], int] = defaultdict(int)
    seen: set[int] = set()
    for module in model.modules():
        norm = is_norm(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            role = "trainable" if param.requires_grad else "norms" if norm else "frozen"
            sizes[role, param.dtype] += param.numel() * param.element_size()
    return dict(sizes)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def describe_weights(model: torch.nn.Module, plan: WeightsPlan) -> str:
    """One start-up line: how many bytes of weights are held in which dtype, and why."""
    sizes = weight_bytes(model)
    parts = [f"{role} {_size(n)} in {_SHORT.get(dtype, str(dtype).removeprefix('torch.'))}"
             for role in ("frozen", "norms", "trainable") for (r, dtype), n in sorted(sizes.items(), key=lambda item: -item[1]) if r == role]
    return f"weights: {', '.join(parts)} ({plan.reason})"
