"""`caption-train suspects MODEL DATASET` (issue 16 item 3), through the command a user types, on the tiny BLIP:
the same per-image losses as a run's `sample_losses.jsonl` for the same model and data, the ranking and `--top`
in suspects.jsonl and suspects.html, resuming from scored.jsonl (a torn last line, a caption changed since, other
settings refused, --overwrite), the refusals (an output folder inside the dataset, a folder without captions, a model
that is not a captioner) and the default output folder.

The equality check trains at lr 1e-12 in fp32 without dropout or caption shuffling (test_sample_losses.FROZEN), so
the weights training measured its losses with are final/'s to ~1e-12.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.hooks import caption_sha1
from caption_train.suspects import META_FILE, SCORED_FILE, SUSPECTS_HTML, SUSPECTS_JSONL
from caption_train.tiny import make_shapes_dataset

from conftest import base_args
from test_sample_losses import FROZEN, lines_of

RECORD_KEYS = ["rank", "image", "loss", "tokens", "caption_sha1", "caption", "model_caption"]
FAST = ("--device", "cpu", "--num_workers", "0", "--max_new_tokens", "4", "--thumbnail_size", "0")
SWAPPED = "zebra crossing at night"  # words the shapes captions never use: a caption pasted beside the wrong image


def suspects(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["suspects", *args, *FAST])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class PageRows(HTMLParser):
    """suspects.html's table rows, in page order: (data-file, the rank cell's text, the loss cell's data-v)."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-file" in attrs:
            self.rows.append([attrs["data-file"]])
        elif tag == "td" and self.rows and "num" in (attrs.get("class") or "").split():
            self._cell = attrs.get("class")
            if "score" in self._cell.split():
                self.rows[-1].append(attrs["data-v"])

    def handle_data(self, data):
        if self._cell and "rank" in self._cell.split():
            self.rows[-1].append(data)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None


def page_rows(out_dir: Path) -> list[tuple[str, int, float]]:
    return [(file, int(rank), float(loss)) for file, rank, loss in PageRows((out_dir / SUSPECTS_HTML).read_text(encoding="utf-8")).rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """7 shapes images (one under `2_rep/`: kohya, served twice an epoch), and 2 the scan skips: an empty caption and
    one not UTF-8."""
    root = tmp_path_factory.mktemp("suspects-data") / "data"
    make_shapes_dataset(root, 7, seed=21, size=32)
    (root / "2_rep").mkdir()
    for suffix in (".png", ".txt"):
        (root / "part0" / f"img_0000{suffix}").rename(root / "2_rep" / f"img_0000{suffix}")
    for name, caption in (("empty", b"  \n"), ("latin1", b"a caf\xe9 circle\n")):
        shutil.copy(root / "part1" / "img_0001.png", root / "part1" / f"{name}.png")
        (root / "part1" / f"{name}.txt").write_bytes(caption)
    return root


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, tiny_blip, data) -> Path:
    """final/ of a 1-epoch run on `data` whose weights do not move (FROZEN: lr 1e-12, fp32, no dropout)."""
    out = tmp_path_factory.mktemp("frozen-runs")
    assert main(["train", *base_args(data, tiny_blip, out, "--batch_size", "4", "--training_name", "frozen", *FROZEN)]) == 0
    (run_dir,) = out.iterdir()
    return run_dir / "final"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_blip) -> tuple[Path, Path]:
    """(final/, its training data): the tiny BLIP's text side trained for real on 16 clean shapes images, long enough
    to learn what shapes captions look like (their loss falls from ~5 to ~1.6)."""
    root = tmp_path_factory.mktemp("trained")
    clean = root / "clean"
    make_shapes_dataset(clean, 16, seed=4, size=32)
    args = base_args(clean, tiny_blip, root / "runs", "--batch_size", "8", "--epochs", "8", "--lr", "5e-3", "--peft_module", "none", "--freeze_vision_tower", "--num_sample_captions", "0")
    assert main(["train", *args]) == 0
    (run_dir,) = (root / "runs").iterdir()
    return run_dir / "final", clean


