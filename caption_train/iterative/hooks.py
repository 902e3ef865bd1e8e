"""`--interactive`: the training hook that serves the caption page beside the loop.

    with InteractiveHooks("127.0.0.1", 8765) as hooks:      # binds the port now (a busy port fails here)
        train(cfg, hooks=hooks)                              # prints "interactive page: http://127.0.0.1:8765/?token=..."

Threads: the server runs on its own event loop in a daemon thread and only touches the Workspace (captions,
ratings, requests). Everything that needs the model runs here, in the training thread, in `on_step_end` between
optimizer steps: "caption now" (eval mode, no_grad, then train mode again), pause (blocks, still serving and
captioning, until resumed) and "save now" (`train.save`, a collective).

The terminal: lines the page's actions print go through `tqdm.write` (also the page's log records while it
serves), so they land above the training bar instead of on its line; a pause is taken off the bar's clock
(`run.progress`), so its elapsed time and ETA count training only.

Several processes (torchrun / accelerate launch): every rank calls every hook; only rank 0 binds and serves.
Rank 0 decides (pause, save) and `broadcast_object_list` hands the decision to all ranks once per optimizer
step (two tiny collectives; skipped entirely in a single process). While paused the ranks meet every 0.5 s, so
no collective waits long enough to hit the process group's timeout. Caption edits and exclusions reach every
rank's DataLoader workers through `<run_dir>/interactive/live.json` (see data.dataset.LiveCaptions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm import tqdm

from caption_train.data.dataset import CaptionDataset
from caption_train.data.images import ImageLoadError, load_rgb
from caption_train.iterative.address import exposure_warning, is_loopback
from caption_train.iterative.schema import Saved
from caption_train.iterative.server import PageServer, bind_socket
from caption_train.iterative.store import LIVE_FILE, Workspace, WorkspaceError
from caption_train.train import TrainingHooks

if TYPE_CHECKING:
    from caption_train.train import Run

log = logging.getLogger(__name__)

STATE_DIR_NAME = "interactive"  # inside the run directory
GENERATE_BATCH = 8
PAUSE_POLL_S = 0.5
PAGE_LOGGER = "caption_train.iterative"  # the server's and the hooks' loggers are below it


def say(line: str) -> None:
    """Print a line to stderr above any progress bar (a plain print would land on the bar's line)."""
    tqdm.write(line, file=sys.stderr)


class _AboveTheBar(logging.Handler):
    """The page's log records, printed with `say` while training shows a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(self.format(record))
        except Exception:  # logging must never take the run down
            self.handleError(record)


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


def caption_images(workspace: Workspace, model: torch.nn.Module, processor: Any, family: Any, images: list[str], *,
                   step: int | None, autocast: Callable[[], Any] = contextlib.nullcontext, prompt: str | None = None) -> None:
    """Caption `images` (ids) with `model` in eval mode and record the results; restores the model's mode.
    `prompt` is the run's --prompt (None: the family's default), so the page shows what training teaches."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), GENERATE_BATCH):
            chunk, loaded, failed = images[start : start + GENERATE_BATCH], [], []
            for image in chunk:
                try:
                    loaded.append((image, load_rgb(workspace.image_file(image))))
                except (ImageLoadError, WorkspaceError) as error:
                    failed.append((image, f"(cannot load the image: {error})"))
            texts: list[str] = []
            if loaded:
                with torch.no_grad(), autocast():
                    texts = family.generate(model, processor, [picture for _, picture in loaded], prompt=prompt)
            workspace.record_model_captions([(image, text) for (image, _), text in zip(loaded, texts)] + failed, step)
    finally:
        if was_training:
            model.train()


