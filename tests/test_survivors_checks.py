"""Checks whose breaking no other test noticed, each fed exactly its case: an unknown key in a `model_config`
sub-table, BLEU-4's brevity penalty and tag F1's best reference (hand-computed values), an image swapped for a
symlink out of the dataset after the page started, `merge --alpha_sweep` keeping the best alpha, and captions
longer than the model's positions with a large --max_length.

    python -m pytest -q tests/test_survivors_checks.py
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.merge import MERGE_INFO
from caption_train.metrics import score_captions
from caption_train.tiny import make_shapes_dataset

from conftest import base_args
from tiny_every_family import BUILDERS


# ---------------------------------------------------------------------------------------------
# Config: model_config sub-tables


@pytest.mark.parametrize("family, table, where", [("blip2-opt", "qformer_config", "file"), ("blip", "text_config", "flag")])
def test_an_unknown_key_in_a_model_config_sub_table_is_one_line_naming_it(family, table, where, shapes_dir, tmp_path, capsys):
    model = BUILDERS[family](tmp_path / "model")
    runs = tmp_path / "runs"
    if where == "file":  # the spelling, in a config file
        config = tmp_path / "config.toml"
        config.write_text(f"[model_config]\n{table} = {{no_such_key = 1}}\n")
        extra = ["--config_file", str(config)]
    else:
        extra = ["--model_config", f"{{{table} = {{no_such_key = 1}}}}"]
    capsys.readouterr()
    assert main(["train", *base_args(shapes_dir, model, runs), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model_config.{table}: unknown key 'no_such_key'" in err, err
    assert not runs.exists() or not any(runs.iterdir())  # refused before a run folder was made


# ---------------------------------------------------------------------------------------------
# Metrics, hand-computed


def test_bleu4_applies_the_brevity_penalty():
    """Every n-gram of a 6-word prediction is in its 9-word reference: all four precisions are 1, so BLEU-4 is the
    brevity penalty alone, exp(1 - 9/6), in corpus BLEU and in the item's sentence BLEU."""
    scores = score_captions(["the cat sat on the mat"], ["the cat sat on the mat in the sun"])
    expected = 100 * math.exp(1 - 9 / 6)  # 60.65
    assert scores.corpus["bleu4"] == pytest.approx(expected, abs=1e-4)
    assert scores.items[0]["bleu"] == pytest.approx(expected, abs=1e-4)
    # A prediction as long as its reference has no penalty: the same n-grams score 100.
    assert score_captions(["the cat sat on the mat"], ["the cat sat on the mat"]).corpus["bleu4"] == pytest.approx(100.0)


def test_tag_scores_take_each_items_best_matching_reference():
    """Item 1: reference 1 shares no tag, reference 2 shares a and b (tp 2, fp 1, fn 1, F1 2/3).
    Item 2: reference 1 gives F1 2/3 (tp 1, fp 1), reference 2 gives 0.8 (tp 2, fn 1): the best is the second.
    Micro-averaged over both items' best references: tp 4, fp 1, fn 2."""
    predictions = ["a, b, c", "sky, tree"]
    references = [["x, y", "a, b, d"], ["sky", "sky, tree, grass"]]
    scores = score_captions(predictions, references)
    assert [item["tag_f1"] for item in scores.items] == pytest.approx([200 / 3, 80.0])
    precision, recall = 100 * 4 / 5, 100 * 4 / 6
    assert scores.corpus["tag_precision"] == pytest.approx(precision)
    assert scores.corpus["tag_recall"] == pytest.approx(recall)
    assert scores.corpus["tag_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


# ---------------------------------------------------------------------------------------------
# The page: an image swapped for a symlink after the scan


def test_an_image_swapped_for_a_symlink_out_of_the_dataset_is_not_served(tmp_path):
    """The scan hides images that are symlinks out of the dataset; one swapped in after the page started is caught
    when it is served: a real server, a real request for the image's id."""
    from caption_train.iterative.review import Review

    from test_interactive_api import Page

    data, outside = tmp_path / "data", tmp_path / "outside"
    make_shapes_dataset(data, 2, seed=3, size=32, subfolders=0)
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a secret outside the dataset")
    review = Review(data, state_dir=tmp_path / "state")
    try:
        page = Page(review.start())
        image_id = page.image("img_0000.png")["id"]
        assert page.raw("GET", f"/api/image/{image_id}") == (200, (data / "img_0000.png").read_bytes())
        (data / "img_0000.png").unlink()
        (data / "img_0000.png").symlink_to(secret)
        status, body = page.raw("GET", f"/api/image/{image_id}")
        assert status == 404 and b"secret" not in body, (status, body[:80])
        # A symlink that stays inside the dataset is still served.
        (data / "img_0000.png").unlink()
        (data / "img_0000.png").symlink_to(data / "img_0001.png")
        assert page.raw("GET", f"/api/image/{image_id}") == (200, (data / "img_0001.png").read_bytes())
    finally:
        review.close()


# ---------------------------------------------------------------------------------------------
# merge --alpha_sweep


def caption_folder(model: Path, folder: Path) -> dict[str, str]:
    """`caption MODEL FOLDER --overwrite`: the model's captions become the folder's .txt files."""
    assert main(["caption", str(model), str(folder), "--overwrite", "--num_workers", "0", "--device", "cpu", "--dtype", "float32",
                 "--max_new_tokens", "6"]) == 0
    return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}


