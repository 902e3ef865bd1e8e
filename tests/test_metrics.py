"""Caption metrics against published or reference-implementation values for small hand examples."""

from __future__ import annotations

import pytest

from caption_train.metrics import bleu, cider_d, is_tag_style, lcs_length, score_captions, split_tags, tokenize

# Two items with 4-gram matches, a third without a reference match, several references per item.
COCO_PREDICTIONS = ["a man riding a wave on top of a surfboard", "a cat sitting on a red sofa", "a dog runs in the snow"]
COCO_REFERENCES = [
    ["a man riding a wave on a surfboard", "a surfer rides a large wave"],
    ["a cat sits on a red couch", "a cat on a sofa"],
    ["two dogs play in the snow"],
]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Red-circle, on the GRASS.") == ["a", "red", "circle", "on", "the", "grass"]
    assert tokenize("don't stop") == ["don't", "stop"]
    assert tokenize("ein Bär über der Brücke") == ["ein", "bär", "über", "der", "brücke"]  # non-ASCII words kept


def test_bleu_matches_papineni_example():
    # The BLEU paper's candidate 1 against its three references (Papineni et al. 2002, section 2.1), as tokenized
    # in NLTK's documentation of nltk.translate.bleu_score.sentence_bleu, which gives 0.5045666840058485.
    hypothesis = "It is a guide to action which ensures that the military always obeys the commands of the party"
    references = [
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    ]
    corpus, items = bleu([hypothesis], [references])
    assert corpus == pytest.approx(50.45666840058485, abs=1e-6)
    assert items[0] == pytest.approx(50.45666840058485, abs=1e-6)


def test_corpus_bleu4_matches_coco_caption():
    # Expected: pycocoevalcap 1.2 (the coco-caption reference implementation), Bleu(4).compute_score(gts, res),
    # on these pre-tokenized captions: Bleu_4 = 0.4187403683105179 (its 1e-15 smoothing explains the last digits).
    scores = score_captions(COCO_PREDICTIONS, COCO_REFERENCES)
    assert scores.corpus["bleu4"] == pytest.approx(41.87403683105179, abs=1e-6)


def test_cider_d_matches_coco_caption():
    # Expected: pycocoevalcap 1.2 cider/cider.py, Cider().compute_score(gts, res) on the same captions:
    # 3.068305687888408, per image [3.51344024, 2.7154495, 2.97602732] (reported here x100).
    corpus, items = cider_d([tokenize(p) for p in COCO_PREDICTIONS], [[tokenize(r) for r in refs] for refs in COCO_REFERENCES])
    assert corpus == pytest.approx(306.8305687888408, abs=1e-9)
    assert items == pytest.approx([351.344024, 271.544950, 297.602732], abs=1e-5)


def test_cider_d_second_example_and_properties():
    # Expected: pycocoevalcap 1.2 Cider() on gts = {1: ["a red circle"], 2: ["a blue square", "a square on green
    # grass"], 3: ["a dog sitting on a mat"], 4: ["two cats on a red sofa"]} and these results:
    # 4.21800896559796, per image [7.5, 3.01878909, 2.57236624, 3.78088053].
    predictions = ["a red circle", "a blue square on the grass", "a cat on a mat", "a red sofa"]
    references = [["a red circle"], ["a blue square", "a square on green grass"], ["a dog sitting on a mat"], ["two cats on a red sofa"]]
    scores = score_captions(predictions, references)
    assert scores.corpus["cider"] == pytest.approx(421.800896559796, abs=1e-9)
    assert [item["cider"] for item in scores.items] == pytest.approx([750.0, 301.878909, 257.236624, 378.088053], abs=1e-5)
    # No 4-gram of any prediction matches: corpus BLEU-4 is 0 (coco-caption: 7.2e-05, its smoothing constant).
    assert scores.corpus["bleu4"] == 0.0
    # Repeating a matching word does not raise CIDEr-D (counts are clipped at the reference's).
    _, plain = cider_d([["red", "circle"], ["blue", "square"]], [[["red", "circle"]], [["blue", "square"]]])
    _, repeated = cider_d([["red", "red", "red", "circle"], ["blue", "square"]], [[["red", "circle"]], [["blue", "square"]]])
    assert repeated[0] < plain[0]


