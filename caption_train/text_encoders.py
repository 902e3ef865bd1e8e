"""How many tokens a caption takes in the text encoders diffusion models are trained with: CLIP (77 tokens, SD 1.x
and SDXL) and T5 (512, Flux and SD3). `lint` warns about captions over these limits; nothing here needs a hub.

    clip = clip_counter()                      # exact where a CLIP vocabulary is at hand, else the estimate
    clip.count(["1girl, long_hair, smile"])    # -> [10] (start and end tokens included, as the limit counts them)
    clip = clip_counter("sd15/tokenizer")      # a CLIP tokenizer folder, e.g. a diffusers model's tokenizer/
    t5 = t5_counter("flux/tokenizer_2")        # a T5 tokenizer folder; without one, the estimate

Where the counts come from, in order: a tokenizer folder you pass (loaded with transformers, local files only);
for CLIP, the BPE vocabulary that the `open_clip_torch` package ships, when it is installed (found without
importing it: importing open_clip loads timm and torchvision); else an estimate. The CLIP estimate splits the
text as CLIP's tokenizer does (lowercased letter runs, single digits, punctuation runs) and guesses how many BPE
pieces each word takes from its length; measured against CLIP's real tokenizer (benchmarks/clip_token_estimate.py,
README "Check a dataset"). The T5 estimate (a SentencePiece unigram vocabulary of 32k pieces) could not be
measured here: no T5 vocabulary can be had offline; it leans high, and 512 tokens is ~350 English words anyway.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from caption_train.errors import UserError

CLIP_LIMIT = 77  # CLIP's context: 75 text tokens between its start and end tokens
T5_LIMIT = 512  # the T5-XXL encoder's sequence length in Flux (dev) and SD3
CLIP_MODELS = "SD 1.x, SDXL"
T5_MODELS = "Flux, SD3"

# CLIP's pre-tokenizer, in Python's `re`: contractions, runs of letters, single digits, runs of anything else that
# is not a space (underscore included: `long_hair` is long, _, hair).
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
# T5's SentencePiece splits digits and most punctuation into pieces of their own; words stay whole or split in two.
_T5_PIECES = re.compile(r"[^\W\d_]+|\d+|[^\s\w]|_")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


@dataclass(frozen=True)
class TokenCounter:
    """Counts a text encoder's tokens for captions (its special tokens included, as its limit counts them)."""

    name: str  # "CLIP", "T5"
    limit: int
    models: str  # the diffusion models that use this encoder, for messages
    source: str  # where the counts come from, for the report
    exact: bool  # False: an estimate (the report says so)
    count: Callable[[list[str]], list[int]]


def clip_counter(tokenizer_dir: str | None = None, *, bpe_path: str | None = None) -> TokenCounter:
    """CLIP token counts: from `tokenizer_dir`, else CLIP's BPE file (`bpe_path`, or open_clip_torch's when it is
    installed), else the estimate."""
    if tokenizer_dir:
        tokenizer = _load_tokenizer_folder(tokenizer_dir, "--clip_tokenizer")
        return TokenCounter("CLIP", CLIP_LIMIT, CLIP_MODELS, f"the tokenizer in {tokenizer_dir}", True, _counting(tokenizer, _clip_clean))
    path = Path(bpe_path) if bpe_path else open_clip_vocabulary()
    if path is not None:
        return TokenCounter("CLIP", CLIP_LIMIT, CLIP_MODELS, f"CLIP's vocabulary ({path.name})", True, _counting(clip_tokenizer_from_bpe(path), _clip_clean))
    return TokenCounter("CLIP", CLIP_LIMIT, CLIP_MODELS, "estimated: no CLIP tokenizer here; --clip_tokenizer DIR or pip install open_clip_torch counts exactly",
                        False, lambda captions: [estimate_clip_tokens(c) for c in captions])


def t5_counter(tokenizer_dir: str | None = None) -> TokenCounter:
    """T5 token counts: from `tokenizer_dir`, else the estimate."""
    if tokenizer_dir:
        tokenizer = _load_tokenizer_folder(tokenizer_dir, "--t5_tokenizer")
        return TokenCounter("T5", T5_LIMIT, T5_MODELS, f"the tokenizer in {tokenizer_dir}", True, _counting(tokenizer, str.strip))
    return TokenCounter("T5", T5_LIMIT, T5_MODELS, "estimated: no T5 tokenizer here; --t5_tokenizer DIR counts exactly", False,
                        lambda captions: [estimate_t5_tokens(c) for c in captions])


