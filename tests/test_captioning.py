"""The `caption` command on the tiny local BLIP: .txt files beside images, skip/overwrite, jsonl, adapters, bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from caption_train.captioning import GenerationOptions, find_images, generate_captions
from caption_train.cli import main
from caption_train.inference import caption_paths, load_for_inference

from conftest import base_args
from test_files import umask  # noqa: F401 - the fixture


@pytest.fixture
def images(tmp_path, shapes_dir) -> Path:
    """A copy of the shapes images without their captions: part0/ and part1/ with 12 PNGs each."""
    root = tmp_path / "images"
    shutil.copytree(shapes_dir, root, ignore=shutil.ignore_patterns("*.txt"))
    return root


@pytest.fixture(scope="module")
def lora_final(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    """A real LoRA adapter: the tiny BLIP trained for 2 epochs at a high LR so its captions differ from the base's."""
    out = tmp_path_factory.mktemp("caption-runs")
    assert main(["train", *base_args(shapes_dir, tiny_blip, out, "--epochs", "2", "--lr", "1e-2", "--save_every_n_epochs", "0", "--num_sample_captions", "0")]) == 0
    (final,) = out.glob("*/final")
    return final


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["caption", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_a_txt_beside_every_image_recursively(capsys, images, tiny_blip):
    # float32 like the reference below (the default, auto, is bf16 on a CPU with native bf16)
    code, out, _ = run(capsys, str(tiny_blip), str(images), "--batch_size", "5", "--num_workers", "0", "--max_new_tokens", "6", "--dtype", "float32")
    assert code == 0
    pngs = find_images(images)
    assert len(pngs) == 24 and {p.parent.name for p in pngs} == {"part0", "part1"}
    model, processor, family = load_for_inference(tiny_blip)
    expected = caption_paths(model, processor, family, pngs, batch_size=5, max_new_tokens=6)
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in pngs] == expected
    assert "captioned 24 images" in out and "images/s" in out
    assert not [p for p in images.rglob(".*")]  # no temp files left behind


def test_existing_captions_untouched_unless_overwrite(capsys, images, tiny_blip):
    keep = images / "part0" / "img_0000.txt"
    keep.write_text("my own caption", encoding="utf-8")
    code, out, _ = run(capsys, str(tiny_blip), str(images), "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and keep.read_text(encoding="utf-8") == "my own caption"
    assert "captioned 23 images" in out and "skipped 1 that already had a .txt" in out

    code, out, _ = run(capsys, str(tiny_blip), str(images), "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and "nothing to caption" in out  # all done: the model is not even loaded

    code, out, _ = run(capsys, str(tiny_blip), str(images), "--num_workers", "0", "--max_new_tokens", "4", "--overwrite", "--prefix", "trig, ", "--suffix", ".")
    assert code == 0 and "captioned 24 images" in out
    text = keep.read_text(encoding="utf-8")
    assert text != "my own caption" and text.startswith("trig, ") and text.endswith(".")


def test_unreadable_images_and_name_clashes_are_reported_and_skipped(capsys, images, tiny_blip):
    (images / "part0" / "broken.png").write_bytes(b"not a png")
    shutil.copy(images / "part1" / "img_0001.png", images / "part1" / "img_0001.jpg")  # both want img_0001.txt
    (images / ".hidden").mkdir()
    shutil.copy(images / "part1" / "img_0001.png", images / ".hidden" / "x.png")
    code, out, err = run(capsys, str(tiny_blip), str(images), "--num_workers", "2", "--max_new_tokens", "4")
    assert code == 0
    assert "broken.png" in err and "not an image" in err
    assert "captioned 24 images" in out and "1 unreadable" in out and "1 whose .txt another image" in out
    assert not (images / "part0" / "broken.txt").exists() and not (images / ".hidden" / "x.txt").exists()


def test_output_jsonl_instead_of_txt(capsys, images, tiny_blip, tmp_path):
    target = tmp_path / "out" / "captions.jsonl"
    code, out, _ = run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target), "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and target.is_file()
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["file_name"] for r in rows] == [p.relative_to(images).as_posix() for p in find_images(images)]
    assert rows[0]["file_name"] == "part0/img_0000.png" and all(isinstance(r["text"], str) for r in rows)
    assert not list(images.rglob("*.txt"))  # jsonl mode writes no .txt files


