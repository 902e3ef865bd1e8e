"""`caption-train lint`: the report on the hostile corpus (every case gets exactly its expected findings), agreement
with the scanner, text/JSON output, exit status, --model token counting, and that it never writes to the dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from caption_train.cli import main
from caption_train.data.scan import scan_dataset
from caption_train.lint import CODES, ERROR, WARNING, lint_dataset, load_tokenizer
from caption_train.text import plural
from hostile_corpus import SKIPPED, built_corpus, GOOD_IMAGES, LOAD_SKIPPED, build_corpus, case_params, cases, kept_images, tree_digest

CASE_NAMES = [case.name for case in cases()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return built_corpus(tmp_path_factory.mktemp("lint") / "dataset")


@pytest.fixture(scope="module")
def report(corpus, tiny_blip):
    tokenizer, limit = load_tokenizer(str(tiny_blip))
    return lint_dataset(corpus[0], tokenizer=tokenizer, max_tokens=limit)


def unreadable_images(built: dict) -> int:
    """Files the corpus should get an unreadable_image finding for: one more where mode-000 files are unreadable."""
    return sum(case.skips if case.outcome == SKIPPED else 1 for case in built.values() if "unreadable_image" in case.lint)


def unreadable_captions(built: dict) -> int:
    """Captions the corpus should get an unreadable_caption finding for: one more where mode-000 files are unreadable."""
    return sum(case.skips for case in built.values() if "unreadable_caption" in case.lint)


def findings_of(report, root: Path, case) -> set[str]:
    prefix = f"cases/{case.name}/"
    codes = {f.code for f in report.findings if f.path.startswith(prefix)}
    if case.name == "metadata_jsonl":
        codes |= {f.code for f in report.findings if f.path == "metadata.jsonl"}
    return codes


@pytest.mark.parametrize("name", case_params(CASE_NAMES))
def test_each_case_gets_exactly_its_findings(name, corpus, report):
    root, built, _ = corpus
    case = built[name]
    if case.unavailable:
        pytest.skip(case.unavailable)
    assert findings_of(report, root, case) == set(case.lint)


def test_good_images_have_no_findings(report):
    assert not [f for f in report.findings if f.path.startswith("good/")]


def test_codes_and_severities(report):
    assert all(f.code in CODES for f in report.findings)
    assert {f.severity for f in report.errors} == {ERROR} and {f.severity for f in report.warnings} == {WARNING}
    # The policy: errors are exactly what training skips; nothing it trains on is an error.
    assert {f.code for f in report.errors} <= {"unreadable_image", "missing_caption", "empty_caption", "caption_not_utf8",
                                               "unreadable_caption", "bad_metadata_line", "unreadable_metadata", "no_usable_pairs"}
    assert report.exit_code == 1


def test_lint_agrees_with_the_scanner(corpus, report):
    """Lint's usable pairs = the scan's samples minus the images only a full decode rejects."""
    root, built, _ = corpus
    result = scan_dataset(root)
    load_skipped = sum(1 for c in built.values() if c.outcome == LOAD_SKIPPED)
    assert report.usable == len(result.samples) - load_skipped == GOOD_IMAGES + kept_images(list(built.values())) - load_skipped
    counts = report.counts(ERROR)
    assert counts["unreadable_image"] == result.skipped["unreadable image"] + load_skipped
    assert counts["empty_caption"] == result.skipped["empty caption"]
    assert counts["caption_not_utf8"] == result.skipped["caption not UTF-8"]
    assert counts["unreadable_caption"] == result.skipped["unreadable caption"]
    assert counts["missing_caption"] == result.skipped["missing caption"]
    assert counts["bad_metadata_line"] == result.skipped["bad metadata line"]


def test_messages_say_what_to_do(report):
    by_path = {(f.code, f.path): f.message for f in report.findings}
    bomb = by_path["unreadable_image", "cases/decompression_bomb/decompression_bomb.png"]
    assert "too large" in bomb and f"exceeds limit of {2 * Image.MAX_IMAGE_PIXELS}" in bomb  # Pillow's limit, named
    assert "UTF-16" in by_path["caption_not_utf8", "cases/utf16_caption/utf16_caption.png"]
    assert "0xe9" in by_path["caption_not_utf8", "cases/latin1_caption/latin1_caption.png"]
    assert "uppercase_txt_caption.TXT" in by_path["missing_caption", "cases/uppercase_txt_caption/uppercase_txt_caption.png"]
    assert "named pipe" in by_path["unreadable_image", "cases/fifo_image/fifo_image.png"]
    assert "truncated" in by_path["unreadable_image", "cases/truncated_jpeg/truncated_jpeg.jpg"]
    long = by_path["long_caption", "cases/ten_thousand_words/ten_thousand_words.png"]
    assert "over the limit of 32" in long
    # Display names are one line, undecodable bytes escaped.
    assert all("\n" not in f.path + f.message for f in report.findings)


def test_token_and_image_stats(report):
    assert report.max_tokens == 32 and max(report.tokens) > 10_000 and len(report.tokens) == report.usable
    assert report.widths and max(report.widths) == 20000 and min(report.widths) == 1
    assert report.modes["CMYK"] == 1 and report.formats["JPEG"] >= 3


def test_quick_mode_finds_the_same_problems(corpus, report):
    quick = lint_dataset(corpus[0], decode=False)
    assert not quick.decoded
    # Without a tokenizer there are no token checks (long captions, unknown characters).
    key = lambda r: sorted((f.code, f.path) for f in r.findings if f.code not in ("long_caption", "unknown_characters"))  # noqa: E731
    assert key(quick) == key(report)  # truncated files too: the end-of-file check decodes just the suspects


def test_lint_never_writes(corpus, report):
    root, _, before = corpus
    lint_dataset(root, decode=False)
    assert tree_digest(root) == before


# ---------------------------------------------------------------------------------------------
# command line


@pytest.mark.permissions  # the count differs where mode-000 files are unreadable
def test_cli_text_report_and_exit_status(corpus, capsys):
    root, built, before = corpus
    assert main(["lint", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"caption-train lint {root}\n")
    assert "ERRORS: training skips these" in out and "WARNINGS:" in out
    assert "[unreadable_image]" in out and f"... and {unreadable_images(built) - 10} more (--max_listed 0 lists all)" in out
    assert out.rstrip().splitlines()[-1].startswith("result: ")
    assert main(["lint", str(root), "--max_listed", "0"]) == 1
    assert "--max_listed 0 lists all" not in capsys.readouterr().out
    assert tree_digest(root) == before


def test_cli_json(corpus, tiny_blip, capsys):
    root = corpus[0]
    assert main(["lint", str(root), "--json", "--quick", "--model", str(tiny_blip), "--max_length", "8"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 1 and data["counts"]["errors"] == len([f for f in data["findings"] if f["severity"] == "error"])
    assert data["captions"]["tokens"]["limit"] == 8 and data["checks"]["decoded"] is False
    assert {"severity", "code", "path", "message"} == set(data["findings"][0])
    assert data["error_counts"]["unreadable_image"] >= 10


def test_clean_dataset_exits_zero(shapes_dir, tiny_blip, capsys):
    assert main(["lint", str(shapes_dir), "--model", str(tiny_blip)]) == 0
    out = capsys.readouterr().out
    assert "ERRORS" not in out and "WARNINGS" not in out
    assert "result: 0 errors, 0 warnings" in out and "24 usable image+caption pairs" in out
    report = lint_dataset(shapes_dir)
    assert report.summary_lines() == [f"dataset {shapes_dir}: 24 images with captions", "  images: 24 PNG; modes 24 RGB; width 32, height 32 px",
                                      "  captions: 3 words (token lengths and unknown characters not checked: pass --model)"]


def test_strict_fails_on_warnings(tmp_path, capsys):
    root = tmp_path / "ds"
    build_corpus(root, good=2, only={"animated_png"})
    assert main(["lint", str(root)]) == 0
    assert main(["lint", str(root), "--strict"]) == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (lambda t: [str(t / "missing")], "DATASET_DIR {t}/missing: no such directory"),
        (lambda t: [str(t / "file.png")], "is a file, not a directory"),
        (lambda t: [""], "DATASET_DIR is empty"),
        (lambda t: [str(t), "--model", str(t / "no-model")], "--model"),
        (lambda t: [str(t), "--max_length", "10"], "--max_length needs --model"),
        (lambda t: [str(t), "--prompt", "describe"], "--prompt needs --model"),
        (lambda t: [str(t), "--model_config", "{processor = {max_pixels = 1}}"], "--model_config needs --model"),
        (lambda t: [str(t), "--text_encoders", "clip,sdxl"], "--text_encoders 'clip,sdxl': use clip, t5"),
        (lambda t: [str(t), "--t5_tokenizer", str(t / "no-tokenizer")], "--t5_tokenizer {t}/no-tokenizer: no such folder"),
        (lambda t: [str(t), "--bogus"], "unrecognized arguments: --bogus"),
        (lambda t: [], "required: DATASET_DIR"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, expected):
    (tmp_path / "file.png").write_bytes(b"x")
    assert main(["lint", *args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected.format(t=tmp_path) in err[0], err


def test_empty_folder_is_an_error_not_a_crash(tmp_path, capsys):
    assert main(["lint", str(tmp_path)]) == 1
    assert "no usable image+caption pair" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# individual checks on small datasets


def save(path: Path, color=(200, 30, 30), size=(32, 32), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def test_tags_and_tag_variants(tmp_path):
    root = tmp_path / "ds"
    captions = ["1girl, long_hair, smile", "1girl, long hair, outdoors", "1boy, Long hair, smile", "1girl, smile", "a photo"]
    for i, caption in enumerate(captions):
        save(root / f"{i}.png", color=(i * 40, 0, 0), caption=caption)
    report = lint_dataset(root)
    assert report.tag_style and report.tag_counts["smile"] == 3 and report.tag_counts["1girl"] == 3
    variants = [f for f in report.findings if f.code == "tag_variants"]
    assert len(variants) == 1 and "'long hair' (1)" in variants[0].message and "'long_hair' (1)" in variants[0].message
    assert report.exit_code == 0
    assert report.to_dict()["tags"]["top"][0][1] == 3
    assert "tags: " in report.format_text()


def test_duplicates_same_caption_and_cost(tmp_path):
    root = tmp_path / "ds"
    save(root / "a.png", caption="a red square")
    save(root / "sub" / "b.png", caption="a red square")
    save(root / "c.png", color=(0, 0, 200), size=(40, 40), caption="a blue square")  # unique size: never hashed
    report = lint_dataset(root)
    dupes = [f for f in report.findings if f.code.startswith("duplicate")]
    assert [(f.code, f.path) for f in dupes] == [("duplicate_image", "a.png")] and "sub/b.png" in dupes[0].message
    assert report.hashed_files == 2


def test_sidecar_overrides_metadata_and_orphans(tmp_path):
    root = tmp_path / "ds"
    save(root / "a.png", caption="from the txt")
    save(root / "b.png", color=(0, 200, 0))
    (root / "c.caption").write_text("kohya style")
    (root / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "from metadata"}\n{"file_name": "b.png", "text": "b from metadata"}\n', encoding="utf-8")
    report = lint_dataset(root)
    codes = {(f.code, f.path) for f in report.findings}
    assert codes == {("sidecar_overrides_metadata", "a.png"), ("orphan_caption", "c.caption")}
    assert report.usable == 2


def test_only_unusable_images_is_an_error(tmp_path):
    save(tmp_path / "a.png")
    report = lint_dataset(tmp_path)
    assert {f.code for f in report.errors} == {"missing_caption", "no_usable_pairs"} and report.exit_code == 1


@pytest.mark.permissions  # the count differs where mode-000 files are unreadable
def test_summary_lines_for_training_start(corpus, report):
    lines = report.summary_lines()
    assert 3 <= len(lines) <= 7
    # One head line (the trainer prints no other dataset line): what is trained on, what is skipped and why.
    # The unreadable image and caption counts are one higher each where mode-000 files are unreadable (not as root).
    assert lines[0] == (f"dataset {corpus[0]}: {report.usable} images with captions; skipped {len(report.errors)} "
                        f"({plural(unreadable_images(corpus[1]), 'unreadable image')}, {plural(unreadable_captions(corpus[1]), 'unreadable caption')}, 3 empty captions, 3 missing captions, 2 captions not UTF-8, "
                        f"1 bad metadata.jsonl line); {len(report.warnings)} warnings (list them: caption-train lint {corpus[0]})")
    assert lines[1].startswith("  warnings: ") and "1 duplicate with differing captions" in lines[1]
    assert any(line.strip().startswith("captions:") and "over the limit of 32" in line for line in lines)


def test_load_tokenizer_from_a_run_folder(tmp_path, tiny_blip):
    """A run's final/ holds the processor and an adapter_config.json naming the base model: limit from the base."""
    from transformers import AutoProcessor

    final = tmp_path / "final"
    AutoProcessor.from_pretrained(tiny_blip).save_pretrained(final)
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_blip)}))
    tokenizer, limit = load_tokenizer(str(final))
    assert limit == 32 and tokenizer("a red circle")["input_ids"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_fifo_caption_does_not_hang_the_scanner(tmp_path):
    save(tmp_path / "a.png", caption="fine")
    save(tmp_path / "b.png")
    os.mkfifo(tmp_path / "b.txt")
    result = scan_dataset(tmp_path)
    assert result.skipped == {"unreadable caption": 1}


# ---------------------------------------------------------------------------------------------
# captions the tokenizer cannot write


@pytest.fixture
def odd_captions(tmp_path):
    """4 captions; the tests' tiny vocabulary has no ',' and no emoji (it lowercases and strips accents)."""
    root = tmp_path / "ds"
    captions = {"a.png": "a red circle", "b.png": "a red circle, big", "sub/c.png": "a blue 😀square, small", "d.png": "a Bluë square"}
    for i, (rel, caption) in enumerate(captions.items()):
        save(root / rel, color=(i * 50, 0, 0), caption=caption)
    return root


def test_unknown_characters_share_characters_and_example(odd_captions, tiny_blip, capsys):
    tokenizer, limit = load_tokenizer(str(tiny_blip))
    report = lint_dataset(odd_captions, tokenizer=tokenizer, max_tokens=limit)
    unknown = report.unknown
    assert (unknown.checked, unknown.flagged, unknown.unk_token) == (4, 2, "[UNK]")
    # Per caption, the characters inside each [UNK]'s source span that the tokenizer cannot read alone: the comma
    # (its own token), the emoji (which turns the whole word "😀square" into one [UNK]) - not the letters around it.
    assert unknown.chars == {",": 2, "😀": 1}
    assert unknown.example == ("b.png", "a red circle, big")
    assert {(f.code, f.path) for f in report.findings} == {("unknown_characters", "b.png"), ("unknown_characters", "sub/c.png")}
    line = next(line for line in report.summary_lines() if "[UNK]" in line)
    assert line == ("  warning: 50.0% of captions (2 of 4) contain characters the tokenizer reads as [UNK], so the model "
                    "can never write them: ',' (2), '😀' U+1F600 (1); e.g. b.png: 'a red circle, big'")

    assert main(["lint", str(odd_captions), "--model", str(tiny_blip)]) == 0
    out = capsys.readouterr().out
    assert "[unknown_characters] (2)" in out and "sub/c.png: '😀' U+1F600, ',' read as [UNK]: 'a blue 😀square, small'" in out
    assert main(["lint", str(odd_captions), "--model", str(tiny_blip), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["unknown_characters"]
    assert data == {"captions_checked": 4, "captions_with_unknown": 2, "unknown_token": "[UNK]", "top": [[",", 2], ["😀", 1]]}


def test_no_unknown_characters_no_line(shapes_dir, tiny_blip):
    tokenizer, limit = load_tokenizer(str(tiny_blip))
    report = lint_dataset(shapes_dir, tokenizer=tokenizer, max_tokens=limit)
    assert report.unknown.flagged == 0 and not any("[UNK]" in line for line in report.summary_lines())


# ---------------------------------------------------------------------------------------------
# the trainer's start-up summary: built from the scan, without walking or opening anything again


def test_summary_from_the_scan_needs_no_second_walk(odd_captions, tiny_blip):
    import shutil

    from caption_train.lint import summarize_scan

    (odd_captions / "e.png").write_text("not an image")
    (odd_captions / "e.txt").write_text("a caption")
    (odd_captions / "f.png").write_bytes(b"")  # no caption
    result = scan_dataset(odd_captions, probe=False)
    tokenizer, limit = load_tokenizer(str(tiny_blip))
    shutil.rmtree(odd_captions)  # proof: the summary reads nothing from the dataset folder
    report = summarize_scan(result, tokenizer=tokenizer, max_tokens=limit, max_tokenized=3)
    lines = report.summary_lines()
    assert lines[0] == (f"dataset {odd_captions}: 5 images with captions; skipped 1 (1 missing caption); 1 warning "
                        f"(list them and open every image: caption-train lint {odd_captions})")
    assert lines[1] == "  warnings: 1 caption with unknown characters"
    # Token checks on an evenly spaced sample (every second caption: a.png, d.png, sub/c.png), and the lines say so.
    assert report.captions_tokenized == 3 and len(report.tokens) == 3
    assert "tokens, 0 over the limit of 32 (in an evenly spaced sample of 3 of 5 captions)" in lines[2]
    assert "33.3% of captions (1 of 3, an evenly spaced sample of 5)" in lines[3] and "e.g. sub/c.png: " in lines[3]
    assert not report.widths and not report.images_checked  # no image was opened


def test_start_up_summary_line_without_findings(shapes_dir):
    from caption_train.lint import summarize_scan

    report = summarize_scan(scan_dataset(shapes_dir, probe=False, spot_check=256))
    assert report.summary_lines()[0] == f"dataset {shapes_dir}: 24 images with captions"  # all 24 probed: nothing to add
    report = summarize_scan(scan_dataset(shapes_dir, probe=False, spot_check=4))
    assert report.summary_lines()[0] == f"dataset {shapes_dir}: 24 images with captions (open every image: caption-train lint {shapes_dir})"


# ---------------------------------------------------------------------------------------------
# repeat folders and plurals


def test_lint_reports_repeat_folders(tmp_path):
    from caption_train.lint import summarize_scan

    root = tmp_path / "ds"
    save(root / "30_mystyle" / "a.png", caption="a red square")
    save(root / "30_mystyle" / "b.png", color=(0, 0, 200), caption="a blue square")
    save(root / "10_extra" / "deep" / "c.png", color=(0, 200, 0), caption="a green square")
    save(root / "other" / "d.png", color=(9, 9, 9), caption="a dark square")
    report = lint_dataset(root)
    assert report.repeat_folders == {"10_extra": (10, 1), "30_mystyle": (30, 2)}
    assert ("repeat folders (training serves each image N times per epoch; kohya_repeats = false turns this off): "
            "10_extra x10 (1 image), 30_mystyle x30 (2 images)") in report.format_text().splitlines()
    assert report.to_dict()["repeat_folders"] == {"10_extra": {"repeats": 10, "images": 1}, "30_mystyle": {"repeats": 30, "images": 2}}
    assert "  repeat folders: 10_extra x10 (1 image), 30_mystyle x30 (2 images)" in report.summary_lines()
    off = summarize_scan(scan_dataset(root), repeats=False)
    assert "  repeat folders ignored (kohya_repeats = false): 10_extra x10 (1 image), 30_mystyle x30 (2 images)" in off.summary_lines()
    assert not any(line.startswith("repeat folders") for line in lint_dataset(root / "other").format_text().splitlines())


def test_counts_in_messages_are_singular_for_one(tmp_path):
    root = tmp_path / "ds"
    save(root / "a.png", caption="a red square")
    save(root / "b.png", size=(8, 8), caption="a red square")  # one warning: tiny image
    text = lint_dataset(root).format_text()
    assert "  2 image files, 2 usable image+caption pairs, 2 caption files (every image decoded; 0 files hashed for duplicates)" in text
    (root / "b.png").unlink()
    (root / "b.txt").unlink()
    report = lint_dataset(root)
    assert "  1 image file, 1 usable image+caption pair, 1 caption file (every image decoded; 0 files hashed for duplicates)" in report.format_text()
    assert report.format_text().endswith("result: 0 errors, 0 warnings")
    assert report.summary_lines()[0] == f"dataset {root}: 1 image with captions"
    save(root / "c.png", size=(8, 8), caption="x")
    assert lint_dataset(root).format_text().endswith("result: 0 errors, 1 warning")
