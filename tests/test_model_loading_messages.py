"""What loading a model says, through the commands users type: a model folder without its processor files, a hub id
with no hub to reach (or offline mode and no cached copy), a BLIP/GIT prompt that fills the text model's positions,
and transformers' own progress bars kept out of train / caption / merge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from caption_train.cli import main
from conftest import REPO, VOCAB_TEXTS, base_args

TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
IMAGE_PROCESSOR_FILES = ("processor_config.json",)  # transformers 5 keeps the image processor's settings in it


def without(model: Path, out: Path, names: tuple[str, ...]) -> Path:
    """A copy of the model folder `model` without the files `names`."""
    shutil.copytree(model, out)
    for name in names:
        (out / name).unlink()
    return out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("captioning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_git(tmp_path_factory) -> Path:
    from tiny_families_git import build_tiny_git

    return build_tiny_git(tmp_path_factory.mktemp("git") / "git", VOCAB_TEXTS)


@pytest.fixture(scope="module")
def tiny_paligemma(tmp_path_factory) -> Path:
    from tiny_families_chat import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("paligemma") / "paligemma", VOCAB_TEXTS)


# ---------------------------------------------------------------------------- a folder without its processor

MISSING_TOKENIZER = "the tokenizer (tokenizer.json / vocab.txt / vocab.json / *.model / *.tiktoken, with tokenizer_config.json)"
MISSING_IMAGE_PROCESSOR = "the image processor config (preprocessor_config.json, or processor_config.json with an image_processor table)"


@pytest.mark.parametrize("family", ["blip", "git", "paligemma"])
@pytest.mark.parametrize("dropped, missing", [(TOKENIZER_FILES, MISSING_TOKENIZER), (IMAGE_PROCESSOR_FILES, MISSING_IMAGE_PROCESSOR),
                                              (TOKENIZER_FILES + IMAGE_PROCESSOR_FILES, f"{MISSING_TOKENIZER} and {MISSING_IMAGE_PROCESSOR}")],
                         ids=["tokenizer", "image-processor", "both"])
def test_caption_with_a_model_folder_missing_processor_files_says_which_in_one_line(request, family, dropped, missing, shapes_dir, tmp_path, capsys):
    """Without its image processor config transformers raised a 43-line OSError traceback; without its tokenizer
    files it silently built an empty 5-token tokenizer and captioned with it."""
    source = request.getfixturevalue({"blip": "tiny_blip", "git": "tiny_git", "paligemma": "tiny_paligemma"}[family])
    model = without(source, tmp_path / "model", dropped)
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "part0", images, ignore=shutil.ignore_patterns("*.txt"))
    assert main(["caption", str(model), str(images), "--num_workers", "0"]) == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == (
        f"error: model {model}: its processor files are missing: {missing}; save the model's processor beside it "
        "(processor.save_pretrained(folder)) or copy those files from the model it was made from")
    assert not list(images.glob("*.txt"))  # nothing captioned


@pytest.mark.parametrize("family", ["blip", "git"])
@pytest.mark.parametrize("dropped, missing", [(TOKENIZER_FILES, MISSING_TOKENIZER), (IMAGE_PROCESSOR_FILES, MISSING_IMAGE_PROCESSOR)],
                         ids=["tokenizer", "image-processor"])
def test_train_with_a_model_folder_missing_processor_files_says_which_in_one_line(request, family, dropped, missing, shapes_dir, tmp_path, capsys):
    source = request.getfixturevalue({"blip": "tiny_blip", "git": "tiny_git"}[family])
    model = without(source, tmp_path / "model", dropped)
    out = tmp_path / "runs"
    assert main(["train", *base_args(shapes_dir, model, out)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: model {model}: its processor files are missing: {missing}; save the model's processor beside it "
        "(processor.save_pretrained(folder)) or copy those files from the model it was made from")
    assert not out.exists()  # bad input leaves nothing behind


def test_a_runs_checkpoint_missing_processor_files_captions_with_the_base_models_processor(tiny_blip, shapes_dir, tmp_path, capsys):
    """An adapter folder whose tokenizer.json is gone: the base model's processor is used, not the empty 6-token
    tokenizer transformers builds from the tokenizer_config.json left behind (its captions would be [UNK] soup)."""
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--num_sample_captions", "0")]) == 0
    final = Path(capsys.readouterr().out.strip().splitlines()[-1])
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "part0", images, ignore=shutil.ignore_patterns("*.txt"))
    args = ["--num_workers", "0", "--max_new_tokens", "5", "--output_jsonl"]
    assert main(["caption", str(final), str(images), *args, str(tmp_path / "whole.jsonl")]) == 0
    (final / "tokenizer.json").unlink()
    assert main(["caption", str(final), str(images), *args, str(tmp_path / "partial.jsonl")]) == 0
    assert (tmp_path / "partial.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()


# ---------------------------------------------------------------------------- the hub: unreachable, or offline and not cached


def run_timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    """`caption_train.cli.main(argv)` in a fresh Python (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when
    imported): (exit code, stderr, seconds main() took, imports excluded)."""
    code = ("import sys, time, caption_train.cli, caption_train.captioning, caption_train.train, caption_train.models\n"
            "start = time.perf_counter(); rc = caption_train.cli.main(sys.argv[1:])\n"
            "print(f'SECONDS {time.perf_counter() - start:.2f}', file=sys.stderr); sys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    lines = result.stderr.splitlines()
    seconds = float(lines[-1].split()[1])
    return result.returncode, "\n".join(lines[:-1]), seconds


@pytest.fixture()
def hub_env(tmp_path) -> dict[str, str]:
    """No offline mode, a hub endpoint that does not resolve, an empty local cache of our own."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return env | {"HF_ENDPOINT": "http://nonexistent.invalid", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO)}


