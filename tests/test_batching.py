"""Length-grouped batches (data/batching.py): each epoch a shuffled partition with little padding, deterministic under
the seed, spread over kohya repeats, sharded by accelerate under torchrun, row lengths estimated without decoding images,
and the start-up and padding lines of the train command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caption_train.cli import main
from caption_train.data.batching import (AUTO_MIN_PADDING, LengthGroupedBatches, batch_tokens, epoch_seed, estimate_row_lengths,
                                         expected_padding, group_batches, random_batches)
from caption_train.data.dataset import CaptionDataset
from caption_train.data.scan import scan_dataset
from caption_train.tracking import read_metrics

from conftest import REPO, VOCAB_TEXTS, base_args
from mixed_dataset import make_mixed_dataset


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed")
    make_mixed_dataset(out, 24, seed=3)
    return out


# ---------------------------------------------------------------------------------------------
# The sampler alone


def test_each_epoch_is_a_shuffled_partition_with_little_padding():
    """Every index once per epoch, full batches but the last (the short one last, where accelerate expects it), the
    full batch with the longest row first; the same batches for the same (seed, epoch), other rows together in another epoch; and far
    less padding than random batches of the same lengths."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=203)
    samples = np.arange(203)
    epochs = [group_batches(lengths, samples, batch_size=8, seed=epoch_seed(42, epoch)) for epoch in range(3)]
    for batches in epochs:
        assert sorted(np.concatenate(batches).tolist()) == list(range(203))
        assert [len(b) for b in batches] == [8] * 25 + [3]
        assert lengths[batches[0]].max() == max(lengths[b].max() for b in batches[:-1])  # of the full batches
        assert expected_padding(lengths, batches) < expected_padding(lengths, random_batches(203, 8, 1)) / 5
    again = group_batches(lengths, samples, batch_size=8, seed=epoch_seed(42, 0))
    assert all(np.array_equal(a, b) for a, b in zip(epochs[0], again))
    pairs = [{frozenset(b.tolist()) for b in batches} for batches in epochs]
    assert pairs[0] != pairs[1] and pairs[1] != pairs[2]  # rows meet other rows from epoch to epoch
    other_seed = group_batches(lengths, samples, batch_size=8, seed=epoch_seed(43, 0))
    assert [b.tolist() for b in other_seed] != [b.tolist() for b in epochs[0]]


def test_kohya_repeats_are_spread_over_batches(tmp_path):
    """A repeat folder's copies of an image are served as often as the folder says, each epoch, and rows of the same
    length are ordered by copy, so a batch holds different images rather than one image's copies."""
    make_mixed_dataset(tmp_path, 8, seed=1, max_parts=1, repeats={"6_style": 4})  # 4 images x 6 + 4 images x 1
    samples = scan_dataset(tmp_path, probe=False).samples
    dataset = CaptionDataset(samples, repeat=True)
    numbers = dataset.sample_numbers()
    assert numbers.tolist() == [samples.index(dataset.sample_at(i)) for i in range(len(dataset))] and len(numbers) == 28
    sampler = LengthGroupedBatches(dataset, np.full(len(samples), 10), batch_size=4, seed=0)  # every row the same length
    for epoch in range(3):
        dataset.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(28))
        assert all(len({int(numbers[i]) for i in b}) == len(b) for b in batches), batches  # no image twice in a batch


def test_the_sampler_reads_the_epoch_from_its_dataset(mixed_dir):
    """The loop sets the dataset's epoch (for the caption transforms): the sampler follows it, so no wrapper has to
    pass set_epoch through."""
    dataset = CaptionDataset(scan_dataset(mixed_dir, probe=False).samples)
    sampler = LengthGroupedBatches(dataset, np.arange(24) % 7 + 3, batch_size=4, seed=5)
    dataset.set_epoch(3)
    assert list(sampler) == [b.tolist() for b in sampler.batches(3)] != [b.tolist() for b in sampler.batches(0)]


