"""Caption metrics, offline: BLEU-4, ROUGE-L, CIDEr-D, exact match, and tag precision/recall/F1.

    scores = score_captions(["a red circle"], ["a red circle"])     # one reference (str) or several (list) per item
    scores.corpus      # {"bleu4": 0.0, "rougeL": 100.0, "cider": 0.0, "exact_match": 100.0}
    scores.items[0]    # {"bleu": 100.0, "rougeL": 100.0, "cider": 0.0, "exact_match": 100.0}

Every score is on a 0-100 scale (CIDEr-D is x100 as papers report it, so it can exceed 100). All metrics see the
same tokens: `tokenize` lowercases and drops punctuation, like the coco-caption toolkit's PTB tokenizer does
before scoring (that one needs Java; this is a regex).

Where the numbers come from:
- BLEU-4: sacrebleu (corpus BLEU; per item, sentence BLEU with effective order so short captions are not 0).
  Corpus BLEU-4 is 0 when no caption has 4 words: there are no 4-grams to match.
- ROUGE-L: coco-caption's (`rouge.py`), written here: LCS precision and recall, each the best over the item's
  references, combined as an F-measure with beta = 1.2; the corpus value is the mean over items. rouge-score's
  LCS F1 (beta = 1, one best reference) is a different, usually slightly higher number; papers report this one.
- CIDEr-D: no maintained package provides it (pycocoevalcap, the coco-caption port, last released in 2020 and
  ships 100 MB of Java), so it is written here to match coco-caption's `cider_scorer.py` exactly: n = 1..4,
  sigma = 6, idf over the evaluated set's references, clipped counts, x10. It is a corpus metric: an item's
  score depends on the other items' references.
- Exact match: same tokens. Tags: comma-separated parts compared as sets, micro-averaged over the corpus;
  reported when most references are tag lists (`is_tag_style`).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

# Display names, in table order.
METRIC_LABELS = {
    "bleu4": "BLEU-4",
    "rougeL": "ROUGE-L",
    "cider": "CIDEr-D",
    "exact_match": "exact match",
    "tag_precision": "tag precision",
    "tag_recall": "tag recall",
    "tag_f1": "tag F1",
}
# Per-item columns (per-item BLEU is sentence BLEU, hence its own key).
ITEM_LABELS = {"cider": "CIDEr-D", "bleu": "BLEU", "rougeL": "ROUGE-L", "tag_f1": "tag F1", "exact_match": "exact"}

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def tokenize(text: str) -> list[str]:
    """Lowercased words; punctuation dropped, apostrophes inside words kept ("don't"), any script."""
    return _WORD.findall(text.lower())


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, normalized: lowercase, `_` as space, whitespace collapsed, trailing '.' dropped."""
    tags = []
    for part in text.split(","):
        tag = " ".join(part.replace("_", " ").lower().split()).rstrip(".").strip()
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def is_tag_style(references: Sequence[str | Sequence[str]]) -> bool:
    """True when at least half of the items' (first) references contain a comma: a tag list, not a sentence."""
    firsts = [_as_list(r)[0] for r in references]
    return bool(firsts) and sum("," in r for r in firsts) * 2 >= len(firsts)


