"""Atomic text writes and file permissions, shared by every writer of user-visible files (captions, reports, page
state, metrics, checkpoints, merged models).

    write_text_atomic(Path("img.txt"), "a red circle\n")     # new file: 0o666 minus the umask, like open("w")
    give_default_modes(tmp_dir)                              # after save_pretrained into a temp folder

A temp file from `tempfile.mkstemp` is created 0600 whatever the umask, and `os.replace` carries that mode to the
target, so every temp+rename writer must set the mode itself: the mode `open(path, "w")` would have given (the
existing file's mode when one is replaced, else 0o666 minus the umask).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Read from /proc where it exists: os.umask can only be read by setting it, which would race
    with other threads creating files meanwhile (the interactive page writes from a server thread)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits `open(path, "w")` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


def mode_for(path: Path) -> int:
    """The mode a write to `path` should leave: the existing file's (replacing keeps it), else a new file's."""
    try:
        existing = os.stat(path)
    except OSError:
        return new_file_mode()
    return stat.S_IMODE(existing.st_mode) if stat.S_ISREG(existing.st_mode) else new_file_mode()


def give_default_modes(folder: Path) -> None:
    """Give every file under `folder` (one we just filled, e.g. by save_pretrained) a new file's mode.

    Libraries that write through their own temp files (transformers' model.safetensors) leave them 0600.
    """
    mode = new_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_text_atomic(path: Path, text: str, *, mode: int | None = None, errors: str = "strict") -> None:
    """Write `text` as UTF-8 to a temp file in `path`'s folder, fsync, then os.replace: readers see old or new,
    never half.

    `errors` is the UTF-8 encoder's error handler ("backslashreplace" where file names that are not valid UTF-8
    may appear in the text); `mode` sets the file's permission bits (default: see `mode_for`).
    """
    write_bytes_atomic(path, text.encode("utf-8", errors), mode=mode)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None, durable: bool = True) -> None:
    """`write_text_atomic` for bytes. durable=False skips the fsync, for files that are only a cache: a torn one
    after a crash is detected and rebuilt by its reader."""
    path = Path(path)
    final_mode = mode_for(path) if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), final_mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def absolute_if_local(value: str | None) -> str | None:
    """An existing local path made absolute (symlinks resolved), so a recorded path works from any working
    directory; anything else (a hub id, None) unchanged."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value
