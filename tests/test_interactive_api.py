"""The interactive page's server against real runs: a tiny training run (edits reach the next epoch's batches,
rating 1 excludes, pause/resume, save now, caption now, accept), the same under torchrun, and `review` mode
(token, Host and Origin checks, traversal and symlinks, size limits, structured errors)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit

import pytest

from caption_train import train as train_module
from caption_train.config import resolve
from caption_train.data.captions import CaptionTransform
from caption_train.data.dataset import CaptionDataset, LiveCaptions
from caption_train.data.scan import Sample
from caption_train.errors import UserError
from caption_train.iterative import parse_interactive
from caption_train.iterative.hooks import InteractiveHooks
from caption_train.iterative.review import Review
from caption_train.iterative.store import HISTORY_FILE, LIVE_FILE, RATINGS_FILE, image_id
from caption_train.models import resolve_family
from caption_train.tiny import make_shapes_dataset

from conftest import REPO

URL_LINE = re.compile(r"^interactive page: http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{20,})$")


# ---------------------------------------------------------------------------------------------
# A small client: raw HTTP (so paths reach the server unnormalized) and websockets (aiohttp)


class Page:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.removeprefix("token=")

    def raw(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None, token: str | None = "auto",
            chunked: bool = False) -> tuple[int, bytes]:
        if token == "auto":
            token = self.token
        if token is not None:
            path += ("&" if "?" in path else "?") + "token=" + quote(token)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            if chunked:
                conn.putrequest(method, path)
                for key, value in (headers or {}).items():
                    conn.putheader(key, value)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for start in range(0, len(body or b""), 8192):
                    piece = body[start : start + 8192]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        status, body = self.raw("GET", path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def send(self, kind: str, payload: dict | None = None, **envelope: Any) -> tuple[int, dict]:
        message = {"req_from": "client", "type": kind, **envelope}
        if payload is not None:
            message["payload"] = payload
        return self.post(json.dumps(message).encode())

    def post(self, body: bytes, **kwargs: Any) -> tuple[int, dict]:
        headers = kwargs.pop("headers", {"Content-Type": "application/json"})
        status, raw = self.raw("POST", "/api/message", body=body, headers=headers, **kwargs)
        return status, json.loads(raw)

    def status(self) -> dict:
        return self.get("/api/state")["payload"]["status"]

    def image(self, name: str) -> dict:
        found = [info for info in self.get(f"/api/images?q={quote(name)}&limit=100")["images"] if info["path"].endswith(name)]
        assert len(found) == 1, (name, found)
        return found[0]

    def ws(self, *, token: str | None = "auto", origin: str | None = None, send: list[dict] = (),
           until: Callable[[list[dict]], bool] = lambda messages: bool(messages), timeout: float = 120) -> list[dict]:
        """Connect, send `send`, collect messages until `until(messages)` or the server closes."""
        return asyncio.run(self._ws(token, origin, list(send), until, timeout))

    def ws_refused(self, **kwargs: Any) -> int:
        """HTTP status of a refused websocket handshake."""
        import aiohttp

        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            self.ws(**kwargs)
        return info.value.status

    async def _ws(self, token, origin, send, until, timeout) -> list[dict]:
        import aiohttp

        token = self.token if token == "auto" else token
        url = f"ws://{self.host}:{self.port}/ws" + (f"?token={quote(token)}" if token is not None else "")
        headers = {"Origin": origin} if origin else {}
        messages: list[dict] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, headers=headers, autoclose=True) as ws:
                for message in send:
                    await ws.send_str(json.dumps(message))
                deadline = time.monotonic() + timeout
                while not until(messages):
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, f"websocket: timed out; last messages {messages[-3:]}"
                    msg = await ws.receive(timeout=remaining)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    messages.append(json.loads(msg.data))
        return messages


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def review_caption_now(data: Path, model: Path, state_dir: Path, image: str = "part0/img_0000.png") -> dict:
    """Start `caption-train review DATA --model MODEL`'s server, ask it for a model caption of `image` through the
    page's API ("caption now"), and return the image's model_caption record once it arrives."""
    review = Review(data, model=str(model), state_dir=state_dir)
    page = Page(review.start())
    stop = threading.Event()
    server_loop = threading.Thread(target=review.serve, args=(stop,), daemon=True)
    server_loop.start()
    try:
        info = page.image(image)
        assert page.status()["can_generate"] is True
        assert page.send("caption_generate", {"images": [info["id"]]})[0] == 200
        return wait_for(lambda: page.get(f"/api/images/{info['id']}")["model_caption"], "review caption now")
    finally:
        stop.set()
        server_loop.join(10)
        review.close()


def folder_snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Address parsing (config validation will call this)


@pytest.mark.parametrize("value, expected", [
    ("8765", ("127.0.0.1", 8765)), (8765, ("127.0.0.1", 8765)), (" 8765 ", ("127.0.0.1", 8765)), ("0", ("127.0.0.1", 0)),
    ("127.0.0.1:9000", ("127.0.0.1", 9000)), ("0.0.0.0:80", ("0.0.0.0", 80)), ("localhost:1", ("localhost", 1)),
    ("[::1]:9000", ("::1", 9000)), (":7000", ("127.0.0.1", 7000)), ("my-host.lan:65535", ("my-host.lan", 65535)),
])
def test_parse_interactive(value, expected):
    assert parse_interactive(value) == expected


@pytest.mark.parametrize("value, message", [
    ("", "expected [HOST:]PORT"), ("abc", "expected [HOST:]PORT"), ("65536", "0 to 65535"), ("-1", "expected [HOST:]PORT"),
    ("host:", "expected [HOST:]PORT"), ("::1:80", "IPv6 host in brackets"), ("http://x:80", "not a host name"),
    ("a b:80", "not a host name"), ("127.0.0.1:80/x", "without http:// or a path"),
])
def test_parse_interactive_errors_name_the_flag(value, message):
    with pytest.raises(UserError) as info:
        parse_interactive(value)
    assert str(info.value).startswith("--interactive ") and message in str(info.value)


def test_busy_port_fails_before_training():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(UserError, match="cannot listen there"):
            InteractiveHooks("127.0.0.1", busy.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The dataset follows live edits, in DataLoader workers too


def test_live_captions_override_exclude_and_reinclude(tmp_path):
    live = LiveCaptions(tmp_path / "live.json")
    assert live.lookup("a.png", "old") == "old"  # no file yet
    (tmp_path / "live.json").write_text(json.dumps({"captions": {"a.png": "new"}, "excluded": ["b.png"]}))
    assert live.lookup("a.png", "old") == "new" and live.lookup("b.png", "x") is None and live.lookup("c.png", "c") == "c"
    # Same size, same second: the replacement is still seen (inode changes with os.replace).
    replacement = tmp_path / "tmp.json"
    replacement.write_text(json.dumps({"captions": {"a.png": "neu"}, "excluded": ["c.png"]}))
    os.replace(replacement, tmp_path / "live.json")
    assert live.lookup("a.png", "old") == "neu" and live.lookup("b.png", "x") == "x" and live.lookup("c.png", "c") is None
    (tmp_path / "live.json").write_text("{broken")  # a bad file keeps the last good state
    assert live.lookup("a.png", "old") == "neu"


def test_dataloader_workers_pick_up_edits_mid_epoch_and_between_epochs(tmp_path):
    import torch

    pairs = make_shapes_dataset(tmp_path / "data", 8, seed=0, size=32, subfolders=0)
    samples = [Sample(path, caption) for path, caption in pairs]
    dataset = CaptionDataset(samples, CaptionTransform())
    live_path = tmp_path / "state" / LIVE_FILE
    live_path.parent.mkdir()
    dataset.follow(live_path)

    def write_live(captions: dict, excluded: list) -> None:
        tmp = live_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"captions": {str(samples[i].image_path): c for i, c in captions.items()},
                                   "excluded": [str(samples[i].image_path) for i in excluded]}))
        os.replace(tmp, live_path)

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, prefetch_factor=1, collate_fn=lambda items: items[0])

    # Mid-epoch: the worker is already running when the file changes; items it fetches later carry the edit.
    seen = []
    for index, item in enumerate(loader()):
        seen.append(item[1] if item is not None else None)
        if index == 0:
            write_live({7: "a green triangle"}, [6])
    assert seen[0] == pairs[0][1] and seen[7] == "a green triangle" and seen[6] is None
    # Next epoch (new workers): still in force; re-rating (leaving the excluded list) brings the image back.
    write_live({7: "a green triangle"}, [])
    dataset.set_epoch(1)
    again = [item[1] for item in loader()]
    assert again[6] == pairs[6][1] and again[7] == "a green triangle" and again[:6] == [c for _, c in pairs[:6]]


# ---------------------------------------------------------------------------------------------
# A real training run with the page


class RecordingHooks(InteractiveHooks):
    """Marks epoch ends in the batch log, so the test can tell which epoch a batch belonged to."""

    def __init__(self, batch_log: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.batch_log = batch_log

    def on_epoch_end(self, run, epoch):
        with self.batch_log.open("a") as handle:
            handle.write(json.dumps({"epoch_end": epoch}) + "\n")
        super().on_epoch_end(run, epoch)


def record_batches(monkeypatch, batch_log: Path) -> None:
    """Log every batch's (path, caption) items as the collator gets them, from any DataLoader worker process."""
    original = train_module.collate_batch

    def recording(items, **kwargs):
        record = {"items": [[item[2], item[1]] for item in items if item is not None], "dropped": sum(item is None for item in items)}
        with open(batch_log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return original(items, **kwargs)

    monkeypatch.setattr(train_module, "collate_batch", recording)


def batches_by_epoch(batch_log: Path) -> list[list[dict]]:
    epochs: list[list[dict]] = [[]]
    for line in batch_log.read_text().splitlines():
        record = json.loads(line)
        if "epoch_end" in record:
            epochs.append([])
        else:
            epochs[-1].append(record)
    return epochs[:-1]


class TrainingThread(threading.Thread):
    def __init__(self, cfg, hooks):
        super().__init__(daemon=True)
        self.cfg, self.hooks, self.result, self.error = cfg, hooks, None, None

    def run(self):
        try:
            self.result = train_module.train(self.cfg, hooks=self.hooks)
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            self.hooks.close()


@pytest.fixture
def dataset_copy(tmp_path, shapes_dir) -> Path:
    """The shared shapes dataset must not be written: edits go to a copy."""
    return Path(shutil.copytree(shapes_dir, tmp_path / "data"))


@pytest.mark.slow
def test_training_run_with_the_page(capsys, monkeypatch, tmp_path, tiny_blip, dataset_copy):
    batch_log = tmp_path / "batches.jsonl"
    record_batches(monkeypatch, batch_log)
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((str(src), str(dst))), real_replace(src, dst))[1])

    # 24 images / batch 4 = 6 steps per epoch x 3 epochs; DataLoader workers on, so edits must reach other processes.
    cfg = resolve({}, {"dataset_dir": str(dataset_copy), "model_name_or_path": str(tiny_blip), "output_dir": str(tmp_path / "runs"),
                       "epochs": 3, "batch_size": 4, "num_workers": 2, "log_with": "none", "num_sample_captions": 2, "save_every_n_epochs": 0})
    hooks = RecordingHooks(batch_log, start_paused=True)
    thread = TrainingThread(cfg, hooks)
    thread.start()
    wait_for(lambda: hooks.url or thread.error, "the page to start")
    assert thread.error is None, thread.error
    page = Page(hooks.url)

    # ---- paused after step 1: steps stop
    status = wait_for(lambda: (s := page.status())["state"] == "paused" and s, "the run to pause")
    assert status["step"] == 1 and status["epoch"] == 1 and status["total_steps"] == 18 and status["loss"] is not None
    run_dir = hooks.workspace.state_dir.parent
    time.sleep(1.5)
    assert page.status()["step"] == 1 and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

    # ---- no token, wrong token, wrong Origin
    assert page.raw("GET", "/", token=None)[0] == 401
    assert page.raw("GET", "/api/state", token="not-the-token")[0] == 403
    assert page.raw("GET", "/api/state", token=None, headers={"Authorization": f"Bearer {page.token}"})[0] == 200
    assert page.ws_refused(token=None) == 401 and page.ws_refused(token="nope") == 403
    assert page.ws_refused(origin="http://evil.example") == 403

    # ---- edit a caption: .txt replaced atomically, history kept, counts live
    target = page.image("part0/img_0000.png")
    txt = dataset_copy / "part0" / "img_0000.txt"
    assert target["caption"] == "a red circle" and target["probe"]
    inode = txt.stat().st_ino
    code, reply = page.send("caption_new", {"image": target["id"], "new_caption": "a green  triangle", "previous": "a red circle"}, id="e1")
    assert code == 200 and reply["type"] == "ack" and reply["id"] == "e1", reply
    assert txt.read_text() == "a green triangle\n" and txt.stat().st_ino != inode
    src, dst = next(pair for pair in replaced if pair[1] == str(txt))
    assert Path(src).parent == txt.parent and Path(src).name.startswith(".img_0000.txt.")  # temp file beside it, then os.replace
    assert not [p for p in txt.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    history = [json.loads(line) for line in (run_dir / "interactive" / HISTORY_FILE).read_text().splitlines()]
    assert history == [{**history[0], "action": "edit", "image": "part0/img_0000.png", "old": "a red circle\n", "new": "a green triangle", "step": 1}]
    assert page.status()["modified"] == 1
    # A stale edit (the caption changed since the page loaded it) is refused, not silently applied.
    code, reply = page.send("caption_new", {"image": target["id"], "new_caption": "a blue square", "previous": "a red circle"})
    assert code == 409 and reply["payload"]["code"] == "conflict" and txt.read_text() == "a green triangle\n"

    # ---- rating 1 excludes; 5 is stored as gold
    excluded = page.image("part1/img_0001.png")
    code, reply = page.send("caption_quality", {"image": excluded["id"], "quality": 1})
    assert code == 200 and reply["payload"]["detail"]["image"]["excluded"] is True
    gold = page.image("part1/img_0003.png")
    assert page.send("caption_quality", {"image": gold["id"], "quality": 5})[0] == 200
    ratings = json.loads((run_dir / "interactive" / RATINGS_FILE).read_text())
    assert ratings["part1/img_0001.png"]["rating"] == 1 and ratings["part1/img_0003.png"]["rating"] == 5
    assert page.status()["excluded"] == 1 and page.status()["gold"] == 1

    # ---- caption now (while paused), then accept the model's caption
    accepted = page.image("part0/img_0002.png")
    code, reply = page.send("caption_generate", {"images": [accepted["id"], gold["id"]]})
    assert code == 200, reply
    model = wait_for(lambda: page.get(f"/api/images/{accepted['id']}")["model_caption"], "caption now")
    assert model["step"] == 1 and model["text"]
    assert page.send("caption_accept", {"image": accepted["id"], "model_caption": model["text"]})[0] == 200
    assert (dataset_copy / "part0" / "img_0002.txt").read_text().strip() == " ".join(model["text"].split())
    assert json.loads((run_dir / "interactive" / HISTORY_FILE).read_text().splitlines()[-1])["action"] == "accept"

    # ---- save now, while paused
    assert page.send("save", {})[0] == 200
    wait_for(lambda: (run_dir / "step-1" / "adapter_model.safetensors").is_file(), "save now")

    # ---- bad requests against the live server
    assert page.post(b"x" * (100 * 1024))[0] == 413
    assert page.post(b"{" * (100 * 1024), chunked=True)[0] == 413
    assert page.raw("GET", "/api/image/..%2f..%2fetc%2fpasswd")[0] == 404
    code, reply = page.send("caption_new", {"image": "../../../etc/passwd", "new_caption": "x"})
    assert code == 422 and reply["payload"]["code"] == "invalid_message"

    # ---- resume over the websocket; live step updates until the run finishes
    messages = page.ws(send=[{"type": "resume", "id": "go"}],
                       until=lambda ms: any(m["type"] == "status" and m["payload"]["state"] == "finished" for m in ms))
    assert messages[0]["type"] == "hello"
    assert any(m["type"] == "ack" and m["id"] == "go" for m in messages)
    steps = [m["payload"]["step"] for m in messages if m["type"] == "status"]
    assert steps == sorted(steps) and len({s for s in steps if s > 1}) >= 2, steps
    thread.join(300)
    assert not thread.is_alive() and thread.error is None, thread.error
    with pytest.raises(OSError):  # the server stopped with the run
        socket.create_connection((page.host, page.port), timeout=5).close()

    # ---- what training actually saw
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert [r["step"] for r in rows] == list(range(1, 19))
    epochs = batches_by_epoch(batch_log)
    assert len(epochs) == 3

    def captions_of(epoch: list[dict], name: str) -> list[str]:
        return [caption for batch in epoch for path, caption in batch["items"] if path.endswith(name)]

    for later in epochs[1:]:  # the epochs after the edit: the new text, and the excluded image not at all
        assert captions_of(later, "img_0000.png") == ["a green triangle"]
        assert captions_of(later, "img_0001.png") == [] and sum(batch["dropped"] for batch in later) == 1
        assert captions_of(later, "img_0002.png") == [" ".join(model["text"].split())]
    assert captions_of(epochs[0][:1], "img_0000.png") in ([], ["a red circle"])  # the batch before the edit
    import torch

    assert torch.load(run_dir / "step-1" / "training_state.pt", weights_only=False)["global_step"] == 1

    # ---- exactly one URL line, printed once
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("interactive page:")]
    assert len(lines) == 1 and URL_LINE.match(lines[0]) and URL_LINE.match(lines[0]).group(2) == page.token


