"""Per-image caption losses in the run (issue 16 item 1): `<run>/sample_losses.jsonl` through the command a user types,
on the tiny BLIP, checked against losses computed here from the run's own data: one line per training image per
epoch with the contract's keys, each caption's hash as read before shuffling, a kohya-repeated image's mean over its
repeats, captions the scan skipped counted and left out, and (torchrun, 2 processes) accelerate's padding repeats
counted once. Resume (no duplicates, a mid-epoch stop) is checked in test_resume.py, the hooks' view in test_hooks.py.

Training runs at lr 1e-12 in fp32 without dropout, so the final weights are the start's to ~1e-12 and any epoch's
per-image loss can be recomputed from final/ in eval mode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caption_train.cli import main
from caption_train.config import load_train_config
from caption_train.data.captions import CaptionTransform
from caption_train.data.dataset import CaptionDataset
from caption_train.data.images import load_rgb
from caption_train.data.scan import scan_dataset
from caption_train.files import write_text_atomic
from caption_train.hooks import TrainingHooks, caption_sha1
from caption_train.inference import load_for_inference
from caption_train.sample_losses import KEYS, LOSSES_FILE, read_sample_losses
from caption_train.tiny import make_shapes_dataset
from caption_train.train import train

from conftest import REPO, base_args
from test_train import free_port

FROZEN = ("--lr", "1e-12", "--mixed_precision", "no", "--peft_args", "{lora_dropout = 0}", "--num_sample_captions", "0")


def lines_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOSSES_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def tag_dataset(tmp_path_factory) -> Path:
    """6 shapes images with comma-separated captions (so that shuffling changes them), one more under `3_rep/`
    (kohya: served 3 times an epoch), and one with an empty caption (the scan skips it)."""
    root = tmp_path_factory.mktemp("tags")
    for path, caption in make_shapes_dataset(root, 7, seed=5, size=32):
        word, color, shape = caption.split()
        path.with_suffix(".txt").write_text(f"{color}, {shape},  {word}\n")  # a double space: the hash is of the text as read
    (root / "3_rep").mkdir()
    for suffix in (".png", ".txt"):
        (root / "part0" / f"img_0006{suffix}").rename(root / "3_rep" / f"img_0006{suffix}")
    shutil.copy(root / "part0" / "img_0000.png", root / "part0" / "empty.png")
    (root / "part0" / "empty.txt").write_text("  \n")
    return root


def expected_losses(final: Path, dataset: Path, epoch: int, *, seed: int = 42) -> dict[str, tuple[float, int, list[float]]]:
    """image -> (mean of its repeats' losses, their mean target count, each repeat's loss) in 0-based `epoch`, from
    final/ in eval mode, on the captions training was served: the dataset's own items (shuffle as the run had it)."""
    model, processor, family = load_for_inference(final, dtype=torch.float32)
    samples = scan_dataset(dataset, probe=False).samples
    data = CaptionDataset(samples, CaptionTransform(shuffle=True), seed=seed, repeat=True)
    data.set_epoch(epoch)
    per_image: dict[str, list[tuple[float, int]]] = {}
    for index in range(len(data)):
        image, caption, path, _ = data[index]
        batch = family.collate(processor, [image], [caption], max_length=32, prompt=None)
        with torch.no_grad():
            result = family.caption_loss(model, batch)
        per_image.setdefault(Path(path).relative_to(dataset).as_posix(), []).append((float(result.row_mean()[0]), int(result.row_tokens[0])))
    return {image: (sum(l for l, _ in rows) / len(rows), round(sum(t for _, t in rows) / len(rows)), [l for l, _ in rows])
            for image, rows in per_image.items()}


def test_one_line_per_training_image_per_epoch_with_the_contracts_numbers(capsys, tmp_path, tiny_blip, tag_dataset):
    assert main(["train", *base_args(tag_dataset, tiny_blip, tmp_path, "--epochs", "2", "--batch_size", "4", "--shuffle_captions", *FROZEN)]) == 0
    out = capsys.readouterr().out
    final = Path(out.strip().splitlines()[-1])
    lines = lines_of(final.parent)

    captions = {p.relative_to(tag_dataset).with_suffix(".png").as_posix(): " ".join(p.read_text().split()) for p in tag_dataset.rglob("*.txt")}
    trained = sorted(image for image, caption in captions.items() if caption)
    assert len(trained) == 7 and "part0/empty.png" not in trained
    assert all(list(line) == list(KEYS) for line in lines)
    assert [(line["epoch"], line["image"]) for line in lines] == [(epoch, image) for epoch in (1, 2) for image in trained]
    for epoch in (1, 2):
        assert f"caption losses, epoch {epoch}: 7 of 7 training images in {LOSSES_FILE}" in out
    assert "; 1 with an empty or unreadable caption not ranked" in out

    for epoch in (1, 2):
        expected = expected_losses(final, tag_dataset, epoch - 1)
        for line in (line for line in lines if line["epoch"] == epoch):
            loss, tokens, repeats = expected[line["image"]]
            # The text as read (whitespace runs collapsed), not the shuffled one training saw.
            assert line["caption_sha1"] == caption_sha1(captions[line["image"]]), line
            assert (line["loss"], line["tokens"]) == (pytest.approx(loss, abs=1e-5), tokens), line
        repeated = expected["3_rep/img_0006.png"][2]
        assert len(repeated) == 3 and max(repeated) - min(repeated) > 1e-3  # three shuffles: the mean is not any one of them
    assert read_sample_losses(final.parent / LOSSES_FILE)["3_rep/img_0006.png"][-1].epoch == 2


