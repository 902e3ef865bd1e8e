"""report.html (evaluate) and samples.html (the probe panel) on a phone: in a real browser (Playwright driving
Debian's Chromium, emulating a phone at 360 and 390 px), measured with bounding boxes. The page must not be wider
than the screen, every caption, score and control must lie on it, and caption columns must stay wide enough to read
(not a word per line). Skips when playwright or /usr/bin/chromium is missing (CI installs both: see .ci/run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from caption_train.evaluate import EvalItem, EvalResult, record_samples, write_report
from caption_train.tiny import make_shapes_dataset

from test_interactive_browser import launch_chromium, need_browser

PHONES = (360, 390)
MIN_TEXT_WIDTH = 150  # px: about 20 characters a line at the page's 14 px font
TAGS = "a red circle, solid flat fill, centered on a white background, one small simple shape, flat vector art style"

# What must lie on the screen (selector -> what it is), and which of those are caption text that must stay readable.
ON_SCREEN = "h1, .meta, .metric, .controls input, .controls select, #items th, td img, td.num, .ref, .file, .pred, .pred > div, summary"
TEXT = ".ref, #items td.pred, .pred > div:not([hidden])"

LAYOUT_PROBLEMS = """([screen, onScreen, text, minText]) => {
  const problems = [];
  const viewport = document.documentElement.clientWidth;
  // Without <meta name="viewport"> a phone lays the page out 980 px wide and shrinks it to fit: unreadable.
  if (viewport !== screen) problems.push(`laid out ${viewport} px wide on a ${screen} px screen (no viewport meta tag?)`);
  if (document.documentElement.scrollWidth > viewport) problems.push(`the page is ${document.documentElement.scrollWidth} px wide on a ${viewport} px screen`);
  const describe = (el) => `${el.tagName.toLowerCase()}.${el.className || ""} "${(el.textContent || el.value || "").trim().slice(0, 24)}"`;
  const shown = (el) => !el.closest("[hidden]") && getComputedStyle(el).display !== "none" && el.getClientRects().length > 0;
  for (const el of document.querySelectorAll(onScreen)) {
    if (!shown(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.left < -0.5 || r.right > viewport + 0.5) problems.push(`${describe(el)} is off the screen (${Math.round(r.left)}..${Math.round(r.right)} px)`);
  }
  for (const el of document.querySelectorAll(text)) {
    if (!shown(el)) continue;
    const width = el.getBoundingClientRect().width;
    if (width < minText) problems.push(`${describe(el)} is only ${Math.round(width)} px wide`);
  }
  return problems;
}"""


def check_phone_layout(browser, page_path: Path, shots: Path, *, open_history: bool = False) -> None:
    for width in PHONES:
        context = browser.new_context(viewport={"width": width, "height": 800}, is_mobile=True, has_touch=True, device_scale_factor=2)
        page = context.new_page()
        page.goto(page_path.as_uri())
        if open_history:
            page.locator("details").first.evaluate("details => { details.open = true; }")
        problems = page.evaluate(LAYOUT_PROBLEMS, [width, ON_SCREEN, TEXT, MIN_TEXT_WIDTH])
        page.screenshot(path=str(shots / f"{page_path.stem}-{width}.png"), full_page=True)
        context.close()
        assert not problems, f"{page_path.name} at {width} px:\n" + "\n".join(problems[:20])


@pytest.mark.slow
def test_report_and_samples_fit_a_phone(tmp_path):
    sync_api = need_browser()
    pairs = make_shapes_dataset(tmp_path / "heldout", 4, seed=2, size=64, subfolders=0)
    # Long file names and tag captions, every per-image score column (tags on), and an empty prediction.
    items = []
    for i, (path, _) in enumerate(pairs):
        long_name = path.with_name(f"a_rather_long_file_name_from_a_camera_{i:04d}.png")
        path.rename(long_name)
        prediction = "" if i == 3 else TAGS.replace("a red", ["a blue", "a green", "a red"][i])
        items.append(EvalItem(long_name, TAGS, prediction, {"cider": 10.0 * i, "bleu": 20.0, "rougeL": 30.0, "tag_f1": 40.0, "exact_match": float(i == 2)}))
    metrics = {"bleu4": 21.5, "rougeL": 33.1, "cider": 47.2, "exact_match": 25.0, "tag_precision": 61.0, "tag_recall": 58.3, "tag_f1": 59.6}
    _, report = write_report(tmp_path / "evaluations" / "eval-a-long-model-name-20261204-101500", EvalResult(metrics, items, seconds=1.5),
                             model="runs/caption-train-20261204-101500/final", dataset=tmp_path / "heldout")

    run_dir = tmp_path / "runs" / "caption-train-20261204-101500"
    run_dir.mkdir(parents=True)
    for epoch in range(1, 13):
        rows = [{"image": str(item.image), "truth": TAGS, "prediction": TAGS if epoch > 10 else f"a red circle, epoch {epoch}"} for item in items[:3]]
        samples = record_samples(run_dir, rows, epoch=epoch, step=epoch * 6)

    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        check_phone_layout(browser, report, tmp_path)
        check_phone_layout(browser, samples, tmp_path, open_history=True)
        # Wide screens keep the table: one row per image, the caption beside the image.
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(report.as_uri())
        image, text = (page.locator("#items tbody tr").first.locator(f"td >> nth={n}").bounding_box() for n in (1, 2))
        assert text["x"] >= image["x"] + image["width"] - 1 and abs(text["y"] - image["y"]) < 40
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        browser.close()