TORCHRUN_SCRIPT = """
import json, sys
from caption_train.config import resolve
from caption_train.iterative.hooks import InteractiveHooks
from caption_train.train import train
cfg = resolve({}, json.loads(sys.argv[1]))
with InteractiveHooks(start_paused=True) as hooks:
    train(cfg, hooks=hooks)
"""


@pytest.mark.slow
def test_pause_edit_save_under_torchrun(tmp_path, tiny_blip, dataset_copy):
    """Two CPU processes: only rank 0 serves; pause, save and resume are agreed by both (no hang, one step-1/)."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        master_port = probe.getsockname()[1]
    args = {"dataset_dir": str(dataset_copy), "model_name_or_path": str(tiny_blip), "output_dir": str(tmp_path / "runs"),
            "epochs": 2, "batch_size": 4, "num_workers": 0, "log_with": "none", "num_sample_captions": 0, "save_every_n_epochs": 0}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stderr = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: a full pipe would stall the ranks
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(master_port),
                                str(script), json.dumps(args)], stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp_path, env=env)
    try:
        url_lines = []
        for line in process.stdout:
            if line.startswith("interactive page:"):
                url_lines.append(line.strip())
                break
        assert url_lines and URL_LINE.match(url_lines[0]), (tmp_path / "stderr.txt").read_text()[-3000:]
        page = Page(url_lines[0].split(": ", 1)[1])
        wait_for(lambda: page.status()["state"] == "paused", "pause under torchrun")
        time.sleep(1.5)  # both ranks are held: no step happens
        assert page.status()["step"] == 1
        target = page.image("part1/img_0005.png")
        assert page.send("caption_new", {"image": target["id"], "new_caption": "a yellow circle"})[0] == 200
        assert page.send("save", {})[0] == 200
        run_dir = wait_for(lambda: next(iter((tmp_path / "runs").glob("*/step-1/adapter_model.safetensors")), None), "save under torchrun").parent.parent
        assert page.send("resume", {})[0] == 200
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        stderr.close()
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert (dataset_copy / "part1" / "img_0005.txt").read_text().strip() == "a yellow circle"
    # 24 images / (4 per batch x 2 processes) = 3 steps per epoch, 2 epochs.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert sum(line.startswith("interactive page:") for line in (out + "\n".join(url_lines)).splitlines()) == 1  # rank 0 only


# ---------------------------------------------------------------------------------------------
# review mode: the same server without training


@pytest.fixture
def review_dataset(tmp_path) -> tuple[Path, Path]:
    """A dataset with an image symlinked from outside it and a caption file symlinked to a file outside it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    make_shapes_dataset(data, 6, seed=3, size=32)
    make_shapes_dataset(outside, 1, seed=4, size=32, subfolders=0)
    (outside / "notes.txt").write_text("a secret note")
    (data / "leak.png").symlink_to(outside / "img_0000.png")
    (data / "leak.txt").write_text("a red circle")
    (data / "part1" / "img_0001.txt").unlink()
    (data / "part1" / "img_0001.txt").symlink_to(outside / "notes.txt")  # would show a file from outside: hidden
    (data / "part0" / "img_0002.txt").unlink()
    (data / "part0" / "img_0002.txt").symlink_to(data / "part0" / "img_0000.txt")  # inside: shown, but not written through
    return data, outside


