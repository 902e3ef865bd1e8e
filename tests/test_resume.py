"""Never lose a run: resume equivalence, signals, crash-kill + resume, non-finite losses, checkpoint pruning."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caption_train import resume
from caption_train.checkpoint import STATE_NAME, checkpoints_in, find_resumable
from caption_train.cli import main
from caption_train.config import load_train_config
from caption_train.errors import UserError
from caption_train.tracking import read_metrics
from caption_train.hooks import TrainingHooks
from caption_train.train import TrainingStopped, train

from conftest import REPO, base_args

# 24 images / batch 4 = 6 batches; accumulating 2 -> 3 optimizer steps per epoch; 3 epochs = 9 steps.
# Caption shuffle/dropout, flips and LoRA dropout are on, so any RNG or data-order slip changes the losses.
STOCHASTIC = ("--batch_size", "4", "--gradient_accumulation_steps", "2", "--epochs", "3", "--validation_split", "0.25",
              "--shuffle_captions", "--caption_dropout", "0.2", "--random_flip", "0.5", "--lr", "3e-3",
              "--peft_args", "{lora_dropout = 0.2}", "--num_sample_captions", "1")


class StopAtStep(TrainingHooks):
    """Acts like a SIGINT arriving during step `k` (right after step k-1, i.e. before or inside k's accumulation
    window): the loop must finish step k, save and stop."""

    def __init__(self, k: int):
        self.k = k

    def on_setup(self, run):
        if self.k == 1:
            run.request_stop()

    def on_step_end(self, run, epoch):
        if run.step == self.k - 1:
            run.request_stop()


class PoisonLoss(TrainingHooks):
    """Makes the loss NaN for the given (1-based) optimizer steps, through a forward hook on the real model's input
    embeddings (the loss is computed from the hidden states, outside the model's own output)."""

    def __init__(self, bad_steps: set[int]):
        self.bad_steps = bad_steps

    def on_setup(self, run):
        def poison(module, inputs, output):
            return output * float("nan") if run.step + 1 in self.bad_steps else output

        run.model.get_input_embeddings().register_forward_hook(poison)


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if key in row]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    out = tmp_path_factory.mktemp("full")
    return train(load_train_config(base_args(shapes_dir, tiny_blip, out, *STOCHASTIC)))


@pytest.mark.parametrize("k", [2, 3, 7])  # mid-epoch, at an epoch's last step, in the last epoch
def test_stop_and_resume_matches_uninterrupted(tmp_path, tiny_blip, shapes_dir, uninterrupted, k):
    args = base_args(shapes_dir, tiny_blip, tmp_path, *STOCHASTIC)
    with pytest.raises(TrainingStopped) as info:
        train(load_train_config(args), hooks=StopAtStep(k))
    assert info.value.exit_code == 130
    stopped_at = find_resumable(tmp_path, "caption-train")
    assert stopped_at.name == f"step-{k}"

    final = train(load_train_config([*args, "--resume", "auto"]))
    assert final.parent == stopped_at.parent  # same run directory, no new one
    assert losses(final.parent) == pytest.approx(losses(uninterrupted.parent), rel=1e-5)
    assert losses(final.parent, "val/loss") == pytest.approx(losses(uninterrupted.parent, "val/loss"), rel=1e-5)
    assert_same_weights(final, uninterrupted)


def test_resume_from_explicit_epoch_checkpoint(tmp_path, tiny_blip, shapes_dir, uninterrupted):
    """An epoch-N/ checkpoint copied out of the full run resumes to the same result."""
    import shutil

    run_copy = tmp_path / uninterrupted.parent.name
    shutil.copytree(uninterrupted.parent, run_copy, ignore=shutil.ignore_patterns("epoch-2", "epoch-3", "final"))
    final = train(load_train_config([*base_args(shapes_dir, tiny_blip, tmp_path, *STOCHASTIC), "--resume", str(run_copy / "epoch-1")]))
    assert losses(final.parent) == pytest.approx(losses(uninterrupted.parent), rel=1e-5)
    assert_same_weights(final, uninterrupted)


