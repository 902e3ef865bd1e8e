"""Caption checks for datasets made for diffusion training (kohya/SD tag lists, Flux/SD3 prose): what `lint` and
the trainer's start-up summary report besides files and tokens.

    issues = caption_issues(captions, tag_style=True, triggers={"mychar"})
    issues += encoder_limit_issues(captions, clip_counter())[1]
    for issue in issues:
        print(issue.code, captions[issue.index], issue.message)

Each check and its threshold (README "Check a dataset"):
- boilerplate_tag: a tag in at least 95% of the captions of a tag-style dataset of 10 or more captions (trigger
  words excepted): the same words under every image teach nothing about any of them.
- trigger_cooccurrence: a tag in at least 95% of a trigger word's captions (3 or more): the tag's meaning is
  fused into the trigger. Triggers: `--trigger`, and kohya folder names (`10_mychar/`) used as a caption tag.
- duplicate_tag: the same tag twice in one caption (ignoring case, `_` vs space).
- near_identical_captions: the same caption on different images (ignoring case, punctuation and tag order) of 6
  or more words or tags, or captions of 12 or more that differ in one word or tag.
- clip_too_long / t5_too_long: over CLIP's 77 or T5's 512 tokens (text_encoders).
"""

from __future__ import annotations

import collections
import re
from array import array
from dataclasses import dataclass
from typing import Iterable, Sequence

from caption_train.data.captions import split_parts
from caption_train.text_encoders import TokenCounter

BOILERPLATE_SHARE = 0.95  # a tag in at least this share of all captions is boilerplate
BOILERPLATE_MIN_CAPTIONS = 10  # fewer captions than this: too few to call any tag boilerplate
TRIGGER_SHARE = 0.95  # a tag in at least this share of a trigger's captions is fused into the trigger
TRIGGER_MIN_CAPTIONS = 3
SAME_MIN_TOKENS = 6  # identical captions shorter than this are normal (class captions: "a red circle")
NEAR_MIN_TOKENS = 12  # one word or tag apart is suspicious only in a caption this long

WHY = {
    "boilerplate_tag": "the same words under every image teach nothing about any of them; the captioner learns to write them everywhere",
    "trigger_cooccurrence": "the trigger is (almost) never seen without this tag, so the model cannot tell them apart: the tag is fused into the trigger",
    "duplicate_tag": "a repeated tag counts twice, and the model learns to repeat it",
    "near_identical_captions": "captions that say the same of different images teach the model to ignore what differs between them",
    "clip_too_long": "SD 1.x and SDXL read 77 CLIP tokens; the rest of the caption is cut off and never seen",
    "t5_too_long": "Flux and SD3 read 512 T5 tokens; the rest of the caption is cut off and never seen",
}


@dataclass(frozen=True)
class Issue:
    code: str  # a key of WHY
    index: int  # the caption it is shown at (the example)
    message: str  # one line
    others: tuple[int, ...] = ()  # other captions it concerns (near-identical captions: the rest of the group)


def normalize_tag(tag: str) -> str:
    """A tag as the model tells tags apart: lowercase, `_` as a space, one space between words."""
    return " ".join(tag.replace("_", " ").lower().split())


def caption_issues(captions: Sequence[str], *, tag_style: bool, triggers: Iterable[str] = (),
                   same_image: Sequence[object] | None = None) -> list[Issue]:
    """Every check but the token limits. `same_image`: per caption, an id that is equal for byte-identical images
    (lint's duplicate hashes), so that a copied image is not also reported as a near-identical caption."""
    tags = [[normalize_tag(part) for part in split_parts(c)] for c in captions]
    issues = _duplicate_tags(captions, tags)
    triggers = {normalize_tag(t) for t in triggers if normalize_tag(t)}
    fused, fused_tags = _trigger_cooccurrence(captions, tags, triggers)
    issues += fused
    if tag_style:  # a tag fused into a trigger that is in every caption is reported once, as fused
        issues += _boilerplate(tags, triggers | fused_tags)
    issues += _near_identical(captions, tags if tag_style else None, same_image)
    return issues


def encoder_limit_issues(captions: Sequence[str], counter: TokenCounter) -> tuple[list[int], list[Issue]]:
    """(token count of each caption, an issue per caption over the encoder's limit)."""
    counts = counter.count(list(captions))
    code = f"{counter.name.lower()}_too_long"
    approx = "" if counter.exact else "~"
    issues = [Issue(code, i, f"{approx}{n} {counter.name} tokens{'' if counter.exact else ' (estimated)'}, over {counter.limit}: {counter.models} cut off the rest")
              for i, n in enumerate(counts) if n > counter.limit]
    return counts, issues


# ---------------------------------------------------------------------------------------------
# The checks


def _duplicate_tags(captions: Sequence[str], tags: list[list[str]]) -> list[Issue]:
    issues = []
    for i, caption_tags in enumerate(tags):
        repeated = [tag for tag, n in collections.Counter(caption_tags).items() if n > 1]
        if repeated:
            listed = ", ".join(f"{tag!r} {caption_tags.count(tag)}x" for tag in repeated[:5])
            issues.append(Issue("duplicate_tag", i, f"{listed} in {_short(captions[i])}"))
    return issues