def test_output_jsonl_continues_and_repairs_a_cut_last_line(capsys, images, tiny_blip, tmp_path):
    target = tmp_path / "captions.jsonl"
    names = [p.relative_to(images).as_posix() for p in find_images(images)]
    # An interrupted earlier run: 5 whole lines and a sixth cut off mid-write (no newline).
    earlier = [json.dumps({"file_name": name, "text": f"earlier {i}"}) + "\n" for i, name in enumerate(names[:5])]
    target.write_text("".join(earlier) + json.dumps({"file_name": names[5], "text": "cut"})[:20], encoding="utf-8")
    os.chmod(target, 0o640)
    code, out, _ = run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target), "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and "captioned 19 images" in out and "skipped 5 already in it" in out
    text = target.read_text(encoding="utf-8")
    assert text.startswith("".join(earlier)) and text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["file_name"] for r in rows) == sorted(names)  # every image once: none twice, the cut one redone
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # continued in place
    # A finished file: nothing to do, nothing appended.
    code, out, _ = run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target))
    assert code == 0 and "nothing to caption: all 24 images" in out and target.read_text(encoding="utf-8") == text
    # --overwrite starts afresh.
    assert run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target), "--overwrite", "--num_workers", "0", "--max_new_tokens", "4")[0] == 0
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["file_name"] for r in rows] == names and not any(r["text"].startswith("earlier") for r in rows)


def test_output_jsonl_that_is_not_ours_is_refused(capsys, images, tiny_blip, tmp_path):
    target = tmp_path / "notes.jsonl"
    target.write_text("my notes\nmore notes", encoding="utf-8")
    code, _, err = run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target))
    assert code == 2 and "line 1 is not a" in err and target.read_text(encoding="utf-8") == "my notes\nmore notes"
    target.write_text("one line without newline", encoding="utf-8")  # not cut from one of ours: never truncated
    code, _, err = run(capsys, str(tiny_blip), str(images), "--output_jsonl", str(target))
    assert code == 2 and target.read_text(encoding="utf-8") == "one line without newline"


def test_captions_get_the_umask_mode_and_replaced_ones_keep_theirs(capsys, images, tiny_blip, umask):
    kept = images / "part0" / "img_0000.txt"
    kept.write_text("mine", encoding="utf-8")
    os.chmod(kept, 0o640)
    code, _, _ = run(capsys, str(tiny_blip), str(images), "--overwrite", "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and kept.read_text(encoding="utf-8") != "mine"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in images.rglob("*.txt") if p != kept}
    assert len(modes) == 23 and set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_adapter_final_dir_captions_with_its_base(capsys, images, lora_final, tiny_blip):
    code, _, _ = run(capsys, str(lora_final), str(images), "--num_workers", "0", "--max_new_tokens", "6", "--dtype", "float32")
    assert code == 0
    pngs = find_images(images)
    # Same captions as the unmerged adapter (the command merges it for speed: that must not change them).
    model, processor, family = load_for_inference(lora_final)
    expected = caption_paths(model, processor, family, pngs, batch_size=16, max_new_tokens=6)
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in pngs] == expected
    base, processor, family = load_for_inference(tiny_blip)
    assert expected != caption_paths(base, processor, family, pngs, max_new_tokens=6)  # the adapter does something


def test_adapter_whose_base_moved(capsys, images, lora_final, tiny_blip, tmp_path):
    moved = tmp_path / "final"
    shutil.copytree(lora_final, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "tiny-blip")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, str(moved), str(images))
    assert code == 2
    assert err.startswith("error: adapter's base model not found: looked for ") and "gone/tiny-blip" in err and "--base_model" in err
    assert len(err.strip().splitlines()) == 1
    code, _, _ = run(capsys, str(moved), str(images), "--base_model", str(tiny_blip), "--num_workers", "0", "--max_new_tokens", "4")
    assert code == 0 and len(list(images.rglob("*.txt"))) == 24


