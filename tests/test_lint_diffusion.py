"""`caption-train lint` for diffusion datasets: one small dataset per finding (captions over CLIP's 77 or T5's 512
tokens, boilerplate tags, a tag fused into a trigger word, a tag twice in a caption, near-identical captions on
different images) and a clean dataset with none, all through the command; the CLIP token estimate and its exact
counterparts; the trainer's one-line start-up form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from caption_train.cli import main
from caption_train.diffusion_lint import WHY
from caption_train.text_encoders import CLIP_LIMIT, clip_counter, estimate_clip_tokens, estimate_t5_tokens, open_clip_vocabulary

DIFFUSION_CODES = ("clip_too_long", "t5_too_long", "boilerplate_tag", "trigger_cooccurrence", "duplicate_tag", "near_identical_captions")
# 60 distinct tags; caption i takes the 12 starting at 7*i (wrapping around): two captions share at most 5 of their
# 12 tags, no tag is in more than a fifth of the captions, and no tag is in 3 captions in a row.
POOL = [f"{color} {thing}" for color in ("red", "blue", "green", "white", "black", "grey")
        for thing in ("hat", "scarf", "boots", "dress", "coat", "bag", "belt", "gloves", "shirt", "socks")]


def write(root: Path, captions: dict[str, str]) -> Path:
    """One 24x24 PNG of its own colour per caption (no two images alike), with the caption beside it."""
    for i, (rel, caption) in enumerate(captions.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (i * 17 % 256, i * 53 % 256, i * 101 % 256)).save(path)
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root


def clean_captions(n: int = 12, folder: str = "", start: int = 0) -> dict[str, str]:
    return {f"{folder}{i:02d}.png": ", ".join(POOL[(7 * (start + i) + k) % len(POOL)] for k in range(12)) for i in range(n)}


def lint_json(root: Path, *args: str) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["lint", str(root), "--json", *args])
    return json.loads(out.getvalue())


def findings(data: dict, code: str) -> list[dict]:
    return [f for f in data["findings"] if f["code"] == code]


def lint_text(root: Path, capsys, *args: str) -> tuple[int, str]:
    code = main(["lint", str(root), *args])
    return code, capsys.readouterr().out


def assert_reported(out: str, code: str, count: int, example: str) -> None:
    """The finding's header with its count, its why line, and an example file under it."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if f"[{code}] ({count})" in line)
    assert lines[header + 1] == f"    why: {WHY[code]}"
    assert lines[header + 2].startswith(f"    {example}: "), lines[header:header + 3]


# ---------------------------------------------------------------------------------------------
# a clean dataset: none of them


def test_clean_dataset_has_no_diffusion_findings(tmp_path, capsys):
    root = write(tmp_path / "ds", clean_captions(6, "5_mychar/") | clean_captions(6, "other/", start=6))
    for rel in list(root.glob("5_mychar/*.txt")):  # the trigger leads its folder's captions, with nothing always beside it
        rel.write_text("mychar, " + rel.read_text(), encoding="utf-8")
    code, out = lint_text(root, capsys, "--strict")
    assert code == 0 and "result: 0 errors, 0 warnings" in out, out
    data = lint_json(root)
    assert data["triggers"] == ["mychar"]  # the kohya folder's name, found as a tag: the co-occurrence check ran
    assert not [f for f in data["findings"] if f["code"] in DIFFUSION_CODES]
    assert data["text_encoders"]["CLIP"]["over_limit"] == 0 and data["text_encoders"]["T5"]["over_limit"] == 0
    from caption_train.data.scan import scan_dataset
    from caption_train.lint import summarize_scan

    assert not any("diffusion" in line for line in summarize_scan(scan_dataset(root)).summary_lines())


# ---------------------------------------------------------------------------------------------
# one dataset per finding


def test_caption_over_clips_77_tokens(tmp_path, capsys):
    captions = clean_captions(4)
    captions["long.png"] = ", ".join(POOL[:30])  # 30 two-word tags: ~90 CLIP tokens
    root = write(tmp_path / "ds", captions)
    code, out = lint_text(root, capsys)
    assert code == 0
    assert_reported(out, "clip_too_long", 1, "long.png")
    assert "long.png: ~93 CLIP tokens (estimated), over 77" in out
    assert "estimated: no CLIP tokenizer here" in out  # the report says the count is an estimate
    assert "t5_too_long" not in out
    assert len(findings(lint_json(root, "--text_encoders", "t5"), "clip_too_long")) == 0  # off when not asked for