@pytest.mark.slow
def test_two_processes_write_each_image_once_as_first_served(tmp_path, tiny_blip):
    """torchrun, 2 CPU processes, 9 images at 4 a batch: the second step's batches are padded with repeats of the
    first step's samples (accelerate's even batches). Each image gets one line, with the loss it had when first
    served: the start's weights for the 8 images of step 1 (a large lr changes them before step 2), which
    `suspects` on the base model (fp32, no dropout) gives too."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 9, seed=3, size=32)
    out = tmp_path / "runs"
    args = base_args(data, tiny_blip, out, "--batch_size", "4", *FROZEN, "--lr", "0.05")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "train2.py"), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("caption losses, epoch 1: 9 of 9 training images") == 1  # the main process's note only
    (run_dir,) = out.iterdir()
    lines = lines_of(run_dir)
    assert sorted(line["image"] for line in lines) == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))

    assert main(["suspects", str(tiny_blip), str(data), "--output_dir", str(tmp_path / "base"), "--dtype", "float32",
                 "--device", "cpu", "--num_workers", "0", "--top", "0"]) == 0
    base = {row["image"]: row["loss"] for row in map(json.loads, (tmp_path / "base" / "suspects.jsonl").read_text().splitlines())}
    same = [line["image"] for line in lines if abs(line["loss"] - base[line["image"]]) < 1e-5]
    assert len(same) == 8, (lines, base)


def test_a_padding_repeat_counts_as_first_served_whichever_process_gathered_it_first():
    """epoch_lines on rows as gathered (process 0's, then process 1's): index 3 served by process 1 in batch 1 and
    repeated as padding by process 0 in batch 2 keeps batch 1's loss, though process 0's row comes first."""
    from caption_train.sample_losses import ServedLoss, epoch_lines

    rows = [ServedLoss(0, "/d/a.png", "s0", 2.0, 2, 1), ServedLoss(3, "/d/b.png", "s3", 9.0, 3, 2),  # process 0
            ServedLoss(3, "/d/b.png", "s3", 3.0, 3, 1), ServedLoss(0, "/d/a.png", "s0", 8.0, 2, 2)]  # process 1
    lines = epoch_lines(rows, epoch=4, dataset_dir="/d")
    assert [(line.image, line.loss, line.tokens, line.epoch) for line in lines] == [("a.png", 1.0, 2, 4), ("b.png", 1.0, 3, 4)]


class EditMidEpoch(TrainingHooks):
    """Follows a live-captions file (as the page does) and, after optimizer step `at`, gives `image` a new caption."""

    def __init__(self, live: Path, image: Path, caption: str, at: int):
        self.live, self.image, self.caption, self.at = live, image, caption, at

    def on_setup(self, run):
        run.follow_captions(self.live)

    def on_step_end(self, run, epoch):
        if run.step == self.at:
            write_text_atomic(self.live, json.dumps({"captions": {str(self.image): self.caption}, "excluded": []}))


def test_a_caption_edited_mid_epoch_gets_the_loss_and_hash_of_its_new_text(tmp_path, tiny_blip):
    """An image under `10_rep/` (10 servings an epoch of 12, batch 1) whose caption the page edits after step 6:
    epoch 1's line carries the new text's hash and the mean of the servings of the new text only, the same loss
    epoch 2 (all new text) has; the servings of the old text, whose loss differs, are left out."""
    data = tmp_path / "data"
    pairs = make_shapes_dataset(data, 3, seed=8, size=32, subfolders=0)
    (data / "10_rep").mkdir()
    for suffix in (".png", ".txt"):
        pairs[0][0].with_suffix(suffix).rename(data / "10_rep" / f"x{suffix}")
    image = data / "10_rep" / "x.png"
    old, new = (data / "10_rep" / "x.txt").read_text().strip(), "a green square"
    hooks = EditMidEpoch(tmp_path / "live.json", image, new, at=6)
    final = train(load_train_config(base_args(data, tiny_blip, tmp_path / "runs", "--epochs", "2", "--batch_size", "1", *FROZEN)), hooks=hooks)
    lines = {(line["epoch"], line["image"]): line for line in lines_of(final.parent)}
    first, second = lines[(1, "10_rep/x.png")], lines[(2, "10_rep/x.png")]
    assert first["caption_sha1"] == second["caption_sha1"] == caption_sha1(new)
    assert first["loss"] == pytest.approx(second["loss"], abs=1e-5)

    model, processor, family = load_for_inference(final, dtype=torch.float32)
    picture = load_rgb(image)
    with torch.no_grad():
        old_loss, new_loss = family.caption_loss(model, family.collate(processor, [picture] * 2, [old, new], max_length=32)).row_mean().tolist()
    assert second["loss"] == pytest.approx(new_loss, abs=1e-5) and abs(old_loss - new_loss) > 1e-2
