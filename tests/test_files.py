"""File permissions of everything we write: what open(path, "w") gives under the user's umask, kept on replace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from caption_train import checkpoint
from caption_train.files import give_default_modes, write_text_atomic


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under this umask; the process's own is put back after."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_what_open_w_gives(tmp_path, umask):
    write_text_atomic(tmp_path / "a.txt", "x")
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~umask


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_explicit_mode_wins(tmp_path, umask):
    write_text_atomic(tmp_path / "a.txt", "x", mode=0o604)
    assert mode(tmp_path / "a.txt") == 0o604


def test_give_default_modes(tmp_path, umask):
    (tmp_path / "sub").mkdir()
    for name in ("a.bin", "sub/b.json"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
    give_default_modes(tmp_path)
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "sub" / "b.json") == 0o666 & ~umask


def test_checkpoint_files_get_default_modes(tmp_path, tiny_blip, umask):
    from caption_train.inference import load_for_inference

    model, processor, _ = load_for_inference(tiny_blip)
    target = tmp_path / "run" / "final"
    tmp = checkpoint.begin_checkpoint(target)
    checkpoint.finish_checkpoint(tmp, target, model, processor, {"lr": 1e-4}, {"global_step": 1})
    files = [p for p in target.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.toml", "training_state.pt"} <= {p.name for p in files}
    assert {p.name: mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