# ---------------------------------------------------------------------------------------------
# Estimates


def estimate_clip_tokens(text: str) -> int:
    """CLIP tokens of `text` with its start and end tokens, without CLIP's vocabulary: CLIP's own split into
    pieces, then per piece a guess from its length (common English words are one token; CLIP's BPE cuts rarer,
    longer words into pieces of ~4 letters; characters outside ASCII take ~1 token each)."""
    total = 2.0
    for piece in _CLIP_PIECES.findall(_clip_clean(text).lower()):
        if piece[0].isalpha():
            total += _letters_tokens(piece)
        elif piece[0].isdigit() or piece[0] == "'":
            total += 1
        else:
            total += _punctuation_tokens(piece)
    return round(total)


# Expected CLIP tokens of an ASCII word by its length (1..14 letters), measured on captions and English prose:
# words up to 4 letters are almost always one token; from 12 letters on, most are cut in two or more.
_WORD_TOKENS = (0, 1.0, 1.0, 1.01, 1.03, 1.06, 1.1, 1.2, 1.24, 1.4, 1.4, 1.45, 2.0, 2.05, 2.1)


def _letters_tokens(word: str) -> float:
    ascii_letters = sum(ch.isascii() for ch in word)
    other = len(word) - ascii_letters  # accented letters, CJK, ...: ~1.25 tokens each (2-3 bytes in byte-level BPE)
    if ascii_letters >= len(_WORD_TOKENS):
        guess = ascii_letters / 3.5
    else:
        guess = _WORD_TOKENS[ascii_letters]
    return guess + 1.25 * other


def _punctuation_tokens(run: str) -> float:
    # One mark is one token; runs like "..." or "!!" are often one token, longer runs mostly one per mark.
    return (1.0, 1.25, 2.0)[len(run) - 1] if len(run) <= 3 else 0.75 * len(run)


def estimate_t5_tokens(text: str) -> int:
    """T5 tokens of `text` with its end token, without T5's vocabulary: one per word of up to 8 letters, two for
    longer ones, one per digit run and per punctuation mark, one per character outside ASCII (all leaning high)."""
    total = 1
    for piece in _T5_PIECES.findall(text):
        if piece[0].isalpha():
            total += len(piece) if not piece.isascii() else 1 if len(piece) <= 8 else 2
        else:
            total += 1
    return total


# ---------------------------------------------------------------------------------------------
# Exact counts


def open_clip_vocabulary() -> Path | None:
    """CLIP's BPE merges file shipped inside an installed open_clip_torch, found without importing the package."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def clip_tokenizer_from_bpe(path: Path) -> Any:
    """transformers' CLIPTokenizer built from CLIP's BPE merges file: the byte alphabet, the same with the end-of-word
    mark, one token per merge, then the start and end tokens (49408 in all, CLIP's vocabulary)."""
    from transformers import CLIPTokenizer

    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read CLIP's vocabulary ({err})") from None
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # the first line is a version header
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [ch + "</w>" for ch in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's alphabet: every byte as a printable character (printable bytes as themselves, the others
    mapped to code points from 256 on), as GPT-2 and CLIP build their vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _clip_clean(text: str) -> str:
    """CLIP's tokenizer first unescapes HTML (twice) and straightens curly quotes (ftfy); the rest it does itself."""
    return html.unescape(html.unescape(text)).translate(_QUOTES).strip()


def _counting(tokenizer: Any, clean: Callable[[str], str]) -> Callable[[list[str]], list[int]]:
    def count(captions: list[str]) -> list[int]:
        counts: list[int] = []
        for start in range(0, len(captions), 1024):
            chunk = [clean(c) for c in captions[start:start + 1024]]
            counts += [len(ids) for ids in tokenizer(chunk, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]
        return counts

    return count


def _load_tokenizer_folder(folder: str, flag: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(folder).expanduser().is_dir():
        raise UserError(f"{flag} {folder}: no such folder; pass a tokenizer folder (e.g. a diffusers model's tokenizer/ or tokenizer_2/)")
    try:
        return AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to build it is the same advice
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{flag} {folder}: could not load a tokenizer from it ({reason}); pass a folder with tokenizer files (tokenizer.json, or vocab.json + merges.txt, or spiece.model)") from None
