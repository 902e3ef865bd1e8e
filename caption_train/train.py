"""The training recipe: setup -> fit (train, validate, sample, save per epoch) -> final save, on accelerate.

    from caption_train.config import load_train_config
    final_dir = train(load_train_config(["--dataset_dir", "data", "--epochs", "3"]))

Runs unchanged on one CPU, one GPU, or several processes under `torchrun` / `accelerate launch`.
Resumable (`--resume auto|PATH`), and stops cleanly on SIGINT / SIGTERM with a checkpoint to resume from.
Hooks (caption_train.hooks.TrainingHooks) get the run's events with a RunView, the narrow HookRun protocol over
the loop's state; the loop knows no particular hooks (the `train` command builds the interactive page's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from caption_train import checkpoint, resume
from caption_train.adapters import count_parameters, describe_adapters, load_adapter_for_training, wrap_model
from caption_train.config import TrainConfig, resolved_lr, to_toml_dict
from caption_train.data.batching import GroupingPlan, PaddingTally, estimate_row_lengths, padding_line, plan_grouping
from caption_train.data.captions import CaptionTransform
from caption_train.data.dataset import CaptionDataset, drop_failed
from caption_train.data.scan import CAPTION_NOT_UTF8, EMPTY_CAPTION, UNREADABLE_CAPTION, Sample, scan_dataset, split_validation
from caption_train.errors import UserError
from caption_train.features import CachePlan, FeatureCache, plan_feature_cache, vision_is_frozen
from caption_train.hooks import HookedTracker, SampleLoss, TrainingHooks
from caption_train.lint import TrainingView, summarize_scan
from caption_train.memory import MemoryPlan, answer_out_of_memory, plan_memory
from caption_train.models import ModelFamily, resolve_family
from caption_train.models.base import CaptionLoss, quiet_transformers_bars, unwrap_peft
from caption_train.optim import build_optimizer, build_scheduler, current_lr, optimizer_steps_per_epoch
from caption_train.packing import PackingPlan, plan_packing
from caption_train.precision import Precision, enable_fast_gpu_matmul, resolve_precision
from caption_train.quantize import check_quantize_runnable, describe_quantization, prepare_quantized_for_training, quantization_load_kwargs
from caption_train.sample_losses import (LOSSES_FILE, ServedLoss, add_epoch, append_epoch, epoch_lines, epoch_note, latest_losses,
                                         read_sample_losses, truncate_losses)
from caption_train.text import plural, printable
from caption_train.tracking import Tracker, make_tracker, plot_losses
from caption_train.weights import WeightsPlan, describe_weights, keep_in_fp32, plan_weights


class TrainingStopped(UserError):
    """The run ended early on purpose (signal) or by necessity (diverged); a checkpoint was saved first."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """SIGINT / SIGTERM handler: the first signal asks the loop to stop after the current optimizer step
    (and save); a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. train() called from a worker thread): no handlers
                return

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the save
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this optimizer step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


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
    val_samples: list[Sample]
    steps_per_epoch: int
    total_steps: int
    run_dir: Path
    tracker: Tracker
    hooks: TrainingHooks
    resumed_from: Path | None = None
    features: FeatureCache | None = None  # image features of a frozen vision tower, computed once
    memory: MemoryPlan | None = None  # the start-up memory estimate, whose suggestions answer an out-of-memory error
    grouping: GroupingPlan | None = None  # the training batches' order: length-grouped or random (data/batching.py)
    packing: PackingPlan = field(default_factory=lambda: PackingPlan(False, ""))  # rows packed without padding (packing.py)
    padding: PaddingTally = field(default_factory=PaddingTally)  # padding in the batches this run trained on, until reported
    sample_new_tokens: int | None = None  # how long a probe caption may get (None: the family's default)
    timings: "Timings" = field(default_factory=lambda: Timings())
    # ---- position, saved in every checkpoint
    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of that epoch already consumed by this process
    nonfinite_streak: int = 0
    stop: StopRequest = field(default_factory=StopRequest)
    stop_agreed: int = 0  # signal number all processes agreed to stop on (0 = keep going)
    last_batch: dict[str, torch.Tensor] | None = None
    # This epoch's training batches so far, per sample: (batch number in the epoch, image paths, each item's Served,
    # each row's summed caption cross-entropy and its target-token count; detached, on the device), this process's
    # share. See keep_batch_losses; they become sample_losses.jsonl's lines at the end of the epoch.
    batch_losses: list[tuple[int, list[str], list[Any], torch.Tensor, torch.Tensor]] = field(default_factory=list)
    carried_losses: list[ServedLoss] = field(default_factory=list)  # the epoch's rows before the step checkpoint resumed from
    losses_size: int = 0  # bytes of sample_losses.jsonl written (main process): a checkpoint records it, resume cuts back to it
    losses_epoch: int = 0  # the last epoch (1-based) whose lines are in sample_losses.jsonl
    skipped_captions: int = 0  # images the scan skipped for an empty or unreadable caption: never ranked, counted
    progress: Any = None  # the training bar, once run_training made it (a hook's pause is taken off its clock)
    # The latest caption loss per training image (path relative to dataset_dir), for hooks (HookRun.sample_losses),
    # and every epoch's (sample_losses.jsonl; a resumed run reads its earlier epochs back from the file). Filled when
    # an epoch's per-image losses are in, before on_epoch_end.
    sample_losses: dict[str, SampleLoss] = field(default_factory=dict)
    sample_loss_history: dict[str, list[SampleLoss]] = field(default_factory=dict)  # every epoch's, oldest first

    @functools.cached_property
    def view(self) -> "RunView":
        """What the hooks see of this run."""
        return RunView(self)