@pytest.mark.slow
def test_accelerate_shards_the_grouped_batches_over_two_processes(tmp_path, mixed_dir):
    """torchrun, 2 CPU processes, accelerate's prepared DataLoader with the seedable sampler as training builds it:
    process r gets batches r, r+2, ... of the epoch's grouped order (together each row once), and skipping a
    resumed run's first batches gives each process the rest of its own."""
    from test_train import free_port

    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "tests" / "batching_worker.py"), str(mixed_dir), str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    samples = scan_dataset(mixed_dir, probe=False).samples
    dataset = CaptionDataset(samples)
    sampler = LengthGroupedBatches(dataset, np.array([len(s.caption) for s in samples]), batch_size=3, seed=7)
    for epoch in (0, 1):
        expected = [b.tolist() for b in sampler.batches(epoch)]  # 24 rows / 3 = 8 batches
        assert ranks[0][str(epoch)] == expected[0::2] and ranks[1][str(epoch)] == expected[1::2]
    assert ranks[0]["0"] != ranks[0]["1"]
    assert ranks[0]["1-skip2"] == ranks[0]["1"][2:] and ranks[1]["1-skip2"] == ranks[1]["1"][2:]


# ---------------------------------------------------------------------------------------------
# Row lengths, without decoding an image


def collated_lengths(family, processor, samples, prompt, max_length) -> list[int]:
    """Each sample's real row length: the family's collate on its decoded image, one row at a time."""
    from caption_train.data.images import load_rgb

    return [batch_tokens(family.collate(processor, [load_rgb(s.image_path)], [s.caption], max_length=max_length, prompt=prompt))[0]
            for s in samples]


@pytest.mark.parametrize("name", ["blip", "qwen2_vl", "llava"])
def test_estimated_row_lengths_are_the_rows_training_builds(tmp_path, mixed_dir, tiny_blip, name):
    """The estimate (caption tokens, plus image tokens from the header's size where they follow it: Qwen2-VL) is
    the length of the row the family's collate builds from the decoded image, to a token (a caption tokenized after
    the template's text can merge differently at its first token)."""
    from caption_train.models import resolve_family
    from tiny_families_chat import BUILDERS

    model_dir = tiny_blip if name == "blip" else BUILDERS[name](tmp_path / name, VOCAB_TEXTS, **({"max_pixels": 112 * 112} if name == "qwen2_vl" else {}))
    family, _ = resolve_family(str(model_dir))
    processor = family.load(str(model_dir), {})[1]
    prompt = family.training_prompt(None)
    samples = scan_dataset(mixed_dir, probe=False).samples
    rows = estimate_row_lengths(samples, family=family, processor=processor, prompt=prompt, max_length=512)
    real = collated_lengths(family, processor, samples, prompt, 512)
    assert np.abs(rows.lengths - np.array(real)).max() <= 1, (rows.lengths.tolist(), real)
    assert len(set(real)) > 5  # the rows do differ
    if name == "qwen2_vl":
        assert rows.how == "caption tokens + image tokens from 24 image headers"
        counter = family.prompt_token_counter(processor, prompt)
        sizes = [(w, h) for w in (28, 57, 113, 300) for h in (30, 90, 250)]
        assert [counter(w, h) for w, h in sizes] == [family._prompt_length(processor, prompt, w, h) for w, h in sizes]
    else:
        assert rows.how == "caption tokens"


# ---------------------------------------------------------------------------------------------
# Through the train command