def _as_list(references: str | Sequence[str]) -> list[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("an item has no reference caption")
    return refs


# ---------------------------------------------------------------------------- BLEU (sacrebleu)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(corpus BLEU-4, per-item sentence BLEU) on pre-tokenized, space-joined text."""
    from sacrebleu.metrics import BLEU

    # sacrebleu wants one stream per reference slot; items with fewer references repeat their first one, which
    # changes nothing (BLEU clips by the max count over references and picks the closest length).
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    corpus = BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(list(predictions), streams).score
    sentence = BLEU(tokenize="none", effective_order=True)
    items = [sentence.sentence_score(p, list(refs)).score for p, refs in zip(predictions, references)]
    return corpus, items


# ---------------------------------------------------------------------------- ROUGE-L (coco-caption's, written here)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for token in a:
        diagonal = 0
        for j, other in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if token == other else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], *, beta: float = 1.2) -> tuple[float, list[float]]:
    """(mean, per-item) ROUGE-L x100 on token lists, as coco-caption's rouge.py computes it.

    Per item: precision = LCS / prediction length and recall = LCS / reference length, each the maximum over the
    references (taken separately, so two references can supply them), then the F-measure with beta = 1.2,
    (1 + b^2) P R / (R + b^2 P), which weighs recall higher. This is what captioning papers report as ROUGE-L;
    rouge-score's LCS F1 (beta = 1, best single reference) gives different numbers.
    """
    items = []
    for prediction, refs in zip(predictions, references):
        lcs = [lcs_length(prediction, ref) for ref in refs]
        precision = max((n / len(prediction) if prediction else 0.0) for n in lcs)
        recall = max((n / len(ref) if ref else 0.0) for n, ref in zip(lcs, refs))
        if precision and recall:
            items.append(100.0 * (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            items.append(0.0)
    return _mean(items), items


# ---------------------------------------------------------------------------- CIDEr-D (written here)


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], *, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus, per-item) CIDEr-D x100 on token lists, as coco-caption's cider_scorer.py computes it."""
    if not predictions:
        return 0.0, []
    hyp_counts = [_ngram_counts(p, n) for p in predictions]
    ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    # Document frequency: in how many items' reference sets an n-gram occurs.
    df: Counter = Counter()
    for refs in ref_counts:
        df.update(set().union(*refs))
    log_items = math.log(len(predictions))

    def vectorize(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_items - math.log(max(1.0, df[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight * weight
        # coco-caption measures length as the number of bigrams (words - 1); kept so the numbers match it.
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    items = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec_h, norm_h, len_h = vectorize(hyp)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, len_r = vectorize(ref)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                # Clipping the hypothesis weight at the reference's is the "-D": repeating words does not pay.
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    dot /= norm_h[k] * norm_r[k]
                total[k] += dot * penalty
        items.append(100.0 * 10.0 * (sum(total) / n) / len(refs))
    return _mean(items), items


# ---------------------------------------------------------------------------- exact match and tags


def exact_match(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> tuple[float, list[float]]:
    items = [100.0 if any(list(p) == list(r) for r in refs) else 0.0 for p, refs in zip(predictions, references)]
    return _mean(items), items


@dataclass
class TagCounts:
    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0

    def precision(self) -> float:
        predicted = self.true_positive + self.false_positive
        return 100.0 * self.true_positive / predicted if predicted else 0.0

    def recall(self) -> float:
        relevant = self.true_positive + self.false_negative
        return 100.0 * self.true_positive / relevant if relevant else 0.0

    def f1(self) -> float:
        p, r = self.precision(), self.recall()
        return 2 * p * r / (p + r) if p + r else 0.0


def _tag_counts(prediction: str, reference: str) -> TagCounts:
    predicted, relevant = set(split_tags(prediction)), set(split_tags(reference))
    hits = len(predicted & relevant)
    return TagCounts(hits, len(predicted) - hits, len(relevant) - hits)


def tag_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict[str, float], list[float]]:
    """({"tag_precision", "tag_recall", "tag_f1"} micro-averaged over all tags, per-item F1); best reference per item."""
    totals = TagCounts()
    items = []
    for prediction, refs in zip(predictions, references):
        best = max((_tag_counts(prediction, r) for r in refs), key=TagCounts.f1)
        totals.true_positive += best.true_positive
        totals.false_positive += best.false_positive
        totals.false_negative += best.false_negative
        items.append(best.f1())
    return {"tag_precision": totals.precision(), "tag_recall": totals.recall(), "tag_f1": totals.f1()}, items


# ---------------------------------------------------------------------------- everything at once


@dataclass
class CaptionScores:
    corpus: dict[str, float]
    """Metric key (see METRIC_LABELS) -> corpus score."""
    items: list[dict[str, float]] = field(default_factory=list)
    """Per item: key (see ITEM_LABELS) -> score."""


def score_captions(predictions: Sequence[str], references: Sequence[str | Sequence[str]], *, tags: bool | None = None) -> CaptionScores:
    """Score predictions against references (a str or a list of str per item). tags=None: decide by is_tag_style."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    refs = [_as_list(r) for r in references]
    if tags is None:
        tags = is_tag_style(references)
    if not predictions:
        return CaptionScores(corpus={key: 0.0 for key in ("bleu4", "rougeL", "cider", "exact_match")})
    hyp_tokens = [tokenize(p) for p in predictions]
    ref_tokens = [[tokenize(r) for r in item] for item in refs]
    hyp_text = [" ".join(t) for t in hyp_tokens]
    ref_text = [[" ".join(t) for t in item] for item in ref_tokens]

    corpus: dict[str, float] = {}
    columns: dict[str, list[float]] = {}
    corpus["bleu4"], columns["bleu"] = bleu(hyp_text, ref_text)
    corpus["rougeL"], columns["rougeL"] = rouge_l(hyp_tokens, ref_tokens)
    corpus["cider"], columns["cider"] = cider_d(hyp_tokens, ref_tokens)
    corpus["exact_match"], columns["exact_match"] = exact_match(hyp_tokens, ref_tokens)
    if tags:
        tag_corpus, columns["tag_f1"] = tag_scores(predictions, refs)
        corpus.update(tag_corpus)
    items = [{key: columns[key][i] for key in ITEM_LABELS if key in columns} for i in range(len(predictions))]
    return CaptionScores(corpus=corpus, items=items)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