def test_rouge_l_is_coco_captions_f_measure_with_beta_1_2():
    """Hand-computed with coco-caption's definition (pycocoevalcap/rouge/rouge.py), F = (1 + b^2) P R / (R + b^2 P),
    b = 1.2, P and R each the maximum over the references:

    1. "the quick brown dog jumps on the log" (8 words) vs "the quick brown fox jumps over the lazy dog" (9):
       LCS "the quick brown jumps the" = 5, P = 5/8, R = 5/9; F = 2.44 * (25/72) / (5/9 + 1.44 * 5/8)
       = (61/72) / (131/90) = 5490/9432 = 0.5820610687 (rouge-score's F1 would be 0.5882352941).
    2. "a red circle" vs ["a red circle on white", "red circle"]: LCS 3 -> P 1, R 3/5; LCS 2 -> P 2/3, R 1.
       Max P = 1 and max R = 1 come from different references: F = 1 (a best-single-reference F1 would be 0.8).
    3. "a blue square" vs "red circle": LCS 0 -> 0.   4. "" vs "a red circle": P undefined -> 0.
    The corpus value is the mean: (58.20610687 + 100 + 0 + 0) / 4 = 39.55152672.
    """
    scores = score_captions(
        ["The quick brown dog jumps on the log.", "A red circle", "a blue square", ""],
        ["The quick brown fox jumps over the lazy dog", ["a red circle on white", "red circle"], "red circle", "a red circle"],
    )
    assert [item["rougeL"] for item in scores.items] == pytest.approx([100 * 5490 / 9432, 100.0, 0.0, 0.0], abs=1e-9)
    assert scores.corpus["rougeL"] == pytest.approx((100 * 5490 / 9432 + 100.0) / 4, abs=1e-9)


def test_lcs_length_against_brute_force():
    import itertools
    import random

    def brute(a, b):
        return max((k for k in range(len(a) + 1) for sub in itertools.combinations(a, k) if _is_subsequence(sub, b)), default=0)

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == brute(a, b) == lcs_length(b, a)


def _is_subsequence(sub, seq) -> bool:
    it = iter(seq)
    return all(token in it for token in sub)


def test_exact_match_and_sentence_bleu_for_short_captions():
    scores = score_captions(["A red circle.", "a blue square"], ["a red circle", "a red square"])
    assert scores.corpus["exact_match"] == 50.0
    assert scores.items[0]["exact_match"] == 100.0 and scores.items[1]["exact_match"] == 0.0
    # Per-item BLEU uses the orders a 3-word caption has, so a perfect short caption scores 100, not 0.
    assert scores.items[0]["bleu"] == pytest.approx(100.0)
    assert scores.corpus["rougeL"] == pytest.approx((100 + 200 / 3) / 2)
    assert "tag_f1" not in scores.corpus  # sentences, not tags


def test_tag_precision_recall_f1():
    assert split_tags("1girl, Blue_hair,  long   hair ,solo.") == ["1girl", "blue hair", "long hair", "solo"]
    # Item 1: predicted {1girl, solo, blue hair, smile}, reference {1girl, blue hair, long hair, solo}: 3 hits.
    # Item 2: predicted {outdoors}, reference {outdoors, tree}: 1 hit. Micro: P = 4/5, R = 4/6.
    scores = score_captions(["1girl, solo, Blue_hair, smile", "outdoors"], ["1girl, blue hair, long hair, solo", "outdoors, tree"])
    assert is_tag_style(["1girl, blue hair", "outdoors, tree"])
    assert scores.corpus["tag_precision"] == pytest.approx(80.0)
    assert scores.corpus["tag_recall"] == pytest.approx(400 / 6)
    assert scores.corpus["tag_f1"] == pytest.approx(2 * 80 * (400 / 6) / (80 + 400 / 6))
    assert scores.items[0]["tag_f1"] == pytest.approx(75.0) and scores.items[1]["tag_f1"] == pytest.approx(200 / 3)
    assert "tag_f1" not in score_captions(["a, b"], ["a, b"], tags=False).corpus


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_captions(["a", "b"], ["a"])
    assert score_captions([], []).corpus["cider"] == 0.0


def test_rouge_l_matches_pycocoevalcap():
    """Values from pycocoevalcap 1.2's Rouge().compute_score on these items (tokenized as `tokenize` does)."""
    scores = score_captions(COCO_PREDICTIONS, COCO_REFERENCES)
    assert [item["rougeL"] for item in scores.items] == pytest.approx([90.70631970260223, 85.91549295774648, 50.0], abs=1e-9)