def grouped_padding(tiny_blip: Path, mixed_dir: Path) -> float:
    """The padding of epoch 1's grouped batches (batch 4, seed 42) of the tiny BLIP on `mixed_dir`, counted from the
    rows its collate builds: what the train command must report."""
    from caption_train.models import resolve_family

    family, _ = resolve_family(str(tiny_blip))
    processor = family.load(str(tiny_blip), {})[1]
    samples = scan_dataset(mixed_dir, probe=False).samples
    rows = estimate_row_lengths(samples, family=family, processor=processor, prompt=None, max_length=32)
    real = np.array(collated_lengths(family, processor, samples, None, 32))
    return expected_padding(real, LengthGroupedBatches(CaptionDataset(samples), rows.lengths, batch_size=4, seed=42).batches(0))


def padding_fraction(run_dir: Path) -> float:
    (row,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/padding_fraction" in r]
    assert row["epoch"] == 1
    return row["train/padding_fraction"]


def test_train_groups_by_length_and_reports_the_padding(capsys, tmp_path, tiny_blip, mixed_dir):
    """`auto` groups this dataset's rows (random batches would be ~30% padding): the start-up line says so with its
    estimate, the end of epoch 1 prints the padding the model saw (counted here from the grouped batches' own rows)
    and metrics.jsonl keeps it; with --group_by_length off the same run pads far more. Epoch 2 reports nothing."""
    args = base_args(mixed_dir, tiny_blip, tmp_path / "runs", "--batch_size", "4", "--epochs", "2", "--num_sample_captions", "0")
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    final = Path(out.strip().splitlines()[-1])
    assert "batches: grouped by length (auto: rows " in out and "tokens (caption tokens); padding ~" in out
    grouped = padding_fraction(final.parent)
    assert f"padding: {grouped:.1%} of the " in out and "in epoch 1's batches were padding (grouped by length)" in out
    assert out.count("padding: ") == 1

    assert grouped == pytest.approx(grouped_padding(tiny_blip, mixed_dir), abs=1e-9)

    assert main(["train", *args, "--group_by_length", "off", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    unsorted = padding_fraction(Path(out.strip().splitlines()[-1]).parent)
    assert "batches: random order (--group_by_length off)" in out and "(random batches)" in out
    assert unsorted > max(AUTO_MIN_PADDING, 3 * grouped), (unsorted, grouped)


def test_auto_leaves_rows_of_one_length_in_random_order(capsys, tmp_path, tiny_blip, shapes_dir):
    assert main(["train", *base_args(shapes_dir, tiny_blip, tmp_path / "runs", "--batch_size", "4", "--num_sample_captions", "0")]) == 0
    out = capsys.readouterr().out
    assert "batches: random order (auto: rows 5-5 tokens (caption tokens); random batches would be only ~0% padding)" in out
    assert "padding: 0.0% of the 120 token positions in epoch 1's batches were padding (random batches)" in out


@pytest.mark.parametrize("extra, message", [
    (("--group_by_length", "on", "--batch_size", "1"), "group_by_length on needs batch_size 2 or more"),
    (("--group_by_length", "sometimes"), "group_by_length"),
])
def test_bad_grouping_requests_are_one_line(capsys, tmp_path, tiny_blip, mixed_dir, extra, message):
    assert main(["train", *base_args(mixed_dir, tiny_blip, tmp_path / "runs", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.slow
def test_two_process_training_groups_and_reports_padding_once(tmp_path, tiny_blip, mixed_dir):
    """torchrun, 2 CPU processes: both ranks group (each takes every other batch), one start-up line and one padding
    line, and the padding reported is that of all of epoch 1's batches, both processes' shares reduced."""
    from test_train import free_port

    out = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "train2.py"), *base_args(mixed_dir, tiny_blip, out, "--batch_size", "4", "--epochs", "2", "--num_sample_captions", "0")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("batches: grouped by length (auto:") == 1 and result.stdout.count("padding: ") == 1
    (run_dir,) = out.iterdir()
    # 24 images / (4 per batch x 2 processes) -> 3 optimizer steps per epoch.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r] == list(range(1, 7))
    assert padding_fraction(run_dir) == pytest.approx(grouped_padding(tiny_blip, mixed_dir), abs=1e-9)
