"""Load what training wrote (a run's final/ or epoch-N/, a merged model, or any model) and caption images.

    model, processor, family = load_for_inference("runs/x-20261126-120000/final")
    captions = caption_paths(model, processor, family, ["a.png", "b.png"], batch_size=16)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from caption_train.data.images import load_rgb
from caption_train.errors import UserError
from caption_train.models import ModelFamily, resolve_family

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, from the adapter's own config."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read it ({err})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path recorded; pass the base model explicitly")
    return base


def load_for_inference(path: str | Path, *, base_model: str | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, ModelFamily]:
    """(model in eval mode, processor, family) for a peft adapter folder or a full model folder/hub id."""
    path_str = str(path)
    adapter = Path(path_str) / ADAPTER_CONFIG
    if adapter.is_file():
        from peft import PeftModel

        base = base_model or adapter_base_model(Path(path_str))
        family, _ = resolve_family(base)
        model, _ = family.load(base, {})
        model = PeftModel.from_pretrained(model, path_str)
        # The processor saved beside the adapter is the one training used.
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path_str)
    else:
        family, _ = resolve_family(path_str)
        model, processor = family.load(path_str, {})
    return model.to(device).eval(), processor, family


@torch.no_grad()
def caption_paths(model: torch.nn.Module, processor: Any, family: ModelFamily, paths: Sequence[str | Path], *, batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
    """Greedy captions for image files, in order."""
    captions: list[str] = []
    for start in range(0, len(paths), batch_size):
        images = [load_rgb(p) for p in paths[start : start + batch_size]]
        captions += family.generate(model, processor, images, **generate_kwargs)
    return captions
