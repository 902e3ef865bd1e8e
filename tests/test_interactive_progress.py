"""The training bar and the interactive page: a pause is left out of the bar's elapsed time and ETA, and what the
page's actions print (a save asked for on the page, the page's log records) lands above the bar, not on its line."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from caption_train.config import resolve
from caption_train.data.scan import Sample
from caption_train.iterative.hooks import InteractiveHooks
from caption_train.iterative.store import Workspace
from caption_train.tiny import make_shapes_dataset
from caption_train.train import RunView, StopRequest

from test_interactive_api import Page, TrainingThread, wait_for

PAUSE_S = 2.0
STEP_S = 0.05


def terminal_lines(text: str) -> list[str]:
    """What a terminal ends up showing line by line: a bar redraws its line after each carriage return."""
    return [piece.strip() for piece in re.split(r"[\r\n]", text) if piece.strip()]


def eta(bar: tqdm) -> float:
    info = bar.format_dict
    return (info["total"] - info["n"]) / info["rate"]


def test_a_pause_is_left_out_of_the_bars_elapsed_time_and_eta(tmp_path):
    pairs = make_shapes_dataset(tmp_path / "data", 2, seed=0, size=32, subfolders=0)
    hooks = InteractiveHooks()
    hooks.close()  # no server needed: the pause loop runs on the workspace alone
    hooks.workspace = workspace = Workspace(tmp_path / "data", [Sample(p, c) for p, c in pairs], state_dir=tmp_path / "state")
    bar = tqdm(total=100, file=open(tmp_path / "bar.txt", "w"), mininterval=0)
    # The loop's own view (what hooks get) over the parts of a run a step's hook touches: its position, a single
    # process, no stop request, and the bar (run_training stores it on the run).
    run = SimpleNamespace(global_step=0, run_dir=tmp_path, accelerator=SimpleNamespace(num_processes=1), stop=StopRequest(), progress=bar)
    view = RunView(run)

    def step() -> None:
        time.sleep(STEP_S)
        bar.update(1)
        run.global_step += 1
        hooks.on_step_end(view, 0)

    try:
        for _ in range(5):
            step()
        before_elapsed, before_eta = bar.format_dict["elapsed"], eta(bar)
        started = time.monotonic()
        workspace.set_control(pause=True)
        threading.Timer(PAUSE_S, lambda: workspace.set_control(pause=False)).start()
        step()  # pauses inside on_step_end until the timer resumes
        assert time.monotonic() - started >= PAUSE_S
        step()
        # One more step's worth of time, not the pause; the estimate stays about what it was (it used to jump ~10x).
        assert bar.format_dict["elapsed"] - before_elapsed < 1.0, (before_elapsed, bar.format_dict["elapsed"])
        assert eta(bar) < 3 * before_eta, (before_eta, eta(bar))
    finally:
        bar.close()


def test_the_pages_log_records_print_above_the_bar(capsys):
    hooks = InteractiveHooks()
    hooks.close()
    bar = tqdm(total=10, desc="training", file=sys.stderr, mininterval=0)
    bar.update(3)
    hooks._route_log(True)  # on_setup does this when the page starts serving
    try:
        logging.getLogger("caption_train.iterative.server").error("interactive page: caption_new failed: boom")
    finally:
        hooks._route_log(False)
    bar.close()
    lines = terminal_lines(capsys.readouterr().err)
    assert "interactive page: caption_new failed: boom" in lines, lines  # a line of its own, not glued to the bar
    assert logging.getLogger("caption_train.iterative").propagate and not logging.getLogger("caption_train.iterative").handlers


class PauseClock(InteractiveHooks):
    """Records the bar's elapsed time and the wall clock around every step's hook (the pause happens inside)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.around: list[tuple[float, float, float, float]] = []

    def on_step_end(self, run, epoch):
        bar = run._run.progress  # the loop's own bar, which hooks do not see (they report a pause: run.paused_for)
        wall, elapsed = time.monotonic(), bar.format_dict["elapsed"]
        super().on_step_end(run, epoch)
        self.around.append((wall, elapsed, time.monotonic(), bar.format_dict["elapsed"]))


@pytest.mark.slow
def test_training_bar_leaves_the_pause_out_and_page_lines_stay_off_it(capsys, tmp_path, tiny_blip, shapes_dir):
    cfg = resolve({}, {"dataset_dir": str(shapes_dir), "model_name_or_path": str(tiny_blip), "output_dir": str(tmp_path / "runs"),
                       "epochs": 1, "batch_size": 4, "num_workers": 0, "log_with": "none", "num_sample_captions": 0, "save_every_n_epochs": 0})
    hooks = PauseClock(start_paused=True)  # pauses after step 1
    thread = TrainingThread(cfg, hooks)
    thread.start()
    try:
        wait_for(lambda: hooks.url or thread.error, "the page to start")
        assert thread.error is None, thread.error
        page = Page(hooks.url)
        wait_for(lambda: page.status()["state"] == "paused", "the run to pause")
        assert page.send("save", {})[0] == 200  # prints "saved ..." while the bar is on screen
        wait_for(lambda: (hooks.workspace.state_dir.parent / "step-1").is_dir(), "save now")
        time.sleep(PAUSE_S)
        assert page.send("resume", {})[0] == 200
        thread.join(300)
        assert thread.error is None, thread.error
    finally:
        hooks.close()
    wall_before, elapsed_before, wall_after, elapsed_after = hooks.around[0]
    assert wall_after - wall_before >= PAUSE_S
    assert elapsed_after - elapsed_before < 0.5, hooks.around[0]  # the bar's clock did not run during the pause
    lines = terminal_lines(capsys.readouterr().err)
    saved = [line for line in lines if "(asked for on the interactive page)" in line]
    assert saved and all(line.startswith("saved ") for line in saved), saved
