"""The training recipe: setup -> fit (train, validate, sample, save per epoch) -> final save, on accelerate.

    from caption_train.config import load_train_config
    final_dir = train(load_train_config(["--dataset_dir", "data", "--epochs", "3"]))

Runs unchanged on one CPU, one GPU, or several processes under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from caption_train import checkpoint
from caption_train.adapters import count_parameters, wrap_model
from caption_train.config import TrainConfig, resolved_lr, to_toml_dict
from caption_train.data.captions import CaptionTransform
from caption_train.data.dataset import CaptionDataset, drop_failed
from caption_train.data.scan import Sample, scan_dataset, split_validation
from caption_train.errors import UserError
from caption_train.models import ModelFamily, resolve_family
from caption_train.optim import build_optimizer, build_scheduler, current_lr, optimizer_steps_per_epoch
from caption_train.tracking import Tracker, make_tracker, plot_losses


class TrainingHooks:
    """Extension points called by the loop on every process (no-ops here). The interactive page plugs in here.

    Hooks run in the training thread, between optimizer steps, so they may pause, generate (use eval mode and
    no_grad, then restore train mode) or call `save(run, name, epoch=...)`. Under several processes every rank
    calls every hook: anything collective (a save, a pause) must be agreed, e.g. via broadcast_object_list.
    """

    def on_setup(self, run: "Run") -> None:
        pass

    def on_step_end(self, run: "Run", epoch: int) -> None:
        pass

    def on_epoch_end(self, run: "Run", epoch: int) -> None:
        pass

    def on_train_end(self, run: "Run") -> None:
        pass


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Any
    family: ModelFamily
    model: torch.nn.Module
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_dataset: CaptionDataset
    train_loader: Any
    val_loader: Any | None
    sample_items: list[Sample]
    steps_per_epoch: int
    total_steps: int
    run_dir: Path
    tracker: Tracker
    hooks: TrainingHooks
    global_step: int = 0


# ---------------------------------------------------------------------------------------------
# Setup


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    reset_accelerator_state()
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        # Seedable sampler: every process draws the same permutation per epoch, so the shards are disjoint.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def reset_accelerator_state() -> None:
    """Let a second `train()` in the same process choose other settings (tests, notebooks, the demo).

    accelerate keeps one process-wide state and refuses a different mixed_precision once it exists.
    Only in single-process runs: under torchrun the state belongs to the launcher's process group.
    """
    import os

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def collate_batch(items: list, *, family: ModelFamily, processor: Any, max_length: int) -> dict[str, torch.Tensor] | None:
    """Module-level (picklable) collate: drops images that failed to load, then lets the family build the batch."""
    items = drop_failed(items)
    if not items:
        return None
    images, captions, _paths = zip(*items)
    return family.collate(processor, images, captions, max_length=max_length)


def make_loader(dataset: CaptionDataset, cfg: TrainConfig, collate: Any, *, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
        pin_memory=torch.cuda.is_available(),
    )


def enable_gradient_checkpointing(model: torch.nn.Module, family: ModelFamily) -> None:
    """Checkpoint activations without hooking input embeddings.

    Non-reentrant checkpointing does not need inputs that require grad, so unlike the usual
    `enable_input_require_grads()` recipe a frozen vision tower stays out of the backward pass.
    Must run after peft wrapping: peft calls `enable_input_require_grads()` on models it finds checkpointed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def pick_sample_items(train: list[Sample], val: list[Sample], count: int) -> list[Sample]:
    """The fixed probe images captioned every epoch: validation images when there are any."""
    return (val or train)[:count]


