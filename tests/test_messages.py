"""Small user-facing messages: plurals, review naming its own argument, demo refusing a used workdir up front."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.text import plural


def test_plural():
    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "epoch") == "1 epoch" and plural(3, "optimizer step") == "3 optimizer steps"
    assert plural(2, "index", "indices") == "2 indices"


def test_one_image_is_one_image(capsys, tmp_path, shapes_dir, tiny_blip):
    """caption and train say "1 image", "1 optimizer step per epoch x 1 epoch = 1 step" (not "1 images", "1 steps")."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(shapes_dir / "part0" / "img_0000.png", one)
    assert main(["caption", str(tiny_blip), str(one), "--num_workers", "0", "--max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "captioning 1 image under" in out and "captioned 1 image in" in out
    shutil.copy(shapes_dir / "part0" / "img_0000.txt", one)
    assert main(["train", "--dataset_dir", str(one), "--model_name_or_path", str(tiny_blip), "--output_dir", str(tmp_path / "runs"),
                 "--epochs", "1", "--batch_size", "1", "--num_workers", "0", "--log_with", "none", "--num_sample_captions", "0"]) == 0
    assert "1 training / 0 validation images; 1 optimizer step per epoch x 1 epoch = 1 step" in capsys.readouterr().out


def test_review_names_its_own_argument(capsys, tmp_path):
    assert main(["review", str(tmp_path / "nosuchdir")]) == 2
    err = capsys.readouterr().err
    assert f"DATASET_DIR {tmp_path / 'nosuchdir'}: no such directory" in err and "--dataset_dir" not in err


@pytest.mark.parametrize("used", ["tiny-blip", "shapes", "heldout"])
def test_demo_refuses_a_used_workdir_before_building_anything(capsys, tmp_path, used):
    (tmp_path / used).mkdir()
    assert main(["demo", "--workdir", str(tmp_path), "--images", "12", "--epochs", "1"]) == 2
    captured = capsys.readouterr()
    assert f"{tmp_path / used} already exists; continue that demo with --resume auto" in captured.err and "building" not in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == [used]  # nothing built beside it


def test_demo_resume_refuses_a_workdir_whose_build_never_finished(capsys, tmp_path):
    """--resume needs the settings file prepare() writes last; folders without it are a build that was stopped."""
    (tmp_path / "shapes").mkdir()
    assert main(["demo", "--workdir", str(tmp_path), "--images", "12", "--epochs", "1", "--resume", "auto"]) == 2
    captured = capsys.readouterr()
    assert "were never finished (stopped while building); delete that folder, or pass a new --workdir" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    (tmp_path / "demo.json").write_text("not json")
    assert main(["demo", "--workdir", str(tmp_path), "--images", "12", "--epochs", "1", "--resume", "auto"]) == 2
    assert f"{tmp_path / 'demo.json'}: cannot read it" in capsys.readouterr().err


def test_demo_resume_refuses_other_data_settings(capsys, tmp_path):
    """The data on disk was generated with the recorded --images/--heldout/--seed: resuming with others is refused."""
    for name in ("tiny-blip", "shapes", "heldout"):
        (tmp_path / name).mkdir()
    (tmp_path / "demo.json").write_text('{"images": 12, "heldout": 1, "seed": 0}\n')
    assert main(["demo", "--workdir", str(tmp_path), "--images", "24", "--heldout", "1", "--resume", "auto"]) == 2
    assert "was built with --images 12 --heldout 1 --seed 0; resume with those, or pass a new --workdir" in capsys.readouterr().err


def test_demo_refuses_a_file_as_workdir(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--workdir", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_help_into_a_closed_pipe_is_quiet():
    """`caption-train --help | head -1`: the reader leaves early; no BrokenPipe traceback."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: every write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "caption_train", "--help"], stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_training_start_lines_count_in_plurals_and_small_features_in_kb(capsys, tmp_path, shapes_dir, tiny_blip):
    """"2 unreadable images", "2 captions with unknown characters" (not "2 unreadable image"), and the feature cache
    line gives a tiny model's features in B/KB (not "24 x 0.0 MB")."""
    import re

    data = Path(shutil.copytree(shapes_dir, tmp_path / "data"))
    for i in range(2):
        (data / f"empty{i}.png").write_bytes(b"")
        (data / f"empty{i}.txt").write_text("a red circle", encoding="utf-8")
        shutil.copy(shapes_dir / "part0" / "img_0000.png", data / f"utf16_{i}.png")
        (data / f"utf16_{i}.txt").write_bytes("a red circle".encode("utf-16"))
        (data / "part0" / f"img_000{2 * i}.txt").write_text("a red circle, big", encoding="utf-8")  # ',' is not in the tiny vocabulary
    assert main(["train", "--dataset_dir", str(data), "--model_name_or_path", str(tiny_blip), "--output_dir", str(tmp_path / "runs"), "--epochs", "1",
                 "--batch_size", "8", "--num_workers", "0", "--log_with", "none", "--num_sample_captions", "0", "--cache_image_features", "memory"]) == 0
    out = capsys.readouterr().out
    assert "skipped 4 (" in out and "2 unreadable images" in out and "2 captions not UTF-8" in out, out
    assert "  warnings: 2 captions with unknown characters\n" in out, out
    assert re.search(r"caching in memory \(24 x \d+(\.\d)? (B|KB) (float32|bfloat16)\)", out), out


def test_a_zero_byte_image_is_an_empty_file_in_caption_and_lint(capsys, tmp_path, shapes_dir, tiny_blip):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(shapes_dir / "part0" / "img_0000.png", folder / "good.png")
    (folder / "zero.png").write_bytes(b"")
    assert main(["caption", str(tiny_blip), str(folder), "--num_workers", "0", "--max_new_tokens", "3"]) == 0
    assert f"skipped unreadable image {folder / 'zero.png'}: empty file" in capsys.readouterr().err
    (folder / "zero.txt").write_text("a red circle", encoding="utf-8")
    main(["lint", str(folder)])
    assert "zero.png: empty file" in capsys.readouterr().out
