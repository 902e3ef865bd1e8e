"""A small dataset whose rows differ in length: shapes images of several sizes, captions of one to six parts.

    pairs = make_mixed_dataset(tmp_path / "mixed", 24, seed=3)   # [(image path, caption), ...], in index order
    make_mixed_dataset(tmp_path / "rep", 8, repeats={"3_style": 4})   # 4 of the images under a 3_style/ repeat folder

Words come from the tiny models' vocabulary (colors and shapes), so every caption tokenizes without unknown tokens.
Deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path

from caption_train.tiny import COLORS, SHAPES, make_shapes_dataset

SIZES = ((32, 32), (64, 32), (32, 64), (64, 64), (96, 48), (48, 96), (112, 112))


def make_mixed_dataset(out_dir, n: int, *, seed: int = 0, max_parts: int = 6, repeats: dict[str, int] | None = None) -> list[tuple[Path, str]]:
    """`n` images (sizes cycling through SIZES) with captions of 1..max_parts comma-separated parts; `repeats`: kohya
    folder name -> how many of the images (the first ones) go under it."""
    from PIL import Image

    out_dir = Path(out_dir)
    rng = random.Random(seed)
    base = make_shapes_dataset(out_dir / ".base", n, seed=seed, size=32, subfolders=0)
    folders = [name for name, count in (repeats or {}).items() for _ in range(count)]
    words = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
    pairs = []
    for i, (source, caption) in enumerate(base):
        folder = out_dir / (folders[i] if i < len(folders) else f"part{i % 2}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:04d}.png"
        Image.open(source).convert("RGB").resize(SIZES[i % len(SIZES)]).save(path, format="PNG")
        caption = ", ".join([caption] + [f"a {rng.choice(words)}" for _ in range(rng.randrange(max_parts))])
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        pairs.append((path, caption))
    for leftover in (out_dir / ".base").iterdir():  # hidden: the scan skips it anyway; removed to keep the folder plain
        leftover.unlink()
    (out_dir / ".base").rmdir()
    return pairs
