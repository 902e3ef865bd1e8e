"""The training-hook protocol: what a hook sees of a run, what it may do, and the events the loop calls.

    from caption_train.hooks import TrainingHooks

    class CaptionEveryHundredSteps(TrainingHooks):
        def on_step_end(self, run, epoch):
            if run.step % 100 == 0 and run.is_main_process:
                path = run.samples[0].image_path
                print(run.step, run.caption([path], [load_rgb(path)]))

    train(cfg, hooks=CaptionEveryHundredSteps())

The loop (`caption_train.train`) and the interactive page (`caption_train.iterative`) both depend on this module
and not on each other: the loop passes every event a `HookRun` (train.RunView, a narrow view of its state), and
the page's hooks (iterative.hooks.InteractiveHooks) use only what `HookRun` offers. A change to the page needs
no reading of the loop, and a change to the loop none of the page, as long as this protocol holds.

Every event runs in the training thread, between optimizer steps, on every process. Anything collective (`save`,
`agree`) must be called by every process at the same point; `caption` is not collective (call it on the main
process only, or on each process for its own images).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, TypeVar

if TYPE_CHECKING:  # kept out of the import: this module must stay light (the page and the loop both load it)
    import torch
    from PIL import Image

    from caption_train.data.scan import Sample
    from caption_train.tracking import Tracker

T = TypeVar("T")


@dataclass(frozen=True)
class SampleLoss:
    """One training image's caption loss in one epoch: a line of `<run>/sample_losses.jsonl`."""

    image: str
    """The image's path relative to the dataset folder (as in the jsonl)."""
    epoch: int
    """The epoch it was taken in, 1-based (as `metrics.jsonl`'s "epoch")."""
    loss: float
    """Mean token cross-entropy over the caption's target tokens, without label smoothing (a kohya-repeated
    image: the mean over the epoch's repeats)."""
    tokens: int
    """How many target tokens that mean is over."""
    caption_sha1: str
    """SHA-1 of the caption trained on (`caption_sha1(text)`), so an edited caption's losses tell apart from the
    old text's."""


