"""Small helpers for the words of user-facing messages.

    plural(1, "image")  # "1 image"
    plural(3, "step")   # "3 steps"
    join_words(["blip", "git", "blip-2"])  # "blip, git and blip-2"
"""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """`count` and `word`, pluralized (`many`, default word + "s") unless count is exactly 1."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def join_words(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