class RunView:
    """The run as hooks see it: caption_train.hooks.HookRun over the loop's Run, and nothing more (the hooks,
    the interactive page among them, never touch the Run itself)."""

    def __init__(self, run: Run):
        self._run = run

    @property
    def run_dir(self) -> Path:
        return self._run.run_dir

    @property
    def dataset_dir(self) -> Path:
        return Path(self._run.cfg.dataset_dir)

    @property
    def samples(self) -> list[Sample]:
        return [sample for dataset in self._datasets() for sample in dataset.samples]

    @property
    def probe_samples(self) -> list[Sample]:
        return list(self._run.sample_items)

    @property
    def epoch(self) -> int:
        return self._run.epoch

    @property
    def epochs(self) -> int:
        return self._run.cfg.epochs

    @property
    def step(self) -> int:
        return self._run.global_step

    @property
    def total_steps(self) -> int:
        return self._run.total_steps

    @property
    def is_main_process(self) -> bool:
        return self._run.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self._run.accelerator.num_processes

    @property
    def stop_requested(self) -> bool:
        return bool(self._run.stop.signum)

    @property
    def model(self) -> torch.nn.Module:
        return self._run.accelerator.unwrap_model(self._run.model)

    def sample_losses(self) -> dict[str, SampleLoss]:
        return dict(self._run.sample_losses)

    def sample_loss_history(self) -> dict[str, list[SampleLoss]]:
        return {image: list(rows) for image, rows in self._run.sample_loss_history.items()}

    def follow_captions(self, live_file: Path) -> None:
        for dataset in self._datasets():
            dataset.follow(live_file)

    def caption(self, paths: Sequence[str | Path], images: Sequence[Any]) -> list[str]:
        return generate_captions(self._run, [str(path) for path in paths], list(images))

    def save(self, name: str) -> Path:
        return save(self._run, name, epoch=self._run.epoch)

    def agree(self, value: Any) -> Any:
        if self._run.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        holder = [value]
        broadcast_object_list(holder, from_process=0)
        return holder[0]

    def paused_for(self, seconds: float) -> None:
        leave_out_of_bar(self._run.progress, seconds)

    def request_stop(self) -> None:
        self._run.stop.signum = self._run.stop.signum or int(signal.SIGINT)

    def _datasets(self) -> list[CaptionDataset]:
        """The training dataset, and the validation one when there is one (accelerate's loader wraps it)."""
        val = getattr(self._run.val_loader, "dataset", None) if self._run.val_loader is not None else None
        return [self._run.train_dataset] + ([val] if isinstance(val, CaptionDataset) else [])


def leave_out_of_bar(bar: Any, seconds: float) -> None:
    """Take `seconds` (a pause) off the bar's clock: its elapsed time, rate and ETA then count training only.

    tqdm's rate is a moving average of (steps, seconds since the last print); moving both the start and the last
    print forward keeps the pause out of both. (`tqdm.unpause` would also drop the training time between the
    bar's last print and the pause.)
    """
    if bar is None or getattr(bar, "disable", True) or seconds <= 0:
        return
    bar.start_t += seconds
    bar.last_print_t += seconds
    bar.refresh()


class Timings:
    """Wall-clock seconds per part of the run, for the one-line breakdown printed at the end."""

    PARTS = ("set-up", "training", "evaluation/samples", "saving")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._open: list[list] = []  # [name, started] of the parts in progress, innermost last

    @contextlib.contextmanager
    def part(self, name: str):
        """Time a part; a part inside another (a step checkpoint during training) counts only for itself."""
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[name] += now - self._open.pop()[1]
            if self._open:
                self._open[-1][1] = now

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        other = max(0.0, total - sum(self.seconds.values()))
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        return f"time: {parts}, other {other:.1f} s; total {total:.1f} s"


def make_accelerator(cfg: TrainConfig, precision: Precision) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    reset_accelerator_state()
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=precision.mode,
        cpu=not cuda,
        # Seedable sampler: every process draws the same permutation per epoch, so the shards are disjoint.
        # non_blocking: host-to-GPU copies from pinned memory overlap with compute.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=cuda),
    )
    check_fsdp_granted(accelerator)
    return accelerator


def check_fsdp_granted(accelerator: Any) -> None:
    """An FSDP launch config that accelerate did not honour is an error, not a silent DDP (or single-process) run.

    accelerate 1.x turns FSDP on only for GPU-like devices: on CPU processes it ignores ACCELERATE_USE_FSDP and
    replicates the whole model on every process, which is not what a user sharding a too-large model asked for.
    """
    from accelerate.utils import DistributedType, parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(f"the launch config asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up {accelerator.distributed_type.value} "
                        "instead: it shards with FSDP on GPUs only; run on GPUs, or drop the FSDP config (torchrun runs CPU processes data-parallel)")


def is_sharded(accelerator: Any) -> bool:
    """FSDP: each process holds a shard of the weights, so whole-model work needs every process."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_limits(cfg: TrainConfig) -> None:
    """What the trainer does not do under FSDP yet, refused in one line rather than run wrong. (Written from
    accelerate's and torch's documented APIs; no FSDP run was possible where this was built: see the README.)"""
    if cfg.resume:
        raise UserError("--resume under FSDP is not supported yet (its checkpoints hold no optimizer state); "
                        "start a new run with --model_name_or_path set to a checkpoint's folder")
    if cfg.cache_image_features in ("memory", "disk"):
        raise UserError(f"--cache_image_features {cfg.cache_image_features} under FSDP: the vision tower is sharded, "
                        "so it cannot run outside the model's forward; use auto or off")


def reset_accelerator_state() -> None:
    """Let a second `train()` in the same process choose other settings (tests, notebooks, the demo).

    accelerate keeps one process-wide state and refuses a different mixed_precision once it exists.
    Only in single-process runs: under torchrun the state belongs to the launcher's process group.
    """
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def collate_batch(items: list, *, family: ModelFamily, processor: Any, max_length: int, prompt: str | None) -> dict[str, Any] | None:
    """Module-level (picklable) collate: drops images that failed to load, then lets the family build the batch.

    The batch also carries `image_paths`, `pixel_rows` (which rows have pixel_values: an image whose features are
    cached is not loaded) and, for CaptionDataset's items, `served` (each row's data.dataset.Served: its dataset
    index and caption text's hash, for its per-image loss); `model_inputs` turns it into the model's keyword arguments.
    """
    items = drop_failed(items)
    if not items:
        return None
    images, captions, paths = zip(*(item[:3] for item in items))
    batch = family.collate(processor, images, captions, max_length=max_length, prompt=prompt)
    batch["pixel_rows"] = torch.tensor([row for row, image in enumerate(images) if image is not None], dtype=torch.long)
    batch["image_paths"] = list(paths)
    if len(items[0]) > 3:  # CaptionDataset's items say which sample and caption text each row is (per-image losses)
        batch["served"] = [item[3] for item in items]
    return batch


def model_inputs(run: "Run", batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a collated batch: cached image features in place of pixels when the
    feature cache is on, else the batch as the family built it."""
    paths = batch.pop("image_paths")
    batch.pop("served", None)
    if run.features is None:
        batch.pop("pixel_rows")
    else:
        # The tower is run directly, outside the (DDP-wrapped) model's forward: it has no trainable parameter to sync.
        batch = run.features.model_inputs(batch, paths, model=run.accelerator.unwrap_model(run.model), family=run.family,
                                          processor=run.processor, autocast=run.accelerator.autocast)
    # Packed after the cache: its image features follow each row's image tokens, which packing keeps in order.
    return run.packing.pack(run.accelerator.unwrap_model(run.model), batch)


