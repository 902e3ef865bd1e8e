"""A real browser (Playwright driving Debian's Chromium) on the interactive page during a tiny training run:
live step updates, a caption edited through the page lands in the .txt, caption now, rating, pause/resume; and
in review mode, the layout from a 360 px phone to a 2560 px screen (every control inside its card and visible,
long captions shown whole) and help text that speaks of the mode the page is in; and the review queue (most
suspect caption first, its keys) from a run's sample_losses.jsonl.
Skips when playwright or /usr/bin/chromium is missing (CI installs both: see .ci/run)."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from caption_train.config import resolve
from caption_train.iterative.hooks import InteractiveHooks
from caption_train.iterative.review import Review
from caption_train.tiny import make_shapes_dataset

from test_interactive_api import Page, TrainingThread, wait_for
from test_review_queue import LATEST_ORDER, LOSSES, NOT_DOWN, queue, write_losses

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


# Five tags, long enough to need three lines or more in a phone-width card.
FIVE_TAGS = "a red circle, solid flat fill, centered on a white background, one small simple shape, flat vector art style"

# Everything on the page a person clicks, types into or reads must lie inside its card (or the window), have a size,
# be the topmost element at its own centre (not clipped, not covered), and show its whole label; the caption box
# must show its whole text without scrolling inside it; the page must not scroll sideways.
LAYOUT_PROBLEMS = """() => {
  const problems = [];
  const viewport = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > viewport) problems.push(`the page scrolls sideways (${document.documentElement.scrollWidth} > ${viewport} px)`);
  const within = (r, box) => r.left >= box.left - 0.5 && r.right <= box.right + 0.5 && r.top >= box.top - 0.5 && r.bottom <= box.bottom + 0.5;
  const describe = (el) => `${el.tagName.toLowerCase()}.${el.className || ""} "${(el.textContent || el.value || "").trim().slice(0, 20)}"`;
  const check = (el, where, outer) => {
    if (el.closest("[hidden]") || getComputedStyle(el).display === "none") return;
    el.scrollIntoView({ block: "center", inline: "nearest" });
    const r = el.getBoundingClientRect();
    const box = outer ? outer.getBoundingClientRect() : { left: 0, right: viewport, top: -1e9, bottom: 1e9 };
    if (r.width < 4 || r.height < 4) problems.push(`${where}: ${describe(el)} has no size (${r.width}x${r.height})`);
    else if (!within(r, box)) problems.push(`${where}: ${describe(el)} sticks out (${JSON.stringify([r.left, r.right, r.top, r.bottom].map(Math.round))} vs ${JSON.stringify([box.left, box.right, box.top, box.bottom].map(Math.round))})`);
    else {
      const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      if (!hit || !(el === hit || el.contains(hit))) problems.push(`${where}: ${describe(el)} is hidden under ${hit ? describe(hit) : "nothing"}`);
    }
    if (el.tagName === "BUTTON" && el.scrollWidth > el.clientWidth + 1) problems.push(`${where}: ${describe(el)} cuts its label`);
  };
  for (const el of document.querySelectorAll("header button, header .state, .toolbar select, .toolbar input, .toolbar button")) check(el, "header", null);
  for (const card of document.querySelectorAll("article.card")) {
    const name = card.querySelector(".path").textContent;
    for (const el of card.querySelectorAll("button, textarea, img, .path, .model-caption, .loss-line, .spark")) check(el, name, card);
    const caption = card.querySelector("textarea.caption");
    if (caption.scrollHeight > caption.clientHeight) problems.push(`${name}: the caption scrolls inside its box (${caption.scrollHeight} > ${caption.clientHeight} px)`);
  }
  return problems;
}"""


def check_layout(page, widths: list[int], shots: Path, prefix: str) -> None:
    """At each width: no layout problem, and a screenshot (look at them when changing the CSS)."""
    for width in widths:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)  # the caption boxes refit on the next animation frame
        problems = page.evaluate(LAYOUT_PROBLEMS)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / f"{prefix}-{width}.png"))
        assert not problems, f"at {width} px wide:\n" + "\n".join(problems[:20])


def visible_help(page) -> str:
    return " ".join(para.inner_text() for para in page.locator("p.help").all() if para.is_visible())


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def need_browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    return sync_api


def step_number(text: str) -> int:
    match = re.match(r"(\d+) / \d+", text)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
def test_browser_edits_a_caption_during_training(tmp_path, tiny_blip, shapes_dir):
    sync_api = need_browser()
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
            browser = launch_chromium(playwright)
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
            assert "out of training" in visible_help(page) and "nothing is trained" not in visible_help(page)
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
            check_layout(page, [360, 1920], tmp_path, "training")
            page.set_viewport_size({"width": 1360, "height": 900})

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


@pytest.mark.slow
def test_review_page_fits_phone_and_wide_screens(tmp_path, tiny_blip):
    """Review mode with a model: long captions, model captions, every control, at 360 to 2560 px wide."""
    sync_api = need_browser()
    data = tmp_path / "data"
    make_shapes_dataset(data, 6, seed=3, size=32)
    for txt in data.rglob("*.txt"):
        txt.write_text(FIVE_TAGS + "\n")
    review = Review(data, model=str(tiny_blip), state_dir=tmp_path / "state")
    url = review.start()
    stop = threading.Event()
    captioner = threading.Thread(target=review.serve, args=(stop,), daemon=True)
    captioner.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
            page.goto(url)
            expect = sync_api.expect
            cards = page.locator("article.card")
            expect(cards).to_have_count(6, timeout=30_000)
            # Review mode captions the images shown without a click: wait until every card has the model's caption.
            expect(page.locator(".model-caption.empty")).to_have_count(0, timeout=60_000)
            expect(cards.nth(0).locator("textarea.caption")).to_have_value(FIVE_TAGS)
            # No losses: the page opens on all images and offers no queue.
            assert page.locator("#view").input_value() == "all" and page.locator("#queue-help").is_hidden()

            # The help and the words speak of review, not of training.
            help_text = visible_help(page)
            assert "nothing is trained" in help_text and "training" not in help_text, help_text
            cards.nth(1).locator('.rating button[data-q="1"]').click()
            expect(cards.nth(1).locator(".badges")).to_have_text("rated 1 (bad)")
            assert "training" not in page.locator("header .counters").inner_text()

            # Wide cards (3 columns at 1400 px: the caption takes two lines) to a phone (three lines) and back, in the
            # same page: the caption boxes refit as the width changes.
            check_layout(page, [1400, 360, 800, 1920, 2560], tmp_path, "review")
            browser.close()
        assert not problems, problems
    finally:
        stop.set()
        captioner.join(10)
        review.close()


@pytest.mark.slow
def test_review_queue_in_the_browser(tmp_path):
    """The page opens on the queue: the first k cards are the k highest latest-epoch losses, with loss and trend;
    the keys move through it, mark fine, edit and skip; re-ranking leaves out what was handled; it fits a phone."""
    sync_api = need_browser()
    data = tmp_path / "data"
    make_shapes_dataset(data, 8, seed=11, size=32)
    write_losses(tmp_path / "run", data, LOSSES)
    review = Review(data, losses=tmp_path / "run", state_dir=tmp_path / "state")
    url = review.start()
    api = Page(url)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
            page.goto(url)
            expect = sync_api.expect
            cards = page.locator("article.card")
            expect(cards).to_have_count(7, timeout=30_000)
            assert page.locator("#view").input_value() == "suspects"
            k = 3
            assert [cards.nth(i).locator(".path").inner_text() for i in range(k)] == LATEST_ORDER[:k]
            first = cards.nth(0)
            expect(first.locator(".rank")).to_have_text("#1")
            expect(first.locator(".loss-value")).to_have_text("loss 2.500")
            expect(first.locator(".loss-arrow")).to_have_text("↗ from 0.300")  # did not go down
            expect(cards.nth(1).locator(".loss-arrow")).to_have_text("↘ from 3.000")
            assert first.locator(".loss").get_attribute("title").startswith("epoch 1: 0.300, epoch 2: 0.600, epoch 3: 2.500")
            assert len(first.locator(".spark polyline.latest").get_attribute("points").split()) == 3
            expect(page.locator("#count-suspects")).to_have_text("7")
            help_text = visible_help(page)
            assert "Keys:" in help_text and "training" not in help_text, help_text

            def current() -> int:
                return page.evaluate("[...document.querySelectorAll('article.card')].findIndex(c => c.classList.contains('current'))")

            # j / k move; a marks fine and goes on; e edits (letters typed are text, not keys); Ctrl+Enter saves and
            # goes on; Esc leaves the box; s skips.
            assert current() == 0
            page.keyboard.press("j")
            page.keyboard.press("j")
            page.keyboard.press("k")
            assert current() == 1
            page.keyboard.press("a")
            expect(cards.nth(1).locator(".badges")).to_contain_text("fine")
            wait_for(lambda: current() == 2, "a: next after fine")
            assert LATEST_ORDER[1] not in queue(api)
            page.keyboard.press("e")
            textarea = cards.nth(2).locator("textarea.caption")
            expect(textarea).to_be_focused()
            page.keyboard.type(", just skewed")
            assert current() == 2
            page.keyboard.press("Control+Enter")
            caption_file = (data / LATEST_ORDER[2]).with_suffix(".txt")
            wait_for(lambda: caption_file.read_text().strip().endswith(", just skewed"), "the edited .txt")
            wait_for(lambda: current() == 3, "Ctrl+Enter: next after the fix")
            expect(cards.nth(2).locator(".badges")).to_contain_text("fixed")
            page.keyboard.press("e")
            page.keyboard.press("Escape")
            page.keyboard.press("s")
            assert current() == 4
            expect(page.locator("#count-suspects")).to_have_text("5")

            # Re-rank: what was marked fine or fixed has left the queue; the filter keeps the loss that did not go down.
            page.keyboard.press("r")
            rest = [p for p in LATEST_ORDER if p not in LATEST_ORDER[1:3]]
            expect(cards).to_have_count(len(rest))
            assert [cards.nth(i).locator(".path").inner_text() for i in range(len(rest))] == rest and current() == 0
            expect(page.locator("#toast")).to_be_hidden(timeout=10_000)  # "saved caption of ..." floats over cards a while
            check_layout(page, [360, 1400], tmp_path, "queue")
            page.select_option("#view", "not_down")
            expect(cards).to_have_count(1)
            expect(cards.nth(0).locator(".path")).to_have_text(NOT_DOWN[0])
            browser.close()
        assert not problems, problems
    finally:
        review.close()


@pytest.mark.slow
def test_queue_keys_cross_pages(tmp_path):
    """j past the last card of a page loads the next page of the queue; k before the first goes back."""
    sync_api = need_browser()
    data = tmp_path / "data"
    make_shapes_dataset(data, 26, seed=1, size=32, subfolders=0)
    losses = {f"img_{i:04d}.png": [1.0, 10.0 - i / 10] for i in range(26)}  # img_0000 the most suspect, then in order
    write_losses(tmp_path / "run", data, losses)
    review = Review(data, losses=tmp_path / "run", state_dir=tmp_path / "state")
    url = review.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            expect = sync_api.expect
            current = page.locator("article.card.current .path")
            expect(current).to_have_text("img_0000.png", timeout=30_000)
            page.keyboard.press("k")  # nothing before the first
            expect(current).to_have_text("img_0000.png")
            for _ in range(24):
                page.keyboard.press("j")
            expect(page.locator("#page-info")).to_have_text("25–26 of 26")
            expect(current).to_have_text("img_0024.png")
            page.keyboard.press("k")
            expect(page.locator("#page-info")).to_have_text("1–24 of 26")
            expect(current).to_have_text("img_0023.png")
            browser.close()
    finally:
        review.close()