def test_exact_clip_counts_from_a_tokenizer_folder(tmp_path, capsys):
    """A CLIP tokenizer folder (vocab without merges: one token per character) counts 16 x 'hello' as 82 tokens,
    where the estimate says 19: the folder's tokenizer is what counts."""
    from transformers import CLIPTokenizer

    from caption_train.text_encoders import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[]).save_pretrained(tmp_path / "clip")
    root = write(tmp_path / "ds", {"a.png": " ".join(["hello"] * 16), "b.png": "a red hat"})
    assert estimate_clip_tokens(" ".join(["hello"] * 16)) == 19
    code, out = lint_text(root, capsys, "--clip_tokenizer", str(tmp_path / "clip"))
    assert "a.png: 82 CLIP tokens, over 77" in out and f"the tokenizer in {tmp_path / 'clip'}" in out
    assert main(["lint", str(root), "--clip_tokenizer", str(tmp_path / "nothing")]) == 2
    assert "--clip_tokenizer" in capsys.readouterr().err


def test_caption_over_t5s_512_tokens(tmp_path, capsys):
    captions = clean_captions(3)
    captions["essay.png"] = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)  # 540 words
    root = write(tmp_path / "ds", captions)
    code, out = lint_text(root, capsys)
    assert_reported(out, "t5_too_long", 1, "essay.png")
    assert "essay.png: ~541 T5 tokens (estimated), over 512" in out


def test_boilerplate_tag_in_nearly_every_caption(tmp_path, capsys):
    captions = {rel: "masterpiece, " + caption for rel, caption in clean_captions(12).items()}
    captions["11.png"] = captions["11.png"].replace("masterpiece, ", "")  # 11 of 12: 92%, under the 95% line
    root = write(tmp_path / "ds", captions)
    assert not findings(lint_json(root), "boilerplate_tag")
    (root / "11.txt").write_text("masterpiece, best quality, " + clean_captions(12)["11.png"], encoding="utf-8")
    code, out = lint_text(root, capsys)
    assert_reported(out, "boilerplate_tag", 1, "00.png")
    assert "00.png: 'masterpiece' is in 12 of 12 captions (100%)" in out


def test_trigger_word_always_with_another_tag(tmp_path, capsys):
    captions = clean_captions(8)
    for rel in ("00.png", "02.png", "04.png", "06.png"):  # the trigger in half the captions, always with blue hair
        captions[rel] = "mychar, blue hair, " + captions[rel]
    captions["01.png"] = "blue hair, " + captions["01.png"]  # blue hair elsewhere too: still fused into mychar
    root = write(tmp_path / "ds", captions)
    assert not findings(lint_json(root), "trigger_cooccurrence")  # no trigger named, no kohya folder: nothing to check
    code, out = lint_text(root, capsys, "--trigger", "mychar")
    assert_reported(out, "trigger_cooccurrence", 1, "00.png")
    assert "00.png: trigger 'mychar' comes with 'blue hair' in all of its 4 captions" in out


def test_trigger_from_a_kohya_folder_name(tmp_path):
    captions = {rel: "mychar, blue_hair, " + c for rel, c in clean_captions(4, "10_mychar/").items()} | clean_captions(4, "misc/", start=4)
    data = lint_json(write(tmp_path / "ds", captions))
    assert data["triggers"] == ["mychar"]
    assert [f["message"] for f in findings(data, "trigger_cooccurrence")] == ["trigger 'mychar' comes with 'blue hair' in all of its 4 captions"]


def test_the_same_tag_twice_in_a_caption(tmp_path, capsys):
    captions = clean_captions(3)
    captions["01.png"] = "smile, long_hair, red hat, Long hair"
    root = write(tmp_path / "ds", captions)
    code, out = lint_text(root, capsys)
    assert_reported(out, "duplicate_tag", 1, "01.png")
    assert "01.png: 'long hair' 2x in " in out


