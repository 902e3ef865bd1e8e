"""The hook protocol (caption_train.hooks) as the loop keeps it, on real runs of the tiny BLIP: every event in
order, what a hook sees (position, images, metrics, probe captions), what it may do (caption now with the current
weights, save, agree), and the wiring of --interactive through the commands a user types."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from caption_train.cli import main, make_hooks
from caption_train.config import load_train_config
from caption_train.errors import UserError
from caption_train.hooks import TrainingHooks
from caption_train.models import resolve_family
from caption_train.models.base import unwrap_peft
from caption_train.train import train

from conftest import REPO, base_args
from test_interactive_api import URL_LINE, Page, wait_for


FORCED_WORD = "circle"


class Recorder(TrainingHooks):
    """Records every event with what the run showed at that moment, and uses each thing a hook may do once."""

    def __init__(self, model_dir: Path, caption_at: int, save_at: int):
        self.model_dir, self.caption_at, self.save_at = model_dir, caption_at, save_at
        self.events: list[tuple] = []
        self.metrics: list[tuple[int, dict]] = []
        self.closed = 0

    def on_setup(self, run):
        self.events.append(("setup", run.epoch, run.step))
        self.seen = {"run_dir": run.run_dir, "dataset_dir": run.dataset_dir, "samples": [s.image_path for s in run.samples],
                     "probe": [s.image_path for s in run.probe_samples], "epochs": run.epochs, "total_steps": run.total_steps,
                     "main": run.is_main_process, "processes": run.num_processes, "stop": run.stop_requested,
                     "losses": run.sample_losses(), "agreed": run.agree(("pause", None))}

    def on_step_end(self, run, epoch):
        self.events.append(("step", epoch, run.step))
        if run.step == self.caption_at:
            self.caption_now(run)
        if run.step == self.save_at:
            self.saved = run.save("from-a-hook")
            self.saved_again = run.save("from-a-hook")  # an existing folder is left alone

    def caption_now(self, run):
        """Caption three images through the protocol while the live model is made to say one word: its LM head's
        bias for "circle" raised, then restored. Only the weights being trained can give that caption."""
        family, _ = resolve_family(str(self.model_dir))
        _, processor = family.load(str(self.model_dir), {})
        paths = [s.image_path for s in run.samples[:3]]
        images = [Image.open(path).convert("RGB") for path in paths]
        head = unwrap_peft(run.model).text_decoder.cls.predictions.decoder
        word = processor.tokenizer.convert_tokens_to_ids(FORCED_WORD)
        with torch.no_grad():
            head.bias[word] += 100.0
        try:
            self.captions = run.caption(paths, images)
            self.mode_after = run.model.training
            model = run.model.eval()  # the same weights, captioned by the family directly
            with torch.no_grad():
                self.direct = family.generate(model, processor, images)
            model.train()
        finally:
            with torch.no_grad():
                head.bias[word] -= 100.0
        base, _ = family.load(str(self.model_dir), {})
        with torch.no_grad():
            self.base = family.generate(base.eval(), processor, images)

    def on_epoch_end(self, run, epoch):
        self.events.append(("epoch_end", epoch, run.step))

    def on_train_end(self, run):
        self.events.append(("train_end", run.epoch, run.step))

    def on_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def on_samples(self, rows, step):
        self.events.append(("samples", len(rows), step))

    def close(self):
        self.closed += 1


def test_every_event_in_order_with_what_a_hook_sees_and_may_do(tmp_path, tiny_blip, shapes_dir):
    # 24 images, a quarter held out: 18 training / batch 8 = 3 optimizer steps per epoch, 2 epochs.
    hooks = Recorder(tiny_blip, caption_at=2, save_at=4)
    args = base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "2", "--validation_split", "0.25",
                     "--save_every_n_epochs", "0", "--mixed_precision", "no")
    final = train(load_train_config(args), hooks=hooks)

    assert hooks.events == [
        ("setup", 0, 0), ("step", 0, 1), ("step", 0, 2), ("step", 0, 3), ("samples", 2, 3), ("epoch_end", 0, 3),
        ("step", 1, 4), ("step", 1, 5), ("step", 1, 6), ("samples", 2, 6), ("epoch_end", 1, 6), ("train_end", 1, 6)]
    assert hooks.closed == 1
    seen = hooks.seen
    assert seen["run_dir"] == final.parent and seen["dataset_dir"] == shapes_dir
    assert sorted(map(str, seen["samples"])) == sorted(map(str, shapes_dir.rglob("*.png")))  # training + validation, once each
    assert len(seen["probe"]) == 2 and set(seen["probe"]) <= set(seen["samples"])
    assert (seen["epochs"], seen["total_steps"], seen["main"], seen["processes"], seen["stop"]) == (2, 6, True, 1, False)
    assert seen["losses"] == {}  # no per-image losses recorded yet (issue 16 item 1 fills them)
    assert seen["agreed"] == ("pause", None)

    # Every metrics line the run wrote, as it was written.
    from caption_train.tracking import read_metrics

    logged = [(row.pop("step"), row) for row in read_metrics(final.parent / "metrics.jsonl")]
    assert hooks.metrics == logged and [step for step, row in logged if "train/loss" in row] == [1, 2, 3, 4, 5, 6]
    assert [step for step, row in logged if "val/loss" in row] == [3, 6]

    # Caption now: the live weights (made to say one word) through the family's generate, then training mode again.
    assert hooks.captions == hooks.direct and hooks.mode_after is True
    assert all(set(caption.split()) == {FORCED_WORD} for caption in hooks.captions), hooks.captions
    assert all(set(caption.split()) != {FORCED_WORD} for caption in hooks.base), hooks.base

    # Save: a resumable checkpoint at the current position, written once.
    assert hooks.saved == hooks.saved_again == final.parent / "from-a-hook"
    state = torch.load(hooks.saved / "training_state.pt", weights_only=False)
    assert (state["global_step"], state["epoch"]) == (4, 1)


def test_request_stop_saves_and_stops_like_ctrl_c(tmp_path, tiny_blip, shapes_dir):
    from caption_train.train import TrainingStopped

    class StopAtTwo(TrainingHooks):
        def on_step_end(self, run, epoch):
            if run.step == 2:
                run.request_stop()
                self.requested = run.stop_requested

    hooks = StopAtTwo()
    with pytest.raises(TrainingStopped) as info:
        train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--batch_size", "4", "--num_sample_captions", "0")), hooks=hooks)
    assert info.value.exit_code == 128 + signal.SIGINT and hooks.requested
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-3"]  # step 3 was the one in progress


# ---------------------------------------------------------------------------------------------
# --interactive through the commands


@pytest.fixture
def busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        yield busy.getsockname()[1]


def test_the_train_command_builds_the_page_from_the_flag(capsys, tmp_path, tiny_blip, shapes_dir, busy_port):
    """`caption-train train --interactive HOST:PORT` binds the page's port before anything is written: a busy port
    is a one-line error and no run folder (without the page, this run would train and return 0)."""
    out = tmp_path / "runs"
    assert main(["train", *base_args(shapes_dir, tiny_blip, out, "--interactive", f"127.0.0.1:{busy_port}")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --interactive 127.0.0.1:{busy_port}: cannot listen there"), err
    assert not out.exists()


def test_make_hooks_gives_the_page_only_when_asked(tiny_blip, shapes_dir, tmp_path):
    from caption_train.iterative.hooks import InteractiveHooks

    plain = make_hooks(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path)))
    assert type(plain) is TrainingHooks
    page = make_hooks(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--interactive", "127.0.0.1:0")))
    try:
        assert isinstance(page, InteractiveHooks) and page.port > 0 and (page.host, page.sock is not None) == ("127.0.0.1", True)
    finally:
        page.close()


def test_train_called_directly_with_interactive_says_how_to_get_the_page(tmp_path, tiny_blip, shapes_dir):
    cfg = load_train_config(base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--interactive", "0"))
    with pytest.raises(UserError, match=r"interactive = '0': train\(cfg\) does not start the page itself; pass hooks=caption_train.cli.make_hooks\(cfg\)"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_train2_interactive_serves_the_page_until_ctrl_c(tmp_path, tiny_blip, shapes_dir):
    """`python train2.py ... --interactive 127.0.0.1:0`: the page comes up, pauses the run, captions an image with
    the run's weights; Ctrl-C while paused stops the run with a resumable checkpoint."""
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--epochs", "50", "--batch_size", "2", "--num_sample_captions", "0",
                     "--save_every_n_epochs", "0", "--interactive", "127.0.0.1:0")
    process = subprocess.Popen([sys.executable, str(REPO / "train2.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = wait_for(lambda: next((line.split(": ", 1)[1].strip() for line in lines if URL_LINE.match(line.strip())), None)
                       or process.poll() is not None and "exited", "the page's URL")
        assert url != "exited", lines
        page = Page(url)
        assert page.send("pause", {})[0] == 200
        status = wait_for(lambda: (s := page.status())["state"] == "paused" and s, "the run to pause")
        target = page.image("part0/img_0000.png")
        assert page.send("caption_generate", {"images": [target["id"]]})[0] == 200
        caption = wait_for(lambda: page.get(f"/api/images/{target['id']}")["model_caption"], "caption now")
        assert caption["step"] == status["step"] >= 1
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 130
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(10)
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in run_dir.glob("step-*")] == [f"step-{status['step'] + 1}"]  # the step in progress, finished and saved
    assert sum(bool(URL_LINE.match(line.strip())) for line in lines) == 1
