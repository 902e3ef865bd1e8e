"""`--interactive`: the training hooks that serve the caption page beside the loop.

    with InteractiveHooks("127.0.0.1", 8765) as hooks:      # binds the port now (a busy port fails here)
        train(cfg, hooks=hooks)                              # prints "interactive page: http://127.0.0.1:8765/?token=..."

(`caption-train train --interactive 8765` builds them this way: cli.make_hooks.) Written against the hook
protocol alone (caption_train.hooks.HookRun): this module never imports the training loop, and the loop never
imports the page.

The review queue: the run's per-image losses reach the page through the protocol (`run.sample_loss_history()`,
at set-up for a resumed run and after every epoch); the page ranks them (ranking.suspect_order).

Threads: the server runs on its own event loop in a daemon thread and only touches the Workspace (captions,
ratings, requests). Everything that needs the model runs here, in the training thread, in `on_step_end` between
optimizer steps: "caption now" (`run.caption`), pause (blocks, still serving and captioning, until resumed) and
"save now" (`run.save`, a collective).

The terminal: lines the page's actions print go through `tqdm.write` (also the page's log records while it
serves), so they land above the training bar instead of on its line; a pause is reported to the loop
(`run.paused_for`), which takes it off the bar's clock, so its elapsed time and ETA count training only.

Several processes (torchrun / accelerate launch): every rank calls every hook; only rank 0 binds and serves.
Rank 0 decides (pause, save) and `run.agree` hands the decision to all ranks once per optimizer step (a tiny
collective; skipped in a single process). While paused the ranks meet every 0.5 s, so no collective waits long
enough to hit the process group's timeout. Caption edits and exclusions reach every rank's DataLoader workers
through `<run_dir>/interactive/live.json` (`run.follow_captions`; see data.dataset.LiveCaptions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from caption_train.data.images import ImageLoadError, load_rgb
from caption_train.hooks import HookRun, TrainingHooks
from caption_train.address import exposure_warning, is_loopback
from caption_train.iterative.schema import Saved
from caption_train.iterative.server import PageServer, bind_socket
from caption_train.iterative.store import LIVE_FILE, Workspace, WorkspaceError

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


Captioner = Callable[[Sequence[Path], Sequence[Any]], list[str]]
"""(image files, the loaded images) -> one caption each: HookRun.caption during training, a model's in `review`."""


def record_captions(workspace: Workspace, caption: Captioner, images: list[str], *, step: int | None) -> None:
    """Caption `images` (ids) in batches with `caption` and record the results; an image that cannot be loaded
    gets a message in place of a caption."""
    for start in range(0, len(images), GENERATE_BATCH):
        chunk, loaded, failed = images[start : start + GENERATE_BATCH], [], []
        for image in chunk:
            try:
                path = workspace.image_file(image)
                loaded.append((image, path, load_rgb(path)))
            except (ImageLoadError, WorkspaceError) as error:
                failed.append((image, f"(cannot load the image: {error})"))
        texts = caption([path for _, path, _ in loaded], [picture for _, _, picture in loaded]) if loaded else []
        workspace.record_model_captions([(image, text) for (image, _, _), text in zip(loaded, texts)] + failed, step)