@pytest.fixture
def review_page(tmp_path, review_dataset):
    data, _ = review_dataset
    review = Review(data, state_dir=tmp_path / "review-state")
    url = review.start()
    yield Page(url), review
    review.close()


def test_review_serves_only_the_dataset(review_page, review_dataset, tmp_path):
    page, review = review_page
    data, outside = review_dataset
    before = folder_snapshot(data)
    listed = page.get("/api/images?view=all&limit=100")
    hidden = {"leak.png", "part1/img_0001.png"}
    assert listed["total"] == 5 and {info["path"] for info in listed["images"]} == {p for p in before if p.endswith(".png")} - hidden
    assert page.status()["mode"] == "review" and page.status()["can_generate"] is False

    # The page and its files need the token too.
    for path in ("/", "/main.js", "/main.css", "/api/state", "/api/images", f"/api/image/{listed['images'][0]['id']}", "/nothing"):
        assert page.raw("GET", path, token=None)[0] == 401, path
        assert page.raw("GET", path, token="x" * 32)[0] == 403, path
    status, html = page.raw("GET", "/")
    assert status == 200 and page.token.encode() in html and b"__TOKEN__" not in html
    status, png = page.raw("GET", f"/api/image/{listed['images'][0]['id']}")
    assert status == 200 and png.startswith(b"\x89PNG")

    # Traversal in every spelling is a 404 and never a file's content.
    secret_id = image_id("leak.png")  # the id the symlinked image would have: it is not served
    note_id = image_id("part1/img_0001.png")  # its caption is a file outside the dataset: not shown
    for path in ("/api/image/../../../../etc/passwd", "/api/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/api/image/..%2f..%2foutside%2fnotes.txt",
                 "/api/image//etc/passwd", "/api/image/" + quote(str(outside / "img_0000.png"), safe=""), "/../../etc/passwd",
                 "/main.js/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/api/image/{secret_id}", f"/api/images/{secret_id}",
                 f"/api/images/{note_id}", "/static/../caption_train/iterative/server.py", "/api/image/" + "0" * 16):
        status, body = page.raw("GET", path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"secret" not in body and not body.startswith(b"\x89PNG"), path
    for image in ("../outside/notes.txt", str(outside / "notes.txt"), "%2e%2e%2foutside", "leak.png"):
        code, reply = page.send("caption_new", {"image": image, "new_caption": "pwned"})
        assert code == 422 and reply["payload"]["code"] == "invalid_message", image
    for image in (secret_id, note_id):
        code, reply = page.send("caption_new", {"image": image, "new_caption": "pwned"})
        assert code == 404 and reply["payload"]["code"] == "unknown_image"
    assert b"secret" not in page.raw("GET", "/api/images?view=all&limit=100")[1]

    # A caption file that is a symlink (even inside the dataset) is not written through.
    linked = page.image("part0/img_0002.png")
    code, reply = page.send("caption_new", {"image": linked["id"], "new_caption": "pwned"})
    assert code == 409 and reply["payload"]["code"] == "not_writable" and "symbolic link" in reply["payload"]["message"]
    assert (outside / "notes.txt").read_text() == "a secret note" and (data / "part0" / "img_0000.txt").read_text() == before["part0/img_0000.txt"].decode()

    # Nothing in the dataset changed; state went to the review folder.
    assert folder_snapshot(data) == before
    assert not (data / HISTORY_FILE).exists() and (tmp_path / "review-state" / LIVE_FILE).is_file()


def test_review_guards_hosts_origins_and_sizes(review_page):
    page, _ = review_page
    # DNS rebinding: a page of another site resolving to 127.0.0.1 sends its own Host.
    assert page.raw("GET", "/api/state", headers={"Host": f"evil.example:{page.port}"})[0] == 403
    assert page.raw("GET", "/api/state", headers={"Host": f"localhost:{page.port}"})[0] == 200
    # A browser page from another origin may not post or connect, even with the token.
    ok = {"type": "caption_quality", "payload": {"image": page.image("part0/img_0000.png")["id"], "quality": 4}}
    assert page.post(json.dumps(ok).encode(), headers={"Content-Type": "application/json", "Origin": "http://evil.example"})[0] == 403
    assert page.post(json.dumps(ok).encode(), headers={"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{page.port}"})[0] == 200
    assert page.ws_refused(origin="null") == 403
    assert page.ws(origin=f"http://localhost:{page.port}")[0]["type"] == "hello"
    # Size limits: body, caption, websocket frame.
    assert page.post(b"x" * (64 * 1024 + 1))[0] == 413
    assert page.post(b" " * (200 * 1024), chunked=True)[0] == 413
    code, reply = page.send("caption_new", {"image": ok["payload"]["image"], "new_caption": "x" * 2001})
    assert code == 422 and "payload.new_caption" in json.dumps(reply["payload"]["details"])
    closed = page.ws(send=[{"type": "pause", "pad": "x" * (65 * 1024)}], until=lambda ms: len(ms) >= 2, timeout=30)
    assert [m["type"] for m in closed] == ["hello"]  # the server closed the connection instead of answering


def test_review_errors_are_structured_and_the_server_survives(review_page):
    page, _ = review_page
    cases = [
        (b"not json", 400, "invalid_json"),
        (b"[1, 2]", 422, "invalid_message"),
        (json.dumps({"type": "caption_delete", "payload": {}}).encode(), 422, "invalid_message"),
        (json.dumps({"type": "caption_quality", "payload": {"image": "0" * 16, "quality": 9}, "id": "q9"}).encode(), 422, "invalid_message"),
        (json.dumps({"type": "caption_quality", "payload": {"image": "0" * 16, "quality": 2}}).encode(), 404, "unknown_image"),
        (json.dumps({"type": "pause", "payload": {}}).encode(), 409, "unavailable"),  # nothing to pause in review mode
        (json.dumps({"type": "caption_generate", "payload": {"images": ["0" * 16]}}).encode(), 409, "unavailable"),  # no --model
    ]
    for body, code, error in cases:
        status, reply = page.post(body)
        assert (status, reply["type"], reply["payload"]["code"]) == (code, "error", error), (body, reply)
        assert set(reply["payload"]) == {"code", "message", "details"}
    assert page.post(b"x", headers={"Content-Type": "text/plain"})[1]["payload"]["code"] == "invalid_message"
    assert page.post(json.dumps({"type": "caption_quality", "payload": {"quality": 9}, "id": "q9"}).encode())[1]["id"] == "q9"
    # Over the websocket: an invalid message gets an error reply and the connection stays usable.
    image = page.image("part0/img_0000.png")["id"]
    messages = page.ws(send=[{"type": "nonsense"}, {"type": "caption_quality", "payload": {"image": image, "quality": 3}, "id": "ok"}],
                       until=lambda ms: any(m["type"] == "ack" for m in ms))
    kinds = [m["type"] for m in messages]
    assert "error" in kinds and kinds.index("error") < kinds.index("ack")
    assert page.status()["rated"] == 1


def test_review_with_a_model_captions_and_accepts(tmp_path, tiny_blip):
    data = tmp_path / "data"
    make_shapes_dataset(data, 4, seed=5, size=32)
    state = tmp_path / "state"
    review = Review(data, model=str(tiny_blip), state_dir=state)
    page = Page(review.start())
    stop = threading.Event()
    server_loop = threading.Thread(target=review.serve, args=(stop,), daemon=True)
    server_loop.start()
    try:
        info = page.image("part0/img_0000.png")
        assert page.status()["can_generate"] is True
        assert page.send("caption_generate", {"images": [info["id"]]})[0] == 200
        model = wait_for(lambda: page.get(f"/api/images/{info['id']}")["model_caption"], "review caption now")
        assert model["step"] is None and model["text"]
        assert page.send("caption_accept", {"image": info["id"]})[0] == 200
        assert (data / "part0" / "img_0000.txt").read_text().strip() == " ".join(model["text"].split())
        record = json.loads((state / HISTORY_FILE).read_text().splitlines()[-1])
        assert record["action"] == "accept" and record["old"] == "a red circle\n" and "step" not in record
    finally:
        stop.set()
        server_loop.join(10)
        review.close()
    # The next review of the same state folder remembers what was modified.
    again = Review(data, state_dir=state)
    try:
        assert again.workspace.counts()["modified"] == 1
    finally:
        again.close()


def test_review_refuses_a_state_dir_inside_the_dataset(tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(data, 2, seed=0, size=32)
    with pytest.raises(UserError, match="inside the dataset"):
        Review(data, state_dir=data / "notes")
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == sorted(["img_0000.png", "img_0000.txt", "img_0001.png", "img_0001.txt"])


def test_review_command_line(tmp_path, capsys):
    from caption_train.cli import main

    assert main(["review", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["review", str(tmp_path), "--listen", "http://x"]) == 2
    assert "--listen" in capsys.readouterr().err


def test_non_loopback_bind_warns_loudly_and_still_needs_token_and_origin(tmp_path, capsys):
    data = tmp_path / "data"
    make_shapes_dataset(data, 2, seed=0, size=32)
    review = Review(data, listen="0.0.0.0:0", state_dir=tmp_path / "state")
    try:
        url = review.start()
        captured = capsys.readouterr()
        assert "WARNING: the interactive page listens on 0.0.0.0" in captured.err and "ssh -L" in captured.err
        assert [line for line in captured.out.splitlines() if line.startswith("interactive page:")] == [f"interactive page: {url}"]
        page = Page(url.replace("0.0.0.0", "127.0.0.1"))
        assert page.raw("GET", "/api/state", token=None)[0] == 401
        # Any name of the machine may be used, but a browser's Origin must match the Host it talks to.
        assert page.raw("GET", "/api/state", headers={"Host": f"myhost.lan:{page.port}"})[0] == 200
        same = {"Host": f"myhost.lan:{page.port}", "Origin": f"http://myhost.lan:{page.port}", "Content-Type": "application/json"}
        other = {**same, "Origin": "http://evil.example"}
        body = json.dumps({"type": "caption_quality", "payload": {"image": page.image("img_0000.png")["id"], "quality": 2}}).encode()
        assert page.post(body, headers=same)[0] == 200 and page.post(body, headers=other)[0] == 403
    finally:
        review.close()


def test_every_run_gets_its_own_token(tmp_path, capsys):
    """The token in the printed URL is new each run: a page (or a leaked URL) of an earlier run opens nothing now."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 2, seed=0, size=32)
    first, second = (Review(data, state_dir=tmp_path / "state") for _ in range(2))
    try:
        pages = [Page(first.start()), Page(second.start())]
        printed = [URL_LINE.match(line).group(2) for line in capsys.readouterr().out.splitlines() if URL_LINE.match(line)]
        assert printed == [page.token for page in pages] and printed[0] != printed[1]
        assert all(len(token) >= 32 for token in printed)  # 24 random bytes, URL-safe
        # Each server knows only its own: the other run's token is refused, its own accepted.
        for page, other in ((pages[0], pages[1]), (pages[1], pages[0])):
            assert page.raw("GET", "/api/state")[0] == 200
            assert page.raw("GET", "/api/state", token=other.token)[0] == 403
    finally:
        first.close()
        second.close()
    # The training hooks' server draws its own too (no token passed).
    from caption_train.iterative.server import PageServer

    third = Review(data, state_dir=tmp_path / "state")
    servers = [PageServer(third.workspace, "127.0.0.1", 0) for _ in range(2)]
    try:
        assert servers[0].token != servers[1].token
    finally:
        for server in servers:
            server.sock.close()
        third.close()


INTERACTIVE_FAMILIES = {  # family: (builder module, builder name, its options: a random model that says something)
    "git": ("tiny_families_git", "build_tiny_git", {}),
    "florence2": ("tiny_families_git", "build_tiny_florence2", {"tie_word_embeddings": False}),
    "blip2": ("tiny_families_git", "build_tiny_blip2", {}),
    "qwen2_vl": ("tiny_families_chat", "build_tiny_qwen2_vl", {}),
}  # (a random tiny PaliGemma, with Gemma's tied embeddings, says nothing for any image: its page test is review's)


class KeepRun(InteractiveHooks):
    def on_setup(self, run):
        self.run = run
        super().on_setup(run)


def caption_now_on_a_paused_run(model_dir, tmp_path, mixed_precision: str):
    """A one-epoch run on 4 images with the page, paused after step 1; "caption now" asked for every image.
    (data, names, page, hooks, thread, targets, the captions the page answered)."""
    data = tmp_path / "data"
    make_shapes_dataset(data, 4, seed=2, size=32, subfolders=0)
    cfg = resolve({}, {"dataset_dir": str(data), "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "runs"),
                       "epochs": 1, "batch_size": 2, "num_workers": 0, "log_with": "none", "num_sample_captions": 0,
                       "save_every_n_epochs": 0, "mixed_precision": mixed_precision})
    hooks = KeepRun(start_paused=True)
    thread = TrainingThread(cfg, hooks)
    thread.start()
    wait_for(lambda: hooks.url or thread.error, "the page to start")
    assert thread.error is None, thread.error
    page = Page(hooks.url)
    wait_for(lambda: page.status()["state"] == "paused", "the run to pause")
    names = [f"img_000{i}.png" for i in range(4)]
    targets = [page.image(name) for name in names]
    assert page.send("caption_generate", {"images": [t["id"] for t in targets]})[0] == 200
    captions = [wait_for(lambda t=t: page.get(f"/api/images/{t['id']}")["model_caption"], "caption now") for t in targets]
    return data, names, page, hooks, thread, targets, captions


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(INTERACTIVE_FAMILIES))
def test_the_page_during_training_with_every_family(tmp_path, family):
    """--interactive with each non-BLIP family: paused after step 1, "caption now" answers with exactly what the
    family's own generate gives with the run's weights at that step, an edit reaches the dataset, and the run finishes."""
    import importlib

    from PIL import Image

    from conftest import VOCAB_TEXTS

    module, builder, options = INTERACTIVE_FAMILIES[family]
    model_dir = getattr(importlib.import_module(module), builder)(tmp_path / "model", VOCAB_TEXTS, **options)
    data, names, page, hooks, thread, targets, captions = caption_now_on_a_paused_run(model_dir, tmp_path, "no")
    # The weights as they are at step 1 (the run waits, paused): what the family generates with them directly
    # (family and processor found from the model folder, as a user would; no --prompt, so the family's own).
    family_of, _ = resolve_family(str(model_dir))
    _, processor = family_of.load(str(model_dir), {})
    model = hooks.run.model.eval()
    direct = family_of.generate(model, processor, [Image.open(data / name).convert("RGB") for name in names])
    model.train()
    assert [c["step"] for c in captions] == [1] * 4 and any(c["text"] for c in captions)  # a random model may say nothing for some
    assert [" ".join(c["text"].split()) for c in captions] == [" ".join(d.split()) for d in direct]

    target = targets[1]
    code, _ = page.send("caption_new", {"image": target["id"], "new_caption": "a blue circle", "previous": target["caption"]})
    assert code == 200 and (data / "img_0001.txt").read_text() == "a blue circle\n"
    page.send("resume", {})
    thread.join(300)
    assert not thread.is_alive() and thread.error is None, thread.error
    assert (thread.result / "adapter_model.safetensors").is_file()
