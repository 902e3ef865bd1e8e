"""`lint --model` reports what training does to captions: the max_length it uses (training's default or
--max_length, capped at the model's limit), the prompt, template and image tokens in the same row (chat VLMs), and
which captions it truncates; checked against the batches a real training run builds (tiny Qwen2-VL and BLIP)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import caption_train.train as train_module
from caption_train.cli import main
from caption_train.models.base import IGNORE_INDEX

from conftest import VOCAB_TEXTS, base_args
from tiny_families_chat import build_tiny_qwen2_vl

PHRASES = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def caption(n: int) -> str:
    """n phrases of the tiny vocabulary (each a few tokens)."""
    return " ".join(PHRASES[i % len(PHRASES)] for i in range(n))


def write(root: Path, items: dict[str, tuple[tuple[int, int], str]]) -> Path:
    for i, (name, (size, text)) in enumerate(items.items()):
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (30 * i % 256, 90, 160)).save(root / name)
        (root / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    return root


def lint_json(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["lint", *args, "--json", "--text_encoders", "none"])
    return json.loads(out.getvalue())


def truncated_in_lint(data: dict) -> set[str]:
    return {Path(f["path"]).name for f in data["findings"] if f["code"] == "long_caption"}


@pytest.fixture
def recorded_batches(monkeypatch) -> list[dict]:
    """Every batch the training loop takes from its loader (its labels and image paths, as the collate built them,
    before packing); the memory plan's probe batches are not among them."""
    batches: list[dict] = []
    original = train_module.model_inputs

    def recording(run, batch):
        batches.append({"labels": batch["labels"].clone(), "image_paths": list(batch["image_paths"])})
        return original(run, batch)

    monkeypatch.setattr(train_module, "model_inputs", recording)
    return batches


def truncated_in_training(batches: list[dict], full_targets) -> set[str]:
    """Images whose training row holds fewer caption targets than the whole caption has (`full_targets(path)`)."""
    cut = set()
    for batch in batches:
        for labels, path in zip(batch["labels"], batch["image_paths"]):
            if int((labels != IGNORE_INDEX).sum()) < full_targets(Path(path)):
                cut.add(Path(path).name)
    return cut


# ---------------------------------------------------------------------------------------------
# a chat VLM: the image's tokens share max_length with the caption


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    # max_pixels 112x112: a 56 px image gives 4 image tokens, a 112 px one 16.
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen"), VOCAB_TEXTS, max_pixels=112 * 112)


@pytest.fixture
def chat_dataset(tmp_path) -> Path:
    """Short, middle and long captions, each beside a small and a large image: at --max_length 45 the middle one
    fits after the small image's tokens but not after the large one's."""
    items = {}
    for size_name, size in (("small", (56, 56)), ("large", (112, 112))):
        for length_name, n in (("short", 2), ("middle", 5), ("long", 8)):
            items[f"{size_name}_{length_name}.png"] = (size, caption(n))
    return write(tmp_path / "ds", items)


@pytest.mark.slow
def test_chat_vlm_lint_truncates_what_training_truncates(tmp_path, qwen, chat_dataset, recorded_batches, capsys):
    data = lint_json(str(chat_dataset), "--model", str(qwen), "--max_length", "45")
    training = data["training"]
    assert (training["max_length"], training["origin"], training["model_limit"]) == (45, "--max_length", 512)
    lint_cut = truncated_in_lint(data)
    assert lint_cut == {"large_middle.png", "small_long.png", "large_long.png"}  # the image's tokens count
    assert training["truncated"] == 3 and training["captions_checked"] == 6
    # Prompt, template and image tokens before each caption: 12 more for the large images.
    assert training["tokens_before_caption"]["max"] - training["tokens_before_caption"]["min"] == 12

    from caption_train.models.chat_vlm import chat_turns
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    from caption_train.models import resolve_family

    family, config = resolve_family(str(qwen))
    before = chat_turns(family.training_processor(str(qwen), {}, config), family.default_prompt).before

    def full_targets(path: Path) -> int:  # the caption's tokens and the end-of-turn token
        return len(tokenizer(before + path.with_suffix(".txt").read_text().strip(), add_special_tokens=False)["input_ids"]) + 1

    capsys.readouterr()
    assert main(["train", *base_args(chat_dataset, qwen, tmp_path / "runs"), "--max_length", "45"]) == 0
    assert sum(len(b["image_paths"]) for b in recorded_batches) == 6
    assert truncated_in_training(recorded_batches, full_targets) == lint_cut
    # The trainer's start-up line says the same.
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("training with"))
    assert "max_length 45 (this run's max_length, within the model's 512)" in line and "3 of 6 captions truncated" in line, line


