"""Metric trackers behind one interface, so the training loop never asks which one is active.

    tracker = make_tracker(log_with="wandb", run_dir=run_dir, project="caption-train", run_name="x", config={}, enabled=True)
    tracker.log({"train/loss": 0.5}, step=10)
    tracker.log_samples([{"image": path, "truth": t, "prediction": p}], step=10)
    tracker.finish()

`metrics.jsonl` in the run directory is always written (by the main process); wandb is optional.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    """Used on non-main processes and for `--log_with none`."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlTracker:
    """One JSON object per line: {"step": N, "<metric>": value, ...}; flushed per line so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self._handle.flush()

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        pass  # sample captions are printed by the trainer; jsonl holds numbers only

    def finish(self) -> None:
        self._handle.close()


def wandb_logged_in() -> bool:
    """True when wandb has credentials (env var or `wandb login`'s netrc entry); checked without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker:
    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict[str, Any]):
        import wandb

        # Online only when the user is logged in; otherwise offline, to be synced later with `wandb sync`.
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self._wandb = wandb
        self._run = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir), mode=mode)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        table = self._wandb.Table(columns=["image", "truth", "prediction"])
        for row in rows:
            table.add_data(self._wandb.Image(str(row["image"])), row["truth"], row["prediction"])
        self._run.log({"samples": table}, step=step)

    def finish(self) -> None:
        self._run.finish()


class MultiTracker:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_samples(rows, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def make_tracker(*, log_with: str, run_dir: Path, project: str, run_name: str, config: dict[str, Any], enabled: bool) -> Tracker:
    if not enabled:
        return NullTracker()
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl")]
    if log_with == "wandb":
        trackers.append(WandbTracker(run_dir, project, run_name, config))
    return MultiTracker(trackers)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train (and validation) loss against optimizer step; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r and math.isfinite(r["train/loss"])]
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