def caption_sha1(text: str) -> str:
    """`SampleLoss.caption_sha1` of a caption: the SHA-1 (hex) of its UTF-8 text as training reads it, before
    shuffling and dropout (whitespace runs collapsed, as data.scan and the page's edits store it). The loop writes
    it beside each loss; the page compares it with the caption now to tell a caption fixed since its loss."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class HookRun(Protocol):
    """What a hook sees of the run and may do. The loop builds one (train.RunView); a hook gets it in every event."""

    # ---- what a hook sees

    @property
    def run_dir(self) -> Path:
        """The run's folder (`<output_dir>/<training_name>-<time>/`); a hook may keep its own state in a subfolder."""

    @property
    def dataset_dir(self) -> Path:
        """The training data's folder (--dataset_dir)."""

    @property
    def samples(self) -> list["Sample"]:
        """The distinct images of the run with their captions as scanned at start: training, then validation."""

    @property
    def probe_samples(self) -> list["Sample"]:
        """The fixed images captioned after every epoch (--num_sample_captions)."""

    @property
    def epoch(self) -> int:
        """The epoch in progress, 0-based (the `epoch` the events get)."""

    @property
    def epochs(self) -> int:
        """How many epochs the run trains (--epochs)."""

    @property
    def step(self) -> int:
        """Optimizer steps done so far, over the whole run (a resumed run starts at its checkpoint's)."""

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run will have done at the end."""

    @property
    def is_main_process(self) -> bool:
        """True on the process that writes, logs and serves (rank 0); True in a single-process run."""

    @property
    def num_processes(self) -> int:
        """How many processes train (torchrun / accelerate launch); 1 otherwise."""

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for (SIGINT / SIGTERM, or `request_stop`): the loop saves and stops after this step.
        A hook that waits (a pause) should stop waiting then."""

    @property
    def model(self) -> "torch.nn.Module":
        """The model being trained, unwrapped from accelerate (for inspection: read its weights, register a
        forward hook). Leave it in the mode you found it; to generate, use `caption`."""

    def sample_losses(self) -> dict[str, SampleLoss]:
        """The latest caption loss of every training image, keyed by `SampleLoss.image`; updated when an epoch's
        losses are in (before `on_epoch_end`). Empty before the first epoch's (a resumed run starts with its earlier
        epochs', read back from the file); the whole history is `<run_dir>/sample_losses.jsonl` (and
        `sample_loss_history`). An image not trained on in an epoch (unreadable, rated 1) keeps its older loss."""

    def sample_loss_history(self) -> dict[str, list[SampleLoss]]:
        """Every recorded epoch's caption loss of every training image, oldest epoch first, keyed like
        `sample_losses` (whose values are these lists' last items): what `sample_losses.jsonl` holds, a resumed
        run's earlier epochs included. The page draws each image's trend from it."""

    # ---- what a hook may do

    def follow_captions(self, live_file: Path) -> None:
        """Train on the caption edits and exclusions written to `live_file` (a data.dataset.LiveCaptions file) from
        now on, in every DataLoader worker. Call it on every process, in `on_setup` (before workers start)."""

    def caption(self, paths: Sequence[str | Path], images: Sequence["Image.Image"]) -> list[str]:
        """Caption `images` (loaded from `paths`) with the current weights now: the run's model, processor, prompt
        and autocast, and the image-feature cache when it is on (hence the paths); eval mode and no gradients,
        then the model's mode as it was. Not collective."""

    def save(self, name: str) -> Path:
        """Write a resumable checkpoint folder `<run_dir>/<name>/` at the current position and return it
        (an existing folder of that name is left alone and returned). Collective: every process must call it."""

    def agree(self, value: T) -> T:
        """The main process's `value`, on every process (a picklable object). Collective: every process must call
        it. In a single process it returns `value`."""

    def paused_for(self, seconds: float) -> None:
        """Tell the loop that a hook held training for `seconds` (a pause): they are left out of the progress
        bar's elapsed time and estimate, which then count training only."""

    def request_stop(self) -> None:
        """Ask the loop to save and stop after the current optimizer step, as a first Ctrl-C does (the run ends
        with TrainingStopped and can be resumed)."""


class TrainingHooks:
    """The events the loop calls, each with the run's `HookRun` (no-ops here: subclass and override).

    Order: on_setup, then per optimizer step on_step_end (and on_metrics for its log line), per epoch
    on_samples (the probe captions) and on_epoch_end, then on_train_end; close always, last.
    """

    def on_setup(self, run: HookRun) -> None:
        """Before the first optimizer step (a resumed run: at its checkpoint's position). Every process."""

    def on_step_end(self, run: HookRun, epoch: int) -> None:
        """After each optimizer step, its log line and its step checkpoint. Every process."""

    def on_epoch_end(self, run: HookRun, epoch: int) -> None:
        """After the epoch's validation, probe captions and checkpoint; the epoch's per-image losses are in
        `run.sample_losses()` by now. Every process."""

    def on_train_end(self, run: HookRun) -> None:
        """After the last epoch, before final/ is saved (not called when the run stops early). Every process."""

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Every metrics line the run logs (train/loss, train/lr, ... per step; val/loss, scores per epoch), as
        it goes to the tracker. Main process only."""

    def on_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """The probe images' captions after an epoch: [{"image": path, "truth": caption, "prediction": text}].
        Main process only."""

    def close(self) -> None:
        """Release what the hooks hold (a server, threads); called once when train() returns or raises."""


class HookedTracker:
    """A tracker that also hands every metrics line and sample table to the hooks (`on_metrics`, `on_samples`),
    so the loop logs once and never asks who listens."""

    def __init__(self, inner: "Tracker", hooks: TrainingHooks):
        self.inner, self.hooks = inner, hooks

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step)
        self.hooks.on_metrics(metrics, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.inner.log_samples(rows, step)
        self.hooks.on_samples(rows, step)

    def finish(self) -> None:
        self.inner.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