def put_in_hub_cache(model: Path, hf_home: Path, repo_id: str) -> None:
    """Lay `model`'s files out as huggingface_hub's cache holds a downloaded model (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def assert_line(line: str, before: str, after: str) -> None:
    """`line` is `before`, the resolver's reason (its wording differs between systems), then `after`."""
    assert line.startswith(before) and line.endswith(after) and len(line) > len(before) + len(after), line


# huggingface_hub retries a failed connection five times, waiting 1+2+4+8+8 s: the old path took 23 s at the least.
FAST_S = 15


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_in_one_line_that_says_how_to_use_the_cache(hub_env, tiny_blip, shapes_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "part0", images, ignore=shutil.ignore_patterns("*.txt"))
    for argv, label in [(["caption", "some-org/not-cached", str(images)], "MODEL some-org/not-cached: not a local folder; as a hub id: "),
                        (["train", *base_args(shapes_dir, Path("some-org/not-cached"), tmp_path / "runs")], "--model_name_or_path some-org/not-cached: ")]:
        rc, err, seconds = run_timed(argv, hub_env, tmp_path)
        assert rc == 2 and "Retrying" not in err and seconds < FAST_S, (seconds, err)
        assert_line(one_error_line(err), f"error: {label}the Hugging Face Hub (http://nonexistent.invalid) cannot be reached (", ") and some-org/not-cached "
                    "is not in the local cache; check your network or pass a local model folder (HF_HUB_OFFLINE=1 loads models from the local cache only)")
    assert not (tmp_path / "runs").exists()
    # A model in the local cache: the line says so, and HF_HUB_OFFLINE=1 then captions with it.
    put_in_hub_cache(tiny_blip, Path(hub_env["HF_HOME"]), "some-org/cached")
    rc, err, seconds = run_timed(["caption", "some-org/cached", str(images), "--num_workers", "0", "--max_new_tokens", "3"], hub_env, tmp_path)
    assert rc == 2 and seconds < FAST_S, (seconds, err)
    assert_line(one_error_line(err), "error: MODEL some-org/cached: not a local folder; as a hub id: the Hugging Face Hub (http://nonexistent.invalid) "
                "cannot be reached (", "); some-org/cached is in the local cache: set HF_HUB_OFFLINE=1 to load it from there")
    rc, err, _ = run_timed(["caption", "some-org/cached", str(images), "--num_workers", "0", "--max_new_tokens", "3"], hub_env | {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert rc == 0, err
    assert len(list(images.glob("*.txt"))) == len(list(images.glob("*.png")))


@pytest.mark.slow
def test_offline_mode_and_an_id_not_in_the_cache_is_one_line(hub_env, shapes_dir, tmp_path):
    env = hub_env | {"HF_HUB_OFFLINE": "1"}
    cache = Path(env["HF_HOME"]) / "hub"
    for argv, label in [(["caption", "some-org/not-cached", str(shapes_dir)], "MODEL some-org/not-cached: not a local folder; as a hub id: "),
                        (["train", *base_args(shapes_dir, Path("some-org/not-cached"), tmp_path / "runs")], "--model_name_or_path some-org/not-cached: ")]:
        rc, err, _ = run_timed(argv, env, tmp_path)
        assert rc == 2
        assert one_error_line(err) == (f"error: {label}HF_HUB_OFFLINE=1 is set (local cache only) and some-org/not-cached is not in the local cache "
                                       f"({cache}); unset HF_HUB_OFFLINE to download it, or pass a local model folder")


# ---------------------------------------------------------------------------- a prompt longer than the text positions


@pytest.mark.parametrize("family", ["blip", "git"])
def test_caption_with_a_prompt_that_fills_the_text_positions_is_one_line(request, family, shapes_dir, tmp_path, capsys):
    """The tiny models have 32 text positions; 11 x "a red circle" is 33 words, 34 tokens with the start token.
    BLIP raised `ValueError: max_new_tokens must be greater than 0` out of main(), GIT an IndexError."""
    model = request.getfixturevalue({"blip": "tiny_blip", "git": "tiny_git"}[family])
    prompt = " ".join(["a red circle"] * 11)
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "part0", images, ignore=shutil.ignore_patterns("*.txt"))
    assert main(["caption", str(model), str(images), "--num_workers", "0", "--prompt", prompt]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --prompt {prompt!r}: it takes 34 of the text model's 32 positions (start token included), which leaves no room for a caption; use a shorter prompt")
    assert not list(images.glob("*.txt"))
    # One word shorter still leaves room: the caption is the prompt and what fits after it.
    shorter = " ".join(["a red circle"] * 10)
    assert main(["caption", str(model), str(images), "--num_workers", "0", "--prompt", shorter, "--max_new_tokens", "40"]) == 0
    assert all(p.read_text(encoding="utf-8").startswith(shorter) for p in images.glob("*.txt"))


# ---------------------------------------------------------------------------- transformers' progress bars


def test_train_caption_and_merge_print_no_transformers_bars_and_put_the_setting_back(tiny_blip, shapes_dir, tmp_path, capfd):
    """A full fine-tune (its checkpoints are whole models: "Writing model shards"), captioning it ("Loading
    weights") and merging it halfway back to the base (two loads, one save). The bars are on before and after."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--peft_module", "none", "--num_sample_captions", "0")]) == 0
    captured = capfd.readouterr()
    final = Path(captured.out.strip().splitlines()[-1])
    assert (final / "model.safetensors").is_file() and "training:" in captured.err
    assert "full fine-tune: " in captured.out and "none: " not in captured.out
    images = tmp_path / "images"
    shutil.copytree(shapes_dir / "part0", images, ignore=shutil.ignore_patterns("*.txt"))
    assert main(["caption", str(final), str(images), "--num_workers", "0", "--max_new_tokens", "3"]) == 0
    assert main(["merge", str(final), str(tmp_path / "merged"), "--alpha", "0.5"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    for err in (captured.err, capfd.readouterr().err):
        assert not [bar for bar in TRANSFORMERS_BARS if bar in err], err
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()  # as they were
    # The bars still come out where nothing of ours covers them (so the checks above can see one).
    from transformers import BlipForConditionalGeneration

    BlipForConditionalGeneration.from_pretrained(tiny_blip)
    assert "Loading weights" in capfd.readouterr().err