class _TeeTracker:
    """Passes everything to the run's tracker and shows loss, lr and the epoch's sample captions on the page."""

    def __init__(self, inner: Any, hooks: "InteractiveHooks"):
        self.inner, self.hooks = inner, hooks

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log(metrics, step)
        self.hooks._on_metrics(metrics)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.inner.log_samples(rows, step)
        self.hooks._on_samples(rows, step)

    def finish(self) -> None:
        self.inner.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class InteractiveHooks(TrainingHooks):
    """Serve the caption page during training. `start_paused`: pause after the first optimizer step."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, start_paused: bool = False,
                 captions_per_step: int = GENERATE_BATCH):
        self.host, self.token, self.start_paused, self.captions_per_step = host, token, start_paused, captions_per_step
        # Only the main process serves. RANK is set by torchrun and accelerate launch; on_setup re-checks.
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.sock = bind_socket(host, port) if self.main else None
        self.port = self.sock.getsockname()[1] if self.sock is not None else port
        self.workspace: Workspace | None = None
        self.server: PageServer | None = None
        self._log_handler: logging.Handler | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "InteractiveHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (idempotent). on_train_end does it too; call it when training raised."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._route_log(False)
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    # ------------------------------------------------------------------ hooks

    def on_setup(self, run: "Run") -> None:
        state_dir = run.run_dir / STATE_DIR_NAME
        datasets = [run.train_dataset]
        val_dataset = getattr(run.val_loader, "dataset", None) if run.val_loader is not None else None
        if isinstance(val_dataset, CaptionDataset):
            datasets.append(val_dataset)
        for dataset in datasets:  # every rank: its workers fork after this and inherit it
            dataset.follow(state_dir / LIVE_FILE)
        self.main = run.accelerator.is_main_process
        if not self.main:
            self.close()
            return
        if self.sock is None:  # RANK said otherwise; accelerate knows better
            self.sock = bind_socket(self.host, self.port)
        samples = [sample for dataset in datasets for sample in dataset.samples]
        self.workspace = Workspace(Path(run.cfg.dataset_dir), samples, state_dir=state_dir, mode="training",
                                   probe=run.sample_items, log=say)
        self.workspace.update_status(state="running", epoch=run.epoch + 1 if hasattr(run, "epoch") else 1, epochs=run.cfg.epochs,
                                     step=run.global_step, total_steps=run.total_steps, can_generate=True)
        if self.start_paused:
            self.workspace.set_control(pause=True)
        run.tracker = _TeeTracker(run.tracker, self)
        self.server = PageServer(self.workspace, self.host, self.port, token=self.token, sock=self.sock)
        self.sock = None  # the server owns it now
        self._route_log(True)
        self.server.start()
        if not is_loopback(self.host):
            print(exposure_warning(self.host, self.server.port), file=sys.stderr, flush=True)
        print(f"interactive page: {self.server.url}", flush=True)

    def on_step_end(self, run: "Run", epoch: int) -> None:
        workspace = self.workspace
        if workspace is not None:
            workspace.update_status(epoch=epoch + 1, step=run.global_step)
        paused, save = self._agree(run)
        was_paused = False
        bar = getattr(run, "progress", None)  # the training bar (train.run_training stores it on the run)
        entered = time.time()  # when paused, all the time spent here is pause (captioning and saving included)
        while True:
            if save is not None:
                self._save(run, save, epoch)
            if workspace is not None:
                self._caption_pending(run, None if paused else self.captions_per_step)
            if not paused:
                break
            if workspace is not None and not was_paused:
                workspace.update_status(state="paused")
            was_paused = True
            if workspace is not None:
                with workspace.changed:
                    workspace.changed.wait_for(lambda: not workspace.pause_requested or workspace.save_requested or bool(workspace.pending) or _stop_signal(run),
                                               timeout=PAUSE_POLL_S)
            paused, save = self._agree(run)
        if was_paused:
            leave_out_of_bar(bar, time.time() - entered)
            if workspace is not None:
                workspace.update_status(state="running")

    def on_epoch_end(self, run: "Run", epoch: int) -> None:
        if self.workspace is not None:
            self.workspace.update_status(epoch=epoch + 1, step=run.global_step)

    def on_train_end(self, run: "Run") -> None:
        if self.workspace is not None:
            with self.workspace.lock:
                self.workspace.pending.clear()
            self.workspace.update_status(state="finished", step=run.global_step, can_generate=False)
        self.close()

    def _route_log(self, on: bool) -> None:
        """While serving, the page's log records (e.g. a failed action's traceback) print above the bar."""
        logger = logging.getLogger(PAGE_LOGGER)
        if on and self._log_handler is None:
            self._log_handler, self._log_propagate = _AboveTheBar(), logger.propagate
            logger.addHandler(self._log_handler)
            logger.propagate = False  # else the root logger's console handler prints it a second time, on the bar
        elif not on and self._log_handler is not None:
            logger.removeHandler(self._log_handler)
            logger.propagate = self._log_propagate
            self._log_handler = None

    # ------------------------------------------------------------------ between steps

    def _agree(self, run: "Run") -> tuple[bool, str | None]:
        """(pause?, checkpoint name to save or None) as decided by the main process, the same on every rank."""
        decision: list[Any] = [False, None]
        workspace = self.workspace
        if workspace is not None:
            with workspace.lock:
                # A Ctrl-C / SIGTERM while paused must reach the loop, which stops and saves.
                decision[0] = workspace.pause_requested and not _stop_signal(run)
                if workspace.save_requested:
                    workspace.save_requested = False
                    name = f"step-{run.global_step}"
                    if (run.run_dir / name).exists():  # saved at this step already (save_every_n_steps, a double click)
                        workspace.emit("saved", Saved(path=str(run.run_dir / name), step=run.global_step))
                    else:
                        decision[1] = name
        if run.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(decision, from_process=0)
        return bool(decision[0]), decision[1]

    def _save(self, run: "Run", name: str, epoch: int) -> None:
        from caption_train.train import save

        path = save(run, name, epoch=epoch)  # collective: every rank is here, by the broadcast decision
        if self.workspace is not None:
            say(f"saved {path} (asked for on the interactive page)")
            self.workspace.emit("saved", Saved(path=str(path), step=run.global_step))

    def _caption_pending(self, run: "Run", limit: int | None) -> None:
        workspace = self.workspace
        assert workspace is not None
        images = workspace.take_pending(limit if limit is not None else 4 * GENERATE_BATCH)
        if not images:
            return
        try:
            caption_images(workspace, run.accelerator.unwrap_model(run.model), run.processor, run.family, images,
                           step=run.global_step, autocast=run.accelerator.autocast, prompt=run.cfg.prompt)
        except Exception as error:  # the page asked for it; a failure must not end the run
            log.exception("interactive page: captioning failed")
            workspace.record_model_captions([(image, f"(captioning failed: {type(error).__name__}: {error})") for image in images], run.global_step)

    # ------------------------------------------------------------------ tracker tee

    def _on_metrics(self, metrics: dict[str, float]) -> None:
        if self.workspace is None:
            return
        update: dict[str, Any] = {}
        if "train/loss" in metrics:
            update["loss"] = _finite(metrics["train/loss"])
        lr = metrics.get("train/effective_lr", metrics.get("train/lr"))
        if lr is not None:
            update["lr"] = _finite(lr)
        if "val/loss" in metrics:
            update["val_loss"] = _finite(metrics["val/loss"])
        if update:
            self.workspace.update_status(**update)

    def _on_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        if self.workspace is None:
            return
        pairs = [(self.workspace.by_path[row["image"]], row["prediction"]) for row in rows if row.get("image") in self.workspace.by_path]
        self.workspace.record_model_captions(pairs, step)


def _stop_signal(run: "Run") -> bool:
    stop = getattr(run, "stop", None)
    return bool(getattr(stop, "signum", 0))


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None