def make_loader(dataset: CaptionDataset, cfg: TrainConfig, collate: Any, *, shuffle: bool, batch_sampler: Any = None) -> torch.utils.data.DataLoader:
    """Random batches (seeded) when `shuffle`, else in order; or `batch_sampler`'s (length-grouped) batches."""
    if batch_sampler is not None:  # (no persistent_workers either: see below)
        # A generator of its own: without one, each epoch's iterator draws its workers' base seed from the global RNG,
        # which a resumed run (restoring that RNG mid-epoch, then making the iterator again) would draw twice.
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=cfg.num_workers, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(cfg.seed), pin_memory=torch.cuda.is_available())
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.num_workers,
        # No persistent_workers: each worker keeps its own copy of the dataset, so it would keep the epoch
        # (caption shuffles, cached-image set) it was started with.
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
        pin_memory=torch.cuda.is_available(),
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint activations without hooking input embeddings.

    Non-reentrant checkpointing does not need inputs that require grad, so unlike the usual
    `enable_input_require_grads()` recipe a frozen vision tower stays out of the backward pass.
    Must run after peft wrapping: peft calls `enable_input_require_grads()` on models it finds checkpointed.
    """
    base = unwrap_peft(model)
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers hooks the input embeddings anyway when the model's main input is input_ids. Unneeded here, and
    # harmful: the hooked output becomes a leaf that requires grad, and models that add position embeddings to it
    # in place (GIT) then fail.
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()


PROBE_MIN_NEW_TOKENS = 8


def probe_new_tokens(caption_tokens: list[int] | None) -> int | None:
    """How many tokens a probe caption may take: the longest training caption's (as the start-up summary
    tokenized them, special tokens included) and a quarter more. A model that has not learned to stop yet costs no
    more than a caption per probe image, and long captions are not cut at a fixed length. None without counts."""
    if not caption_tokens:
        return None
    longest = max(caption_tokens)
    return max(PROBE_MIN_NEW_TOKENS, longest + (longest + 3) // 4)


def pick_sample_items(train: list[Sample], val: list[Sample], count: int) -> list[Sample]:
    """The fixed probe images captioned every epoch: validation images when there are any."""
    return (val or train)[:count]


# ---------------------------------------------------------------------------------------------
# Setup


@quiet_transformers_bars()  # the start-up lines cover it
def load_model(cfg: TrainConfig, family: ModelFamily, resume_dir: Path | None, weights: WeightsPlan) -> tuple[torch.nn.Module, Any]:
    """The model to train: fresh adapters on the base model, or the checkpoint's weights when resuming; its weights
    in the dtypes `weights` plans (frozen ones in bf16 under bf16 autocast, what trains and norms in fp32)."""
    if resume_dir is not None and cfg.peft_module == "none":
        return family.load(str(resume_dir), weights.load_overrides(cfg.model_config))
    # --quantize and the weights' dtype reach from_pretrained through the family like any load kwarg
    # (models/base.pop_load_kwargs).
    overrides = weights.load_overrides(cfg.model_config) | quantization_load_kwargs(cfg.quantize)
    model, processor = family.load(cfg.model_name_or_path, overrides)
    model = prepare_quantized_for_training(model)
    if resume_dir is not None:
        model = load_adapter_for_training(model, resume_dir)
    else:
        model = wrap_model(model, family, cfg.peft_module, cfg.peft_args)
    keep_in_fp32(model, weights)
    return model, processor


def open_run_dir(cfg: TrainConfig, resume_dir: Path | None, main: bool) -> Path:
    """A new run folder, or the resumed run's own; every process gets the main process's answer."""
    from accelerate.utils import broadcast_object_list

    if resume_dir is not None:
        return resume_dir.parent
    holder = [str(checkpoint.new_run_dir(Path(cfg.output_dir), cfg.training_name)) if main else None]
    broadcast_object_list(holder)
    return Path(holder[0])


def setup(cfg: TrainConfig, hooks: TrainingHooks) -> Run:
    from accelerate.utils import set_seed

    precision = resolve_precision(cfg.mixed_precision)
    check_quantize_runnable(cfg.quantize)
    enable_fast_gpu_matmul()
    accelerator = make_accelerator(cfg, precision)
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if not main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per run, not one per process

    sharded = is_sharded(accelerator)
    if sharded:
        fsdp_limits(cfg)
    # ---- what to resume (checked before anything heavy is loaded)
    resume_dir = resume.resolve_resume(cfg)
    if resume_dir is not None:
        # Structural changes (another model among them) are refused before that model is looked up; the notes on
        # other changes come below, once the prompt is resolved.
        resume.check_config_compatible(cfg, resume_dir)
    family, _ = resolve_family(cfg.model_name_or_path)
    # The prompt trained with, resolved (checked before the model loads) and recorded in every config.toml, so that
    # caption/evaluate use it, and a resumed run keeps it, even if the family's default changes in a later version.
    prompt, prompt_origin = resume.given_prompt(cfg, resume_dir)
    cfg = dataclasses.replace(cfg, prompt=family.training_prompt(prompt))
    state: dict[str, Any] = {}
    if resume_dir is not None:
        notes = resume.check_config_compatible(cfg, resume_dir)
        state = resume.load_state(resume_dir)
        if main:
            print(f"resuming from {resume_dir} (step {state['global_step']}, epoch {state['epoch'] + 1}, batch {state['batches_done']})", flush=True)
            for note in notes:
                print(f"  config changed: {note}", flush=True)
    elif cfg.resume == "auto" and main:
        print(f"--resume auto: no checkpoint of a run named {cfg.training_name!r} in {cfg.output_dir}; starting a new run", flush=True)

    # ---- data (read-only; every process scans the same sorted list). One walk that reads captions and at most
    # 256 image headers, so start-up does not grow with the dataset: the loader skips (and names) any other broken
    # image. The split is over distinct images; repeat folders repeat training samples only.
    scan = scan_dataset(Path(cfg.dataset_dir), probe=False, spot_check=256)
    train_samples, val_samples = split_validation(scan.samples, cfg.validation_split, cfg.seed)

    # ---- model
    weights = plan_weights(precision.mode, peft_module=cfg.peft_module, quantize=cfg.quantize, model_config=cfg.model_config, sharded=sharded)
    model, processor = load_model(cfg, family, resume_dir, weights)
    max_length = min(cfg.max_length, family.max_text_length(model))
    if main:  # the dataset summary, from the scan above: skips, repeat folders, caption lengths (and what this run
        # truncates, from its own collate), unknown characters, the diffusion checks
        view = TrainingView(model=cfg.model_name_or_path, family=family, processor=processor, prompt=cfg.prompt, requested=cfg.max_length,
                            origin="this run's max_length", model_limit=family.max_text_length(model))
        report = summarize_scan(scan, repeats=cfg.kohya_repeats, training=view)
        for line in report.summary_lines():
            print(line, flush=True)
    if cfg.freeze_vision_tower:
        family.vision_tower(model).requires_grad_(False)
    if vision_is_frozen(family, model):
        family.freeze_vision_tower(model)  # eval mode, no autograd; accepts cached features
    trainable, total = count_parameters(model)
    if sharded:
        plan = CachePlan("off", "image features: computed every step (FSDP shards the vision tower)")
    else:
        # Under autocast, as in training: a chat VLM's plan runs its tower once, on weights that may mix bf16 and fp32.
        with accelerator.autocast():
            plan = plan_feature_cache(requested=cfg.cache_image_features, family=family, model=model, processor=processor,
                                      n_images=len(train_samples) + len(val_samples), random_flip=cfg.random_flip,
                                      mixed_precision=precision.mode, cache_dir=cfg.cache_dir, dataset_dir=cfg.dataset_dir,
                                      sample_image=str(train_samples[0].image_path) if train_samples else None)
    if cfg.full_logits:
        family.use_full_logits(model)
    if main:
        adapter = "full fine-tune" if cfg.peft_module == "none" else cfg.peft_module
        print(f"model {cfg.model_name_or_path} ({family.name}), {adapter}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)", flush=True)
        print(family.prompt_line(prompt, prompt_origin) + ("; recorded in the run's config.toml" if cfg.prompt is not None else ""), flush=True)
        if (targets := describe_adapters(model)) is not None:
            print(targets, flush=True)
        print(precision.describe(), flush=True)
        print(describe_weights(model, weights), flush=True)
        if (quantized := describe_quantization(cfg.quantize)) is not None:
            print(quantized, flush=True)
        print(plan.message, flush=True)
        if (note := family.loss_note(model)) is not None:
            print(note, flush=True)
        if cfg.compile:
            print("compiled: text decoder (torch.compile; the first steps are slow while it compiles)", flush=True)

    # ---- loaders
    collate = functools.partial(collate_batch, family=family, processor=processor, max_length=max_length, prompt=cfg.prompt)
    transform = CaptionTransform(shuffle=cfg.shuffle_captions, frozen_parts=cfg.frozen_parts, dropout=cfg.caption_dropout)
    train_dataset = CaptionDataset(train_samples, transform, seed=cfg.seed, random_flip=cfg.random_flip, repeat=cfg.kohya_repeats)
    packing = plan_packing(cfg.packing, family, model, batch_size=cfg.batch_size)
    grouping = plan_grouping(cfg.group_by_length, train_dataset, batch_size=cfg.batch_size, seed=cfg.seed, packed=packing.on,
                             saved=state.get("batch_order", {}) if state else None,
                             estimate=lambda: estimate_row_lengths(train_samples, family=family, processor=processor, prompt=cfg.prompt, max_length=max_length))
    if main:
        print(packing.message, flush=True)
        print(grouping.message, flush=True)
    train_loader = make_loader(train_dataset, cfg, collate, shuffle=True, batch_sampler=grouping.sampler)
    val_loader = make_loader(CaptionDataset(val_samples), cfg, collate, shuffle=False) if val_samples else None

    # ---- optimization
    lr = resolved_lr(cfg)
    model.to(accelerator.device)  # before the optimizer: fused AdamW needs its parameters on the GPU already
    # The memory plan's probe step runs here: on the device, before the optimizer (which allocates its state at its
    # first step) and before compiling. It turns gradient checkpointing on when asked, or (auto) when needed.
    memory = plan_memory(cfg, model=model, family=family, processor=processor, samples=train_samples, collate=collate,
                         accelerator=accelerator, lr=lr, enable_checkpointing=enable_gradient_checkpointing, sharded=sharded)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=memory.checkpointing if memory else cfg.gradient_checkpointing is True)
    if main and memory is not None:
        for line in memory.lines():
            print(line, flush=True)
    if cfg.compile:
        family.text_model(model).compile()  # in place: parameter names and checkpoints stay as they are
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), lr=lr, args=cfg.optimizer_args)
    if val_loader is not None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if state:
        resume.restore_optimizer(optimizer, state, lr=lr, args=cfg.optimizer_args)
    # After prepare, len(train_loader) is this process's share of the batches.
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    # Not passed to accelerator.prepare: it would step the schedule once per process per step, while
    # total_steps above is already counted per process.
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, lr=lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch, args=cfg.scheduler_args)
    if state:
        resume.fast_forward(scheduler, state["global_step"])

    # ---- output (only now: bad input above must leave nothing behind)
    run_dir = open_run_dir(cfg, resume_dir, main)
    if main and state:
        resume.truncate_metrics(run_dir / "metrics.jsonl", state["metrics_rows"])
    tracker = make_tracker(log_with=cfg.log_with, run_dir=run_dir, project=cfg.wandb_project, run_name=run_dir.name, config=to_toml_dict(cfg), enabled=main)
    if main:
        if not state:
            checkpoint.write_config(run_dir / checkpoint.CONFIG_NAME, to_toml_dict(cfg))
        print(f"run directory: {run_dir}", flush=True)
        repeated = f" ({len(train_dataset)} with repeats)" if len(train_dataset) != len(train_samples) else ""
        print(f"{len(train_samples)} training{repeated} / {plural(len(val_samples), 'validation image')}; {plural(steps_per_epoch, 'optimizer step')} per epoch x {plural(cfg.epochs, 'epoch')} = {plural(total_steps, 'step')}", flush=True)

    run = Run(
        cfg=cfg, accelerator=accelerator, family=family, model=model, processor=processor, optimizer=optimizer,
        scheduler=scheduler, train_dataset=train_dataset, train_loader=train_loader, val_loader=val_loader,
        # Under FSDP the main process alone cannot generate with a sharded model: no probe panel.
        sample_items=[] if sharded else pick_sample_items(train_samples, val_samples, cfg.num_sample_captions), val_samples=val_samples,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, run_dir=run_dir, tracker=tracker, hooks=hooks,
        resumed_from=resume_dir, features=plan.build(), memory=memory, grouping=grouping, packing=packing,
        sample_new_tokens=probe_new_tokens(report.tokens) if main else None,
    )
    if state:
        run.global_step, run.epoch, run.batches_done = state["global_step"], state["epoch"], state["batches_done"]
        run.nonfinite_streak = state.get("nonfinite_streak", 0)
        # Last, so nothing above consumes random numbers the uninterrupted run did not.
        if not resume.restore_rng(resume_dir, accelerator.process_index) and main:
            print(f"  note: {resume_dir} has no RNG state for process {accelerator.process_index} (process count changed); dropout noise will differ", flush=True)
    run.skipped_captions = sum(scan.skipped[reason] for reason in (EMPTY_CAPTION, CAPTION_NOT_UTF8, UNREADABLE_CAPTION))
    restore_sample_losses(run, state)
    return run


def restore_sample_losses(run: Run, state: dict[str, Any]) -> None:
    """A resumed run: sample_losses.jsonl cut back to what its checkpoint had seen written (a crashed or stopped
    run's later lines are written again), every epoch's losses read back from it for the hooks (the file is the
    source of truth), and the losses of the epoch in progress that the checkpoint kept (a step checkpoint)."""
    if not state:
        return
    saved = state.get("sample_losses", {})  # (a checkpoint from before per-image losses has none: nothing written then)
    path = run.run_dir / LOSSES_FILE
    if run.accelerator.is_main_process:
        truncate_losses(path, saved.get("bytes", 0))
    run.accelerator.wait_for_everyone()  # no process reads the file before it is cut back
    if path.is_file():
        run.losses_size = path.stat().st_size
        run.sample_loss_history = read_sample_losses(path)
        run.sample_losses = latest_losses(run.sample_loss_history)
        run.losses_epoch = max((line.epoch for line in run.sample_losses.values()), default=0)
    if saved.get("epoch") == run.epoch:
        run.carried_losses = [ServedLoss(*row) for row in saved.get("rows", [])]


# ---------------------------------------------------------------------------------------------
# One epoch, one optimizer step


def epoch_batches(run: Run, epoch: int) -> Any:
    """This epoch's loader, past the batches a resumed checkpoint had already consumed."""
    run.train_dataset.set_epoch(epoch)  # new caption shuffles/dropouts/flips each epoch
    skip_cached_images(run, run.train_loader)
    run.train_loader.set_epoch(epoch)  # new batch order each epoch (the same on every process)
    if run.batches_done:
        return run.accelerator.skip_first_batches(run.train_loader, run.batches_done)
    return run.train_loader


def skip_cached_images(run: Run, loader: Any) -> None:
    """Call before a loader's iterator is made: images whose features are cached are not decoded, and once every
    image of the loader is cached there is nothing left for worker processes to do but tokenize a few captions, so
    the batches are made in-process (on a small CPU the workers would only compete with the training step)."""
    if run.features is None or loader is None or run.family.variable_image_features:
        return  # (chat VLMs load every image: its size sets how many placeholders the prompt holds)
    dataset = loader.dataset
    dataset.skip_image = run.features.skip_predicate()
    in_process = run.features.covers(str(s.image_path) for s in dataset.samples)
    # accelerate's prepared loader wraps a plain DataLoader (base_dataloader), which is the one that starts workers.
    getattr(loader, "base_dataloader", loader).num_workers = 0 if in_process else run.cfg.num_workers


def train_one_epoch(run: Run, epoch: int, progress: tqdm) -> None:
    """Train until the epoch ends or all processes agree to stop."""
    accelerator, model = run.accelerator, run.model
    model.train()
    run.batch_losses = []
    window = torch.zeros(3, device=accelerator.device)  # this step's (sum of finite losses, batches, non-finite batches)
    for batch in epoch_batches(run, epoch):
        run.batches_done += 1
        weight, paths, served = 1.0, [], []
        if batch is None:
            # Every image of this batch was unreadable or excluded. Under DDP this process must still join the
            # gradient all-reduce, so it replays its previous batch with zero weight instead of skipping.
            if run.last_batch is None:
                continue
            batch, weight = run.last_batch, 0.0
        else:
            paths, served = batch["image_paths"], batch.get("served", [])
            run.padding.add(batch, packed=run.packing.on)
            batch = model_inputs(run, batch)
        run.last_batch = batch
        with accelerator.accumulate(model):
            result = run.family.caption_loss(model, batch, label_smoothing=run.cfg.label_smoothing)
            loss = result.loss
            if weight:
                keep_batch_losses(run, paths, served, result)
            # Backward even when the loss is not finite: under DDP every process must join the gradient
            # all-reduce. The step is then skipped for everyone.
            accelerator.backward(loss * weight)
            finite = bool(torch.isfinite(loss))
            if weight:
                window += torch.stack([loss.detach().float() if finite else torch.zeros((), device=window.device),
                                       torch.ones((), device=window.device), torch.tensor(0.0 if finite else 1.0, device=window.device)])
            if accelerator.sync_gradients:
                optimizer_step(run, window, epoch, progress)
                window.zero_()
        if run.stop_agreed:
            return


def keep_batch_losses(run: Run, paths: list[str], served: list[Any], result: CaptionLoss) -> None:
    """Keep a training batch's per-image losses: its image paths and samples (data.dataset.Served) beside each row's
    summed plain (unsmoothed) token cross-entropy and target count, from the forward the step ran anyway. The
    tensors stay on the device (no sync per step); record_epoch_losses reads them once per epoch."""
    if served:
        run.batch_losses.append((run.batches_done, paths, served, result.row_loss_sum, result.row_tokens))


def epoch_rows(run: Run) -> list[ServedLoss]:
    """Every process's per-sample losses of the epoch in progress so far, on every process (collective when there
    are several: one gather), after those a resumed step checkpoint kept."""
    mine: list[ServedLoss] = []
    if run.batch_losses:
        sums = torch.cat([entry[3] for entry in run.batch_losses]).tolist()  # one device-to-host copy per epoch
        tokens = torch.cat([entry[4] for entry in run.batch_losses]).tolist()
        served = [(batch, path, item) for batch, paths, items, _, _ in run.batch_losses for path, item in zip(paths, items)]
        mine = [ServedLoss(item.index, path, item.caption_sha1, loss, count, batch)
                for (batch, path, item), loss, count in zip(served, sums, tokens, strict=True)]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = [ServedLoss(*row) for row in gather_object([tuple(row) for row in mine])]
    return run.carried_losses + mine


def record_epoch_losses(run: Run, epoch: int) -> None:
    """The epoch's per-image caption losses: appended to sample_losses.jsonl (main process), handed to the hooks
    (every process, before on_epoch_end), a one-line note. Collective."""
    if run.losses_epoch >= epoch + 1:  # a run resumed after this epoch's lines were written (a hook's save at its end)
        return
    lines = epoch_lines(epoch_rows(run), epoch=epoch + 1, dataset_dir=run.cfg.dataset_dir)
    run.batch_losses, run.carried_losses = [], []
    if run.accelerator.is_main_process:
        run.losses_size = append_epoch(run.run_dir / LOSSES_FILE, lines)
        tqdm.write(epoch_note(lines, epoch=epoch + 1, images=len(run.train_dataset.samples), skipped_captions=run.skipped_captions))
    add_epoch(run.sample_loss_history, lines)
    run.sample_losses = latest_losses(run.sample_loss_history)
    run.losses_epoch = epoch + 1


def optimizer_step(run: Run, window: torch.Tensor, epoch: int, progress: tqdm) -> None:
    """Step (or skip a non-finite step), log, then checkpoint / stop as agreed by all processes."""
    accelerator, optimizer = run.accelerator, run.optimizer
    # One collective per step carries the loss, the non-finite count and any stop request, so all agree.
    stop_flag = torch.tensor([float(run.stop.signum)], device=window.device)
    totals = accelerator.reduce(torch.cat([window, stop_flag]), reduction="sum")
    loss_sum, batches, nonfinite, stop = totals.tolist()
    lrs = current_lr(optimizer)  # the LR this step uses, before the schedule moves on
    if nonfinite == 0:
        if run.cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
        optimizer.step()
        run.nonfinite_streak = 0
    else:
        run.nonfinite_streak += 1
        if accelerator.is_main_process:
            tqdm.write(f"warning: non-finite loss at step {run.global_step + 1} ({int(nonfinite)} of {int(batches)} batches); step skipped, gradients dropped", file=sys.stderr)
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()  # also on skipped non-finite steps, so the schedule keeps its length
    optimizer.zero_grad(set_to_none=True)
    run.global_step += 1

    finite_batches = batches - nonfinite
    step_loss = loss_sum / finite_batches if finite_batches else float("nan")
    run.tracker.log({"train/loss": step_loss, "train/epoch": epoch + 1, **{f"train/{k}": v for k, v in lrs.items()}}, step=run.global_step)
    progress.update(1)
    progress.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}", lr=f"{lrs.get('effective_lr', lrs['lr']):.2e}")

    if run.nonfinite_streak >= run.cfg.max_nonfinite_steps:
        path = save(run, f"step-{run.global_step}", epoch=epoch)
        raise TrainingStopped(
            f"training diverged: {run.nonfinite_streak} optimizer steps in a row had a non-finite loss (last at step {run.global_step}); "
            f"the last good weights are in {path}; lower --lr or --max_grad_norm, or check the data", exit_code=3)
    if run.cfg.save_every_n_steps and run.global_step % run.cfg.save_every_n_steps == 0:
        save(run, f"step-{run.global_step}", epoch=epoch)
    run.hooks.on_step_end(run.view, epoch)
    if stop:
        run.stop_agreed = run.stop.signum or int(signal.SIGTERM)


