"""Small helpers for the words of user-facing messages.

    plural(1, "image")  # "1 image"
    plural(3, "step")   # "3 steps"
"""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """`count` and `word`, pluralized (`many`, default word + "s") unless count is exactly 1."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
