"""The prompt a run trains with is recorded (resolved: the family's default too) in the run's and every checkpoint's
config.toml, printed at start-up by train, caption and evaluate, and used by caption / evaluate / resume of the run
even after the family's default changes. `train --help` names the families that take no prompt from the registry."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.models import base
from caption_train.models.chat_vlm import ChatVlmFamily
from caption_train.tiny import make_shapes_dataset
from conftest import VOCAB_TEXTS, base_args

TRAINED_WITH = ChatVlmFamily.default_prompt  # the default when the run trained
LATER_DEFAULT = "Describe the picture."  # a later version's default


def recorded_prompt(folder: Path) -> str | None:
    return tomllib.loads((folder / "config.toml").read_text(encoding="utf-8")).get("prompt")


def caption_texts(model: Path, images: Path, out: Path, *extra: str) -> dict[str, str]:
    assert main(["caption", str(model), str(images), "--num_workers", "0", "--max_new_tokens", "6", "--output_jsonl", str(out), *extra]) == 0
    return {row["file_name"]: row["text"] for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}


@pytest.mark.slow
def test_a_runs_default_prompt_is_recorded_and_caption_evaluate_and_resume_keep_it(tmp_path, monkeypatch, capsys):
    from tiny_families_chat import build_tiny_qwen2_vl

    model = build_tiny_qwen2_vl(tmp_path / "qwen2-vl", VOCAB_TEXTS)
    data = tmp_path / "data"
    make_shapes_dataset(data, 6, seed=1, size=32)
    args = base_args(data, model, tmp_path / "runs", "--batch_size", "6", "--num_sample_captions", "0")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert f"prompt: {TRAINED_WITH!r} (the chat-vlm family's default); recorded in the run's config.toml" in out
    final = Path(out.strip().splitlines()[-1])
    assert recorded_prompt(final.parent) == recorded_prompt(final) == TRAINED_WITH

    # A later version changes the family's default: the run still captions with the prompt it was trained with.
    monkeypatch.setattr(ChatVlmFamily, "default_prompt", LATER_DEFAULT)
    trained = caption_texts(final, data, tmp_path / "run.jsonl")
    assert f"prompt: {TRAINED_WITH!r} (the one trained with, from {final / 'config.toml'})" in capsys.readouterr().out
    assert caption_texts(final, data, tmp_path / "given.jsonl", "--prompt", TRAINED_WITH) == trained
    assert caption_texts(final, data, tmp_path / "later.jsonl", "--prompt", LATER_DEFAULT) != trained  # the prompt matters here
    assert f"prompt: {LATER_DEFAULT!r} (--prompt)" in capsys.readouterr().out
    assert main(["evaluate", str(final), str(data), "--num_workers", "0", "--max_new_tokens", "6", "--output_dir", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert f"prompt: {TRAINED_WITH!r} (the one trained with, from {final / 'config.toml'})" in out
    report = Path(out.strip().splitlines()[-1]).with_name("report.json")
    assert {item["file_name"]: item["prediction"] for item in json.loads(report.read_text())["items"]} == trained

    # Resuming keeps it too, without a "config changed" note, and records it in the new checkpoints.
    assert main(["train", *args, "--epochs", "2", "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"prompt: {TRAINED_WITH!r} (kept from {final / 'config.toml'}); recorded in the run's config.toml" in out
    assert "config changed: prompt" not in out and "config changed: epochs" in out
    resumed_final = Path(out.strip().splitlines()[-1])
    assert resumed_final.parent == final.parent and recorded_prompt(resumed_final) == TRAINED_WITH


def test_a_family_without_a_prompt_says_none_everywhere(tiny_blip, shapes_dir, tmp_path, capsys):
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--num_sample_captions", "0")]) == 0
    out = capsys.readouterr().out
    none = "prompt: none (the blip family captions from the image alone)"
    assert none in out
    final = Path(out.strip().splitlines()[-1])
    assert recorded_prompt(final) is None and recorded_prompt(final.parent) is None
    images = shapes_dir / "part0"
    caption_texts(final, images, tmp_path / "captions.jsonl")
    assert none in capsys.readouterr().out
    caption_texts(final, images, tmp_path / "conditional.jsonl", "--prompt", "a red")  # BLIP: the text every caption starts from
    assert "prompt: 'a red' (--prompt)" in capsys.readouterr().out
    assert main(["evaluate", str(final), str(images), "--num_workers", "0", "--max_new_tokens", "3", "--output_dir", str(tmp_path / "eval")]) == 0
    assert none in capsys.readouterr().out


def test_train_help_names_the_families_that_take_no_prompt_from_the_registry(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--prompt PROMPT Instruction or task prompt, for the families that take one (chat-vlm, florence2 and paligemma; default: the "
            "family's own). The blip, blip-2 and git families train without one and refuse it.") in text

    class NoPromptFamily(base.ModelFamily):
        name = "zz-test"

    monkeypatch.setitem(base._REGISTRY, "zz-test", NoPromptFamily())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "The blip, blip-2, git and zz-test families train without one" in " ".join(capsys.readouterr().out.split())