def test_chat_vlm_default_max_length_is_trainings(qwen, chat_dataset, capsys):
    """Without --max_length: training's default (128), not the model's 512 positions."""
    assert main(["lint", str(chat_dataset), "--model", str(qwen), "--text_encoders", "none"]) == 0
    out = capsys.readouterr().out
    assert "training with " in out and "max_length 128 (training's default, within the model's 512)" in out
    assert "0 of 6 captions truncated" in out and "of the limit of 512" not in out and "over the limit" not in out


def test_chat_vlm_max_length_without_room_is_an_error(qwen, chat_dataset, capsys):
    assert main(["lint", str(chat_dataset), "--model", str(qwen), "--max_length", "30", "--text_encoders", "none"]) == 1
    out = capsys.readouterr().out
    assert "[training_refuses] (3)" in out and "large_short.png: max_length 30: the prompt with its image takes" in out


def test_processor_settings_reach_lints_rows(qwen, chat_dataset):
    """model_config's processor table (a chat VLM's image size) changes the image tokens, as in training."""
    data = lint_json(str(chat_dataset), "--model", str(qwen), "--max_length", "45", "--model_config", "{processor = {max_pixels = 3136}}")
    assert data["training"]["tokens_before_caption"]["max"] == data["training"]["tokens_before_caption"]["min"]  # every image at 56 px
    assert truncated_in_lint(data) == {"small_long.png", "large_long.png"}


# ---------------------------------------------------------------------------------------------
# BLIP: max_length is capped at the model's positions


@pytest.fixture
def blip_dataset(tmp_path) -> Path:
    return write(tmp_path / "ds", {f"{n:02d}.png": ((32, 32), caption(n)) for n in (2, 5, 8, 12)})


@pytest.mark.slow
def test_blip_lint_truncates_what_training_truncates(tmp_path, tiny_blip, blip_dataset, recorded_batches, capsys):
    data = lint_json(str(blip_dataset), "--model", str(tiny_blip))
    training = data["training"]
    assert (training["max_length"], training["requested"], training["model_limit"]) == (32, 128, 32)
    lint_cut = truncated_in_lint(data)
    assert lint_cut == {"12.png"} and training["tokens_before_caption"]["max"] == 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_blip)
    assert main(["train", *base_args(blip_dataset, tiny_blip, tmp_path / "runs")]) == 0
    assert truncated_in_training(recorded_batches, lambda path: len(tokenizer(path.with_suffix(".txt").read_text())["input_ids"])) == lint_cut
    out = capsys.readouterr().out
    assert "max_length 32 (the model's limit; this run's max_length is 128)" in out and "1 of 4 captions truncated" in out


def test_blip_text_report_says_the_cap(tiny_blip, blip_dataset, capsys):
    assert main(["lint", str(blip_dataset), "--model", str(tiny_blip), "--text_encoders", "none"]) == 0
    out = capsys.readouterr().out
    assert "max_length 32 (the model's limit; training's default is 128); 1 of 4 captions truncated" in out
    assert "12.png: training keeps 32 of its " in out


def test_prompt_for_a_family_without_one_is_refused(tiny_blip, blip_dataset, capsys):
    assert main(["lint", str(blip_dataset), "--model", str(tiny_blip), "--prompt", "describe"]) == 2
    assert "trains without a prompt" in capsys.readouterr().err


def test_rows_without_images_are_checked_longest_first_until_a_batch_fits(tmp_path, tiny_blip, monkeypatch):
    """A family whose rows do not depend on the image: the longest captions are collated first, and once a batch
    fits whole, the shorter captions are not collated; the counts are those of collating every caption."""
    from caption_train.lint import _COLLATE_BATCH, lint_dataset, load_training_view
    from caption_train.models.blip import BlipFamily

    root = write(tmp_path / "ds", {f"{i:03d}.png": ((32, 32), caption(12 if i % 20 == 0 else 1 + i % 4)) for i in range(100)})
    view = load_training_view(str(tiny_blip))
    rows = [0]
    original = BlipFamily.collate

    def counting(self, processor, images, captions, **kwargs):
        rows[0] += len(captions)
        return original(self, processor, images, captions, **kwargs)

    monkeypatch.setattr(BlipFamily, "collate", counting)
    report = lint_dataset(root, training=view, encoders=[])
    assert (report.training.checked, sum(n > 0 for n in report.training.lost)) == (100, 5)
    assert rows[0] == 2 * 2 * _COLLATE_BATCH  # two batches, each collated with and without the limit
    everything = check_every_caption(view, root)
    assert sorted(report.training.lost) == sorted(everything.lost)


def check_every_caption(view, root):
    """The same check on every caption (no early stop)."""
    from caption_train.lint import LintReport, _check_truncation, _Pair
    from caption_train.data.images import read_header

    pairs = [_Pair(p.name, p, p.with_suffix(".txt").read_text(), read_header(p)) for p in sorted(root.glob("*.png"))]
    report = LintReport(root=root)
    _check_truncation(view, pairs, report)
    return report.training
