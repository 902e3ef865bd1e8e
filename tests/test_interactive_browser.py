"""A real browser (Playwright driving Debian's Chromium) on the interactive page during a tiny training run:
live step updates, a caption edited through the page lands in the .txt, caption now, rating, pause/resume.
Skips when playwright or /usr/bin/chromium is missing (CI installs both: see .ci/run)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from caption_train.config import resolve
from caption_train.iterative.hooks import InteractiveHooks

from test_interactive_api import Page, TrainingThread, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def step_number(text: str) -> int:
    match = re.match(r"(\d+) / \d+", text)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
def test_browser_edits_a_caption_during_training(tmp_path, tiny_blip, shapes_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    data = Path(shutil.copytree(shapes_dir, tmp_path / "data"))
    cfg = resolve({}, {"dataset_dir": str(data), "model_name_or_path": str(tiny_blip), "output_dir": str(tmp_path / "runs"),
                       "epochs": 4, "batch_size": 4, "num_workers": 0, "log_with": "none", "num_sample_captions": 4, "save_every_n_epochs": 0})
    hooks = InteractiveHooks(start_paused=True)
    thread = TrainingThread(cfg, hooks)
    thread.start()
    try:
        wait_for(lambda: hooks.url or thread.error, "the page to start")
        assert thread.error is None, thread.error
        api = Page(hooks.url)
        wait_for(lambda: api.status()["state"] == "paused", "the run to pause")

        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
            page.goto(hooks.url)
            expect = sync_api.expect

            # Live status and the sample images with their captions on disk.
            expect(page.locator("#state")).to_have_text("paused", timeout=30_000)
            expect(page.locator("#step")).to_have_text("1 / 24")
            expect(page.locator("#mode")).to_have_text("training")
            cards = page.locator("article.card")
            expect(cards).to_have_count(4, timeout=30_000)
            first = cards.nth(0)
            expect(first.locator(".path")).to_have_text("part0/img_0000.png")
            expect(first.locator("textarea.caption")).to_have_value("a red circle")
            assert page.locator("article.card img").first.evaluate("img => img.complete && img.naturalWidth") == 32

            # Edit a caption through the page: typed, saved, written to the .txt.
            first.locator("textarea.caption").fill("a green triangle, on white")
            first.locator("button.save-caption").click()
            wait_for(lambda: (data / "part0" / "img_0000.txt").read_text() == "a green triangle, on white\n", "the edited .txt")
            expect(first.locator(".badges")).to_contain_text("modified")
            expect(page.locator("#count-modified")).to_have_text("1")

            # Ctrl+Enter saves too; rate another 5 (gold) and one 1 (excluded).
            second = cards.nth(1)
            second.locator("textarea.caption").fill("a red triangle, big")
            second.locator("textarea.caption").press("Control+Enter")
            wait_for(lambda: (data / "part0" / "img_0002.txt").read_text().strip() == "a red triangle, big", "Ctrl+Enter save")
            second.locator('.rating button[data-q="5"]').click()
            expect(second.locator(".badges")).to_contain_text("gold")
            cards.nth(3).locator('.rating button[data-q="1"]').click()
            expect(cards.nth(3)).to_have_class(re.compile(r"\bexcluded\b"))
            expect(page.locator("#count-excluded")).to_have_text("1")

            # Caption now, with the current weights (the run is paused: done right away).
            page.locator("#caption-shown").click()
            expect(first.locator(".model-caption")).not_to_have_class(re.compile(r"\bempty\b"), timeout=30_000)
            expect(first.locator(".model-step")).to_have_text("(step 1)")
            page.screenshot(path=str(tmp_path / "interactive-paused.png"), full_page=True)

            # Resume: the step counter moves while training runs.
            page.locator("#pause").click()
            seen = set()
            def progressed() -> bool:
                seen.add(step_number(page.locator("#step").inner_text()))
                return len({s for s in seen if s > 1}) >= 3
            wait_for(progressed, "live step updates", timeout=120)
            page.screenshot(path=str(tmp_path / "interactive-running.png"), full_page=True)
            expect(page.locator("#state")).to_have_text("finished", timeout=180_000)
            expect(page.locator("#step")).to_have_text("24 / 24")
            page.screenshot(path=str(tmp_path / "interactive-finished.png"), full_page=True)
            browser.close()
        thread.join(120)
        assert thread.error is None, thread.error
        assert not problems, problems
        assert (tmp_path / "interactive-paused.png").stat().st_size > 10_000
    finally:
        hooks.close()
