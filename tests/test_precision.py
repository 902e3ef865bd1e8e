"""The precision a run chooses is the one it computes in: `auto` on a CUDA GPU, and the autocast seen inside a
real training step's forward.

    python -m pytest -q tests/test_precision.py

No GPU here: the CUDA capability queries are patched (torch.cuda.is_available / is_bf16_supported /
get_device_name); what is tested is our resolve_precision / inference_dtype on their answers.
"""

from __future__ import annotations

import pytest
import torch

from caption_train.cli import main
from caption_train.errors import UserError
from caption_train.precision import inference_dtype, resolve_precision

from conftest import base_args


def a_gpu(monkeypatch, *, bf16: bool, name: str = "NVIDIA H200") -> None:
    """Make torch report one CUDA GPU named `name`, with or without bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: name)


def cpu_without_fast_bf16(monkeypatch) -> None:
    """So that the CPU's answer cannot stand in for the GPU's in the tests below."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_auto_picks_bf16_on_a_cuda_gpu_that_has_it(monkeypatch):
    cpu_without_fast_bf16(monkeypatch)
    a_gpu(monkeypatch, bf16=True)
    choice = resolve_precision("auto")  # asks torch whether CUDA is there
    assert choice.mode == "bf16" and "NVIDIA H200 supports bf16" in choice.describe()
    assert resolve_precision("auto", use_cuda=True).mode == "bf16"
    assert inference_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp16").mode == "fp16" and resolve_precision("no").mode == "no"  # asked for: given


def test_auto_on_a_cuda_gpu_without_bf16_stays_fp32_and_says_how_to_get_fp16(monkeypatch):
    cpu_without_fast_bf16(monkeypatch)
    a_gpu(monkeypatch, bf16=False, name="Tesla T4")
    choice = resolve_precision("auto")
    assert choice.mode == "no" and "--mixed_precision fp16" in choice.reason
    assert inference_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(UserError, match="this GPU does not support bf16"):
        resolve_precision("bf16")


def test_auto_without_a_gpu_follows_the_cpu(monkeypatch):
    """The GPU branch is taken only with a GPU: a CPU with native bf16 but no CUDA gets bf16 from the CPU's answer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    choice = resolve_precision("auto")
    assert choice.mode == "bf16" and "CPU with native bf16" in choice.reason


# ---------------------------------------------------------------------------- the autocast inside a training step


def autocast_seen_in_training(tmp_path, tiny_blip, shapes_dir, mixed_precision: str) -> set[tuple[bool, torch.dtype | None, torch.dtype]]:
    """Run `train` for one epoch and record, for every nn.Linear forward of a module in training mode (the text
    side; the frozen tower runs in eval mode), whether CPU autocast was on, its dtype, and the output's dtype."""
    seen: set[tuple[bool, torch.dtype | None, torch.dtype]] = set()

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training and isinstance(output, torch.Tensor):
            enabled = torch.is_autocast_enabled("cpu")
            seen.add((enabled, torch.get_autocast_dtype("cpu") if enabled else None, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        args = base_args(shapes_dir, tiny_blip, tmp_path / mixed_precision, "--mixed_precision", mixed_precision, "--num_sample_captions", "0",
                         "--save_every_n_epochs", "0", "--cache_image_features", "off")
        assert main(["train", *args]) == 0
    finally:
        handle.remove()
    return seen


def test_a_bf16_run_computes_its_training_forward_under_bf16_autocast(tmp_path, tiny_blip, shapes_dir, capsys):
    """--mixed_precision bf16 through `train`: the step's forward runs under CPU autocast in bf16 (its linear
    layers give bf16); --mixed_precision no runs without autocast, in fp32."""
    assert autocast_seen_in_training(tmp_path, tiny_blip, shapes_dir, "bf16") == {(True, torch.bfloat16, torch.bfloat16)}
    assert "precision: bf16 autocast (as asked)" in capsys.readouterr().out
    assert autocast_seen_in_training(tmp_path, tiny_blip, shapes_dir, "no") == {(False, None, torch.float32)}