def caption_images(workspace: Workspace, model: torch.nn.Module, processor: Any, family: Any, images: list[str], *,
                   step: int | None, autocast: Callable[[], Any] = contextlib.nullcontext, prompt: str | None = None) -> None:
    """Caption `images` (ids) with a model outside training (`review`) in eval mode and record the results;
    restores the model's mode. `prompt`: None for the family's default."""

    def caption(paths: Sequence[Path], pictures: Sequence[Any]) -> list[str]:
        with torch.no_grad(), autocast():
            return family.generate(model, processor, list(pictures), prompt=prompt)

    was_training = model.training
    model.eval()
    try:
        record_captions(workspace, caption, images, step=step)
    finally:
        model.train(was_training)


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

    def on_setup(self, run: HookRun) -> None:
        state_dir = run.run_dir / STATE_DIR_NAME
        run.follow_captions(state_dir / LIVE_FILE)  # every rank: its workers fork after this and inherit it
        self.main = run.is_main_process
        if not self.main:
            self.close()
            return
        if self.sock is None:  # RANK said otherwise; accelerate knows better
            self.sock = bind_socket(self.host, self.port)
        self.workspace = Workspace(run.dataset_dir, run.samples, state_dir=state_dir, mode="training",
                                   probe=run.probe_samples, log=say)
        self.workspace.set_losses(run.sample_loss_history())  # a resumed run's earlier epochs
        self.workspace.update_status(state="running", epoch=run.epoch + 1, epochs=run.epochs,
                                     step=run.step, total_steps=run.total_steps, can_generate=True)
        if self.start_paused:
            self.workspace.set_control(pause=True)
        self.server = PageServer(self.workspace, self.host, self.port, token=self.token, sock=self.sock)
        self.sock = None  # the server owns it now
        self._route_log(True)
        self.server.start()
        if not is_loopback(self.host):
            print(exposure_warning(self.host, self.server.port), file=sys.stderr, flush=True)
        print(f"interactive page: {self.server.url}", flush=True)

    def on_step_end(self, run: HookRun, epoch: int) -> None:
        workspace = self.workspace
        if workspace is not None:
            workspace.update_status(epoch=epoch + 1, step=run.step)
        paused, save = self._agree(run)
        was_paused = False
        entered = time.time()  # when paused, all the time spent here is pause (captioning and saving included)
        while True:
            if save is not None:
                self._save(run, save)
            if workspace is not None:
                self._caption_pending(run, None if paused else self.captions_per_step)
            if not paused:
                break
            if workspace is not None and not was_paused:
                workspace.update_status(state="paused")
            was_paused = True
            if workspace is not None:
                with workspace.changed:
                    workspace.changed.wait_for(lambda: not workspace.pause_requested or workspace.save_requested or bool(workspace.pending) or run.stop_requested,
                                               timeout=PAUSE_POLL_S)
            paused, save = self._agree(run)
        if was_paused:
            run.paused_for(time.time() - entered)
            if workspace is not None:
                workspace.update_status(state="running")

    def on_epoch_end(self, run: HookRun, epoch: int) -> None:
        """The epoch's per-image losses are in: the review queue re-ranks (the page offers to reload it)."""
        if self.workspace is not None:
            self.workspace.set_losses(run.sample_loss_history())
            self.workspace.update_status(epoch=epoch + 1, step=run.step)

    def on_train_end(self, run: HookRun) -> None:
        if self.workspace is not None:
            with self.workspace.lock:
                self.workspace.pending.clear()
            self.workspace.update_status(state="finished", step=run.step, can_generate=False)
        self.close()

    def on_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Loss, lr and validation loss, live on the page."""
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

    def on_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """The epoch's probe captions become those images' model captions."""
        if self.workspace is None:
            return
        pairs = [(self.workspace.by_path[row["image"]], row["prediction"]) for row in rows if row.get("image") in self.workspace.by_path]
        self.workspace.record_model_captions(pairs, step)

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

    def _agree(self, run: HookRun) -> tuple[bool, str | None]:
        """(pause?, checkpoint name to save or None) as decided by the main process, the same on every rank."""
        paused, save = False, None
        workspace = self.workspace
        if workspace is not None:
            with workspace.lock:
                # A Ctrl-C / SIGTERM while paused must reach the loop, which stops and saves.
                paused = workspace.pause_requested and not run.stop_requested
                if workspace.save_requested:
                    workspace.save_requested = False
                    name = f"step-{run.step}"
                    if (run.run_dir / name).exists():  # saved at this step already (save_every_n_steps, a double click)
                        workspace.emit("saved", Saved(path=str(run.run_dir / name), step=run.step))
                    else:
                        save = name
        paused, save = run.agree((paused, save))
        return bool(paused), save

    def _save(self, run: HookRun, name: str) -> None:
        path = run.save(name)  # collective: every rank is here, by the agreed decision
        if self.workspace is not None:
            say(f"saved {path} (asked for on the interactive page)")
            self.workspace.emit("saved", Saved(path=str(path), step=run.step))

    def _caption_pending(self, run: HookRun, limit: int | None) -> None:
        workspace = self.workspace
        assert workspace is not None
        images = workspace.take_pending(limit if limit is not None else 4 * GENERATE_BATCH)
        if not images:
            return
        try:
            record_captions(workspace, run.caption, images, step=run.step)
        except Exception as error:  # the page asked for it; a failure must not end the run
            log.exception("interactive page: captioning failed")
            workspace.record_model_captions([(image, f"(captioning failed: {type(error).__name__}: {error})") for image in images], run.step)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None
