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
from caption_train.models.base import unwrap_peft
from caption_train.tracking import read_metrics
from caption_train.hooks import TrainingHooks
from caption_train.train import train

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


def cosine(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


def expected_schedule(name: str, lr: float, *, steps_per_epoch: int, total: int) -> list[float]:
    """The LR used at steps 1..total, written from each schedule's definition (not from torch's classes)."""
    if name == "CosineAnnealingLR":  # T_max = total steps, down to 0
        return [cosine(lr, 0.0, k / total) for k in range(total)]
    if name == "CosineAnnealingWarmRestarts":  # T_0 = one epoch: back to lr at each epoch start
        return [cosine(lr, 0.0, (k % steps_per_epoch) / steps_per_epoch) for k in range(total)]
    if name == "CyclicLR":  # triangle between lr/10 and lr, half an epoch up (1 step here) and as long down
        up = max(1, steps_per_epoch // 2)
        return [lr / 10 + (lr - lr / 10) * (1 - abs((k % (2 * up)) / up - 1)) for k in range(total)]
    if name == "OneCycleLR":  # from lr/25 up to lr over 30% of the steps, then down to lr/25/1e4 (cosine both ways)
        start, low, peak = lr / 25, lr / 25 / 1e4, 0.3 * total - 1
        return [cosine(start, lr, k / peak) if k <= peak else cosine(lr, low, (k - peak) / (total - 1 - peak)) for k in range(total)]
    raise AssertionError(name)


@pytest.mark.parametrize("scheduler", ["CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR"])
@pytest.mark.parametrize("optimizer", ["AdamW", "Prodigy"])
def test_optimizer_scheduler_matrix(capsys, tmp_path, tiny_blip, shapes_dir, optimizer, scheduler):
    final, _ = train_cli(capsys, *base_args(shapes_dir, tiny_blip, tmp_path, "--optimizer", optimizer, "--lr_scheduler", scheduler,
                                            "--epochs", "2", "--save_every_n_epochs", "0", "--num_sample_captions", "0"))
    rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 * math.ceil(24 / 8)
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    # The LR in force at each step follows the schedule's formula with the README's defaults (Prodigy's lr is a
    # multiplier, 1.0): 2 epochs x 3 steps.
    lr = 1.0 if optimizer == "Prodigy" else 1e-4
    assert [r["train/lr"] for r in rows] == pytest.approx(expected_schedule(scheduler, lr, steps_per_epoch=3, total=6), rel=1e-6)
    if optimizer == "Prodigy":
        assert all("train/prodigy_d" in r for r in rows)
    assert not (final.parent / "epoch-1").exists()


def fixed_batch(tiny_blip: Path, shapes_dir: Path) -> dict[str, torch.Tensor]:
    """Four dataset images with their captions, collated as training collates them."""
    from transformers import BlipProcessor

    from caption_train.data.images import load_rgb
    from caption_train.models.blip import BlipFamily

    images = sorted(shapes_dir.rglob("*.png"))[:4]
    captions = [image.with_suffix(".txt").read_text().strip() for image in images]
    return BlipFamily().collate(BlipProcessor.from_pretrained(tiny_blip), [load_rgb(i) for i in images], captions, max_length=32)


# Where a test compares training-time outputs with a float32 reload, training runs in float32 too (no autocast).
FP32 = ("--mixed_precision", "no")


class CaptureTrained(TrainingHooks):
    """As training ends: the trained model's parameters and its logits on a fixed batch (eval mode)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def on_train_end(self, run):
        model = run.model
        self.params = {name: p.detach().clone() for name, p in unwrap_peft(model).named_parameters()}
        model.eval()
        with torch.no_grad():
            self.logits = model(**self.batch).logits
        model.train()


def test_ia3_trains_only_its_vectors_and_the_adapter_reproduces_the_model(tmp_path, tiny_blip, shapes_dir):
    from transformers import BlipForConditionalGeneration

    from caption_train.inference import load_for_inference

    capture = CaptureTrained(fixed_batch(tiny_blip, shapes_dir))
    # A high LR so that the trained model's outputs are far from the base model's: "reproduces" then means something.
    final = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--peft_module", "IA3", "--lr", "0.1", "--num_sample_captions", "0", *FP32)), hooks=capture)
    base_model = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    with torch.no_grad():
        assert (base_model(**capture.batch).logits - capture.logits).abs().max() > 1e-2
    base = dict(base_model.named_parameters())
    ia3 = {name: p for name, p in capture.params.items() if ".ia3_l." in name}
    # IA3's scaling vectors on the text decoder's keys/values/feed-forward (the vision tower is not a default
    # target), each moved from its initial 1.0 ...
    assert any(".key." in n for n in ia3) and any(".output.dense." in n for n in ia3)
    assert all("text_decoder" in n for n in ia3)
    assert all(not torch.equal(p, torch.ones_like(p)) for p in ia3.values()), [n for n, p in ia3.items() if torch.equal(p, torch.ones_like(p))]
    # ... and every base weight exactly as loaded.
    others = {name.replace(".base_layer.", "."): p for name, p in capture.params.items() if name not in ia3}
    assert others.keys() == base.keys()
    assert all(torch.equal(p, base[name]) for name, p in others.items())

    from safetensors.torch import load_file

    assert all(".ia3_l" in key for key in load_file(str(final / "adapter_model.safetensors")))
    model, _, family = load_for_inference(final)
    assert family.name == "blip" and model.training is False
    with torch.no_grad():
        torch.testing.assert_close(model(**capture.batch).logits, capture.logits, rtol=1e-5, atol=1e-5)


def test_full_finetune_trains_every_weight_and_saves_the_trained_model(tmp_path, tiny_blip, shapes_dir):
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration

    from caption_train.inference import load_for_inference

    capture = CaptureTrained(fixed_batch(tiny_blip, shapes_dir))
    final = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--peft_module", "none", "--lr", "1e-3", "--num_sample_captions", "0", *FP32)), hooks=capture)
    base = dict(BlipForConditionalGeneration.from_pretrained(tiny_blip).named_parameters())
    assert capture.params.keys() == base.keys()
    unchanged = [name for name, p in capture.params.items() if torch.equal(p, base[name])]
    # Every weight of both towers and the LM head moved (AdamW with weight decay moves anything with a gradient).
    assert not [n for n in unchanged if n.startswith(("vision_model.embeddings", "vision_model.encoder", "text_decoder.bert.encoder"))], unchanged

    saved = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(saved[name], p) for name, p in capture.params.items() if name in saved)
    assert len(saved) >= len(capture.params) - 2  # tied weights may be stored once
    model, _, family = load_for_inference(final)
    assert family.name == "blip" and model.training is False
    with torch.no_grad():
        torch.testing.assert_close(model(**capture.batch).logits, capture.logits, rtol=1e-5, atol=1e-5)


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


class CountDecoderLayerCalls(TrainingHooks):
    """Counts forward calls of the first text decoder layer's attention with autograd on (training, not
    generation). Inside the layer: the checkpoint wraps the layer's whole call, so its own hooks fire once either way."""

    def __init__(self):
        self.calls = 0

    def on_setup(self, run):
        attention = unwrap_peft(run.model).text_decoder.bert.encoder.layer[0].attention
        attention.register_forward_hook(lambda module, inputs, output: setattr(self, "calls", self.calls + torch.is_grad_enabled()))


@pytest.mark.parametrize("flag, calls_per_batch", [((), 1), (("--gradient_checkpointing",), 2)])
def test_gradient_checkpointing_recomputes_activations(tmp_path, tiny_blip, shapes_dir, flag, calls_per_batch):
    """Checkpointed layers drop their activations in the forward pass and run again during backward."""
    counter = CountDecoderLayerCalls()
    train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--num_sample_captions", "0", "--save_every_n_epochs", "0", *flag)), hooks=counter)
    assert counter.calls == 3 * calls_per_batch  # 24 images / batch 8 = 3 batches


class SmoothedLoss(TrainingHooks):
    """The loaded model's loss on a fixed batch, with its logits, before training changes anything."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def on_setup(self, run):
        model = run.model
        model.eval()
        with torch.no_grad():
            output = model(**self.batch)
        model.train()
        self.loss, self.logits = output.loss, output.logits


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label-smoothed next-token CE written out: (1 - eps) * NLL(target) + eps * mean over the vocabulary of -log p,
    averaged over the target positions (labels shifted by one, -100 left out)."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -log_probs.mean(-1)
    return ((1 - epsilon) * nll + epsilon * uniform)[keep].mean()


def test_label_smoothing_flag_smooths_the_training_loss(tmp_path, tiny_blip, shapes_dir):
    batch = fixed_batch(tiny_blip, shapes_dir)
    probe = SmoothedLoss(batch)
    train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--label_smoothing", "0.3", "--num_sample_captions", "0", "--save_every_n_epochs", "0")), hooks=probe)
    expected = smoothed_cross_entropy(probe.logits, batch["labels"], 0.3)
    assert float(probe.loss) == pytest.approx(float(expected), rel=1e-5)
    # The random model is near uniform, so smoothing moves its loss by only ~0.3%: still 100x the tolerance above.
    assert abs(float(expected) - float(smoothed_cross_entropy(probe.logits, batch["labels"], 0.0))) > 1e-3 * float(expected)


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
        (lambda d, m: ["--prompt", "Describe the image."], "the blip family trains without a prompt"),
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
                                                 "--peft_module", "none", "--lr", "3e-3",  # learns enough in 2 epochs for non-zero scores
                                                 "--eval_every_n_epochs", "1", "--eval_max_images", "4", *FP32))
    epoch_rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "val/loss" in r]
    assert len(epoch_rows) == 2
    # Each epoch's scores are those of that epoch's checkpoint captioning the first 4 validation images.
    from caption_train.data.scan import scan_dataset, split_validation
    from caption_train.evaluate import validation_scores
    from caption_train.inference import load_for_inference

    _, val_samples = split_validation(scan_dataset(shapes_dir).samples, 0.25, 42)
    for row, checkpoint in zip(epoch_rows, ("epoch-1", "epoch-2")):
        model, processor, family = load_for_inference(final.parent / checkpoint)
        expected = validation_scores(model, processor, family, val_samples[:4], batch_size=8)
        assert set(expected) == {"val/bleu4", "val/rougeL", "val/cider", "val/exact_match"}
        assert {key: row[key] for key in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9), (checkpoint, row)
    assert any(row["val/cider"] > 0 for row in epoch_rows)  # the captions share words with the truth: not vacuous
    samples = [json.loads(line) for line in (final.parent / "samples.jsonl").read_text().splitlines()]
    assert {s["epoch"] for s in samples} == {1, 2} and len(samples) == 4  # 2 probe images x 2 epochs
    assert (final.parent / "samples.html").stat().st_size > 500


def test_eval_needs_a_validation_split():
    from caption_train.errors import UserError

    with pytest.raises(UserError, match="eval_every_n_epochs needs a validation split"):
        load_train_config(["--dataset_dir", "d", "--eval_every_n_epochs", "1"])
