"""The interactive caption page: fix captions in a web page while training runs (or without training: `review`).

    caption-train train --dataset_dir data --interactive 8765      # prints: interactive page: http://127.0.0.1:8765/?token=...
    caption-train review data --model runs/x/final                  # the same page, no training

Modules: `schema` (pydantic messages), `store` (ids, atomic caption writes, ratings, history), `ranking` (the
review queue's order from per-image losses: suspect_order; reading sample_losses.jsonl), `server` (aiohttp,
token, origin checks), `hooks` (InteractiveHooks: the page during training, written against the hook protocol in
caption_train.hooks), `review` (the command), `static/` (index.html, main.js, main.css: no build step). `[HOST:]PORT`
parsing lives outside, in caption_train.address, so config validation reads it without touching the page.

Nothing outside this package but the `train` and `review` commands (cli.make_hooks, the command table) imports it:
the training loop knows only caption_train.hooks (tests/test_import_structure.py holds that).
"""

from caption_train.address import parse_interactive

__all__ = ["InteractiveHooks", "parse_interactive"]


def __getattr__(name: str):
    if name == "InteractiveHooks":
        from caption_train.iterative.hooks import InteractiveHooks

        return InteractiveHooks
    raise AttributeError(name)