def test_near_identical_captions_on_different_images(tmp_path, capsys):
    prose = "a woman in a red dress standing on a sandy beach at sunset"  # 13 words
    captions = clean_captions(4) | {"x/a.png": prose, "x/b.png": prose.replace("red", "blue"), "x/c.png": prose.upper() + "!",
                                    "y/d.png": "a dog", "y/e.png": "a dog"}  # short identical captions are normal
    root = write(tmp_path / "ds", captions)
    code, out = lint_text(root, capsys)
    assert_reported(out, "near_identical_captions", 1, "x/a.png")
    assert "x/a.png: 3 images with captions the same or one word/tag apart" in out and "(with x/b.png, x/c.png)" in out
    # Two words apart: not near-identical.
    (root / "x" / "b.txt").write_text(prose.replace("red", "blue").replace("sandy", "rocky"), encoding="utf-8")
    message = findings(lint_json(root), "near_identical_captions")[0]["message"]
    assert message.startswith("2 images") and message.endswith("(with x/c.png)")


def test_a_copied_image_is_a_duplicate_not_also_a_near_identical_caption(tmp_path):
    caption = "a woman in a red dress standing on a sandy beach"
    root = write(tmp_path / "ds", {"a.png": caption, "c.png": "a dog on the grass"})
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    (root / "b.txt").write_text(caption, encoding="utf-8")
    data = lint_json(root)
    assert [f["code"] for f in data["findings"]] == ["duplicate_image"]


# ---------------------------------------------------------------------------------------------
# the trainer's start-up line


def test_start_up_summary_has_the_diffusion_checks_in_one_line(tmp_path):
    from caption_train.data.scan import scan_dataset
    from caption_train.lint import summarize_scan

    captions = {rel: "masterpiece, " + c for rel, c in clean_captions(12).items()}
    captions["03.png"] += ", " + POOL[21]  # its first tag again
    captions["04.png"] += ", " + ", ".join(POOL[:30])  # ~130 CLIP tokens
    root = write(tmp_path / "ds", captions)
    lines = summarize_scan(scan_dataset(root, probe=False)).summary_lines()
    line = [line for line in lines if "diffusion" in line]
    assert line == ["  for diffusion training: 1 over CLIP's 77 tokens (SD 1.x, SDXL, estimated); 1 tag in nearly every caption: "
                    "'masterpiece' is in 12 of 12 captions (100%); 2 captions repeating a tag"], lines


# ---------------------------------------------------------------------------------------------
# the CLIP estimate and the exact count


def test_clip_estimate_on_known_captions():
    # CLIP's real counts (start and end tokens included), from its tokenizer: 16, 13, 15, 6 (the estimate misses
    # that "windowsill" takes 3 tokens, and takes "masterpiece" for 2 and "..." for 2).
    assert estimate_clip_tokens("1girl, long_hair, looking_at_viewer, smile") == 16
    assert estimate_clip_tokens("a photo of a cat sitting on a windowsill") == 12
    assert estimate_clip_tokens("masterpiece, best quality, (blue eyes:1.2)") == 16
    assert estimate_clip_tokens("Hello... world!!") == 7
    assert estimate_t5_tokens("a photo of a cat") == 6


@pytest.mark.skipif(open_clip_vocabulary() is None and not list(Path("/opt/pypi/files").glob("open_clip_torch-*.whl")),
                    reason="no open_clip_torch installed or wheel on disk")
def test_exact_clip_counts_from_open_clips_vocabulary(tmp_path):
    """CLIP's own vocabulary (open_clip_torch ships it): the counts CLIP's tokenizer gives."""
    path = open_clip_vocabulary()
    if path is None:
        import zipfile

        wheel = sorted(Path("/opt/pypi/files").glob("open_clip_torch-*.whl"))[-1]
        with zipfile.ZipFile(wheel) as archive:
            path = Path(archive.extract("open_clip/bpe_simple_vocab_16e6.txt.gz", tmp_path))
    counter = clip_counter(bpe_path=str(path))
    assert counter.exact and counter.limit == CLIP_LIMIT
    assert counter.count(["1girl, long_hair, looking_at_viewer, smile", "a photo of a cat sitting on a windowsill",
                          "masterpiece, best quality, (blue eyes:1.2)", "Hello... world!!", "It\u2019s &amp; caf\u00e9"]) == [16, 13, 15, 6, 6]