def setup(cfg: TrainConfig, hooks: TrainingHooks) -> Run:
    from accelerate.utils import broadcast_object_list, set_seed

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if not main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per run, not one per process

    # ---- data (read-only; every process scans the same sorted list)
    scan = scan_dataset(Path(cfg.dataset_dir))
    if main:
        print(scan.summary(), flush=True)
    train_samples, val_samples = split_validation(scan.samples, cfg.validation_split, cfg.seed)

    # ---- model
    family, _ = resolve_family(cfg.model_name_or_path)
    model, processor = family.load(cfg.model_name_or_path, cfg.model_config, label_smoothing=cfg.label_smoothing)
    max_length = min(cfg.max_length, family.max_text_length(model))
    model = wrap_model(model, family, cfg.peft_module, cfg.peft_args)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, family)
    trainable, total = count_parameters(model)
    if main:
        print(f"model {cfg.model_name_or_path} ({family.name}), {cfg.peft_module}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)", flush=True)

    # ---- loaders
    collate = functools.partial(collate_batch, family=family, processor=processor, max_length=max_length)
    transform = CaptionTransform(shuffle=cfg.shuffle_captions, frozen_parts=cfg.frozen_parts, dropout=cfg.caption_dropout)
    train_dataset = CaptionDataset(train_samples, transform, seed=cfg.seed, random_flip=cfg.random_flip)
    train_loader = make_loader(train_dataset, cfg, collate, shuffle=True)
    val_loader = make_loader(CaptionDataset(val_samples), cfg, collate, shuffle=False) if val_samples else None

    # ---- optimization
    lr = resolved_lr(cfg)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=lr, args=cfg.optimizer_args)
    if val_loader is not None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # After prepare, len(train_loader) is this process's share of the batches.
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    # Not passed to accelerator.prepare: it would step the schedule once per process per step, while
    # total_steps above is already counted per process.
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, lr=lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch, args=cfg.scheduler_args)

    # ---- output (only now: bad input above must leave nothing behind)
    holder = [str(checkpoint.new_run_dir(Path(cfg.output_dir), cfg.training_name)) if main else None]
    broadcast_object_list(holder)
    run_dir = Path(holder[0])
    tracker = make_tracker(log_with=cfg.log_with, run_dir=run_dir, project=cfg.wandb_project, run_name=run_dir.name, config=to_toml_dict(cfg), enabled=main)
    if main:
        checkpoint.write_config(run_dir / checkpoint.CONFIG_NAME, to_toml_dict(cfg))
        print(f"run directory: {run_dir}", flush=True)
        print(f"{len(train_samples)} training / {len(val_samples)} validation images; {steps_per_epoch} optimizer steps per epoch x {cfg.epochs} epochs = {total_steps} steps", flush=True)

    return Run(
        cfg=cfg, accelerator=accelerator, family=family, model=model, processor=processor, optimizer=optimizer,
        scheduler=scheduler, train_dataset=train_dataset, train_loader=train_loader, val_loader=val_loader,
        sample_items=pick_sample_items(train_samples, val_samples, cfg.num_sample_captions),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, run_dir=run_dir, tracker=tracker, hooks=hooks,
    )


# ---------------------------------------------------------------------------------------------
# One epoch, validation, samples, saving


def train_one_epoch(run: Run, epoch: int, progress: tqdm) -> None:
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    model.train()
    window_loss, window_batches = 0.0, 0
    for batch in run.train_loader:
        if batch is None:  # every image in the batch failed to load (already warned about)
            continue
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                lrs = current_lr(optimizer)  # the LR this step uses, before the schedule moves on
                if run.cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), run.cfg.max_grad_norm)
            optimizer.step()  # a no-op inside an accumulation window (accelerate's wrapper)
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach().float()
        window_batches += 1
        if accelerator.sync_gradients:
            run.global_step += 1
            step_loss = accelerator.reduce(window_loss / window_batches, reduction="mean").item()
            window_loss, window_batches = 0.0, 0
            run.tracker.log({"train/loss": step_loss, "train/epoch": epoch + 1, **{f"train/{k}": v for k, v in lrs.items()}}, step=run.global_step)
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}", lr=f"{lrs.get('effective_lr', lrs['lr']):.2e}")
            if run.cfg.save_every_n_steps and run.global_step % run.cfg.save_every_n_steps == 0:
                save(run, f"step-{run.global_step}", epoch=epoch)
            run.hooks.on_step_end(run, epoch)


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """Mean caption loss over the validation split, in eval mode (dropout off), reduced over processes."""
    if run.val_loader is None:
        return None
    run.model.eval()
    total = torch.zeros(2, device=run.accelerator.device)  # (sum of batch losses, batch count)
    for batch in run.val_loader:
        if batch is None:
            continue
        total[0] += run.model(**batch).loss.float()
        total[1] += 1
    total = run.accelerator.reduce(total, reduction="sum")
    run.model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