@torch.no_grad()
def validation_loss(run: Run) -> float | None:
    """Mean caption loss over the validation split, in eval mode (dropout off), reduced over processes."""
    if run.val_loader is None:
        return None
    run.model.eval()
    skip_cached_images(run, run.val_loader)
    total = torch.zeros(2, device=run.accelerator.device)  # (sum of batch losses, batch count)
    for batch in run.val_loader:
        if batch is None:
            continue
        total[0] += run.family.caption_loss(run.model, model_inputs(run, batch), label_smoothing=run.cfg.label_smoothing).loss.float()
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

    items = []
    for sample in run.sample_items:
        try:
            items.append((sample, load_rgb(sample.image_path)))
        except ImageLoadError:
            continue
    if not items:
        return []
    predictions = generate_captions(run, [str(sample.image_path) for sample, _ in items], [image for _, image in items],
                                    max_new_tokens=run.sample_new_tokens)
    return [{"image": str(sample.image_path), "truth": sample.caption, "prediction": prediction} for (sample, _), prediction in zip(items, predictions)]


@torch.no_grad()
def generate_captions(run: Run, paths: list[str], images: list[Any], *, max_new_tokens: int | None = None) -> list[str]:
    """Caption images with the current weights (eval mode, then the model's mode as it was): the run's prompt and
    autocast, and the cached image features when the cache is on. Probe captions and hooks' "caption now"."""
    model = run.accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    try:
        features = probe_features(run, model, paths)
        with run.accelerator.autocast():
            return run.family.generate(model, run.processor, images, prompt=run.cfg.prompt, max_new_tokens=max_new_tokens,
                                       **({} if features is None else {"features": features}))
    finally:
        model.train(was_training)


