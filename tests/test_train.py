"""End to end through the real entry point on the tiny local BLIP: contract files, every optimizer x scheduler,
adapters, accumulation arithmetic, reproducibility, and that bad input writes nothing."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caption_train.cli import main
from caption_train.config import load_train_config
from caption_train.tracking import read_metrics

from conftest import REPO, base_args

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RUN_NAME = re.compile(r"^caption-train-\d{8}-\d{6}(-\d+)?$")


def train_cli(capsys, *args: str) -> tuple[Path, str]:
    """Run `caption-train train ARGS` in-process; return (final dir from the last stdout line, stdout)."""
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    final = Path(out.strip().splitlines()[-1])
    assert final.name == "final" and final.is_dir()
    return final, out


def train_losses(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in row]


def test_lora_run_writes_the_contract(capsys, tmp_path, tiny_blip, shapes_dir):
    out_dir = tmp_path / "runs"
    final, stdout = train_cli(capsys, *base_args(shapes_dir, tiny_blip, out_dir, "--epochs", "2", "--validation_split", "0.25"))
    run_dir = final.parent
    assert run_dir.parent == out_dir and RUN_NAME.match(run_dir.name)
    for name in ("epoch-1", "epoch-2", "final"):
        folder = run_dir / name
        for file in ("adapter_config.json", "adapter_model.safetensors", "config.toml", "training_state.pt", "processor_config.json", "tokenizer.json"):
            assert (folder / file).is_file(), f"{name}/{file}"
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "loss.png").stat().st_size > 1000
    assert not any(p.name.startswith(".") for p in run_dir.iterdir())  # no temp folders left behind

    # The saved config is the resolved one and loads back as a config file.
    cfg = load_train_config(["--config_file", str(final / "config.toml")])
    assert cfg.epochs == 2 and cfg.lr == 1e-4 and cfg.model_name_or_path == str(tiny_blip)

    # The adapter loads with peft's own loader onto the base model.
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    model = PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_blip), final)
    assert any("lora_" in n for n, _ in model.named_parameters())

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["val/loss"] for r in metrics if "val/loss" in r] and all(math.isfinite(r["val/loss"]) for r in metrics if "val/loss" in r)
    assert "truth 'a " in stdout and "| model '" in stdout  # sample captions printed each epoch
    state = torch.load(final / "training_state.pt", weights_only=False)
    assert state["global_step"] == len(train_losses(run_dir)) and state["epoch"] == 2


@pytest.mark.parametrize("scheduler", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR"])
@pytest.mark.parametrize("optimizer", ["AdamW", "Prodigy"])
def test_optimizer_scheduler_matrix(capsys, tmp_path, tiny_blip, shapes_dir, optimizer, scheduler):
    final, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--optimizer", optimizer, "--lr_scheduler", scheduler,
                                            "--epochs", "2", "--save_every_n_epochs", "0", "--num_sample_captions", "0"))
    rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 * math.ceil(24 / 8)
    assert all(math.isfinite(r["train/loss"]) and r["train/lr"] > 0 for r in rows)
    if optimizer == "Prodigy":
        assert all("train/prodigy_d" in r for r in rows)
    assert not (final.parent / "epoch-1").exists()


@pytest.mark.parametrize("module, weights", [("IA3", "adapter_model.safetensors"), ("none", "model.safetensors")])
def test_ia3_and_full_finetune(capsys, tmp_path, tiny_blip, shapes_dir, module, weights):
    final, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--peft_module", module))
    assert (final / weights).is_file()
    from caption_train.inference import load_for_inference

    model, processor, family = load_for_inference(final)
    assert family.name == "blip" and model.training is False


def test_accumulation_counts_optimizer_steps_and_schedule_ends_at_zero(capsys, tmp_path, tiny_blip, shapes_dir):
    # 24 images / batch 4 = 6 batches per epoch; accumulating 4 -> ceil(6 / 4) = 2 optimizer steps per epoch.
    final, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--batch_size", "4", "--gradient_accumulation_steps", "4",
                                            "--epochs", "3", "--lr", "1e-3", "--num_sample_captions", "0"))
    rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Cosine over exactly 6 steps: the LR used at step k is 1e-3 * (1 + cos(pi * (k-1) / 6)) / 2.
    expected = [1e-3 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert [r["train/lr"] for r in rows] == pytest.approx(expected, rel=1e-6)
    state = torch.load(final / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 6


def test_same_seed_same_losses_other_seed_differs(capsys, tmp_path, tiny_blip, shapes_dir):
    common = ("--shuffle_captions", "--caption_dropout", "0.3", "--random_flip", "0.5", "--epochs", "2", "--num_sample_captions", "0", "--save_every_n_epochs", "0")
    first, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path / "a", *common))
    second, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path / "b", *common))
    third, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path / "c", *common, "--seed", "7"))
    assert train_losses(first.parent) == train_losses(second.parent)
    assert train_losses(first.parent) != train_losses(third.parent)


def test_runs_never_overwrite_each_other(capsys, tmp_path, tiny_blip, shapes_dir):
    args = base_args(shapes_dir, tiny_blip, tmp_path, "--save_every_n_epochs", "0", "--num_sample_captions", "0")
    first, _ = train_cli(capsys, *args)
    second, _ = train_cli(capsys, *args)
    assert first != second and first.is_dir() and second.is_dir()


def test_step_checkpoints_and_options(capsys, tmp_path, tiny_blip, shapes_dir):
    final, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--save_every_n_steps", "2", "--epochs", "2",
                                            "--gradient_checkpointing", "--mixed_precision", "bf16", "--label_smoothing", "0.1",
                                            "--max_length", "6", "--model_config", "{hidden_dropout_prob = 0.1}"))
    assert sorted(p.name for p in final.parent.glob("step-*")) == ["step-2", "step-4", "step-6"]


def test_wandb_offline(capsys, tmp_path, tiny_blip, shapes_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final, _ = train_cli(capsys, *[a if a != "none" else "wandb" for a in base_args(shapes_dir, tiny_blip, tmp_path)])
    assert list((final.parent / "wandb").glob("offline-run-*")), "wandb offline run folder missing"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d, m: ["--dataset_dir", str(d / "missing")], "no such directory"),
        (lambda d, m: ["--dataset_dir", str(d / "file.txt")], "is a file, not a directory"),
        (lambda d, m: ["--dataset_dir", str(d / "empty")], "no usable image+caption pairs"),
        (lambda d, m: ["--model_name_or_path", str(d / "no_model")], "no such folder"),
        (lambda d, m: ["--model_name_or_path", str(d)], "no config.json"),
        (lambda d, m: ["--peft_args", "{target_modules = ['nothing_here']}"], "target_modules"),
        (lambda d, m: ["--lr_scheduler", "CyclicLR", "--scheduler_args", "{mode = 'zigzag'}"], "scheduler_args for CyclicLR"),
        (lambda d, m: ["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_blip, shapes_dir, mutate, expected):
    if torch.cuda.is_available() and "fp16" in expected:
        pytest.skip("fp16 is valid on a GPU")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "caption_without_image.txt").write_text("a red circle")
    (tmp_path / "file.txt").write_text("x")
    out_dir = tmp_path / "runs"
    args = base_args(shapes_dir, tiny_blip, out_dir) + mutate(tmp_path, tiny_blip)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert not out_dir.exists()


def test_train2_subprocess_prints_final_path_last(tmp_path, tiny_blip, shapes_dir):
    result = subprocess.run(
        [sys.executable, str(REPO / "train2.py"), *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--num_sample_captions", "0")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = Path(result.stdout.strip().splitlines()[-1])
    assert last.name == "final" and last.is_dir()
    assert "Traceback" not in result.stderr


def test_config_file_run(capsys, tmp_path, tiny_blip, shapes_dir):
    config = tmp_path / "run.toml"
    config.write_text(
        f'train_dir = "{shapes_dir}"\nmodel_name_or_path = "{tiny_blip}"\noutput_dir = "{tmp_path / "runs"}"\n'
        'epochs = 1\nbatch_size = 12\nnum_workers = 0\nlog_with = "none"\nnum_sample_captions = 0\ntraining_name = "from-toml"\n'
        '[peft_args]\nr = 4\nlora_alpha = 8\n[optimizer_args]\nweight_decay = 0.0\n',
        encoding="utf-8",
    )
    final, _ = train_cli(capsys, "--config_file", str(config))
    assert final.parent.name.startswith("from-toml-")
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.slow
def test_two_process_torchrun(tmp_path, tiny_blip, shapes_dir):
    """torchrun with 2 CPU processes (gloo): data sharded, one final/, metrics from the main process only."""
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "train2.py"), *base_args(shapes_dir, tiny_blip, out, "--batch_size", "4", "--epochs", "2", "--validation_split", "0.25")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list(out.iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on one run directory
    finals = list(out.glob("*/final"))
    assert len(finals) == 1 and (finals[0] / "adapter_model.safetensors").is_file()
    assert result.stdout.strip().splitlines()[-1] == str(finals[0])
    # 18 training images / (4 per batch x 2 processes) -> 3 optimizer steps per epoch (6 unsharded would be 5).
    rows = [r for r in read_metrics(runs[0] / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert len([r for r in read_metrics(runs[0] / "metrics.jsonl") if "val/loss" in r]) == 2


def test_caption_metrics_and_probe_panel_during_training(capsys, tmp_path, tiny_blip, shapes_dir):
    final, stdout = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "2", "--validation_split", "0.25",
                                                 "--eval_every_n_epochs", "1", "--eval_max_images", "4"))
    epoch_rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "val/loss" in r]
    assert len(epoch_rows) == 2
    for row in epoch_rows:
        for key in ("val/bleu4", "val/rougeL", "val/cider", "val/exact_match"):
            assert key in row and 0 <= row[key] <= 1000, (key, row)
    samples = [json.loads(line) for line in (final.parent / "samples.jsonl").read_text().splitlines()]
    assert {s["epoch"] for s in samples} == {1, 2} and len(samples) == 4  # 2 probe images x 2 epochs
    assert (final.parent / "samples.html").stat().st_size > 500


def test_eval_needs_a_validation_split():
    from caption_train.errors import UserError

    with pytest.raises(UserError, match="eval_every_n_epochs needs a validation split"):
        load_train_config(["--dataset_dir", "d", "--eval_every_n_epochs", "1"])