def _boilerplate(tags: list[list[str]], exempt: set[str]) -> list[Issue]:
    if len(tags) < BOILERPLATE_MIN_CAPTIONS:
        return []
    counts = collections.Counter(tag for caption_tags in tags for tag in set(caption_tags))
    issues = []
    for tag, n in counts.most_common():
        if n < BOILERPLATE_SHARE * len(tags):
            break
        if tag not in exempt:
            first = next(i for i, caption_tags in enumerate(tags) if tag in caption_tags)
            issues.append(Issue("boilerplate_tag", first, f"{tag!r} is in {n:,} of {len(tags):,} captions ({100 * n / len(tags):.0f}%)"))
    return issues


def _trigger_cooccurrence(captions: Sequence[str], tags: list[list[str]], triggers: set[str]) -> tuple[list[Issue], set[str]]:
    """(an issue per trigger and tag fused into it, the tags fused into some trigger)."""
    issues, fused = [], set()
    for trigger in sorted(triggers):
        # A trigger is in a caption as a tag, or as words inside a prose caption ("a photo of sks dog").
        phrase = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")
        having = [i for i, caption in enumerate(captions)
                  if trigger in tags[i] or phrase.search(" ".join(caption.replace("_", " ").lower().split()))]
        if len(having) < TRIGGER_MIN_CAPTIONS:
            continue
        counts = collections.Counter(tag for i in having for tag in set(tags[i]) if trigger not in tag and tag not in triggers)
        for tag, n in counts.most_common():
            if n < TRIGGER_SHARE * len(having):
                break
            share = "all" if n == len(having) else f"{n:,}"
            issues.append(Issue("trigger_cooccurrence", having[0], f"trigger {trigger!r} comes with {tag!r} in {share} of its {len(having):,} captions"))
            fused.add(tag)
    return issues, fused


def kohya_triggers(folders: Iterable[str], captions: Sequence[str], folder_of: Sequence[str | None]) -> set[str]:
    """Trigger words named by kohya repeat folders (`10_mychar/`, `10_mychar woman/`: `mychar`) that the captions
    under that folder use as a tag in at least half of them."""
    found = set()
    for folder in folders:
        name = normalize_tag(folder.split("_", 1)[1]) if "_" in folder else ""
        word = name.split(" ")[0] if name else ""
        under = [i for i, f in enumerate(folder_of) if f == folder]
        if not word or not under:
            continue
        for candidate in dict.fromkeys((name, word)):
            uses = sum(candidate in {normalize_tag(p) for p in split_parts(captions[i])} for i in under)
            if uses * 2 >= len(under):
                found.add(candidate)
                break
    return found


def _near_identical(captions: Sequence[str], tags: list[list[str]] | None, same_image: Sequence[object] | None) -> list[Issue]:
    """Groups of captions that are the same bag of words (tags for a tag-style dataset), or one word or tag apart.

    Every caption is filed under the hash of its bag (a sum of word hashes) and, when long enough, under the
    hash of its bag less each of its words: two captions that share any of these are the same, one word
    longer, or one word different. The hashes go in flat arrays (a few bytes per word) and one sort finds the
    shared ones: 50k captions of 40 tags take ~30 MB, where a dict of the same keys would take ~300 MB.
    """
    import numpy as np

    mask = (1 << 64) - 1
    keys, owners = array("Q"), array("Q")
    for i, caption in enumerate(captions):
        words = tags[i] if tags is not None else re.findall(r"\w+", caption.lower())
        if len(words) < SAME_MIN_TOKENS:
            continue
        hashes = [hash(w) & mask for w in words]
        total = (sum(hashes) + _length_salt(len(words))) & mask
        keys.append(total)
        owners.append(i)
        if len(words) >= NEAR_MIN_TOKENS:
            salt = _length_salt(len(words) - 1) - _length_salt(len(words))
            for h in set(hashes):
                keys.append((total - h + salt) & mask)
                owners.append(i)
    if not keys:
        return []
    key_array = np.frombuffer(keys, dtype=np.uint64)
    owner_array = np.frombuffer(owners, dtype=np.uint64)
    order = np.argsort(key_array, kind="stable")
    sorted_keys, sorted_owners = key_array[order], owner_array[order]
    parent = {}

    def root(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    for start, end in zip(starts, ends):
        if end - start < 2:
            continue
        first = root(int(sorted_owners[start]))
        parent.setdefault(first, first)
        for j in range(start + 1, end):
            other = root(int(sorted_owners[j]))
            if other != first:
                parent[other] = first
    groups: dict[int, list[int]] = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    issues = []
    for members in groups.values():
        members.sort()
        images = {same_image[i] if same_image is not None else i for i in members}
        if len(images) < 2:  # byte-identical images: lint reports them as duplicate images
            continue
        first = members[0]
        differs = next((i for i in members[1:] if captions[i] != captions[first]), None)
        example = f"; e.g. {_short(captions[first])} / {_short(captions[differs])}" if differs is not None else f": {_short(captions[first])}"
        kind = "the same or one word/tag apart" if differs is not None else "the same"
        issues.append(Issue("near_identical_captions", first, f"{len(members)} images with captions {kind}{example}", tuple(members[1:])))
    return issues


def _length_salt(n: int) -> int:
    # Keeps bags of different sizes apart (a bag's hash is otherwise a plain sum).
    return (n * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)


def _short(caption: str, limit: int = 50) -> str:
    return repr(caption if len(caption) <= limit else caption[: limit - 3] + "...")
