"""The prompt a run was trained with reaches every place that captions with the run's weights, through what a user
runs: `caption` and `evaluate` on its checkpoint, `review --model`, and inside the run the probe panel, the
validation metrics and the interactive page's "caption now".

    python -m pytest -q tests/test_survivors_wiring.py

A tiny Qwen2-VL (a chat VLM: the prompt is the user turn) is trained with a prompt that is not its family's default.
Where only the finished output can be read (the commands), the captions are compared with the same model's captions
under each prompt, which differ for this model; inside a run, the prompt that reaches the family's `generate` is
recorded (the real `generate` still runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.evaluate import REPORT_JSON
from caption_train.inference import load_for_inference
from caption_train.models import resolve_family
from caption_train.tiny import make_shapes_dataset

from conftest import VOCAB_TEXTS
from tiny_families_chat import build_tiny_qwen2_vl

PROMPT = "Describe it."  # trained into the tiny tokenizer (tiny_families_chat._TEMPLATE_WORDS); not the default


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    model = build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"), VOCAB_TEXTS)
    assert resolve_family(str(model))[0].default_prompt != PROMPT
    return model


@pytest.fixture(scope="module")
def four_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("four")
    make_shapes_dataset(out, 4, seed=2, size=32, subfolders=0)
    return out


def train_args(data: Path, model: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", "--dataset_dir", str(data), "--model_name_or_path", str(model), "--output_dir", str(runs),
            "--epochs", "1", "--batch_size", "2", "--num_workers", "0", "--log_with", "none", "--mixed_precision", "no",
            "--save_every_n_epochs", "0", "--prompt", PROMPT, *extra]


@pytest.fixture(scope="module")
def prompted_run(chat_model, four_shapes, tmp_path_factory) -> Path:
    """final/ of a one-epoch LoRA run trained with --prompt PROMPT."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(train_args(four_shapes, chat_model, runs, "--num_sample_captions", "0")) == 0
    (final,) = runs.glob("*/final")
    return final


def caption_texts(model: Path, images: Path, out: Path, *extra: str) -> dict[str, str]:
    jsonl = out / f"captions-{len(list(out.glob('captions-*.jsonl')))}.jsonl"
    assert main(["caption", str(model), str(images), "--output_jsonl", str(jsonl), "--num_workers", "0", "--device", "cpu",
                 "--dtype", "float32", "--max_new_tokens", "8", *extra]) == 0
    return {row["file_name"]: row["text"] for row in map(json.loads, jsonl.read_text().splitlines())}


def test_caption_and_evaluate_use_the_prompt_the_run_was_trained_with(prompted_run, chat_model, four_shapes, tmp_path):
    default = resolve_family(str(chat_model))[0].default_prompt
    trained = caption_texts(prompted_run, four_shapes, tmp_path, "--prompt", PROMPT)
    other = caption_texts(prompted_run, four_shapes, tmp_path, "--prompt", default)
    assert trained != other  # this model's captions depend on the prompt, so a wrong prompt shows
    assert caption_texts(prompted_run, four_shapes, tmp_path) == trained  # no --prompt: the run's own

    assert main(["evaluate", str(prompted_run), str(four_shapes), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0",
                 "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "8"]) == 0
    report = json.loads(next((tmp_path / "eval").rglob(REPORT_JSON)).read_text())
    assert {item["file_name"]: item["prediction"] for item in report["items"]} == trained


def test_review_captions_with_the_prompt_the_run_was_trained_with(prompted_run, four_shapes, tmp_path):
    """`review DATA --model RUN/final`: "caption now" through the page's HTTP API."""
    from test_interactive_api import review_caption_now

    data = Path(shutil.copytree(four_shapes, tmp_path / "data"))
    record = review_caption_now(data, prompted_run, tmp_path / "state", image="img_0000.png")
    model, processor, family = load_for_inference(prompted_run)
    image = [load_rgb(data / "img_0000.png")]
    trained, other = (family.generate(model, processor, image, prompt=p)[0] for p in (PROMPT, family.default_prompt))
    assert trained != other
    assert record["text"] == trained


@pytest.fixture
def prompts_seen(chat_model, monkeypatch) -> list:
    """The `prompt` of every call of the chat-VLM family's generate in this process (the real generate runs)."""
    family_class = type(resolve_family(str(chat_model))[0])
    real = family_class.generate
    seen: list = []

    def recording(self, model, processor, images, *, prompt=None, **kwargs):
        seen.append(prompt)
        return real(self, model, processor, images, prompt=prompt, **kwargs)

    monkeypatch.setattr(family_class, "generate", recording)
    return seen


def test_probe_panel_and_validation_metrics_caption_with_the_run_prompt(chat_model, four_shapes, tmp_path, prompts_seen):
    assert main(train_args(four_shapes, chat_model, tmp_path, "--num_sample_captions", "1", "--validation_split", "0.5",
                           "--eval_every_n_epochs", "1")) == 0
    (run_dir,) = tmp_path.glob("caption-train-*")
    assert (run_dir / "samples.jsonl").is_file()  # the probe panel captioned
    assert any("val/cider" in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())  # so did the metrics
    assert len(prompts_seen) >= 2 and set(prompts_seen) == {PROMPT}, prompts_seen


def test_interactive_caption_now_uses_the_run_prompt(chat_model, four_shapes, tmp_path, prompts_seen, capsys):
    """`train --prompt X --interactive 0`: "caption now" through the page's HTTP API captions with X. The run is
    long; once the caption has arrived the test stops it as a user would, with Ctrl-C (SIGINT)."""
    from test_interactive_api import Page, URL_LINE, wait_for

    printed: list[str] = []
    result: dict = {}
    returned = threading.Event()  # main() came back: no SIGINT may reach pytest itself then

    def page_url() -> str | None:
        printed.extend(capsys.readouterr().out.splitlines())
        return next((line.split(": ", 1)[1] for line in printed if URL_LINE.match(line)), None)

    def client() -> None:
        try:
            page = Page(wait_for(page_url, "the page's URL"))
        except AssertionError as error:
            result["error"] = error
            return
        try:
            target = page.image("img_0001.png")
            assert page.send("caption_generate", {"images": [target["id"]]})[0] == 200
            result["caption"] = wait_for(lambda: page.get(f"/api/images/{target['id']}")["model_caption"], "caption now")
        except BaseException as error:  # reported below, after the run stopped
            result["error"] = error
        finally:
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGINT)  # the run's own handler: stop after this step, save, exit 130

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    code = main(train_args(four_shapes, chat_model, tmp_path, "--epochs", "1000", "--num_sample_captions", "0",
                           "--interactive", "127.0.0.1:0"))
    returned.set()
    thread.join(30)
    assert "error" not in result, result["error"]
    assert code == 130 and result["caption"]["step"] >= 1
    assert prompts_seen and set(prompts_seen) == {PROMPT}, prompts_seen
