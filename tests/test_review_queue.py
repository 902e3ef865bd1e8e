"""The review queue (issue 16 item 2): images ranked by their caption's latest per-epoch loss, through the real page
server, from a run's `sample_losses.jsonl` (written here, as a run writes it: legitimate input for `review`).

The order comes from ranking.suspect_order, the seam the page uses and the end-to-end check on a mislabelled
dataset will call; these tests hold what it must do: latest epoch's loss first (not the first epoch's, not the
mean), a caption fixed since its loss leaves the queue, one marked fine leaves it (and is remembered), one rated 1
leaves it, and the "did not go down" filter.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from caption_train.errors import UserError
from caption_train.hooks import SampleLoss, caption_sha1
from caption_train.iterative.ranking import LOSSES_FILE, loss_trend, read_sample_losses, suspect_order
from caption_train.iterative.review import Review
from caption_train.iterative.store import FINE_FILE, HISTORY_FILE
from caption_train.tiny import make_shapes_dataset

from test_interactive_api import Page

# Loss per epoch for each image of an 8-image shapes dataset (relative path -> epochs 1, 2, 3). The latest epoch's
# order differs from the first epoch's and from the mean's, so a queue sorted by either of those comes out wrong.
LOSSES = {
    "part0/img_0000.png": [0.9, 0.8, 0.2],    # high at first, learned: near the end
    "part0/img_0002.png": [0.3, 0.6, 2.5],    # rising: the most suspect, did not go down
    "part0/img_0004.png": [3.0, 2.0, 1.5],    # went down, still high: second
    "part0/img_0006.png": [0.5, 0.4, 0.35],
    "part1/img_0001.png": [1.0, 1.1, 1.2],    # did not go down
    "part1/img_0003.png": [2.8, 1.4, 0.9],
    "part1/img_0005.png": [0.7, 0.6, 0.5],
    # part1/img_0007.png: no loss (a validation image, or a caption training skipped): never queued
}
LATEST_ORDER = ["part0/img_0002.png", "part0/img_0004.png", "part1/img_0001.png", "part1/img_0003.png",
                "part1/img_0005.png", "part0/img_0006.png", "part0/img_0000.png"]
NOT_DOWN = ["part0/img_0002.png", "part1/img_0001.png"]


def write_losses(run_dir: Path, data: Path, losses: dict[str, list[float]], *, sha1_of: dict[str, str] | None = None) -> Path:
    """A run's sample_losses.jsonl: one line per image per epoch, epoch by epoch, each caption's sha1 as trained."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(1, 1 + max(len(v) for v in losses.values())):
        for image, values in losses.items():
            if epoch <= len(values):
                caption = (data / image).with_suffix(".txt").read_text().strip()
                sha1 = (sha1_of or {}).get(f"{image}@{epoch}", caption_sha1(caption))
                lines.append(json.dumps({"epoch": epoch, "image": image, "loss": values[epoch - 1], "tokens": 4, "caption_sha1": sha1}))
    path = run_dir / LOSSES_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def queued(tmp_path):
    """(data, run_dir): 8 images, 7 with three epochs of losses."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 8, seed=11, size=32)
    run_dir = tmp_path / "runs" / "x-20260101-000000"
    write_losses(run_dir, data, LOSSES)
    return data, run_dir


def serve(review: Review) -> Page:
    return Page(review.start())


def queue(page: Page, view: str = "suspects") -> list[str]:
    return [info["path"] for info in page.get(f"/api/images?view={view}&limit=100")["images"]]


# ---------------------------------------------------------------------------------------------
# the seam: suspect_order


def rows(image: str, values: list[float], sha1s: list[str]) -> list[SampleLoss]:
    return [SampleLoss(image, epoch, loss, 3, sha1) for epoch, (loss, sha1) in enumerate(zip(values, sha1s), 1)]


def test_suspect_order_is_the_latest_epochs_loss_highest_first():
    a, b = caption_sha1("a red circle"), caption_sha1("a blue square")
    history = {
        "low.png": rows("low.png", [5.0, 0.1], [a, a]),
        "high.png": rows("high.png", [0.1, 3.0], [a, a]),
        "mid.png": rows("mid.png", [2.0, 1.0], [a, a]),
        "nan.png": rows("nan.png", [1.0, math.nan], [a, a]),
        "gone.png": rows("gone.png", [9.0, 9.0], [a, a]),  # not in the dataset shown
    }
    captions = {name: "a red circle" for name in ("low.png", "high.png", "mid.png", "nan.png")}
    assert suspect_order(history, captions) == ["nan.png", "high.png", "mid.png", "low.png"]
    # Fixed since its loss (the caption now hashes otherwise): out. Marked fine for this text: out; for an old text: in.
    assert suspect_order(history, {**captions, "high.png": "a blue square"}) == ["nan.png", "mid.png", "low.png"]
    assert suspect_order(history, captions, fine={"high.png": a}) == ["nan.png", "mid.png", "low.png"]
    assert suspect_order(history, captions, fine={"high.png": b}) == ["nan.png", "high.png", "mid.png", "low.png"]
    assert suspect_order(history, captions, excluded={"mid.png"}) == ["nan.png", "high.png", "low.png"]
    assert suspect_order(history, captions, not_down=True) == ["nan.png", "high.png"]


def test_the_trend_is_the_latest_captions():
    old, new = caption_sha1("a red circle"), caption_sha1("a green circle")
    # Fixed after epoch 2 (loss fell with the new text) and measured twice since: the trend is the new text's.
    trend = loss_trend(rows("x.png", [2.0, 2.5, 0.9, 1.0], [old, old, new, new]))
    assert (trend.same_caption_from, trend.loss, trend.epoch, trend.caption_sha1) == (2, 1.0, 4, new)
    assert trend.went_down is False  # 0.9 -> 1.0 on the new text, though far below the old text's losses
    assert loss_trend(rows("x.png", [2.0, 0.5], [old, new])).went_down is None  # one epoch of the new text
    assert loss_trend(list(reversed(rows("x.png", [2.0, 0.5], [old, old])))).went_down is True  # any row order


# ---------------------------------------------------------------------------------------------
# through the real server (review --losses)


def test_queue_order_fixed_fine_rated_and_not_down_through_the_server(queued, tmp_path):
    data, run_dir = queued
    state = tmp_path / "state"
    review = Review(data, losses=run_dir, state_dir=state)
    page = serve(review)
    try:
        status = page.status()
        assert (status["ranked"], status["suspects"], status["loss_epoch"]) == (7, 7, 3)
        assert queue(page) == LATEST_ORDER
        top = page.get("/api/images?view=suspects&limit=2")["images"]
        assert [info["loss"]["rank"] for info in top] == [1, 2]
        assert top[0]["loss"] == {"epochs": [1, 2, 3], "losses": [0.3, 0.6, 2.5], "same_caption_from": 0, "down": False,
                                  "fixed": False, "fine": False, "rank": 1}
        assert page.image("part1/img_0007.png")["loss"] is None
        assert queue(page, "not_down") == NOT_DOWN
        # Paging and search keep the queue's order.
        assert [i["path"] for i in page.get("/api/images?view=suspects&offset=2&limit=3")["images"]] == LATEST_ORDER[2:5]
        assert queue(page, "suspects&q=part1") == [p for p in LATEST_ORDER if p.startswith("part1")]

        # A fixed caption leaves the queue (the loss was of the old text) and says so.
        first = page.image(LATEST_ORDER[0])
        assert page.send("caption_new", {"image": first["id"], "new_caption": "a green square"})[0] == 200
        assert queue(page) == LATEST_ORDER[1:] and queue(page, "not_down") == NOT_DOWN[1:]
        info = page.image(LATEST_ORDER[0])["loss"]
        assert info["fixed"] is True and info["rank"] is None
        assert page.status()["suspects"] == 6

        # "The caption is fine": out of the queue, remembered in the state folder with the text's sha1.
        second = page.image(LATEST_ORDER[1])
        code, reply = page.send("caption_fine", {"image": second["id"], "caption": second["caption"]})
        assert code == 200 and reply["payload"]["detail"]["image"]["loss"]["fine"] is True
        assert queue(page) == LATEST_ORDER[2:]
        fine = json.loads((state / FINE_FILE).read_text())
        assert fine[LATEST_ORDER[1]]["caption_sha1"] == caption_sha1(second["caption"])
        assert json.loads((state / HISTORY_FILE).read_text().splitlines()[-1])["action"] == "fine"
        # Judged on a stale text: refused.
        third = page.image(LATEST_ORDER[2])
        code, reply = page.send("caption_fine", {"image": third["id"], "caption": "not what it says"})
        assert code == 409 and reply["payload"]["code"] == "conflict" and queue(page) == LATEST_ORDER[2:]

        # Rated 1 (bad: left out of training): out of the queue; rated again, back.
        assert page.send("caption_quality", {"image": third["id"], "quality": 1})[0] == 200
        assert queue(page) == LATEST_ORDER[3:]
        assert page.send("caption_quality", {"image": third["id"], "quality": 3})[0] == 200
        assert queue(page) == LATEST_ORDER[2:]
    finally:
        review.close()

    # The next review of the same state folder remembers "fine"; taking it back returns the image to the queue.
    again = Review(data, losses=run_dir / LOSSES_FILE, state_dir=state)
    page = serve(again)
    try:
        assert queue(page) == LATEST_ORDER[2:]
        second = page.image(LATEST_ORDER[1])
        assert page.send("caption_fine", {"image": second["id"], "fine": False})[0] == 200
        assert queue(page) == LATEST_ORDER[1:]
        # An edit after "fine" is a new text: the old "fine" no longer holds for it (and its loss is of the old text).
        assert page.send("caption_fine", {"image": second["id"]})[0] == 200
        assert page.send("caption_new", {"image": second["id"], "new_caption": "a purple star"})[0] == 200
        assert page.image(LATEST_ORDER[1])["loss"]["fine"] is False
    finally:
        again.close()


def test_captions_changed_since_the_run_and_mid_run_edits(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, 4, seed=2, size=32)
    run_dir = tmp_path / "run"
    # img_0000 was edited on the page during epoch 2 (epoch 1 trained the old text); img_0001 was edited after the run.
    old = caption_sha1("an old caption")
    write_losses(run_dir, data, {"part0/img_0000.png": [3.0, 1.0, 1.2], "part1/img_0001.png": [2.0, 2.0],
                                 "part0/img_0002.png": [0.5, 0.4]},
                 sha1_of={"part0/img_0000.png@1": old, "part1/img_0001.png@1": old, "part1/img_0001.png@2": old})
    review = Review(data, losses=run_dir, state_dir=tmp_path / "state")
    page = serve(review)
    try:
        assert queue(page) == ["part0/img_0000.png", "part0/img_0002.png"]
        loss = page.image("part0/img_0000.png")["loss"]
        assert loss["same_caption_from"] == 1 and loss["down"] is False and loss["fixed"] is False
        assert queue(page, "not_down") == ["part0/img_0000.png"]
        assert page.image("part1/img_0001.png")["loss"]["fixed"] is True
    finally:
        review.close()


def test_review_finds_the_runs_losses_beside_its_checkpoint(tmp_path, tiny_blip, capsys):
    data = tmp_path / "data"
    make_shapes_dataset(data, 8, seed=11, size=32)
    run_dir = tmp_path / "runs" / "x"
    shutil.copytree(tiny_blip, run_dir / "final")
    write_losses(run_dir, data, LOSSES)
    review = Review(data, model=str(run_dir / "final"), state_dir=tmp_path / "state")
    try:
        assert queue(serve(review)) == LATEST_ORDER
        assert f"review queue: 7 of 7 images with a loss, most suspect first (epoch 3's loss, from {run_dir / LOSSES_FILE})" in capsys.readouterr().out
    finally:
        review.close()
    # A model of a run on another dataset: no queue, one line, the page still serves.
    other = tmp_path / "other"
    make_shapes_dataset(other, 2, seed=1, size=32, subfolders=0)
    review = Review(other, model=str(run_dir / "final"), state_dir=tmp_path / "state2")
    try:
        assert queue(serve(review)) == [] and "no review queue: 7 images named in" in capsys.readouterr().out
    finally:
        review.close()


def test_review_losses_bad_input_is_one_line(queued, tmp_path, capsys):
    from caption_train.cli import main

    data, run_dir = queued
    assert main(["review", str(data), "--losses", str(tmp_path / "nowhere")]) == 2
    assert "--losses" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    for line, message in [("{not json", "not a JSON object"), ('{"epoch": 1, "image": "a.png"}', "missing loss, tokens, caption_sha1"),
                          ('{"epoch": 0, "image": "a.png", "loss": 1, "tokens": 2, "caption_sha1": "x"}', "epoch 0"),
                          ('{"epoch": 1, "image": "a.png", "loss": "high", "tokens": 2, "caption_sha1": "x"}', "loss 'high'")]:
        bad.write_text((run_dir / LOSSES_FILE).read_text() + line + "\n")
        with pytest.raises(UserError, match=rf"bad\.jsonl:22: {message}"):
            read_sample_losses(bad)
        assert main(["review", str(data), "--losses", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "bad.jsonl:22:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    make_shapes_dataset(other, 2, seed=1, size=32, subfolders=0)
    with pytest.raises(UserError, match="none of them in .*pass the dataset that run trained on"):
        Review(other, losses=run_dir, state_dir=tmp_path / "state")


def test_the_queue_is_the_default_view_only_with_losses(queued, tmp_path):
    """What the page opens on: hello says whether losses exist (main.js picks the queue then: the browser test)."""
    data, run_dir = queued
    with_losses, without = Review(data, losses=run_dir, state_dir=tmp_path / "a"), Review(data, state_dir=tmp_path / "b")
    try:
        assert serve(with_losses).status()["ranked"] == 7
        page = serve(without)
        assert page.status()["ranked"] == 0 and queue(page) == []
    finally:
        with_losses.close()
        without.close()


# ---------------------------------------------------------------------------------------------
# during training: the queue follows each epoch's losses through the hook protocol


@pytest.mark.slow
def test_the_queue_during_training_follows_each_epochs_losses(tmp_path, tiny_blip, shapes_dir):
    from caption_train.config import resolve
    from caption_train.iterative.hooks import InteractiveHooks
    from caption_train.train import train

    seen: list[tuple[int, list[str], dict]] = []

    class Watch(InteractiveHooks):
        def on_epoch_end(self, run, epoch):
            super().on_epoch_end(run, epoch)
            page = Page(self.url)  # the live server, between optimizer steps
            written = run.run_dir / LOSSES_FILE
            seen.append((page.status()["loss_epoch"], queue(page), read_sample_losses(written) if written.is_file() else {}))

    cfg = resolve({}, {"dataset_dir": str(shapes_dir), "model_name_or_path": str(tiny_blip), "output_dir": str(tmp_path / "runs"),
                       "epochs": 2, "batch_size": 8, "num_workers": 0, "log_with": "none", "num_sample_captions": 0, "save_every_n_epochs": 0})
    hooks = Watch()
    try:
        final = train(cfg, hooks=hooks)
    finally:
        hooks.close()
    captions = {p.relative_to(shapes_dir).with_suffix(".png").as_posix(): p.read_text().strip() for p in shapes_dir.rglob("*.txt")}
    assert [epoch for epoch, _, _ in seen] == [1, 2]
    for epoch, order, history in seen:
        assert order and order == suspect_order(history, captions), epoch
    assert seen[-1][2] == read_sample_losses(final.parent / LOSSES_FILE)