@torch.no_grad()
def sample_captions(run: Run) -> list[dict[str, Any]]:
    """Caption the fixed probe images with the current weights (main process only, eval mode, greedy)."""
    if not run.sample_items or not run.accelerator.is_main_process:
        return []
    from caption_train.data.images import ImageLoadError, load_rgb

    model = run.accelerator.unwrap_model(run.model)
    model.eval()
    items = []
    for sample in run.sample_items:
        try:
            items.append((sample, load_rgb(sample.image_path)))
        except ImageLoadError:
            continue
    with run.accelerator.autocast():
        predictions = run.family.generate(model, run.processor, [image for _, image in items]) if items else []
    model.train()
    return [{"image": str(sample.image_path), "truth": sample.caption, "prediction": prediction} for (sample, _), prediction in zip(items, predictions)]


def save(run: Run, name: str, *, epoch: int) -> Path:
    """Write a checkpoint folder (main process only); every process waits so no one races ahead of the save."""
    target = run.run_dir / name
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "global_step": run.global_step,
            "epoch": epoch,
        }
        checkpoint.save_checkpoint(target, run.accelerator.unwrap_model(run.model), run.processor, to_toml_dict(run.cfg), state)
    run.accelerator.wait_for_everyone()
    return target


def end_of_epoch(run: Run, epoch: int) -> None:
    metrics: dict[str, float] = {"epoch": epoch + 1}
    val = validation_loss(run)
    if val is not None:
        metrics["val/loss"] = val
    rows = sample_captions(run)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.tracker.log(metrics, step=run.global_step)
        summary = f"epoch {epoch + 1}/{run.cfg.epochs}" + (f": validation loss {val:.4f}" if val is not None else "")
        tqdm.write(summary)
        for row in rows:
            tqdm.write(f"  {Path(row['image']).name}: truth {row['truth']!r} | model {row['prediction']!r}")
        if rows:
            run.tracker.log_samples(rows, step=run.global_step)
    if run.cfg.save_every_n_epochs and (epoch + 1) % run.cfg.save_every_n_epochs == 0:
        save(run, f"epoch-{epoch + 1}", epoch=epoch + 1)


# ---------------------------------------------------------------------------------------------
# The whole run


def train(cfg: TrainConfig, hooks: TrainingHooks | None = None) -> Path:
    run = setup(cfg, hooks or TrainingHooks())
    run.hooks.on_setup(run)
    main = run.accelerator.is_main_process
    progress = tqdm(total=run.total_steps, desc="training", unit="step", disable=not main, dynamic_ncols=True, file=sys.stderr)
    for epoch in range(cfg.epochs):
        run.train_dataset.set_epoch(epoch)  # new caption shuffles/dropouts/flips each epoch
        run.train_loader.set_epoch(epoch)  # new batch order each epoch
        train_one_epoch(run, epoch, progress)
        end_of_epoch(run, epoch)
        run.hooks.on_epoch_end(run, epoch)
    progress.close()
    run.hooks.on_train_end(run)
    final_dir = save(run, "final", epoch=cfg.epochs)
    if main:
        plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        run.tracker.finish()
    run.accelerator.end_training()
    if main:
        print(final_dir, flush=True)  # (contract) the last line printed is the path of final/
    return final_dir

