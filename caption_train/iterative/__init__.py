"""The interactive caption page: fix captions in a web page while training runs (or without training: `review`).

    caption-train train --dataset_dir data --interactive 8765      # prints: interactive page: http://127.0.0.1:8765/?token=...
    caption-train review data --model runs/x/final                  # the same page, no training

Modules: `address` (parse `[HOST:]PORT`), `schema` (pydantic messages), `store` (ids, atomic caption writes,
ratings, history), `server` (aiohttp, token, origin checks), `hooks` (the TrainingHooks), `review` (the command),
`static/` (index.html, main.js, main.css: no build step). Only `address` is imported eagerly, so config
validation can call `parse_interactive` without loading aiohttp or torch.
"""

from caption_train.iterative.address import parse_interactive

__all__ = ["InteractiveHooks", "parse_interactive"]


def __getattr__(name: str):
    if name == "InteractiveHooks":
        from caption_train.iterative.hooks import InteractiveHooks

        return InteractiveHooks
    raise AttributeError(name)
