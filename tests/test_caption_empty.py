"""A model that generates nothing: `caption` writes no empty caption files (which a later run would skip as done
and training would read as empty captions) unless --keep_empty, names the images, and `evaluate`'s report.html
shows "(empty)" where the prediction is empty.

The silent model is the tiny BLIP with its [SEP] logit biased far above every other token, saved with
save_pretrained: a real model whose generate() ends on its first token, as an undertrained or broken one does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from caption_train.captioning import find_images

from test_captioning import images, run  # noqa: F401 - images is a fixture


@pytest.fixture(scope="module")
def silent_blip(tmp_path_factory, tiny_blip) -> Path:
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration

    out = tmp_path_factory.mktemp("silent-blip")
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] = 1e4  # the end token, always
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_blip).save_pretrained(out)
    return out


def test_empty_generations_write_no_caption_files(capsys, images, silent_blip):
    args = [str(silent_blip), str(images), "--num_workers", "0", "--max_new_tokens", "4"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert not list(images.rglob("*.txt"))  # no 0-byte .txt for the next run to skip and training to read
    assert "captioned 0 images" in out
    assert "the model generated nothing for 24 images (part0/img_0000.png, part0/img_0002.png," in out and "(+19 more)" in out
    assert "--keep_empty" in out and "tries them again" in out

    # The next run tries them again rather than saying "nothing to caption".
    code, out, _ = run(capsys, *args)
    assert code == 0 and "nothing to caption" not in out and "generated nothing for 24 images" in out

    # Asked for: the empty captions are written (with the prefix), and the message says so.
    code, out, _ = run(capsys, *args, "--keep_empty", "--prefix", "mystyle, ")
    assert code == 0 and "captioned 24 images" in out and "--keep_empty: empty captions written" in out
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in find_images(images)] == ["mystyle, "] * 24


def test_empty_generations_are_left_out_of_the_jsonl_unless_kept(capsys, images, silent_blip, tmp_path):
    target = tmp_path / "captions.jsonl"
    args = [str(silent_blip), str(images), "--num_workers", "0", "--max_new_tokens", "4", "--output_jsonl", str(target)]
    code, out, _ = run(capsys, *args)
    assert code == 0 and target.read_text(encoding="utf-8") == ""
    assert "generated nothing for 24 images" in out and "no line in the jsonl file" in out
    code, out, _ = run(capsys, *args, "--keep_empty")
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert code == 0 and len(rows) == 24 and {r["text"] for r in rows} == {""}
    assert not list(images.rglob("*.txt"))


def test_report_html_shows_empty_predictions(capsys, shapes_dir, silent_blip, tmp_path):
    from caption_train.cli import main

    data = Path(shutil.copytree(shapes_dir, tmp_path / "data"))
    code = main(["evaluate", str(silent_blip), str(data), "--output_dir", str(tmp_path / "evals"), "--max_images", "3",
                 "--num_workers", "0", "--max_new_tokens", "4", "--thumbnail_size", "0"])
    report = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report.name == "report.html"
    page = report.read_text(encoding="utf-8")
    assert page.count('<td class="pred"><span class="empty">(empty)</span></td>') == 3
