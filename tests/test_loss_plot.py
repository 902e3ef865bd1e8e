"""loss.png: titled with the run's name, the learning rate under the loss, and a noisy loss smoothed (EMA) with
the raw steps faint behind it."""

from __future__ import annotations

import json
import math
import random
import statistics

from caption_train.tracking import loss_figure, plot_losses, read_metrics, smooth


def noisy_run(path, steps: int = 300) -> list[dict]:
    """A OneCycle-like LR and a loss that falls with heavy step-to-step noise, plus validation once an 'epoch'."""
    rng = random.Random(0)
    rows = []
    for step in range(1, steps + 1):
        lr = 1e-3 * math.sin(math.pi * step / (steps + 1))
        rows.append({"step": step, "train/loss": 3.0 * math.exp(-step / 100) + 0.3 + rng.uniform(-0.4, 0.4), "train/lr": lr, "train/epoch": 1 + step // 60})
        if step % 60 == 0:
            rows.append({"step": step, "epoch": step // 60, "val/loss": 3.0 * math.exp(-step / 100) + 0.35})
    rows.insert(10, {"step": 10, "train/loss": float("nan"), "train/lr": 1e-4})  # a skipped non-finite step
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def lines_by_label(fig) -> dict:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def test_the_loss_figure_has_a_title_an_lr_line_and_a_smoothed_loss(tmp_path):
    run_dir = tmp_path / "caption-train-20261202-031500"
    run_dir.mkdir()
    rows = noisy_run(run_dir / "metrics.jsonl")
    fig = loss_figure(read_metrics(run_dir / "metrics.jsonl"), run_dir.name)
    assert fig._suptitle is not None and fig._suptitle.get_text() == run_dir.name
    lines = lines_by_label(fig)

    lr = lines["learning rate"]
    expected = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    assert list(lr.get_xdata()) == [s for s, _ in expected] and list(lr.get_ydata()) == [v for _, v in expected]
    loss_axes = next(line.axes for label, line in lines.items() if label.startswith("train loss"))
    assert lr.axes is not loss_axes  # its own scale: an LR of 1e-3 next to a loss of 3 would be a flat line at 0

    raw = lines["train loss (each step)"]
    ema = next(line for label, line in lines.items() if label.startswith("train loss (EMA"))
    assert raw.get_alpha() is not None and raw.get_alpha() <= 0.4 and (ema.get_alpha() or 1.0) == 1.0  # raw faint behind
    assert len(raw.get_ydata()) == len(ema.get_ydata()) == 300  # the non-finite step is left out
    jitter = lambda ys: statistics.pstdev([b - a for a, b in zip(ys, ys[1:])])  # noqa: E731
    assert jitter(list(ema.get_ydata())) < jitter(list(raw.get_ydata())) / 5
    assert [tuple(p) for p in lines["validation loss"].get_xydata()][:1] == [(60.0, 3.0 * math.exp(-0.6) + 0.35)]

    # The PNG written at the end of training is this figure.
    out = plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    assert out == run_dir / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_runs_are_drawn_raw_and_empty_ones_not_at_all(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s, "train/lr": 1e-4}) + "\n" for s in range(1, 6)))
    labels = set(lines_by_label(loss_figure(read_metrics(tmp_path / "metrics.jsonl"), "short")))
    assert "train loss" in labels and "learning rate" in labels and not any("EMA" in label for label in labels)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "train/loss": float("nan")}) + "\n")
    assert plot_losses(tmp_path / "empty.jsonl", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_smooth_is_a_debiased_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9) == [2.0, 2.0, 2.0]  # no pull toward 0 at the start
    assert smooth([0.0, 1.0], 0.5) == [0.0, (0.25 * 0 + 0.5) / 0.75]


def screen_span(line) -> float:
    """The share of its axes' height a line spans as drawn: ~0 for a line pressed flat against one end."""
    ys = line.axes.transData.transform(line.get_xydata())[:, 1]
    return float(ys.max() - ys.min()) / line.axes.get_window_extent().height


def test_prodigy_effective_lr_gets_its_own_axis(tmp_path):
    """Under Prodigy the logged lr is a 0-1 multiplier and the effective LR (d x lr) is ~1e-7 to 2e-4: on the
    multiplier's axis the effective LR would be a flat line at 0. It gets its own axis, where it fills the panel."""
    import io

    steps = 200
    rows = []
    for step in range(1, steps + 1):
        multiplier = 0.04 + 0.96 * math.sin(math.pi * step / (steps + 1))  # a one-cycle-like schedule
        d = 1e-6 * (200.0 ** (step / steps))  # Prodigy's estimate grows from 1e-6 to 2e-4
        rows.append({"step": step, "train/loss": 2.0 / step, "train/lr": multiplier, "train/effective_lr": d * multiplier})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = loss_figure(read_metrics(tmp_path / "metrics.jsonl"), "prodigy")
    fig.savefig(io.BytesIO(), format="png")  # lays the figure out, as the PNG is drawn
    lines = lines_by_label(fig)
    multiplier, effective = lines["lr multiplier"], lines["effective LR (d x lr)"]
    assert list(effective.get_ydata()) == [r["train/effective_lr"] for r in rows]
    assert effective.axes is not multiplier.axes and effective.axes.get_xlim() == multiplier.axes.get_xlim()  # same steps
    assert screen_span(multiplier) > 0.5 and screen_span(effective) > 0.5, (screen_span(multiplier), screen_span(effective))
    assert effective.axes.get_ylabel() == "effective LR (d x lr)"
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
