"""Which precision to compute in: `auto` picks bf16 autocast where the hardware runs it fast, else fp32.

    choice = resolve_precision("auto")       # Precision(mode="bf16", reason="CPU with AVX512-BF16/AMX: ...")
    Accelerator(mixed_precision=choice.mode)
    dtype = inference_dtype("auto", torch.device("cpu"))   # torch.bfloat16 on such a CPU

Autocast runs matmuls/convolutions in bf16; what trains (and its optimizer state) stays fp32, and under bf16 the
frozen weights are held in bf16 (caption_train/weights.py). "Fast" is asked of the hardware, never assumed: CUDA
reports bf16 support itself; on a CPU, bf16 matmuls are only faster than fp32 with native instructions
(AVX512-BF16 or AMX), and are several times slower without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caption_train.errors import UserError

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    mode: str  # what accelerate calls it: "no" (fp32), "bf16" or "fp16"
    reason: str

    def describe(self) -> str:
        name = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + grad scaler"}[self.mode]
        return f"precision: {name} ({self.reason})"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul instructions (x86 AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(requested: str, *, use_cuda: bool | None = None) -> Precision:
    """The autocast mode for training: `requested` itself, or for `auto` the fastest one this hardware runs well."""
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if requested == "fp16" and not use_cuda:
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use auto, bf16 or no on this machine")
    if requested == "bf16" and use_cuda and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed_precision bf16: this GPU does not support bf16; use auto, fp16 or no")
    if requested != "auto":
        return Precision(requested, "as asked")
    if use_cuda:
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name()} supports bf16")
        return Precision("no", "auto: this GPU has no bf16; pass --mixed_precision fp16 for fp16 with a grad scaler")
    if cpu_has_fast_bf16():
        return Precision("bf16", "auto: CPU with native bf16 matmul (AVX512-BF16/AMX)")
    return Precision("no", "auto: this CPU has no native bf16 matmul, where bf16 would be slower")


def inference_dtype(requested: str, device: torch.device) -> torch.dtype:
    """Weights dtype for captioning/evaluation: `auto` = bf16 where it is fast (see above), fp16 on a GPU without
    bf16, else fp32."""
    if requested != "auto":
        if requested not in DTYPE_NAMES:
            raise UserError(f"--dtype {requested}: use auto, {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def describe_inference_dtype(requested: str, device: torch.device) -> str:
    """The start-up line of caption / evaluate: the dtype the weights load in, and why."""
    dtype = inference_dtype(requested, device)
    name = str(dtype).removeprefix("torch.")
    if requested != "auto":
        return f"weights: {name} (as --dtype asks)"
    if dtype == torch.bfloat16:
        why = "a GPU with bf16" if device.type == "cuda" else "a CPU with native bf16 matmul (AVX512-BF16/AMX)"
    elif dtype == torch.float16:
        why = "a GPU without bf16"
    else:
        why = "no native bf16 on this device"
    return f"weights: {name} (--dtype auto: {why})"


def enable_fast_gpu_matmul() -> None:
    """TF32 for fp32 matmuls/convolutions on Ampere and newer GPUs (10-bit mantissa: fine for training, ~8x faster).
    A no-op without CUDA."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
