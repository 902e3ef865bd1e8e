"""FSDP: the shipped accelerate config is one accelerate's launcher understands, and a launch that asks for FSDP
where accelerate will not shard (CPU processes) is refused instead of silently replicating the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from caption_train.cli import main

from conftest import REPO, base_args

FSDP_CONFIG = REPO / "examples" / "accelerate_fsdp.yaml"
REFUSAL = "error: the launch config asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up"


def test_shipped_fsdp_config_is_full_shard_with_transformer_layer_wrap():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(FSDP_CONFIG))  # unknown top-level keys raise here
    assert config.distributed_type == DistributedType.FSDP and config.mixed_precision == "bf16" and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # The launcher copies fsdp_config keys onto its own options and ignores the rest: a misspelt key would be lost.
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(fsdp) <= options, set(fsdp) - options


def test_fsdp_asked_where_accelerate_does_not_shard_is_refused(capsys, monkeypatch, tmp_path, tiny_blip, shapes_dir):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports for distributed_type FSDP
    out = tmp_path / "runs"
    assert main(["train", *base_args(shapes_dir, tiny_blip, out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(REFUSAL)
    assert not out.exists()


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_on_cpu_processes_is_refused(tmp_path, tiny_blip, shapes_dir):
    """The real launcher with the shipped config on this CPU machine: two processes, which accelerate would run
    data-parallel with the whole model on each; both stop with the one-line reason before loading the model."""
    out = tmp_path / "runs"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--main_process_port", "0",
         str(REPO / "train2.py"), *base_args(shapes_dir, tiny_blip, out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert result.returncode != 0
    assert result.stderr.count(REFUSAL) == 2, result.stderr[-3000:]
    assert not out.exists()


def test_what_fsdp_does_not_do_yet_is_refused_in_one_line():
    from caption_train.config import load_train_config
    from caption_train.errors import UserError
    from caption_train.train import fsdp_limits

    fsdp_limits(load_train_config(["--dataset_dir", "d"]))  # the defaults are fine (auto cache: off under FSDP)
    with pytest.raises(UserError, match="--resume under FSDP is not supported yet"):
        fsdp_limits(load_train_config(["--dataset_dir", "d", "--resume", "auto"]))
    with pytest.raises(UserError, match="--cache_image_features memory under FSDP"):
        fsdp_limits(load_train_config(["--dataset_dir", "d", "--cache_image_features", "memory"]))


@pytest.mark.parametrize("adapter", ["LoRA", "none"])
def test_a_checkpoint_writes_the_gathered_weights_it_is_given(tmp_path, tiny_blip, adapter):
    """Under FSDP the model holds a shard and the trainer passes the gathered full state dict: that, not the
    model's own tensors, is what the checkpoint must hold (adapter weights only, for LoRA)."""
    import torch
    from safetensors.torch import load_file

    from caption_train import checkpoint
    from caption_train.adapters import wrap_model
    from caption_train.models.blip import BlipFamily

    family = BlipFamily()
    model, processor = family.load(str(tiny_blip), {})
    model = wrap_model(model, family, adapter, {})
    gathered = {name: torch.full_like(tensor, 0.25) for name, tensor in model.state_dict().items()}
    target = tmp_path / "step-1"
    checkpoint.begin_checkpoint(target)
    checkpoint.finish_checkpoint(checkpoint.temp_dir_for(target), target, model, processor, {}, {"global_step": 1}, weights=gathered)
    saved = load_file(target / ("adapter_model.safetensors" if adapter == "LoRA" else "model.safetensors"))
    assert saved and all(torch.all(tensor == 0.25) for tensor in saved.values())
    assert all("lora_" in name for name in saved) if adapter == "LoRA" else len(saved) > 50
