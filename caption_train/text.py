"""Small helpers for the words of user-facing messages.

    plural(1, "image")  # "1 image"
    plural(3, "step")   # "3 steps"
    byte_size(24_576)   # "24.6 KB"
    join_words(["blip", "git", "blip-2"])  # "blip, git and blip-2"
"""

from __future__ import annotations

import os


def plural(count: int, word: str, many: str | None = None) -> str:
    """`count` and `word`, pluralized (`many`, default word + "s") unless count is exactly 1."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def byte_size(n: float) -> str:
    """A byte count in the largest decimal unit it reaches (B, KB, MB, GB): a 24 KB feature is "24.6 KB", not "0.0 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def join_words(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def printable(text: str) -> str:
    """Text safe to print on a strict UTF-8 console: a file name that is not valid UTF-8 reaches Python with
    surrogate escapes, shown here as backslash escapes of its bytes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if any("\udc80" <= ch <= "\udcff" for ch in text) else text
