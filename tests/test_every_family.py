"""Every command with every family (BLIP-2 with OPT and with Flan-T5 counted apart), on tiny local models: `evaluate`,
`lint --model` (the family's own token limit), and after a short LoRA run through `train`: `merge --alpha 1 / 0`
(captions as the adapter's / the base model's, through `caption`), `merge --alpha_sweep` (WiSE-FT scored by
captioning) and the review page's "caption now". Labels, overfitting and `--interactive` are tested per family in
tests/test_family_*.py and tests/test_interactive_api.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.evaluate import REPORT_JSON
from caption_train.inference import load_for_inference
from caption_train.merge import MERGE_INFO
from caption_train.models import resolve_family
from caption_train.tiny import make_shapes_dataset

from conftest import base_args
from tiny_every_family import BUILDERS


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def six_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("six")
    make_shapes_dataset(out, 6, seed=3, size=40, subfolders=0)
    return out


def test_evaluate_captions_and_scores_every_image(model_dir, six_shapes, tmp_path, capsys):
    assert main(["evaluate", str(model_dir), str(six_shapes), "--output_dir", str(tmp_path), "--num_workers", "0",
                 "--max_new_tokens", "4", "--dtype", "float32", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    report = json.loads((Path(out.strip().splitlines()[-1]).parent / REPORT_JSON).read_text(encoding="utf-8"))
    assert report["images"] == 6 and {"bleu4", "rougeL", "cider", "exact_match"} <= set(report["metrics"])
    assert all(isinstance(item["prediction"], str) for item in report["items"])


def test_lint_counts_tokens_against_the_familys_limit(model_dir, six_shapes, capsys):
    """lint --model builds each caption's training row with the family's own collate, at the max_length training
    uses (min(max_length, the family's limit)); at --max_length 3 every 3-word caption is cut (or, where the prompt
    and image fill the 3 tokens, refused), as training would."""
    family, config = resolve_family(str(model_dir))
    assert main(["lint", str(six_shapes), "--model", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    limit = family.text_length_limit(config)
    assert data["captions"]["tokens"]["limit"] == min(128, limit) == data["training"]["max_length"]
    assert data["training"]["model_limit"] == limit and data["training"]["captions_checked"] == 6 and data["training"]["truncated"] == 0
    assert data["captions"]["tokens"]["max"] >= 3  # "a red circle": at least one token per word
    main(["lint", str(six_shapes), "--model", str(model_dir), "--json", "--max_length", "3"])
    data = json.loads(capsys.readouterr().out)
    assert data["training"]["truncated"] + data["training"]["refused"] == 6, data["training"]


@pytest.fixture(scope="module")
def lora_final(model_dir, six_shapes, tmp_path_factory) -> Path:
    """A short LoRA run through `train` (lr high enough that the adapter changes the captions of most families)."""
    runs = tmp_path_factory.mktemp("runs")
    args = base_args(six_shapes, model_dir, runs, "--batch_size", "3", "--epochs", "4", "--max_length", "64", "--lr", "2e-2",
                     "--num_sample_captions", "0", "--mixed_precision", "no", "--save_every_n_epochs", "0")
    assert main(["train", *args]) == 0
    (final,) = runs.glob("*/final")
    return final


def captions(model: Path, images: Path, out: Path) -> dict[str, str]:
    jsonl = out / f"{model.name}-{len(list(out.glob('*.jsonl')))}.jsonl"
    assert main(["caption", str(model), str(images), "--output_jsonl", str(jsonl), "--num_workers", "0", "--device", "cpu",
                 "--dtype", "float32", "--max_new_tokens", "6"]) == 0
    return {row["file_name"]: row["text"] for row in map(json.loads, jsonl.read_text().splitlines())}


def test_merge_alpha_one_captions_as_the_adapter_alpha_zero_as_the_base(model_dir, lora_final, six_shapes, tmp_path):
    for alpha in ("1", "0"):
        assert main(["merge", str(lora_final), str(tmp_path / f"alpha{alpha}"), "--alpha", alpha]) == 0
    assert captions(tmp_path / "alpha1", six_shapes, tmp_path) == captions(lora_final, six_shapes, tmp_path)
    assert captions(tmp_path / "alpha0", six_shapes, tmp_path) == captions(model_dir, six_shapes, tmp_path)


def test_merge_alpha_sweep_scores_each_alpha_by_captioning(lora_final, six_shapes, tmp_path, capsys):
    assert main(["merge", str(lora_final), str(tmp_path / "merged"), "--alpha_sweep", "0,1", "--eval_dir", str(six_shapes),
                 "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert {row["alpha"] for row in info["sweep"]} == {0.0, 1.0} and info["alpha"] in (0.0, 1.0)
    assert (tmp_path / "merged" / "config.json").is_file()


def test_review_page_captions_with_the_adapter(lora_final, six_shapes, tmp_path):
    from test_interactive_api import review_caption_now

    data = tmp_path / "data"
    shutil.copytree(six_shapes, data)
    record = review_caption_now(data, lora_final, tmp_path / "state", image="img_0000.png")
    model, processor, family = load_for_inference(lora_final)
    expected = family.generate(model, processor, [load_rgb(data / "img_0000.png")], prompt=family.training_prompt(None))
    assert record["step"] is None and record["text"] == expected[0]
