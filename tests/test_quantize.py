"""--quantize (QLoRA via bitsandbytes): the configs it builds, how it reaches from_pretrained through the family,
and the one-line errors where it cannot run. The CUDA training path itself needs a GPU with bitsandbytes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from caption_train.config import load_train_config
from caption_train.errors import UserError
from caption_train.models import resolve_family
from caption_train.quantize import quantization_config, quantization_load_kwargs, quantize_problem

from conftest import REPO

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def test_4bit_config_is_nf4_with_double_quantization():
    config = quantization_config("4bit", dtype=torch.bfloat16)
    assert type(config).__name__ == "BitsAndBytesConfig"
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("4bit", dtype=torch.float16).bnb_4bit_compute_dtype == torch.float16


def test_8bit_config_and_none():
    config = quantization_config("8bit")
    assert config.load_in_8bit and not config.load_in_4bit
    assert quantization_config("none") is None and quantization_load_kwargs("none") == {}
    assert quantization_load_kwargs("8bit")["quantization_config"].load_in_8bit


def test_quantize_with_full_fine_tune_is_a_config_error():
    with pytest.raises(UserError, match="quantize 4bit .*peft_module none"):
        load_train_config(["--dataset_dir", "d", "--quantize", "4bit", "--peft_module", "none"])
    assert load_train_config(["--dataset_dir", "d", "--quantize", "8bit"]).quantize == "8bit"


def test_unknown_quantize_value_is_a_config_error():
    with pytest.raises(UserError, match="choose one of none, 4bit, 8bit"):
        load_train_config(["--dataset_dir", "d", "--quantize", "3bit"])


def test_missing_bitsandbytes_says_what_to_install():
    problem = quantize_problem("4bit", has_cuda=True, has_bitsandbytes=False)
    assert "pip install" in problem and "bitsandbytes" in problem
    assert quantize_problem("8bit", has_cuda=True, has_bitsandbytes=True) is None
    assert quantize_problem("none", has_cuda=False, has_bitsandbytes=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_no_cuda_is_one_line_before_any_model_is_loaded(tmp_path, shapes_dir):
    out = tmp_path / "runs"
    # A model folder that does not exist: had anything tried to load it first, the error would be about it.
    argv = ["--dataset_dir", str(shapes_dir), "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(out),
            "--quantize", "4bit", "--log_with", "none"]
    result = subprocess.run([sys.executable, str(REPO / "train2.py"), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --quantize 4bit needs a CUDA GPU (bitsandbytes); this machine has none: drop --quantize or run on a GPU"]
    assert not out.exists()


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="checks what transformers says when bitsandbytes is missing")
def test_quantization_config_reaches_from_pretrained_through_the_family(tiny_blip):
    # Through the family's load like any model_config load kwarg: transformers itself then asks for bitsandbytes
    # (a family that dropped it would load unquantized, or reject it as an unknown config key).
    family, _ = resolve_family(str(tiny_blip))
    with pytest.raises(ImportError, match="bitsandbytes"):
        family.load(str(tiny_blip), quantization_load_kwargs("4bit"))
