"""Load what training wrote (a run's final/ or epoch-N/, a merged model, or any model) and caption images.

    model, processor, family = load_for_inference("runs/x-20261126-120000/final")
    captions = caption_paths(model, processor, family, ["a.png", "b.png"], batch_size=16)

    source = resolve_model_source("runs/x/final")      # ModelSource(path=..., base="Salesforce/blip-...")
    model, processor, family = load_for_inference(source.path, device=pick_device("auto"), merge_adapter=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from caption_train.data.images import load_rgb
from caption_train.errors import UserError
from caption_train.hub import hub_problem
from caption_train.models import ModelFamily, resolve_family
from caption_train.models.base import quiet_transformers_bars

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, from the adapter's own config."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read it ({err})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path recorded; pass --base_model")
    return base


# ---------------------------------------------------------------------------- what MODEL is


@dataclass(frozen=True)
class ModelSource:
    """A model argument, resolved: a full model (folder or hub id), or a peft adapter folder plus its base model."""

    path: str
    base: str | None = None  # set for an adapter: the base model it was trained on (or --base_model)

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def _is_local_reference(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else is a path (same rule as the trainer's --model_name_or_path).
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).expanduser().exists()


def _hub_config_error(name: str) -> str | None:
    """None if `name` loads as a hub model config, else the reason it does not (no network, no such id, ...)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    return None


def _check_base_model(base: str, *, from_flag: bool, adapter_dir: Path) -> str:
    origin = "--base_model" if from_flag else f"base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}"
    if _is_local_reference(base):
        path = Path(base).expanduser()
        if (path / MODEL_CONFIG).is_file():
            return str(path)
        why = "no such folder" if not path.exists() else f"no {MODEL_CONFIG} there"
        raise UserError(f"adapter's base model not found: looked for {base} ({origin}: {why}); pass --base_model with the base model's folder or hub id")
    if (problem := hub_problem(base)) is not None:  # at once, not after minutes of retries
        raise UserError(f"adapter's base model {base} ({origin}) cannot be loaded: {problem}; or pass --base_model with the base model's folder")
    reason = _hub_config_error(base)
    if reason is not None:
        raise UserError(f"adapter's base model not found: looked for {base} ({origin}; hub: {reason}); pass --base_model with the base model's folder or hub id")
    return base


def resolve_model_source(model: str | Path, *, base_model: str | None = None, label: str = "MODEL") -> ModelSource:
    """Say what `model` is (adapter folder, model folder, hub id) or raise a one-line UserError naming what was tried."""
    name = str(model)
    if not name.strip():  # Path("") would mean the current directory
        raise UserError(f"{label} is empty; pass a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            base = base_model or adapter_base_model(path)
            return ModelSource(str(path), _check_base_model(base, from_flag=base_model is not None, adapter_dir=path))
        if (path / MODEL_CONFIG).is_file():
            return ModelSource(str(path))
        if (path / "final").is_dir():
            raise UserError(f"{label} {name}: this is a training run folder; pass its checkpoint, e.g. {path / 'final'}")
        raise UserError(f"{label} {name}: neither a peft adapter ({ADAPTER_CONFIG}) nor a model ({MODEL_CONFIG}); pass a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    if path.exists():
        raise UserError(f"{label} {name}: is a file; pass a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    if _is_local_reference(name):
        raise UserError(f"{label} {name}: no such folder; pass a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    if (problem := hub_problem(name)) is not None:  # at once, not after minutes of retries
        raise UserError(f"{label} {name}: not a local folder; as a hub id: {problem}")
    reason = _hub_config_error(name)
    if reason is not None:
        raise UserError(f"{label} {name}: not a local folder, and not loadable as a hub id ({reason}); check the path or id, or your network")
    return ModelSource(name)


# ---------------------------------------------------------------------------- device and dtype


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU, else Apple MPS, else the CPU; otherwise any torch device string (cuda:1, cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where it runs natively (a GPU with bf16, a CPU with AVX512-BF16/AMX), float16 on other GPUs,
    else float32 (see precision.inference_dtype)."""
    from caption_train.precision import inference_dtype

    return inference_dtype(name, device)


# ---------------------------------------------------------------------------- loading


@quiet_transformers_bars()  # the command's start-up lines and bar cover it
def load_for_inference(
    path: str | Path,
    *,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    merge_adapter: bool = False,
) -> tuple[torch.nn.Module, Any, ModelFamily]:
    """(model in eval mode, processor, family) for a peft adapter folder or a full model folder/hub id.

    merge_adapter=True folds LoRA/IA3 weights into the base (peft merge_and_unload): same outputs, faster generation.
    The weights load in `dtype` (default float32) straight away, never as a float32 copy first (half the memory of
    a bf16 model's float32 copy); an adapter's weights load in float32 (peft keeps them there), so its delta is
    computed in float32 and added to the base weights, rounding once. Then every weight (adapter, normalization
    layers, modules a model keeps in float32) is cast to `dtype`: captioning runs without autocast.
    """
    source = resolve_model_source(path, base_model=base_model)
    overrides = {} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")}
    if source.is_adapter:
        from peft import PeftModel

        family, _ = resolve_family(source.base)
        model, base_processor = family.load(source.base, overrides)
        model = PeftModel.from_pretrained(model, source.path)
        if merge_adapter:
            model = model.merge_and_unload()
        processor = load_processor(source.path, fallback=base_processor)
    else:
        family, _ = resolve_family(source.path)
        model, processor = family.load(source.path, overrides)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), processor, family


def load_processor(folder: str, *, fallback: Any) -> Any:
    """The processor saved beside an adapter (the one training used), or `fallback` (the base's) if there is none
    or only part of one (without its vocabulary, transformers would build an empty tokenizer)."""
    from transformers import AutoProcessor

    from caption_train.models.base import missing_processor_files

    if missing_processor_files(folder):
        return fallback
    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return fallback


@torch.no_grad()
def caption_paths(model: torch.nn.Module, processor: Any, family: ModelFamily, paths: Sequence[str | Path], *, batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
    """Greedy captions for image files, in order."""
    captions: list[str] = []
    for start in range(0, len(paths), batch_size):
        images = [load_rgb(p) for p in paths[start : start + batch_size]]
        captions += family.generate(model, processor, images, **generate_kwargs)
    return captions