def test_changed_lr_wins_structural_change_refused(tmp_path, tiny_blip, shapes_dir, capsys):
    args = base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "2", "--lr", "1e-3", "--lr_scheduler", "OneCycleLR")
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(2))
    with pytest.raises(UserError, match=r"cannot change peft_args"):
        train(load_train_config([*args, "--resume", "auto", "--peft_args", "{r = 4}"]))
    capsys.readouterr()
    final = train(load_train_config([*args, "--resume", "auto", "--lr", "2e-3"]))
    assert "lr: checkpoint 0.001, now 0.002 (the new value wins" in capsys.readouterr().out
    rows = [r for r in read_metrics(final.parent / "metrics.jsonl") if "train/lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert max(r["train/lr"] for r in rows[2:]) > 1e-3  # the one-cycle peak now follows the new lr


def test_resume_errors_and_auto_without_runs(tmp_path, tiny_blip, shapes_dir, capsys):
    with pytest.raises(UserError, match="no such folder"):
        train(load_train_config([*base_args(shapes_dir, tiny_blip, tmp_path), "--resume", str(tmp_path / "nope")]))
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        train(load_train_config([*base_args(shapes_dir, tiny_blip, tmp_path), "--resume", str(tmp_path / "half")]))
    final = train(load_train_config([*base_args(shapes_dir, tiny_blip, tmp_path / "runs"), "--resume", "auto"]))
    assert "starting a new run" in capsys.readouterr().out and final.is_dir()
    # Resuming a finished run does nothing and points at its final/.
    assert train(load_train_config([*base_args(shapes_dir, tiny_blip, tmp_path / "runs"), "--resume", "auto"])) == final


def test_non_finite_step_is_skipped(tmp_path, tiny_blip, shapes_dir, capsys):
    final = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "2")), hooks=PoisonLoss({2}))
    rows = losses(final.parent)
    assert len(rows) == 6 and rows[1] != rows[1] and all(r == r for i, r in enumerate(rows) if i != 1)  # NaN only at step 2
    assert "non-finite loss at step 2" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in weights(final).values())


def test_diverging_run_stops_after_saving_last_good_state(tmp_path, tiny_blip, shapes_dir):
    args = base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "3", "--max_nonfinite_steps", "3", "--save_every_n_steps", "1")
    with pytest.raises(TrainingStopped, match="diverged") as info:
        train(load_train_config(args), hooks=PoisonLoss(set(range(2, 100))))
    assert info.value.exit_code == 3
    run_dir = next(tmp_path.iterdir())
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-1", "step-2", "step-3", "step-4"]
    # Steps 2-4 were skipped, so the saved weights are still step 1's.
    for name in ("step-2", "step-3", "step-4"):
        assert_same_weights(run_dir / name, run_dir / "step-1")


def test_save_total_limit_prunes_old_step_checkpoints(tmp_path, tiny_blip, shapes_dir):
    final = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path, "--epochs", "2", "--save_every_n_steps", "1", "--save_total_limit", "2")))
    names = sorted(p.name for p in final.parent.iterdir() if p.is_dir())
    assert names == ["epoch-1", "epoch-2", "final", "step-5", "step-6"]


# ---------------------------------------------------------------------------------------------
# Real processes: signals and SIGKILL