@pytest.mark.slow
def test_alpha_sweep_keeps_the_best_alpha_not_the_last(tiny_blip, tmp_path):
    """The evaluation folder's captions are what the alpha = 0.5 merge writes, so 0.5 scores best of 0, 0.5, 1 (by
    CIDEr-D, then ROUGE-L: a tiny model's few words can tie CIDEr-D at 0): neither the first nor the last alpha."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 6, seed=3, size=32, subfolders=0)
    runs = tmp_path / "runs"
    assert main(["train", *base_args(data, tiny_blip, runs, "--batch_size", "3", "--epochs", "4", "--lr", "2e-2",
                                     "--num_sample_captions", "0", "--mixed_precision", "no", "--save_every_n_epochs", "0")]) == 0
    (final,) = runs.glob("*/final")
    assert main(["merge", str(final), str(tmp_path / "half"), "--alpha", "0.5"]) == 0
    heldout = Path(shutil.copytree(data, tmp_path / "heldout"))
    by_alpha = {alpha: caption_folder(model, heldout) for alpha, model in ((0.0, tiny_blip), (1.0, final), (0.5, tmp_path / "half"))}
    assert by_alpha[0.5] != by_alpha[0.0] and by_alpha[0.5] != by_alpha[1.0]  # the alphas caption differently
    assert main(["merge", str(final), str(tmp_path / "merged"), "--alpha_sweep", "0,0.5,1", "--eval_dir", str(heldout),
                 "--num_workers", "0", "--max_new_tokens", "6", "--device", "cpu", "--eval_dtype", "float32"]) == 0
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    exact = {row["alpha"]: row["metrics"]["exact_match"] for row in info["sweep"]}
    assert exact[0.5] == 100.0 and exact[0.0] < 100.0 and exact[1.0] < 100.0, info["sweep"]
    assert info["alpha"] == 0.5, info["sweep"]
    assert caption_folder(tmp_path / "merged", Path(shutil.copytree(data, tmp_path / "again"))) == by_alpha[0.5]  # what was saved


# ---------------------------------------------------------------------------------------------
# max_length beyond the model's positions


def test_captions_longer_than_the_models_positions_train_with_a_large_max_length(tiny_blip, shapes_dir, tmp_path, capsys):
    """The tiny BLIP has 32 text positions; one caption has ~90 tokens and --max_length asks for 512. Training caps
    the length at the model's limit (and says so in the start-up summary) instead of indexing past its positions."""
    data = Path(shutil.copytree(shapes_dir, tmp_path / "data"))
    long_caption = ", ".join(["a red circle on a blue square"] * 12)
    (data / "part0" / "img_0000.txt").write_text(long_caption)
    assert main(["train", *base_args(data, tiny_blip, tmp_path / "runs", "--max_length", "512", "--num_sample_captions", "0",
                                     "--save_every_n_epochs", "0")]) == 0
    out = capsys.readouterr().out
    assert "max_length 32 (the model's limit; this run's max_length is 512); 1 of 24 captions truncated" in out, out
