"""samples.html, the probe panel of a run: however many epochs, one row per image with a bounded number of
columns (the latest epoch's caption, another epoch by a selector, every epoch in a fold)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from caption_train.evaluate import SAMPLES_HTML, record_samples

EPOCHS = 40
TRUTH = "a red circle, solid fill, centered, white background, small shape"


class Cells(HTMLParser):
    """Header cells, the cells of each body row, the selector's options, and the text of every shown prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.head: list[str] = []
        self.rows: list[int] = []
        self.options: list[tuple[str, bool]] = []
        self.shown: list[str] = []
        self.history: list[int] = []
        self._stack: list[tuple[str, dict]] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._stack.append((tag, attrs))
        if tag == "th":
            self.head.append("")
        elif tag == "tr" and any(t == "tbody" for t, _ in self._stack):
            self.rows.append(0)
        elif tag == "td" and self.rows:
            self.rows[-1] += 1
        elif tag == "option":
            self.options.append((attrs["value"], "selected" in attrs))
        elif tag == "div" and "data-epoch" in attrs and "hidden" not in attrs:
            self._text = []
        elif tag == "ol":
            self.history.append(0)
        elif tag == "li":
            self.history[-1] += 1

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop()[0] != tag:
            pass
        if tag == "div" and self._text is not None:
            self.shown.append("".join(self._text))
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def forty_epochs(run_dir: Path) -> Path:
    images = [f"/nowhere/img_{i}.png" for i in range(3)]
    for epoch in range(1, EPOCHS + 1):
        rows = [{"image": image, "truth": TRUTH, "prediction": f"a red circle, epoch {epoch} of {image[-5]}"} for image in images]
        path = record_samples(run_dir, rows, epoch=epoch, step=epoch * 6)
    return path


def test_forty_epochs_keep_four_columns_and_show_the_latest(tmp_path):
    cells = Cells()
    cells.feed(forty_epochs(tmp_path).read_text())
    assert cells.head == ["", "", "", ""]  # image, caption, model, history: not one column per epoch
    assert cells.rows == [4, 4, 4]
    assert len(cells.options) == EPOCHS and [value for value, selected in cells.options if selected] == [str(EPOCHS)]
    assert cells.shown == [f"a red circle, epoch {EPOCHS} of {i}" for i in range(3)]  # the latest epoch, once per row
    assert cells.history == [EPOCHS] * 3  # every epoch, on demand


@pytest.mark.slow
def test_the_selector_and_history_in_a_browser(tmp_path):
    """The page at 1280 px: no sideways scrolling with 40 epochs; picking an epoch shows that epoch's captions."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_interactive_browser import CHROMIUM, launch_chromium

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found")
    path = forty_epochs(tmp_path)
    assert path.name == SAMPLES_HTML
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(path.as_uri())
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        shown = page.locator("td.pred [data-epoch]:visible")
        assert shown.all_inner_texts() == [f"a red circle, epoch {EPOCHS} of {i}" for i in range(3)]
        page.select_option("#epoch", "3")
        assert shown.all_inner_texts() == [f"a red circle, epoch 3 of {i}" for i in range(3)]
        # A caption of the chosen epoch reads on one or two lines, not a word per line.
        assert page.locator("td.pred [data-epoch]:visible").first.evaluate("el => el.getBoundingClientRect().height") < 3 * 20
        page.locator("details summary").first.click()
        assert page.locator("details ol li:visible").count() == EPOCHS
        page.screenshot(path=str(tmp_path / "samples.png"), full_page=True)
        browser.close()
