"""Atomic text writes, shared by every writer of user-visible files (captions, reports, page state, metrics).

    write_text_atomic(Path("img.txt"), "a red circle\n")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str, *, mode: int | None = None, errors: str = "strict") -> None:
    """Write `text` to a temp file in `path`'s folder, fsync, then os.replace: readers see old or new, never half.

    `errors` is the UTF-8 encoder's error handler ("backslashreplace" where file names that are not valid UTF-8
    may appear in the text); `mode` sets the file's permission bits.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors=errors, newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