def test_decoding_options(capsys, images, tiny_blip, tmp_path):
    target = tmp_path / "prompted.jsonl"
    args = [str(tiny_blip), str(images), "--num_workers", "0", "--max_new_tokens", "5", "--output_jsonl", str(target)]
    assert run(capsys, *args, "--prompt", "a photography of", "--num_beams", "2", "--repetition_penalty", "1.3", "--min_length", "2")[0] == 0
    texts = [json.loads(line)["text"] for line in target.read_text().splitlines()]
    assert all(t.startswith("a photography of") for t in texts)
    first = [run(capsys, *args, "--overwrite", "--temperature", "1.5", "--top_p", "0.9", "--seed", "3")[0], target.read_text()]
    second = [run(capsys, *args, "--overwrite", "--temperature", "1.5", "--top_p", "0.9", "--seed", "3")[0], target.read_text()]
    assert first == second and first[0] == 0  # sampling is reproducible with a seed


def test_generate_captions_restores_training_mode(tiny_blip, images):
    model, processor, family = load_for_inference(tiny_blip)
    model.train()
    results = list(generate_captions(model, processor, family, find_images(images)[:3], GenerationOptions(max_new_tokens=3), batch_size=2))
    assert [r.index for r in results] == [0, 1, 2] and all(r.text is not None for r in results)
    assert model.training


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["{model}", "{tmp}/missing"], "IMAGES_DIR {tmp}/missing: no such directory"),
        (None, ["{model}", ""], "IMAGES_DIR is empty"),
        ("empty", ["{model}", "{tmp}/empty"], "no images found"),
        (None, ["{tmp}/nowhere/model", "{images}"], "MODEL {tmp}/nowhere/model: no such folder"),
        ("empty", ["{tmp}/empty", "{images}"], "neither a peft adapter (adapter_config.json) nor a model (config.json)"),
        ("run", ["{tmp}/run", "{images}"], "training run folder; pass its checkpoint"),
        (None, ["{model}", "{images}", "--num_beams", "0", "--top_p", "2"], "--num_beams must be >= 1, got 0; --top_p must be in (0, 1], got 2.0"),
        (None, ["{model}", "{images}", "--batch_size", "x"], "argument --batch_size: invalid int value: 'x'"),
        (None, ["{model}", "{images}", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, images, tiny_blip, setup, args, message):
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    if setup == "run":
        (tmp_path / "run" / "final").mkdir(parents=True)
    values = {"model": str(tiny_blip), "tmp": str(tmp_path), "images": str(images)}
    code, _, err = run(capsys, *[a.format(**values) for a in args])
    assert code == 2
    assert message.format(**values) in err and len(err.strip().splitlines()) == 1
    assert not list(images.rglob("*.txt"))


def test_a_run_captions_with_the_prompt_it_was_trained_with(tmp_path):
    """Without --prompt, a checkpoint folder's config.toml prompt is used (a chat VLM trained on a custom
    instruction must be asked the same way); --prompt still wins; other folders keep the family default (None)."""
    from caption_train.captioning import generation_options, parse_args

    run = tmp_path / "final"
    run.mkdir()
    (run / "config.toml").write_text('prompt = "Describe the picture in tags."\nepochs = 3\n', encoding="utf-8")
    plain = tmp_path / "model"
    plain.mkdir()
    assert generation_options(parse_args([str(run), "imgs"]), model_dir=str(run))[0].prompt == "Describe the picture in tags."
    assert generation_options(parse_args([str(run), "imgs", "--prompt", "x"]), model_dir=str(run))[0].prompt == "x"
    assert generation_options(parse_args([str(plain), "imgs"]), model_dir=str(plain))[0].prompt is None
