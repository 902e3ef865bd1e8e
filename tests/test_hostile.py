"""Hostile inputs: training on a dataset full of bad files completes, skipping and counting them, or stops with a
one-line error; either way not one byte of the dataset folder changes.

One training run covers the whole corpus (tests/hostile_corpus.py: every bad item beside 8 good images); only
inputs that must be fatal (bad dataset path, bad config, unwritable output) get a run each, and those stop before
or right after loading the model.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.text import plural
from hostile_corpus import (NO_PERMISSIONS, built_corpus, GOOD_IMAGES, LOAD_SKIPPED, TRAINED, build_corpus, case_params, cases, expected_skips,
                            kept_images, permissions_enforced, tree_digest)

from conftest import base_args

CASE_NAMES = [case.name for case in cases()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return built_corpus(tmp_path_factory.mktemp("hostile") / "dataset")


@pytest.fixture(scope="module")
def corpus_run(corpus, tiny_blip, tmp_path_factory):
    """One real training run over the whole corpus, in-process through the CLI entry point."""
    root, built, _ = corpus
    out_dir = tmp_path_factory.mktemp("hostile-runs")
    stdout, stderr = io.StringIO(), io.StringIO()
    # The trainer logs per-file load failures through `logging`; collect them like the user's terminal would.
    handler = logging.StreamHandler(stderr)
    logging.getLogger("caption_train").addHandler(handler)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        code = main(["train", *base_args(root, tiny_blip, out_dir, "--num_sample_captions", "2")])
    finally:
        sys.stdout, sys.stderr = saved
        logging.getLogger("caption_train").removeHandler(handler)
    return code, stdout.getvalue(), stderr.getvalue(), out_dir


def test_corpus_has_at_least_30_hostile_inputs(corpus):
    _, built, _ = corpus
    available = [c for c in built.values() if c.unavailable is None]
    assert len(built) >= 30 and len(available) >= 30, [c.name for c in built.values() if c.unavailable]


def test_training_completes_skips_and_counts(corpus, corpus_run):
    root, built, before = corpus
    code, out, err, out_dir = corpus_run
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    final = Path(out.strip().splitlines()[-1])
    assert final.name == "final" and (final / "adapter_model.safetensors").is_file()

    # One dataset line counts every skipped item by reason. The start-up scan probes the headers of at most 256
    # images, which is all of this corpus; truncated files pass a header probe and are skipped when first loaded,
    # with a warning naming each.
    summaries = [line for line in out.splitlines() if line.startswith("dataset ")]
    assert len(summaries) == 1 and summaries[0].startswith(f"dataset {root}:"), summaries
    summary = summaries[0]
    expected = expected_skips(list(built.values()))
    kept = GOOD_IMAGES + kept_images(list(built.values()))
    # Truncated files pass the start-up spot check (a full check would read every image: start-up time); training
    # skips each when it first loads it, with a warning naming it.
    truncated = [c for c in built.values() if c.outcome == LOAD_SKIPPED]
    assert truncated
    for case in truncated:
        assert re.search(rf"skipping image that cannot be loaded: .*{case.name}/{case.name}\.", err), case.name
    assert f": {kept} images with captions; skipped {sum(expected.values())} (" in summary, summary
    names = {"bad metadata line": "bad metadata.jsonl line"}  # the report's name for the scan's reason
    many = {"caption not UTF-8": "captions not UTF-8"}
    for reason, n in expected.items():
        assert plural(n, names.get(reason, reason), many.get(reason)) in summary, (reason, summary)
    assert f"{kept} training / 0 validation images" in out

    assert tree_digest(root) == before, "training changed the dataset folder"
    assert all(not p.is_relative_to(root) for p in out_dir.rglob("*"))


def test_scan_verify_counts_truncated_images(corpus):
    from caption_train.data.scan import scan_dataset

    root, built, _ = corpus
    truncated = sum(1 for c in built.values() if c.outcome == LOAD_SKIPPED)
    result = scan_dataset(root, verify=True)
    assert result.skipped["unreadable image"] == expected_skips(list(built.values()))["unreadable image"] + truncated
    assert len(result.samples) == GOOD_IMAGES + kept_images(list(built.values())) - truncated


@pytest.fixture(scope="module")
def scanned(corpus):
    from caption_train.data.scan import scan_dataset

    return scan_dataset(corpus[0])


@pytest.mark.parametrize("name", case_params(CASE_NAMES))
def test_each_case_outcome(name, corpus, scanned, loaded_tiny_blip):
    """Per case: SKIPPED and IGNORED ones are not among the scan's samples; LOAD_SKIPPED ones are, and fail to load;
    TRAINED ones load and go through the model's collate and forward pass, as in the run's batches."""
    root, built, _ = corpus
    case = built[name]
    if case.unavailable:
        pytest.skip(case.unavailable)
    from caption_train.data.images import ImageLoadError, load_rgb

    samples = [s for s in scanned.samples if s.image_path.is_relative_to(case.folder(root))]
    assert len(samples) == case.kept, [str(s.image_path) for s in samples]
    if case.outcome == LOAD_SKIPPED:
        with pytest.raises(ImageLoadError):
            load_rgb(samples[0].image_path)
    if case.outcome != TRAINED:
        return
    family, model, processor = loaded_tiny_blip
    images = [load_rgb(s.image_path) for s in samples]
    batch = family.collate(processor, images, [s.caption for s in samples], max_length=32)
    assert batch["pixel_values"].shape[0] == len(samples)
    import torch

    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.fixture(scope="module")
def loaded_tiny_blip(tiny_blip):
    from caption_train.models import resolve_family

    family, _ = resolve_family(str(tiny_blip))
    model, processor = family.load(str(tiny_blip), {})
    return family, model.eval(), processor


# ---------------------------------------------------------------------------------------------
# inputs that must stop the run: one line, exit 2, nothing written


def _file(tmp: Path, name: str, data: bytes = b"x") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _only_bad_dataset(tmp: Path) -> Path:
    root = tmp / "all-bad"
    build_corpus(root, good=0, only={"zero_byte_png", "text_named_jpg", "decompression_bomb", "empty_caption", "latin1_caption", "missing_caption", "orphan_caption"})
    return root


def _captions_only(tmp: Path) -> Path:
    (tmp / "captions-only").mkdir()
    _file(tmp / "captions-only", "a.txt", b"a red circle")
    return tmp / "captions-only"


def _one_pair(tmp: Path) -> Path:
    root = tmp / "one"
    build_corpus(root, good=1, only=set())
    return root


def _symlink_to_itself(tmp: Path) -> Path:
    os.symlink(tmp / "self", tmp / "self")
    return tmp / "self"


def _config(tmp: Path, text: bytes) -> list[str]:
    return ["--config_file", str(_file(tmp, "config.toml", text))]


def _read_only_dir(tmp: Path) -> Path:
    path = tmp / "read-only"
    path.mkdir()
    os.chmod(path, 0o555)
    return path


# (id, make(tmp, dataset) -> (dataset_dir, extra args, output_dir or None for the default), expected message,
#  needs permission bits enforced)
FATAL = [
    ("dataset_is_a_file", lambda t, d: (_file(t, "images.png"), [], None), "is a file, not a directory", False),
    ("dataset_missing", lambda t, d: (t / "no-such-folder", [], None), "no such directory", False),
    ("dataset_symlink_loop", lambda t, d: (_symlink_to_itself(t), [], None), "no such directory", False),
    ("dataset_empty_folder", lambda t, d: ((t / "empty").mkdir() or t / "empty", [], None), "found no images; caption-train reads .bmp .jpeg .jpg .png .webp", False),
    ("dataset_only_captions", lambda t, d: (_captions_only(t), [], None), "no usable image+caption pairs", False),
    ("dataset_only_bad_items", lambda t, d: (_only_bad_dataset(t), [], None), "no usable image+caption pairs", False),
    ("validation_split_one_image", lambda t, d: (_one_pair(t), ["--validation_split", "0.5"], None), "needs at least 2 captioned images", False),
    ("bad_toml", lambda t, d: (d, _config(t, b"epochs = = 3\n"), None), "TOML syntax error", False),
    ("toml_not_utf8", lambda t, d: (d, _config(t, b"training_name = 'caf\xe9'\n"), None), "not a UTF-8 text file", False),
    ("toml_unknown_key", lambda t, d: (d, _config(t, b"epoch = 3\n"), None), "unknown key 'epoch' (did you mean 'epochs'?)", False),
    ("toml_wrong_type", lambda t, d: (d, _config(t, b"epochs = 'five'\n"), None), "expected an integer", False),
    ("config_file_is_a_folder", lambda t, d: (d, ["--config_file", str(t)], None), "no such file", False),
    ("config_file_missing", lambda t, d: (d, ["--config_file", str(t / "nope.toml")], None), "no such file", False),
    ("output_dir_is_a_file", lambda t, d: (d, [], _file(t, "runs")), "cannot create it", False),
    ("output_dir_under_a_file", lambda t, d: (d, [], _file(t, "runs") / "sub"), "cannot create it", False),
    ("output_dir_read_only", lambda t, d: (d, [], _read_only_dir(t) / "runs"), "cannot create it", True),
]


@pytest.mark.parametrize("make, expected, needs_permissions",
                         [pytest.param(*f[1:], id=f[0], marks=[pytest.mark.permissions] if f[3] else []) for f in FATAL])
def test_fatal_input_is_one_line_and_writes_nothing(make, expected, needs_permissions, corpus, tiny_blip, tmp_path, capsys):
    if needs_permissions and not permissions_enforced():
        pytest.skip(NO_PERMISSIONS)
    root, _, before = corpus
    dataset, extra, out_dir = make(tmp_path, root)
    # Everything under tmp_path (this case's own dataset, config, output parent) must stay as it is too.
    tmp_before = tree_digest(tmp_path)
    code = main(["train", *base_args(dataset, tiny_blip, out_dir or tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err
    assert tree_digest(root) == before
    assert tree_digest(tmp_path) == tmp_before


@pytest.mark.permissions
def test_unreadable_metadata_jsonl_is_one_line(tmp_path, tiny_blip, capsys):
    if not permissions_enforced():
        pytest.skip(NO_PERMISSIONS)
    root = _one_pair(tmp_path)
    (root / "metadata.jsonl").write_text("{}\n")
    os.chmod(root / "metadata.jsonl", 0)
    assert main(["train", *base_args(root, tiny_blip, tmp_path / "runs")]) == 2
    assert "metadata.jsonl: cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# a file name that is not UTF-8 must not crash printing on a strict UTF-8 console


def test_non_utf8_file_name_with_strict_stdout(tmp_path, tiny_blip, monkeypatch):
    root = tmp_path / "dataset"
    build_corpus(root, good=0, only={"non_utf8_file_name"})
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)
    failure = None
    try:
        code = main(["train", *base_args(root, tiny_blip, tmp_path / "runs")])
    except UnicodeEncodeError as error:
        failure = error.args  # not the error itself: its traceback would keep the run's progress bar alive
    gc.collect()  # so the interrupted progress bar closes now, while its output is still captured
    if failure:
        raise UnicodeEncodeError(*failure)
    assert code == 0
