"""Every command with every family, on tiny local models: `evaluate`, `lint --model` (the family's own token limit)
and `merge --alpha_sweep` (WiSE-FT, scored by captioning) after a short LoRA run through `train`. Training,
`caption`, plain `merge`, `review` and `--interactive` are tested per family in tests/test_family_*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.evaluate import REPORT_JSON
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
    family, config = resolve_family(str(model_dir))
    assert main(["lint", str(six_shapes), "--model", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["captions"]["tokens"]["limit"] == family.text_length_limit(config)
    assert data["captions"]["tokens"]["max"] >= 3  # "a red circle": at least one token per word


def test_merge_alpha_sweep_after_a_lora_run(model_dir, six_shapes, tmp_path, capsys):
    args = base_args(six_shapes, model_dir, tmp_path / "runs", "--batch_size", "3", "--max_length", "64", "--lr", "1e-3",
                     "--num_sample_captions", "0", "--mixed_precision", "no")
    assert main(["train", *args]) == 0
    final = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["merge", str(final), str(tmp_path / "merged"), "--alpha_sweep", "0,1", "--eval_dir", str(six_shapes),
                 "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert {row["alpha"] for row in info["sweep"]} == {0.0, 1.0} and info["alpha"] in (0.0, 1.0)
    assert (tmp_path / "merged" / "config.json").is_file()
