"""Caption transforms: shuffle with frozen parts, part dropout, determinism of sample_rng."""

import random
import subprocess
import sys

import pytest

from caption_train.data.captions import CaptionTransform, sample_rng, split_parts

CAPTION = "a photo of a cat, sitting, indoors, blurry, orange fur, close-up"
PARTS = split_parts(CAPTION)


def test_split_parts_strips_and_drops_empty():
    assert split_parts(" a ,b,, ,c , ") == ["a", "b", "c"]
    assert split_parts("one sentence only") == ["one sentence only"]
    assert split_parts("") == []


def test_disabled_transform_returns_exact_text():
    text = "  a,b ,,  c  "
    transform = CaptionTransform(frozen_parts=2)  # frozen alone changes nothing
    assert not transform.enabled
    assert transform(text, random.Random(0)) is text


def test_enabled_flags():
    assert CaptionTransform(shuffle=True).enabled
    assert CaptionTransform(dropout=0.1).enabled
    assert not CaptionTransform().enabled


@pytest.mark.parametrize(
    "kwargs",
    [{"frozen_parts": -1}, {"frozen_parts": 1.5}, {"dropout": -0.1}, {"dropout": 1.5}, {"dropout": float("nan")}],
)
def test_invalid_fields_raise(kwargs):
    with pytest.raises(ValueError):
        CaptionTransform(**kwargs)


def test_shuffle_keeps_frozen_parts_first_and_uses_every_order():
    transform = CaptionTransform(shuffle=True, frozen_parts=2)
    rng = random.Random(1)
    first_movable = set()
    for _ in range(500):
        parts = split_parts(transform(CAPTION, rng))
        assert parts[:2] == PARTS[:2]
        assert sorted(parts[2:]) == sorted(PARTS[2:])
        first_movable.add(parts[2])
    assert first_movable == set(PARTS[2:])  # really shuffles


def test_frozen_parts_never_dropped():
    transform = CaptionTransform(frozen_parts=2, dropout=1.0)
    rng = random.Random(2)
    for _ in range(200):
        assert transform(CAPTION, rng) == "a photo of a cat, sitting"


def test_frozen_parts_larger_than_caption():
    transform = CaptionTransform(shuffle=True, frozen_parts=10, dropout=0.5)
    assert transform("b, a", random.Random(0)) == "b, a"


def test_dropout_rate_within_tolerance():
    transform = CaptionTransform(dropout=0.3)
    rng = random.Random(3)
    draws = 20_000
    kept = dict.fromkeys(PARTS, 0)
    for _ in range(draws):
        out = split_parts(transform(CAPTION, rng))
        assert out == [p for p in PARTS if p in out]  # no shuffle: order preserved
        for part in out:
            kept[part] += 1
    for part, count in kept.items():
        # 0.7 expected; the keep-one rule adds at most 0.3**6 / 6 on top
        assert abs(count / draws - 0.7) < 0.015, (part, count / draws)


def test_dropout_one_never_empty_and_keeps_a_random_part():
    transform = CaptionTransform(shuffle=True, dropout=1.0)
    rng = random.Random(4)
    seen = set()
    for _ in range(300):
        out = transform(CAPTION, rng)
        assert out in PARTS  # exactly one whole part
        seen.add(out)
    assert seen == set(PARTS)


def test_single_part_caption_never_dropped():
    transform = CaptionTransform(shuffle=True, dropout=0.9)
    rng = random.Random(5)
    assert {transform("a cat sitting on a mat", rng) for _ in range(200)} == {"a cat sitting on a mat"}


def test_sample_rng_is_deterministic_and_distinct():
    transform = CaptionTransform(shuffle=True, dropout=0.2)
    same = [transform(CAPTION, sample_rng(7, 3, 11)) for _ in range(3)]
    assert len(set(same)) == 1
    by_epoch = {transform(CAPTION, sample_rng(7, epoch, 11)) for epoch in range(20)}
    assert len(by_epoch) > 10
    assert sample_rng(7, 0, 1).random() != sample_rng(7, 1, 0).random()
    assert sample_rng(7, 0, 1).random() != sample_rng(8, 0, 1).random()


def test_sample_rng_same_in_another_process():
    # Guards against salted hash(): a fresh interpreter must draw the same numbers.
    code = "from caption_train.data.captions import sample_rng; print(sample_rng(1, 2, 3).random())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(sample_rng(1, 2, 3).random())