@pytest.fixture
def small(tmp_path) -> Path:
    """7 shapes images in a fresh folder (tests may edit it)."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 7, seed=9, size=32)
    return data


# ---------------------------------------------------------------------------------------------
# the same numbers as training


def test_a_frozen_runs_final_gives_its_sample_losses(capsys, tmp_path, data, frozen_run):
    """The issue's acceptance: `suspects <run>/final DATASET --dtype float32` gives every training image the loss,
    token count and caption hash the run wrote for it (the kohya-repeated image's mean over its two servings is its
    one loss); the captions the scan skipped are counted, not ranked, as in training."""
    trained_lines = lines_of(frozen_run.parent)
    code, out, err = suspects(capsys, str(frozen_run), str(data), "--output_dir", str(tmp_path / "out"), "--dtype", "float32", "--top", "0")
    assert code == 0, err
    records = jsonl(tmp_path / "out" / SUSPECTS_JSONL)
    assert sorted(r["image"] for r in records) == sorted(line["image"] for line in trained_lines) and len(records) == 7
    assert "2_rep/img_0000.png" in {r["image"] for r in records}
    by_image = {r["image"]: r for r in records}
    for line in trained_lines:
        record = by_image[line["image"]]
        assert (record["loss"], record["tokens"], record["caption_sha1"]) == (pytest.approx(line["loss"], abs=1e-5), line["tokens"], line["caption_sha1"]), (line, record)
    assert "7 images ranked by caption loss" in out and "not ranked: 2 with an empty or unreadable caption" in out
    assert "not ranked: 2 with an empty or unreadable caption" in (tmp_path / "out" / SUSPECTS_HTML).read_text()


# ---------------------------------------------------------------------------------------------
# the ranking


def test_the_top_n_highest_losses_ranked_in_the_jsonl_and_the_page(capsys, tmp_path, tiny_blip, small):
    out_dir = tmp_path / "out"
    code, out, err = suspects(capsys, str(tiny_blip), str(small), "--output_dir", str(out_dir), "--top", "3", "--batch_size", "5")
    assert code == 0, err
    scored = jsonl(out_dir / SCORED_FILE)
    assert len(scored) == 7  # every image is scored, --top only chooses what is shown
    records = jsonl(out_dir / SUSPECTS_JSONL)
    assert [list(r) for r in records] == [RECORD_KEYS] * 3
    assert [r["rank"] for r in records] == [1, 2, 3]
    assert [r["image"] for r in records] == [s["image"] for s in sorted(scored, key=lambda s: -s["loss"])[:3]]
    assert records[0]["loss"] > records[1]["loss"] > records[2]["loss"]
    captions = {p.relative_to(small).with_suffix(".png").as_posix(): p.read_text().strip() for p in small.rglob("*.txt")}
    for r in records:
        assert r["caption"] == captions[r["image"]] and r["caption_sha1"] == caption_sha1(captions[r["image"]]) and isinstance(r["model_caption"], str)
    assert page_rows(out_dir) == [(r["image"], r["rank"], pytest.approx(r["loss"], abs=1e-6)) for r in records]
    assert f"1. {records[0]['image']} {records[0]['loss']:.3f}: {records[0]['caption']!r}" in out
    assert "the 3 highest of 7 images" in (out_dir / SUSPECTS_HTML).read_text()
    assert out.strip().splitlines()[-1] == str(out_dir / SUSPECTS_HTML)


@pytest.mark.slow
def test_a_swapped_caption_ranks_first(capsys, tmp_path, trained):
    """After training on clean shapes captions, the one caption pasted from elsewhere is the first to check, by far."""
    final, clean = trained
    data = tmp_path / "swapped"
    shutil.copytree(clean, data)
    (data / "part1" / "img_0005.txt").write_text(SWAPPED + "\n")
    code, out, err = suspects(capsys, str(final), str(data), "--output_dir", str(tmp_path / "out"), "--top", "2")
    assert code == 0, err
    first, second = jsonl(tmp_path / "out" / SUSPECTS_JSONL)
    assert (first["rank"], first["image"], first["caption"]) == (1, "part1/img_0005.png", SWAPPED)
    assert first["loss"] > second["loss"] + 1.0, (first, second)  # by far, not by a hair
    assert page_rows(tmp_path / "out")[0][0] == "part1/img_0005.png"


# ---------------------------------------------------------------------------------------------
# resuming


def test_a_rerun_scores_only_a_torn_last_line_and_a_caption_changed_since(capsys, tmp_path, tiny_blip, small):
    out_dir = tmp_path / "out"
    args = (str(tiny_blip), str(small), "--output_dir", str(out_dir), "--top", "0", "--batch_size", "3")
    assert suspects(capsys, *args)[0] == 0
    scored = out_dir / SCORED_FILE
    first = scored.read_bytes().splitlines(keepends=True)
    assert len(first) == 7
    torn, edited = json.loads(first[-1])["image"], json.loads(first[0])["image"]
    scored.write_bytes(b"".join(first[:-1]) + first[-1][: len(first[-1]) // 2])  # interrupted mid-line
    (small / edited).with_suffix(".txt").write_text("a blue square, edited\n")

    code, out, err = suspects(capsys, *args)
    assert code == 0, err
    assert f"scoring 2 images with {tiny_blip} on cpu (5 already in {scored})" in out
    again = scored.read_bytes().splitlines(keepends=True)
    assert again[:6] == first[:6]  # kept as they were: not scored again
    assert sorted(json.loads(line)["image"] for line in again[6:]) == sorted([torn, edited])
    records = {r["image"]: r for r in jsonl(out_dir / SUSPECTS_JSONL)}
    assert len(records) == 7 and records[edited]["caption"] == "a blue square, edited"
    assert records[edited]["caption_sha1"] == caption_sha1("a blue square, edited")

    code, out, _ = suspects(capsys, *args)  # all done: nothing is scored, the ranking is written again
    assert code == 0 and "nothing left to score: all 7 images are in" in out and scored.read_bytes().splitlines(keepends=True) == again

    assert suspects(capsys, *args, "--overwrite")[0] == 0  # afresh: one line per image, the same numbers
    fresh = {r["image"]: r for r in jsonl(out_dir / SUSPECTS_JSONL)}
    assert len(scored.read_text().splitlines()) == 7
    assert {i: (r["loss"], r["caption_sha1"]) for i, r in fresh.items()} == {i: (pytest.approx(r["loss"], abs=1e-6), r["caption_sha1"]) for i, r in records.items()}


@pytest.mark.parametrize("other, recorded", [
    (("--max_length", "16"), "max_length 128 there, 16 now"),
    (("DATASET",), "dataset "),
    (("--dtype", "bfloat16"), "dtype 'float32' there, 'bfloat16' now"),
    (("MODEL",), "model "),
])
def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_afresh(capsys, tmp_path, tiny_blip, small, frozen_run, other, recorded):
    out_dir = tmp_path / "out"
    args = [str(tiny_blip), str(small), "--output_dir", str(out_dir), "--dtype", "float32"]
    assert suspects(capsys, *args)[0] == 0
    before = files_under(out_dir)
    if other == ("DATASET",):
        shutil.copytree(small, tmp_path / "copy")
    changed = {("MODEL",): [str(frozen_run), *args[1:]], ("DATASET",): [args[0], str(tmp_path / "copy"), *args[2:]]}.get(other, [*args, *other])
    code, out, err = suspects(capsys, *changed)
    assert code == 2 and err.count("\n") == 1 and "holds the losses of another run" in err and recorded in err, err
    assert "--overwrite" in err and files_under(out_dir) == before

    code, out, err = suspects(capsys, *changed, "--overwrite")
    assert code == 0, err
    assert len((out_dir / SCORED_FILE).read_text().splitlines()) == 7
    meta = json.loads((out_dir / META_FILE).read_text())
    assert meta != json.loads(before[META_FILE])


def test_a_scored_file_that_is_not_ours_is_refused(capsys, tmp_path, tiny_blip, small):
    out_dir = tmp_path / "out"
    args = (str(tiny_blip), str(small), "--output_dir", str(out_dir))
    assert suspects(capsys, *args)[0] == 0
    lines = (out_dir / SCORED_FILE).read_text().splitlines(keepends=True)
    (out_dir / SCORED_FILE).write_text(lines[0] + "my notes\n" + "".join(lines[1:]))
    code, _, err = suspects(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and f"{out_dir / SCORED_FILE}:2: not a line suspects writes" in err


# ---------------------------------------------------------------------------------------------
# refusals and bad input


@pytest.mark.parametrize("inside", ["", "reports", "part0/reports"])
def test_an_output_folder_inside_the_dataset_is_refused_and_nothing_written(capsys, tiny_blip, small, inside):
    before = files_under(small)
    code, _, err = suspects(capsys, str(tiny_blip), str(small), "--output_dir", str(small / inside))
    assert code == 2 and err.count("\n") == 1 and "inside DATASET_DIR" in err and "never writes into the dataset" in err, err
    assert files_under(small) == before


def test_a_folder_without_captions_is_one_line_naming_it(capsys, tmp_path, tiny_blip, small):
    for txt in small.rglob("*.txt"):
        txt.unlink()
    code, _, err = suspects(capsys, str(tiny_blip), str(small), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and f"DATASET_DIR {small}: no usable image+caption pairs" in err, err
    assert not (tmp_path / "out").exists()


def test_empty_and_unreadable_captions_are_counted_not_ranked(capsys, tmp_path, tiny_blip, small):
    (small / "part0" / "img_0000.txt").write_text(" \n")
    (small / "part1" / "img_0001.txt").write_bytes(b"a caf\xe9 circle\n")
    code, out, err = suspects(capsys, str(tiny_blip), str(small), "--output_dir", str(tmp_path / "out"), "--top", "0")
    assert code == 0, err
    images = [r["image"] for r in jsonl(tmp_path / "out" / SUSPECTS_JSONL)]
    assert len(images) == 5 and not {"part0/img_0000.png", "part1/img_0001.png"} & set(images)
    assert "5 images ranked by caption loss" in out and "; not ranked: 2 with an empty or unreadable caption" in out
    assert "all 5 of 5 images" in (tmp_path / "out" / SUSPECTS_HTML).read_text()


def test_a_model_that_is_not_a_captioner_is_one_line(capsys, tmp_path, small):
    """No supported family lacks per-token losses (every one scores through FamilyBase.caption_loss); the model
    suspects cannot score is one no family supports: a text-only BERT."""
    from transformers import BertConfig, BertModel

    model_dir = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(model_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = suspects(capsys, str(model_dir), str(small), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "bert" in err.lower(), err
    assert not (tmp_path / "out" / SCORED_FILE).exists()


# ---------------------------------------------------------------------------------------------
# where the results go


def test_the_default_output_folder_is_named_after_the_model_and_the_dataset(capsys, tmp_path, monkeypatch, tiny_blip, data, frozen_run):
    monkeypatch.chdir(tmp_path)
    code, out, err = suspects(capsys, str(frozen_run), str(data))
    assert code == 0, err
    folder = tmp_path / "suspects" / f"{frozen_run.parent.name}-final-on-data"
    assert (folder / SUSPECTS_JSONL).is_file() and out.strip().splitlines()[-1] == str(Path("suspects") / folder.name / SUSPECTS_HTML)
    code, out, err = suspects(capsys, str(tiny_blip), str(data))
    assert code == 0, err
    assert (tmp_path / "suspects" / f"{tiny_blip.name}-on-data" / SUSPECTS_JSONL).is_file()
