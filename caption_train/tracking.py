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


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's: the first points are not pulled toward 0."""
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def smoothing_weight(points: int) -> float:
    """An EMA window of about a twentieth of the run (0.8 at 100 steps, 0.98 from 1000 on): a longer one lags
    behind a falling loss. Short runs (under 40 points) are drawn raw."""
    return min(0.98, 1.0 - 20.0 / points) if points >= 40 else 0.0


def loss_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The run's curves as a matplotlib Figure: loss (raw steps faint, EMA on top, validation points) over the
    learning rate on a shared step axis, titled with the run name. None when no finite train loss was logged."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r and math.isfinite(r["train/loss"])]
    if not train:
        return None
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r and math.isfinite(r["val/loss"])]
    steps, losses = zip(*train)
    weight = smoothing_weight(len(losses))

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.2))
    fig.suptitle(title)
    if weight:
        loss_ax.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8, label="train loss (each step)")
        loss_ax.plot(steps, smooth(list(losses), weight), color="C0", linewidth=1.6, label=f"train loss (EMA {weight:.2f})")
    else:
        loss_ax.plot(steps, losses, color="C0", linewidth=1.2, label="train loss")
    if val:
        loss_ax.plot(*zip(*val), "o-", color="C1", label="validation loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    draw_learning_rates(lr_ax, rows)
    lr_ax.set_xlabel("optimizer step")
    return fig


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]


def draw_learning_rates(lr_ax: Any, rows: list[dict[str, Any]]) -> None:
    """The LR panel. Under Prodigy `train/lr` is a multiplier (0-1) and `train/effective_lr` (d x lr) is the step
    size, ~1e-7 to 1e-3 as d grows: on one linear axis it would be a flat line at 0, so it gets its own axis on the
    right, log-scaled when all its values are positive (d grows by orders of magnitude)."""
    lr, effective = _series(rows, "train/lr"), _series(rows, "train/effective_lr")
    lines = []
    if lr:
        lines += lr_ax.plot(*zip(*lr), "-", color="C2", linewidth=1.2, label="lr multiplier" if effective else "learning rate")
        lr_ax.set_ylabel("lr multiplier" if effective else "learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if effective:
        eff_ax = lr_ax.twinx() if lr else lr_ax
        lines += eff_ax.plot(*zip(*effective), "--", color="C3", linewidth=1.2, label="effective LR (d x lr)")
        eff_ax.set_ylabel("effective LR (d x lr)")
        if all(value > 0 for _, value in effective):
            eff_ax.set_yscale("log")
        else:
            eff_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if len(lines) > 1:
        lr_ax.legend(lines, [line.get_label() for line in lines], loc="best")
    lr_ax.grid(alpha=0.3)


def plot_losses(metrics_path: Path, out_png: Path, title: str | None = None) -> Path | None:
    """Write loss_figure as a PNG (title: the run folder's name); None when there is nothing to plot."""
    fig = loss_figure(read_metrics(metrics_path), title or metrics_path.parent.name)
    if fig is None:
        return None
    fig.savefig(out_png, dpi=100)
    return out_png