def start_training(tmp_path: Path, tiny_blip: Path, shapes_dir: Path, *extra: str) -> subprocess.Popen:
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--epochs", "200", "--save_every_n_epochs", "0", "--num_sample_captions", "0", *extra)
    return subprocess.Popen([sys.executable, str(REPO / "train2.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def wait_for_steps(run_root: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = list(run_root.glob("*/metrics.jsonl"))
        if metrics and len(read_metrics(metrics[0])) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_resumable_checkpoint(tmp_path, tiny_blip, shapes_dir, signum, code):
    process = start_training(tmp_path, tiny_blip, shapes_dir)
    wait_for_steps(tmp_path / "runs", 2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert "--resume auto" in stdout and "Traceback" not in stderr
    checkpoint = find_resumable(tmp_path / "runs", "caption-train")
    assert checkpoint is not None and checkpoint.name.startswith("step-")
    assert stderr.strip().splitlines()[-1].startswith("error: training interrupted by")


@pytest.mark.slow
def test_real_sigint_then_resume_matches_uninterrupted(tmp_path, tiny_blip, shapes_dir):
    """Ctrl-C on a real training process (the signal handler, not a hook setting the stop flag), then
    --resume auto in a new process: same losses, validation losses and weights as a run never interrupted."""
    stochastic = (*STOCHASTIC, "--epochs", "12", "--save_every_n_epochs", "0")  # 36 steps: the signal lands mid-run
    args = base_args(shapes_dir, tiny_blip, tmp_path / "runs", *stochastic)
    process = subprocess.Popen([sys.executable, str(REPO / "train2.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    wait_for_steps(tmp_path / "runs", 3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    stopped_at = find_resumable(tmp_path / "runs", "caption-train")
    assert stopped_at.name.startswith("step-") and 0 < int(stopped_at.name.split("-")[1]) < 36, stopped_at

    resumed = subprocess.run([sys.executable, str(REPO / "train2.py"), *args, "--resume", "auto"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {stopped_at}" in resumed.stdout
    final = Path(resumed.stdout.strip().splitlines()[-1])
    assert final.parent == stopped_at.parent

    reference = train(load_train_config(base_args(shapes_dir, tiny_blip, tmp_path / "reference", *stochastic)))
    assert len(losses(final.parent)) == 36
    assert losses(final.parent) == pytest.approx(losses(reference.parent), rel=1e-5)
    assert losses(final.parent, "val/loss") == pytest.approx(losses(reference.parent, "val/loss"), rel=1e-5)
    assert_same_weights(final, reference)


def assert_no_partial_checkpoint(runs: Path) -> None:
    """No folder under a checkpoint's final name (step-N/, epoch-N/, final/) may be half-written: each has the
    completion marker (training_state.pt, written last) and the full file set, and every file reads back whole.
    Half-written work belongs in a hidden temp folder, which resume ignores."""
    from caption_train.checkpoint import CHECKPOINT_NAME, STATE_NAME, is_complete

    expected = {"adapter_config.json", "adapter_model.safetensors", "config.toml", STATE_NAME, "rng_state_0.pt",
                "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    for folder in sorted(runs.glob("*/*")):
        if not CHECKPOINT_NAME.match(folder.name):
            continue
        files = {p.name for p in folder.iterdir()}
        assert is_complete(folder) and expected <= files, f"{folder} is incomplete: {sorted(files)}"
        torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
        torch.load(folder / "rng_state_0.pt", map_location="cpu", weights_only=False)
        weights(folder)


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes(tmp_path, tiny_blip, shapes_dir):
    """10 trials in a chain: start (or resume) a run that saves every step, SIGKILL it at a random moment (often
    inside a checkpoint write), and resume with --resume auto. Every resume must find an intact checkpoint, the
    run must finish, every checkpoint left behind must load, and each step must be logged exactly once. After
    every kill, nothing half-written may sit under a checkpoint's final name (the temp folder + rename)."""
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration

    rng = random.Random(1234)
    runs = tmp_path / "runs"
    # 300 steps: the tiny run trains ~30 steps/s with the feature cache, and all 10 kills must land before the end.
    args = [*base_args(shapes_dir, tiny_blip, runs, "--num_sample_captions", "0", "--epochs", "100", "--save_every_n_steps", "1",
                       "--save_every_n_epochs", "5", "--save_total_limit", "3"), "--resume", "auto"]
    for trial in range(10):
        logged = sum(len(read_metrics(m)) for m in runs.glob("*/metrics.jsonl"))
        log = tmp_path / f"trial{trial}.log"
        with log.open("w") as handle:
            process = subprocess.Popen([sys.executable, str(REPO / "train2.py"), *args], stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path)
            wait_for_steps(runs, logged + 1)
            while trial == 0 and find_resumable(runs, "caption-train") is None:
                time.sleep(0.05)  # the chain needs one checkpoint to start from
            # Short waits: 10 kills must land before the 90 steps are done, on a fast machine too.
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        assert_no_partial_checkpoint(runs)
        if trial:
            assert "resuming from" in log.read_text(), log.read_text()[-2000:]
    resumed = subprocess.run([sys.executable, str(REPO / "train2.py"), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = Path(resumed.stdout.strip().splitlines()[-1])
    assert final.name == "final" and len(list(runs.iterdir())) == 1
    for _, folder in checkpoints_in(final.parent):
        PeftModel.from_pretrained(BlipForConditionalGeneration.from_pretrained(tiny_blip), folder)
    assert [row["step"] for row in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in row] == list(range(1, 301))


def test_resume_from_another_directory_and_with_the_same_folder_spelled_differently(tmp_path, tiny_blip, shapes_dir, monkeypatch):
    """config.toml records absolute paths, so `--config_file <ckpt>/config.toml --resume <ckpt>` works from any
    working directory; a dataset_dir naming the same folder another way (absolute, relative, a symlink) is no change."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here" / "data").symlink_to(shapes_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "here")
    args = base_args(Path("data"), tiny_blip, Path("runs"), "--epochs", "2", "--num_sample_captions", "0")
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(2))
    (ckpt,) = (tmp_path / "here" / "runs").glob("*/step-2")
    saved = tomllib.loads((ckpt / "config.toml").read_text())
    assert saved["dataset_dir"] == str(shapes_dir.resolve()) and saved["output_dir"] == str(tmp_path / "here" / "runs")

    # The same folder as an absolute path (and through the symlink) is accepted.
    for spelling in (str(shapes_dir), "data"):
        assert resume.check_config_compatible(load_train_config([*args, "--dataset_dir", spelling, "--resume", str(ckpt)]), ckpt) == []
    # A config.toml from before paths were recorded absolute: relative to where the run started.
    old_style = tmp_path / "old-style" / "step-2"
    shutil.copytree(ckpt, old_style)
    (old_style / "config.toml").write_text((ckpt / "config.toml").read_text().replace(str(shapes_dir.resolve()), "data"))
    assert resume.check_config_compatible(load_train_config([*args, "--dataset_dir", str(shapes_dir), "--resume", str(old_style)]), old_style) == []
    with pytest.raises(UserError, match="cannot change dataset_dir"):
        resume.check_config_compatible(load_train_config([*args, "--dataset_dir", str(tmp_path / "elsewhere"), "--resume", str(ckpt)]), ckpt)

    monkeypatch.chdir(tmp_path / "elsewhere")
    final = train(load_train_config(["--config_file", str(ckpt / "config.toml"), "--resume", str(ckpt)]))
    assert final == ckpt.parent / "final" and [r["step"] for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("key, old, new", [("kohya_repeats", "false", "true"), ("freeze_vision_tower", "false", "true")])
def test_repeats_and_a_frozen_tower_cannot_change_on_resume(tmp_path, key, old, new):
    """kohya_repeats changes the epoch's length and order, freeze_vision_tower the trained parameters: a resumed
    position or optimizer state would then mean something else."""
    from caption_train import checkpoint
    from caption_train.config import to_toml_dict
    from caption_train.resume import check_config_compatible

    base = ["--dataset_dir", str(tmp_path), "--peft_module", "none"]
    checkpoint.write_config(tmp_path / checkpoint.CONFIG_NAME, to_toml_dict(load_train_config([*base, f"--{key}", old])))
    assert check_config_compatible(load_train_config([*base, f"--{key}", old]), tmp_path) == []
    with pytest.raises(UserError, match=f"cannot change {key}"):
        check_config_compatible(load_train_config([*base, f"--{key}", new]), tmp_path)


# ---------------------------------------------------------------------------------------------
# Length-grouped batches (data/batching.py): a resumed run draws exactly the batches the interrupted one would have


@contextlib.contextmanager
def recording_rows(size: int = 18):
    """The dataset indices the training loader fetches, in order (num_workers 0: fetched in this process): every
    fetch from a CaptionDataset of `size` items (the 18 training images; the validation set has 6) is noted, then
    served by the real __getitem__."""
    from caption_train.data.dataset import CaptionDataset

    rows: list[int] = []
    original = CaptionDataset.__getitem__

    def getitem(self, index):
        if len(self) == size:
            rows.append(index)
        return original(self, index)

    CaptionDataset.__getitem__ = getitem
    try:
        yield rows
    finally:
        CaptionDataset.__getitem__ = original


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    from mixed_dataset import make_mixed_dataset

    out = tmp_path_factory.mktemp("mixed")
    make_mixed_dataset(out, 24, seed=3)
    return out


# 18 training images / batch 4 = 5 batches; accumulating 2 -> 3 optimizer steps per epoch; 2 epochs = 6 steps.
GROUPED = (*STOCHASTIC, "--group_by_length", "on", "--epochs", "2", "--num_sample_captions", "0")


@pytest.fixture(scope="module")
def uninterrupted_grouped(tmp_path_factory, tiny_blip, mixed_dir) -> tuple[Path, list[int]]:
    with recording_rows() as rows:
        final = train(load_train_config(base_args(mixed_dir, tiny_blip, tmp_path_factory.mktemp("full-grouped"), *GROUPED)))
    return final, rows


@pytest.mark.parametrize("k", [2, 4])  # mid-epoch, in the next epoch after the first epoch's end
def test_grouped_stop_and_resume_matches_uninterrupted(tmp_path, tiny_blip, mixed_dir, uninterrupted_grouped, k, capsys):
    """Rows of different lengths, grouped: stop at step k, --resume auto; the same batches (rows fetched), losses,
    validation losses and weights as the run never interrupted."""
    reference, reference_rows = uninterrupted_grouped
    args = base_args(mixed_dir, tiny_blip, tmp_path, *GROUPED)
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(k))
    state = resume.load_state(find_resumable(tmp_path, "caption-train"))
    assert state["batch_order"]["lengths"] is not None
    capsys.readouterr()
    with recording_rows() as rows:
        final = train(load_train_config([*args, "--resume", "auto"]))
    assert "batches: grouped by length (the checkpoint's row lengths)" in capsys.readouterr().out
    done = state["epoch"] * 18 + state["batches_done"] * 4  # 18 training images, batch 4
    assert rows == reference_rows[done:]
    assert losses(final.parent) == pytest.approx(losses(reference.parent), rel=1e-5)
    assert losses(final.parent, "val/loss") == pytest.approx(losses(reference.parent, "val/loss"), rel=1e-5)
    assert_same_weights(final, reference)


def test_resume_keeps_the_batch_order_when_captions_changed(tmp_path, tiny_blip, mixed_dir, capsys):
    """Captions edited between the stop and the resume (the page edits them in place) change the rows' lengths: the
    resumed run still draws the batches the interrupted run would have (from the lengths its checkpoint keeps), so no
    row of the epoch in progress is trained twice or skipped. Asking it to drop the grouping is refused in one line."""
    data = tmp_path / "data"
    shutil.copytree(mixed_dir, data)
    args = base_args(data, tiny_blip, tmp_path / "runs", *GROUPED)
    with recording_rows() as full:
        train(load_train_config(base_args(data, tiny_blip, tmp_path / "reference", *GROUPED)))
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(2))
    texts = sorted(data.rglob("*.txt"))
    captions = [path.read_text() for path in texts]
    for path, caption in zip(texts, reversed(captions)):  # long captions become short ones and the other way round
        path.write_text(caption)
    state = resume.load_state(find_resumable(tmp_path / "runs", "caption-train"))
    assert main(["train", *args, "--resume", "auto", "--group_by_length", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --group_by_length off: the checkpoint's run grouped its rows by length"), err
    with recording_rows() as resumed:
        train(load_train_config([*args, "--resume", "auto"]))
    done = state["epoch"] * 18 + state["batches_done"] * 4
    assert resumed == full[done:]


def test_a_run_without_grouping_resumes_without_it(tmp_path, tiny_blip, mixed_dir, capsys):
    """A checkpoint of a run that batched at random (or was written before grouping existed: no batch order saved)
    resumes in random order under `auto`; `on` is refused in one line."""
    args = base_args(mixed_dir, tiny_blip, tmp_path, "--epochs", "2", "--batch_size", "4", "--group_by_length", "off", "--num_sample_captions", "0")
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=StopAtStep(2))
    checkpoint = find_resumable(tmp_path, "caption-train")
    state = resume.load_state(checkpoint)
    assert state["batch_order"] == {"lengths": None}
    del state["batch_order"]  # as a checkpoint from before length grouping
    torch.save(state, checkpoint / STATE_NAME)
    assert main(["train", *args, "--resume", "auto", "--group_by_length", "on"]) == 2
    assert "error: --group_by_length on: the checkpoint's run batched its rows in random order" in capsys.readouterr().err
    assert main(["train", *args, "--resume", "auto", "--group_by_length", "auto"]) == 0
    assert "batches: random order (as the checkpoint's run)" in capsys.readouterr().out
