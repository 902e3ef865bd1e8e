"""Checkpoints, through `train`: every structural key refused on resume by name, metrics.jsonl not duplicated by a
resumed run, and `--save_total_limit` renaming a checkpoint away before deleting it.

    python -m pytest -q tests/test_survivors_checkpoints.py

One real run (tiny BLIP, 3 steps, a step-N/ checkpoint per step) serves every test; tests that continue it work on
a copy.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest

from caption_train import resume
from caption_train.checkpoint import checkpoints_in
from caption_train.cli import main
from caption_train.tracking import read_metrics

from conftest import base_args
from hostile_corpus import permissions_enforced

STEPS = 3  # 24 shapes / batch 8, one epoch


@pytest.fixture(scope="module")
def stepped_run(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    """A finished run with step-1/ .. step-3/, epoch-1/ and final/."""
    out = tmp_path_factory.mktemp("stepped")
    assert main(["train", *base_args(shapes_dir, tiny_blip, out, "--save_every_n_steps", "1", "--num_sample_captions", "0")]) == 0
    (run_dir,) = out.glob("caption-train-*")
    return run_dir


def copy_run(run_dir: Path, out: Path) -> Path:
    """The run under another output_dir (a resumed run writes into its checkpoint's run folder)."""
    return Path(shutil.copytree(run_dir, out / run_dir.name))


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# Resume: what may not change


# The spec, one changed value (flags) per key: each would make the checkpoint's weights, optimizer state or data
# order mean something else. The code's list (resume.STRUCTURAL_KEYS) is tested too: a key dropped from it fails
# here, a key added to it without a value here fails below.
STRUCTURAL_CHANGES = {
    "model_name_or_path": ["--model_name_or_path", "someone/another-model"],
    "peft_module": ["--peft_module", "IA3"],
    "peft_args": ["--peft_args", "{r = 4}"],
    "model_config": ["--model_config", "{hidden_dropout_prob = 0.2}"],
    "dataset_dir": ["--dataset_dir", "<another dataset>"],
    "optimizer": ["--optimizer", "Prodigy"],
    "batch_size": ["--batch_size", "4"],
    "gradient_accumulation_steps": ["--gradient_accumulation_steps", "2"],
    "validation_split": ["--validation_split", "0.25"],
    "seed": ["--seed", "7"],
    "kohya_repeats": ["--kohya_repeats", "false"],
    "freeze_vision_tower": ["--peft_module", "none", "--freeze_vision_tower", "true"],  # only valid without adapters
}


@pytest.mark.parametrize("key", sorted(set(STRUCTURAL_CHANGES) | set(resume.STRUCTURAL_KEYS)))
def test_every_structural_key_is_refused_on_resume_by_name(key, stepped_run, tmp_path, capsys):
    if key not in STRUCTURAL_CHANGES:
        pytest.fail(f"resume.STRUCTURAL_KEYS has {key!r}: add a changed value for it to STRUCTURAL_CHANGES")
    change = [str(tmp_path) if value == "<another dataset>" else value for value in STRUCTURAL_CHANGES[key]]
    checkpoint = stepped_run / "step-1"
    before = listing(stepped_run)
    capsys.readouterr()
    assert main(["train", "--config_file", str(checkpoint / "config.toml"), "--resume", str(checkpoint), *change]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --resume {checkpoint}: cannot change "), err
    details = err.split("cannot change ", 1)[1].split(" when resuming")[0]
    assert re.search(rf"(^|, ){key} ", details), err  # this key is named, with its old and new value
    assert listing(stepped_run) == before  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# Resume: metrics.jsonl


def test_a_resumed_run_replays_the_metrics_after_its_checkpoint_without_duplicates(stepped_run, tmp_path):
    """A run that went on past its checkpoint (then crashed, or the user picks an earlier checkpoint) has logged rows
    after it; the resumed run logs those steps again, so the rows after the checkpoint must go first."""
    run_dir = copy_run(stepped_run, tmp_path)
    logged = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3]  # rows after step-1 exist
    checkpoint = run_dir / "step-1"
    assert main(["train", "--config_file", str(checkpoint / "config.toml"), "--resume", str(checkpoint), "--output_dir", str(tmp_path)]) == 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert [r["epoch"] for r in rows if "train/loss" not in r] == [1]  # the end-of-epoch row, once
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx([r["train/loss"] for r in logged if "train/loss" in r], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# --save_total_limit


def resume_with_limit(run_dir: Path, out: Path, limit: int = 1) -> int:
    """Continue the run for a second epoch (steps 4-6), a step-N/ per step, keeping the newest `limit`."""
    final = run_dir / "final"
    return main(["train", "--config_file", str(final / "config.toml"), "--resume", str(final), "--output_dir", str(out),
                 "--epochs", "2", "--save_total_limit", str(limit)])


STEP_DIR = re.compile(r"^step-\d+$")


class DeletionLog:
    """Records, through Python's audit hooks, every rename and deletion under `root` while `on` (a hook cannot be
    removed once added, so it stays and only listens while a test wants it)."""

    EVENTS = ("os.rename", "os.remove", "os.rmdir", "shutil.rmtree")

    def __init__(self, root: Path):
        self.root, self.events, self.on = str(root), [], True
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.on and event in self.EVENTS and isinstance(args[0], (str, os.PathLike)):
            path = os.fspath(args[0])
            if path.startswith(self.root):
                self.events.append((event, Path(path), Path(os.fspath(args[1])) if event == "os.rename" else None))


def test_pruning_renames_a_checkpoint_away_before_deleting_it(stepped_run, tmp_path):
    """A deletion that stops part-way (a crash, a file it cannot remove) must not leave a partial step-N/ under its
    name, where it would look like a checkpoint: every step-N/ is renamed to a hidden name, then deleted there."""
    run_dir = copy_run(stepped_run, tmp_path)
    log = DeletionLog(run_dir)
    try:
        assert resume_with_limit(run_dir, tmp_path) == 0
    finally:
        log.on = False
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-6"]
    renamed = {src.name: dst for event, src, dst in log.events if event == "os.rename" and src.parent == run_dir and STEP_DIR.match(src.name)}
    assert sorted(renamed) == [f"step-{n}" for n in range(1, 6)]
    assert all(dst.parent == run_dir and dst.name.startswith(".") for dst in renamed.values()), renamed
    deleted = [path for event, path, _ in log.events if event != "os.rename"]
    assert {path for path in deleted if path.parent == run_dir} == set(renamed.values())  # deleted under the hidden names
    in_place = [path for path in deleted if any(part.parent == run_dir and STEP_DIR.match(part.name) for part in (path, *path.parents))]
    assert in_place == []  # nothing deleted inside a step-N/ still under its own name
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # and nothing left over


@pytest.mark.permissions
def test_a_checkpoint_that_cannot_be_fully_deleted_is_not_left_under_its_name(stepped_run, tmp_path, capsys):
    """step-1/ holds a folder whose files cannot be deleted: pruning it fails part-way. The run goes on with a
    one-line warning, and what is left of step-1/ is not under its name (nor listed as a checkpoint)."""
    if not permissions_enforced():
        pytest.skip("root ignores the read-only folder (.ci/run reruns this test without that override)")
    run_dir = copy_run(stepped_run, tmp_path)
    locked = run_dir / "step-1" / "locked"
    locked.mkdir()
    (locked / "kept.bin").write_bytes(b"x")
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        capsys.readouterr()
        assert resume_with_limit(run_dir, tmp_path) == 0
        err = capsys.readouterr().err
        assert not (run_dir / "step-1").exists()
        assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-6"]
        assert all(folder.name in ("epoch-1", "epoch-2", "step-6", "final", "final-step-3") for _, folder in checkpoints_in(run_dir))
        warnings = [line for line in err.splitlines() if "could not delete all of step-1/" in line]
        assert len(warnings) == 1 and str(run_dir / ".step-1.tmp-delete") in warnings[0], err
    finally:
        for folder in run_dir.rglob("locked"):
            folder.chmod(stat.S_IRWXU)
