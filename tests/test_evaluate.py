"""The `evaluate` command and the report/probe-panel writers; the slow test trains and shows the scores rise."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.evaluate import REPORT_HTML, REPORT_JSON, SAMPLES_HTML, SAMPLES_JSONL, record_samples, score_predictions
from caption_train.tiny import COLORS, SHAPES, build_tiny_blip, make_shapes_dataset

from test_files import umask  # noqa: F401 - the fixture


def evaluate(capsys, *args: str) -> tuple[Path, dict, str]:
    """Run `caption-train evaluate ARGS`; return (report.html from the last stdout line, report.json, stdout)."""
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    html_path = Path(out.strip().splitlines()[-1])
    assert html_path.name == REPORT_HTML and html_path.is_file()
    return html_path, json.loads((html_path.parent / REPORT_JSON).read_text(encoding="utf-8")), out


def listed_files(html_path: Path) -> list[str]:
    return re.findall(r'<tr data-file="([^"]+)"', html_path.read_text(encoding="utf-8"))


def test_evaluate_writes_table_json_and_html(capsys, tmp_path, tiny_blip, shapes_dir):
    html_path, report, out = evaluate(capsys, str(tiny_blip), str(shapes_dir), "--output_dir", str(tmp_path / "ev"), "--num_workers", "0", "--max_new_tokens", "5")
    assert html_path.parent.parent == tmp_path / "ev" and html_path.parent.name.startswith(f"eval-{tiny_blip.name}-")
    assert "BLEU-4" in out and "CIDEr-D" in out and "exact match" in out
    assert set(report["metrics"]) == {"bleu4", "rougeL", "cider", "exact_match"}
    assert report["images"] == 24 and len(report["items"]) == 24
    item = report["items"][0]
    assert set(item) == {"file_name", "reference", "prediction", "scores"} and item["file_name"].startswith("part")
    assert sorted(listed_files(html_path)) == sorted(i["file_name"] for i in report["items"])
    page = html_path.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 24 and "<script>" in page
    # Worst first: the CIDEr-D column is ascending down the page.
    ciders = [float(v) for v in re.findall(r'<tr data-file="[^"]+"><td class="num rank" data-v="\d+">\d+</td>.*?data-v="([\d.]+)"', page)]
    assert len(ciders) == 24 and ciders == sorted(ciders)


def test_evaluate_limit_tags_and_bad_input(capsys, tmp_path, tiny_blip):
    data = tmp_path / "tags"
    pairs = make_shapes_dataset(data, 6, seed=3, size=32, subfolders=0)
    for path, caption in pairs:
        path.with_suffix(".txt").write_text(caption.replace(" ", ", "))  # "a, red, circle": tag style
    _, report, out = evaluate(capsys, str(tiny_blip), str(data), "--output_dir", str(tmp_path / "ev"), "--num_workers", "0", "--max_new_tokens", "3", "--max_images", "4")
    assert report["images"] == 4 and "tag_f1" in report["metrics"] and "tag F1" in out

    assert main(["evaluate", str(tiny_blip), str(tmp_path / "missing")]) == 2
    assert "DATASET_DIR" in capsys.readouterr().err
    empty = tmp_path / "uncaptioned"
    empty.mkdir()
    pairs[0][0].rename(empty / "x.png")
    assert main(["evaluate", str(tiny_blip), str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DATASET_DIR ") and "no usable image+caption pairs" in err


def test_score_predictions_for_the_training_loop():
    metrics = score_predictions(["a red circle", "a blue square"], ["a red circle", "a red square"])
    assert metrics["exact_match"] == 50.0 and set(metrics) == {"bleu4", "rougeL", "cider", "exact_match"}


def test_probe_panel_samples_jsonl_and_html(tmp_path, shapes_dir):
    images = sorted(shapes_dir.rglob("*.png"))[:3]
    rows = [{"image": str(p), "truth": "a red circle", "prediction": "a blue"} for p in images]
    record_samples(tmp_path, rows, epoch=1, step=3)
    rows[0]["prediction"] = "a red circle"
    html_path = record_samples(tmp_path, rows, epoch=2, step=6)
    lines = [json.loads(line) for line in (tmp_path / SAMPLES_JSONL).read_text().splitlines()]
    assert len(lines) == 6 and lines[0] == {"epoch": 1, "step": 3, "image": str(images[0]), "truth": "a red circle", "prediction": "a blue"}
    page = html_path.read_text()
    assert html_path.name == SAMPLES_HTML and "epoch 1" in page and "epoch 2" in page
    assert len(re.findall(r"<tr data-file=", page)) == 3 and page.count("data:image/jpeg;base64,") == 3


@pytest.mark.slow
def test_training_raises_the_scores(capsys, tmp_path):
    """Train a tiny BLIP from scratch on the shapes set; evaluate held-out images before and after."""
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    model_dir = build_tiny_blip(tmp_path / "model", texts, image_size=64, patch_size=16, hidden_size=128, num_layers=3, num_heads=4, max_position_embeddings=32)
    make_shapes_dataset(tmp_path / "train", 600, seed=0)
    make_shapes_dataset(tmp_path / "heldout", 36, seed=4321)
    common = ["--output_dir", str(tmp_path / "ev"), "--num_workers", "0", "--batch_size", "36"]

    before_html, before, _ = evaluate(capsys, str(model_dir), str(tmp_path / "heldout"), *common)
    assert main(["train", "--dataset_dir", str(tmp_path / "train"), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "runs"),
                 "--peft_module", "none", "--optimizer", "AdamW", "--lr", "6e-4", "--lr_scheduler", "OneCycleLR", "--epochs", "20",
                 "--batch_size", "32", "--save_every_n_epochs", "0", "--num_workers", "0", "--log_with", "none", "--seed", "0",
                 "--num_sample_captions", "0"]) == 0
    final = Path(capsys.readouterr().out.strip().splitlines()[-1])
    after_html, after, out = evaluate(capsys, str(final), str(tmp_path / "heldout"), *common)
    print(out)
    print("before", before["metrics"], "\nafter ", after["metrics"])

    for key in ("rougeL", "cider", "exact_match"):
        assert after["metrics"][key] > before["metrics"][key], key
    assert after["metrics"]["exact_match"] >= 50.0
    for html_path, report in ((before_html, before), (after_html, after)):
        assert report["images"] == 36
        assert sorted(listed_files(html_path)) == sorted(i["file_name"] for i in report["items"])


def test_validation_scores_for_the_training_loop(tiny_blip, shapes_dir):
    from accelerate import Accelerator

    from caption_train.captioning import GenerationOptions
    from caption_train.data.scan import scan_dataset
    from caption_train.evaluate import validation_scores
    from caption_train.inference import load_for_inference

    samples = scan_dataset(shapes_dir).samples[:5]
    model, processor, family = load_for_inference(tiny_blip)
    model.train()
    plain = validation_scores(model, processor, family, samples, GenerationOptions(max_new_tokens=4), batch_size=2)
    assert set(plain) == {"val/bleu4", "val/rougeL", "val/cider", "val/exact_match"} and model.training
    with_accelerator = validation_scores(model, processor, family, samples, GenerationOptions(max_new_tokens=4), batch_size=2, accelerator=Accelerator(cpu=True))
    assert with_accelerator == plain


def test_probe_panel_is_resume_safe(tmp_path):
    rows = [{"image": "/nowhere/a.png", "truth": "a red circle", "prediction": "a red"}]
    for epoch in (1, 2, 3):
        record_samples(tmp_path, rows, epoch=epoch, step=epoch * 10)
    record_samples(tmp_path, rows, epoch=2, step=20)  # resumed from epoch-1: epochs 2 and 3 run again
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / SAMPLES_JSONL).read_text().splitlines()]
    assert epochs == [1, 2]
    assert "(open)" in (tmp_path / SAMPLES_HTML).read_text()  # an image that is gone: a link, no thumbnail


def test_probe_panel_and_report_files_get_the_umask_mode(tmp_path, umask):
    from caption_train.evaluate import EvalResult, write_report

    record_samples(tmp_path, [{"image": "/nowhere/a.png", "truth": "a", "prediction": "b"}], epoch=1, step=1)
    json_path, html_path = write_report(tmp_path / "ev", EvalResult({"cider": 1.0}, []), model="hub/model", dataset=tmp_path)
    for path in (tmp_path / SAMPLES_JSONL, tmp_path / SAMPLES_HTML, json_path, html_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_report_sort_line_follows_the_clicked_column(tmp_path):
    """In a browser: clicking a column header re-sorts the table and the "Sorted ..." line says by what."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = Path("/usr/bin/chromium")
    if not chromium.is_file():
        pytest.skip(f"{chromium} not found (apt-get install -y chromium)")
    from caption_train.evaluate import EvalItem, EvalResult, render_report_html

    items = [EvalItem(tmp_path / f"{name}.png", "a red circle", prediction, {"cider": cider, "bleu": 10.0, "rougeL": rouge, "exact_match": 0.0})
             for name, prediction, cider, rouge in (("a", "a blue square", 5.0, 80.0), ("b", "red", 50.0, 20.0))]
    page_path = tmp_path / "report.html"
    page_path.write_text(render_report_html(EvalResult({"cider": 27.5}, items), model="m", dataset=tmp_path, out_dir=tmp_path, thumbnails=0), encoding="utf-8")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(page_path.as_uri())
        sorted_line = page.locator("#sorted")
        predictions = lambda: page.locator("#items tbody td.pred").all_text_contents()  # noqa: E731
        assert sorted_line.text_content() == "Sorted worst first by CIDEr-D" and predictions() == ["a blue square", "red"]
        page.click("#items th:has-text('ROUGE-L')")
        assert sorted_line.text_content() == "Sorted by ROUGE-L, lowest first" and predictions() == ["red", "a blue square"]
        page.click("#items th:has-text('ROUGE-L')")
        assert sorted_line.text_content() == "Sorted by ROUGE-L, highest first" and predictions() == ["a blue square", "red"]
        page.click("#items th:has-text('prediction')")
        assert sorted_line.text_content() == "Sorted by prediction, A to Z"
        page.click("#items th:has-text('#')")
        assert sorted_line.text_content() == "Sorted worst first by CIDEr-D" and predictions() == ["a blue square", "red"]
        browser.close()