def save(run: Run, name: str, *, epoch: int, batches_done: int | None = None) -> Path:
    """Write a checkpoint folder atomically. Collective: every process calls it (each saves its RNG state).

    `epoch` / `batches_done` say where a resumed run continues: the epoch in progress and the batches of it
    already consumed (default: the loop's current position).
    """
    with run.timings.part("saving"):
        return _save(run, name, epoch=epoch, batches_done=batches_done)


def _save(run: Run, name: str, *, epoch: int, batches_done: int | None) -> Path:
    accelerator = run.accelerator
    target = run.run_dir / name
    if target.exists():  # e.g. a resumed run reaching an epoch it had already saved
        return target
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.begin_checkpoint(target)
    accelerator.wait_for_everyone()
    tmp = checkpoint.temp_dir_for(target)
    checkpoint.write_rng_state(tmp, accelerator.process_index)
    # Under FSDP every process joins in gathering the full weights (the main process gets them); the optimizer
    # state is sharded too and is not saved, so such a checkpoint is for weights, not for --resume.
    weights = accelerator.get_state_dict(run.model) if is_sharded(accelerator) else None
    batches_done = run.batches_done if batches_done is None else batches_done
    # Mid-epoch, the epoch's per-image losses so far (small: a few numbers per sample), so that a run resumed here
    # still writes one line per image for this epoch.
    partial = [tuple(row) for row in epoch_rows(run)] if batches_done and run.losses_epoch < epoch + 1 else []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "optimizer": None if weights is not None else run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),  # for inspection; resume rebuilds and fast-forwards it
            "global_step": run.global_step,
            "epoch": epoch,
            "batches_done": batches_done,
            "nonfinite_streak": run.nonfinite_streak,
            "metrics_rows": count_lines(run.run_dir / "metrics.jsonl"),
            "sample_losses": {"bytes": run.losses_size, "epoch": epoch, "rows": partial},
            "num_processes": accelerator.num_processes,
            "batch_order": run.grouping.state() if run.grouping is not None else {"lengths": None},
        }
        checkpoint.finish_checkpoint(tmp, target, accelerator.unwrap_model(run.model), run.processor, to_toml_dict(run.cfg), state, weights=weights)
        if name.startswith("step-") and run.cfg.save_total_limit:
            checkpoint.prune_step_checkpoints(run.run_dir, run.cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return target


def printable_name(path: str) -> str:
    """A file name safe to print on a strict UTF-8 console (names on disk need not be valid UTF-8)."""
    return printable(Path(path).name)


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def caption_metrics(run: Run, epoch: int) -> dict[str, float]:
    """BLEU-4 / ROUGE-L / CIDEr-D / exact match (/ tag F1) of generated captions on the validation split,
    every eval_every_n_epochs. Collective: each process captions its share."""
    cfg = run.cfg
    if not (cfg.eval_every_n_epochs and (epoch + 1) % cfg.eval_every_n_epochs == 0 and run.val_samples):
        return {}
    from caption_train.captioning import GenerationOptions
    from caption_train.evaluate import validation_scores

    # With the run's --prompt, as the probe panel and `caption` use it: the scores are of what training teaches.
    return validation_scores(run.accelerator.unwrap_model(run.model), run.processor, run.family,
                             run.val_samples[: cfg.eval_max_images or None], GenerationOptions(prompt=cfg.prompt),
                             batch_size=cfg.batch_size, accelerator=run.accelerator)


def probe_features(run: Run, model: torch.nn.Module, paths: list[str]) -> torch.Tensor | None:
    """The probe images' features from the feature cache (computed and stored the first time), so that captioning
    them after every epoch costs the text side only; None without the cache."""
    if run.features is None:
        return None
    return run.features.features_for(paths, model=model, family=run.family, processor=run.processor,
                                     autocast=run.accelerator.autocast, device=run.accelerator.device)


def report_padding(run: Run, epoch: int) -> dict[str, float]:
    """Once, after the first epoch this run trained: the share of padding in the batches the model saw, over all
    processes, printed in one line and returned for the metrics. Collective."""
    if run.padding.reported:
        return {}
    pad, total = run.accelerator.reduce(run.padding.counts().to(run.accelerator.device), reduction="sum").tolist()
    run.padding.reported = True
    how = "grouped by length" if run.grouping is not None and run.grouping.sampler is not None else "random batches"
    how = f"packed, {how}" if run.packing.on else how
    if run.accelerator.is_main_process:
        tqdm.write(padding_line(pad, total, epoch + 1, how))
    return {"train/padding_fraction": pad / total if total else 0.0}


def end_of_epoch(run: Run, epoch: int) -> None:
    metrics: dict[str, float] = {"epoch": epoch + 1}
    metrics.update(report_padding(run, epoch))
    with run.timings.part("evaluation/samples"):
        val = validation_loss(run)
        scores = caption_metrics(run, epoch)
        rows = sample_captions(run)
    if val is not None:
        metrics["val/loss"] = val
    metrics.update(scores)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        from caption_train.evaluate import record_samples
        from caption_train.metrics import METRIC_LABELS

        run.tracker.log(metrics, step=run.global_step)
        summary = f"epoch {epoch + 1}/{run.cfg.epochs}" + (f": validation loss {val:.4f}" if val is not None else "")
        summary += "".join(f", {METRIC_LABELS.get(name[4:], name[4:])} {value:.1f}" for name, value in scores.items())
        tqdm.write(summary)
        for row in rows:
            tqdm.write(f"  {printable_name(row['image'])}: truth {row['truth']!r} | model {row['prediction']!r}")
        if rows:
            run.tracker.log_samples(rows, step=run.global_step)  # a wandb Table when wandb is on
            record_samples(run.run_dir, rows, epoch=epoch + 1, step=run.global_step)  # samples.jsonl + samples.html
    if run.cfg.save_every_n_epochs and (epoch + 1) % run.cfg.save_every_n_epochs == 0:
        save(run, f"epoch-{epoch + 1}", epoch=epoch + 1, batches_done=0)


def stop_early(run: Run, epoch: int) -> None:
    """Save where we are, tell the user how to continue, and leave with 130 (SIGINT) / 143 (SIGTERM)."""
    path = save(run, f"step-{run.global_step}", epoch=epoch)
    run.tracker.finish()
    signum = run.stop_agreed
    if run.accelerator.is_main_process:
        print(f"stopped at step {run.global_step}/{run.total_steps} (epoch {epoch + 1}); checkpoint: {path}", flush=True)
        print(f"resume with the same command plus: --resume auto   (or --resume {path})", flush=True)
    raise TrainingStopped(f"training interrupted by {signal.Signals(signum).name}; resumable checkpoint saved in {path}", exit_code=128 + signum)


# ---------------------------------------------------------------------------------------------
# The whole run


def train(cfg: TrainConfig, hooks: TrainingHooks | None = None) -> Path:
    """Train and return final/. `hooks` get the run's events (caption_train.hooks); they are closed on return.

    The loop knows no particular hooks: the `train` command builds the interactive page's from --interactive
    (cli.make_hooks). Called directly with cfg.interactive set and no hooks, it refuses rather than train without
    the page that was asked for.
    """
    if hooks is None:
        if cfg.interactive is not None:
            raise UserError(f"interactive = {cfg.interactive!r}: train(cfg) does not start the page itself; "
                            "pass hooks=caption_train.cli.make_hooks(cfg), or run `caption-train train` / train2.py")
        hooks = TrainingHooks()
    try:
        return run_training(cfg, hooks)
    finally:
        hooks.close()


def run_training(cfg: TrainConfig, hooks: TrainingHooks) -> Path:
    timings = Timings()
    with timings.part("set-up"):
        run = setup(cfg, hooks)
    run.timings = timings
    main = run.accelerator.is_main_process
    if run.resumed_from is not None and run.resumed_from.name == "final" and run.epoch >= cfg.epochs:
        if main:
            print(f"{run.resumed_from.parent.name} already finished; nothing to resume", flush=True)
            print(run.resumed_from, flush=True)
        run.tracker.finish()
        return run.resumed_from
    run.stop.install()
    if main:  # the hooks see every metrics line and the probe captions as they are logged
        run.tracker = HookedTracker(run.tracker, run.hooks)
    try:
        run.hooks.on_setup(run.view)
        progress = tqdm(total=run.total_steps, initial=run.global_step, desc="training", unit="step", disable=not main, dynamic_ncols=True, file=sys.stderr)
        run.progress = progress
        for epoch in range(run.epoch, cfg.epochs):
            run.epoch = epoch
            # An allocator failure becomes one line with the memory plan's suggestions, not a traceback.
            with timings.part("training"), answer_out_of_memory(run.memory, step=lambda: run.global_step + 1, on_error=progress.close):
                train_one_epoch(run, epoch, progress)
            if run.stop_agreed:
                progress.close()
                stop_early(run, epoch)
            with timings.part("saving"):
                record_epoch_losses(run, epoch)
            end_of_epoch(run, epoch)
            run.hooks.on_epoch_end(run.view, epoch)
            run.batches_done = 0
        progress.close()
        run.hooks.on_train_end(run.view)
        final_dir = finish(run)
    finally:
        run.stop.uninstall()
    if main:
        if run.features is not None:
            print(f"image features: {run.features.hits} read from the cache, {run.features.misses} computed", flush=True)
        print(timings.summary(), flush=True)
        print(final_dir, flush=True)  # (contract) the last line printed is the path of final/
    return final_dir


def finish(run: Run) -> Path:
    """Save final/ (moving an older final/ of a resumed-and-extended run aside), plot, close trackers."""
    final_dir = run.run_dir / "final"
    if final_dir.exists() and run.accelerator.is_main_process:
        final_dir.rename(run.run_dir / f"final-step-{checkpoint.checkpoint_step(final_dir)}")
    run.accelerator.wait_for_everyone()
    final_dir = save(run, "final", epoch=run.cfg.epochs, batches_done=0)
    with run.timings.part("saving"):  # the plot and the tracker's last sync count as writing the run's output
        if run.accelerator.is_main_process:
            plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        run.tracker.finish()
    run.accelerator.end_training()
    return final_dir
