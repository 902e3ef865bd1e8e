"""The demo stopped with Ctrl-C resumes with the command its hint gives: the same command plus --resume auto.

A real `caption-train demo` subprocess at the smallest settings it allows, sent SIGINT once its first optimizer
step is logged; then `caption-train demo ... --resume auto` in-process continues the same run to final/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption_train.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALLEST = ["--images", "12", "--heldout", "1", "--epochs", "4"]


def first_step_logged(workdir: Path) -> bool:
    return any("train/loss" in path.read_text(encoding="utf-8") for path in workdir.glob("runs/*/metrics.jsonl"))


def interrupted_demo(workdir: Path) -> tuple[int, str, str]:
    """Run the demo in a subprocess and send it SIGINT (Ctrl-C) after its first optimizer step."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "caption_train", "demo", "--workdir", str(workdir), *SMALLEST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and not first_step_logged(workdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the demo ended before its first step was logged"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.slow
def test_an_interrupted_demo_resumes_with_the_hinted_command(capsys, tmp_path):
    workdir = tmp_path / "demo"
    code, out, err = interrupted_demo(workdir)
    assert code == 130, err[-3000:]
    assert "resume with the same command plus: --resume auto" in out, out
    (run_dir,) = workdir.glob("runs/demo-*")
    (stopped_at,) = run_dir.glob("step-*")
    assert not (run_dir / "final").exists()

    # Run again without --resume: refused, and told how to continue; nothing is overwritten.
    assert main(["demo", "--workdir", str(workdir), *SMALLEST]) == 2
    assert "continue that demo with --resume auto" in capsys.readouterr().err

    # The hinted command: the same model and data, the same run continued from its checkpoint to final/.
    assert main(["demo", "--workdir", str(workdir), *SMALLEST, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "continuing the demo in" in out and "building" not in out
    assert f"resuming from {stopped_at} (step {stopped_at.name.split('-')[1]}," in out
    assert f"trained model: {run_dir / 'final'}" in out and "after training:" in out
    assert list(workdir.glob("runs/demo-*")) == [run_dir]  # no second run
