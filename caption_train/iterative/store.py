"""The page's view of a dataset: opaque image ids, caption edits written atomically, ratings, history, controls.

    workspace = Workspace(Path("dataset"), samples, state_dir=run_dir / "interactive", mode="training")
    info = workspace.set_caption(image_id, "a red circle", action="edit")    # writes dataset/.../img.txt
    workspace.set_rating(image_id, 1)                                        # excluded from training
    workspace.set_losses(run.sample_loss_history())                          # the review queue, by caption loss
    total, infos = workspace.search(view="suspects")                         # most suspect first

Thread-safe: the server thread edits, the training thread reads controls and records model captions.
Files it writes (nothing else, and nothing at all inside the dataset except the edited .txt files):

    <state_dir>/history.jsonl   one line per change: {"time", "action", "image", "old", "new", "step", ...}
    <state_dir>/ratings.json    {"<relative image path>": {"rating": 1..5, "time", "step"}}
    <state_dir>/fine.json       {"<relative image path>": {"caption_sha1", "time", "step"}}: captions a person
                                marked fine in the review queue (for that text only: an edit brings them back)
    <state_dir>/live.json       what the training DataLoader follows (data.dataset.LiveCaptions): new captions
                                and the images rated 1, keyed by image path as scanned

Ratings: 1 = bad, left out of training (and validation loss) until re-rated; 2-4 = stored, for sorting and
filtering on the page; 5 = "gold", stored and shown with a star. Only 1 changes what the trainer does.

The review queue (views "suspects" and "not_down"): images by their latest caption loss, highest first, as
ranking.suspect_order decides from the losses given to `set_losses`, the captions now, fine.json and ratings.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from caption_train.data.scan import Sample, caption_path_for
from caption_train.files import new_file_mode, write_text_atomic
from caption_train.hooks import SampleLoss, caption_sha1
from caption_train.iterative.ranking import LossTrend, loss_trend, suspect_order
from caption_train.iterative.schema import ImageInfo, LossInfo, ModelCaption, Status, normalize_caption_text

HISTORY_FILE = "history.jsonl"
RATINGS_FILE = "ratings.json"
FINE_FILE = "fine.json"
LIVE_FILE = "live.json"
EXCLUDE_RATING = 1
GOLD_RATING = 5
MAX_PENDING_CAPTIONS = 256


class WorkspaceError(Exception):
    """An action the page asked for that cannot be done; `code` is an ErrorPayload code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def image_id(relative_path: str) -> str:
    """Opaque, stable id of an image (its relative path, hashed): what the page uses instead of paths."""
    return hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8, person=b"caption-train").hexdigest()


def inside(path: Path, root_real: str) -> bool:
    """True when `path`, with every symlink resolved, is `root_real` or lies below it."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


@dataclass
class Entry:
    id: str
    sample: Sample
    rel: str
    caption_path: Path
    probe: bool = False


class Workspace:
    """Images of one dataset, their current captions and ratings, model captions, and the controls queue."""

    def __init__(self, root: Path, samples: Iterable[Sample], *, state_dir: Path, mode: str = "training",
                 probe: Iterable[Sample] = (), log: Callable[[str], None] = print):
        self.root = Path(root)
        self.root_real = os.path.realpath(self.root)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified on pause/resume/save/generate requests
        self.entries: dict[str, Entry] = {}
        self.by_path: dict[str, str] = {}  # str(sample.image_path) -> id
        hidden = 0
        probe_paths = {str(s.image_path) for s in probe}
        for sample in samples:
            rel = _relative(sample.image_path, self.root)
            sidecar = caption_path_for(sample.image_path)
            if rel is None or not inside(sample.image_path, self.root_real) or (os.path.lexists(sidecar) and not inside(sidecar, self.root_real)):
                hidden += 1  # image or caption is a symlink leading out of the dataset: trained on, never shown or written
                continue
            entry = Entry(image_id(rel), sample, rel, caption_path_for(sample.image_path), str(sample.image_path) in probe_paths)
            self.entries[entry.id] = entry
            self.by_path[str(sample.image_path)] = entry.id
        if hidden:
            log(f"interactive page: {hidden} images (or their captions) are symlinks leading outside {self.root}: not shown or editable there")
        self.order = sorted(self.entries, key=lambda i: self.entries[i].rel)
        self.probe = [self.by_path[str(s.image_path)] for s in probe if str(s.image_path) in self.by_path]
        self.captions: dict[str, str] = {i: e.sample.caption for i, e in self.entries.items()}
        self.modified: set[str] = set()
        self.ratings: dict[str, dict[str, Any]] = {}
        self.model_captions: dict[str, ModelCaption] = {}
        # ---- the review queue: losses per image (id -> trend), captions marked fine (id -> record with caption_sha1)
        self.trends: dict[str, LossTrend] = {}
        self.loss_rows: dict[str, list[SampleLoss]] = {}
        self.fine: dict[str, dict[str, Any]] = {}
        self.loss_epoch = 0
        self._queues: dict[bool, list[str]] = {}  # not_down -> ids in queue order; emptied by whatever changes it
        self._ranks: dict[str, int] | None = None
        # ---- controls (read by the training thread or the review loop)
        self.pause_requested = False
        self.save_requested = False
        self.pending: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.status = Status(mode=mode, state="starting" if mode == "training" else "idle", images=len(self.entries))
        self.listeners: list[Callable[[str, Any], None]] = []  # (event type, payload) -> None; the server's publish
        self._load_state()

    # ------------------------------------------------------------------ persisted state

    def _load_state(self) -> None:
        """Pick up an earlier session's ratings and edits (a resumed run, or the same review folder)."""
        ratings_path = self.state_dir / RATINGS_FILE
        if ratings_path.is_file():
            try:
                stored = json.loads(ratings_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                stored = {}
            by_rel = {e.rel: i for i, e in self.entries.items()}
            for rel, record in dict(stored).items():
                if rel in by_rel and isinstance(record, dict) and record.get("rating") in (1, 2, 3, 4, 5):
                    self.ratings[by_rel[rel]] = record
        fine_path = self.state_dir / FINE_FILE
        if fine_path.is_file():
            try:
                stored = json.loads(fine_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                stored = {}
            by_rel = {e.rel: i for i, e in self.entries.items()}
            for rel, record in dict(stored).items():
                if rel in by_rel and isinstance(record, dict) and isinstance(record.get("caption_sha1"), str):
                    self.fine[by_rel[rel]] = record
        live_path = self.state_dir / LIVE_FILE
        if live_path.is_file():
            try:
                live = json.loads(live_path.read_text(encoding="utf-8"))
                for path in dict(live.get("captions", {})):
                    if path in self.by_path:
                        self.modified.add(self.by_path[path])
            except (OSError, ValueError, AttributeError):
                pass
        self._write_live()

    def _write_live(self) -> None:
        captions = {str(self.entries[i].sample.image_path): self.captions[i] for i in sorted(self.modified)}
        excluded = sorted(str(self.entries[i].sample.image_path) for i, r in self.ratings.items() if r["rating"] == EXCLUDE_RATING)
        write_text_atomic(self.state_dir / LIVE_FILE, json.dumps({"captions": captions, "excluded": excluded}, ensure_ascii=False))

    def _write_ratings(self) -> None:
        data = {self.entries[i].rel: record for i, record in sorted(self.ratings.items(), key=lambda kv: self.entries[kv[0]].rel)}
        write_text_atomic(self.state_dir / RATINGS_FILE, json.dumps(data, ensure_ascii=False, indent=1))

    def _write_fine(self) -> None:
        data = {self.entries[i].rel: record for i, record in sorted(self.fine.items(), key=lambda kv: self.entries[kv[0]].rel)}
        write_text_atomic(self.state_dir / FINE_FILE, json.dumps(data, ensure_ascii=False, indent=1))

    def _history(self, record: dict[str, Any]) -> None:
        where = {"step": self.status.step, "epoch": self.status.epoch} if self.mode == "training" else {}
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **where, **record}, ensure_ascii=False)
        with (self.state_dir / HISTORY_FILE).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # ------------------------------------------------------------------ lookups

    def entry(self, image: str) -> Entry:
        entry = self.entries.get(image)
        if entry is None:
            raise WorkspaceError("unknown_image", f"no image with id {image!r} in this dataset")
        return entry

    def info(self, image: str) -> ImageInfo:
        with self.lock:
            entry = self.entry(image)
            rating = self.ratings.get(image, {}).get("rating")
            return ImageInfo(
                id=image, path=entry.rel, caption=self.captions[image], modified=image in self.modified,
                rating=rating, excluded=rating == EXCLUDE_RATING, probe=entry.probe, model_caption=self.model_captions.get(image),
                loss=self._loss_info(image),
            )

    def _loss_info(self, image: str) -> LossInfo | None:
        trend = self.trends.get(image)
        if trend is None:
            return None
        now = caption_sha1(self.captions[image])
        return LossInfo(epochs=list(trend.epochs), losses=list(trend.losses), same_caption_from=trend.same_caption_from,
                        down=trend.went_down, fixed=trend.caption_sha1 != now,
                        fine=self.fine.get(image, {}).get("caption_sha1") == now, rank=self._rank_of(image))

    def image_file(self, image: str) -> Path:
        """The image's file, checked again now (a symlink may have been swapped since the scan)."""
        entry = self.entry(image)
        if not inside(entry.sample.image_path, self.root_real) or not entry.sample.image_path.is_file():
            raise WorkspaceError("unknown_image", f"image {image!r} is no longer readable inside the dataset")
        return entry.sample.image_path

    def search(self, query: str = "", view: str = "all", offset: int = 0, limit: int = 24) -> tuple[int, list[ImageInfo]]:
        """(total matches, one page of them). view: all, probe, modified, rated, excluded, gold, captioned; suspects
        (the review queue, most suspect first), not_down (the queue's images whose loss did not go down)."""
        needle = query.strip().lower()
        with self.lock:
            if view in ("suspects", "not_down"):
                ids = self.queue(not_down=view == "not_down")
            else:
                ids = self.probe if view == "probe" else self.order
            matches = []
            for image in ids:
                rating = self.ratings.get(image, {}).get("rating")
                if view == "modified" and image not in self.modified:
                    continue
                if view == "rated" and rating is None:
                    continue
                if view == "excluded" and rating != EXCLUDE_RATING:
                    continue
                if view == "gold" and rating != GOLD_RATING:
                    continue
                if view == "captioned" and image not in self.model_captions:
                    continue
                if needle and needle not in self.entries[image].rel.lower() and needle not in self.captions[image].lower():
                    continue
                matches.append(image)
            return len(matches), [self.info(i) for i in matches[offset : offset + limit]]

    def counts(self) -> dict[str, int]:
        with self.lock:
            ratings = [r["rating"] for r in self.ratings.values()]
            return {
                "images": len(self.entries), "modified": len(self.modified), "rated": len(ratings),
                "excluded": ratings.count(EXCLUDE_RATING), "gold": ratings.count(GOLD_RATING), "pending_captions": len(self.pending),
                "ranked": len(self.trends), "suspects": len(self.queue()), "loss_epoch": self.loss_epoch,
            }

    # ------------------------------------------------------------------ the review queue

    def set_losses(self, history: dict[str, list[SampleLoss]]) -> int:
        """Take every epoch's loss per image (keyed by path relative to the dataset folder, as HookRun and
        sample_losses.jsonl give them); returns how many of those images are shown here (the rest are not in
        this dataset, or hidden)."""
        by_rel = {e.rel: i for i, e in self.entries.items()}
        with self.lock:
            self.loss_rows = {by_rel[rel]: list(rows) for rel, rows in history.items() if rel in by_rel and rows}
            self.trends = {image: loss_trend(rows) for image, rows in self.loss_rows.items()}
            self.loss_epoch = max((trend.epoch for trend in self.trends.values()), default=0)
            self._queue_changed()
            return len(self.trends)

    def queue(self, *, not_down: bool = False) -> list[str]:
        """Image ids in review-queue order (ranking.suspect_order), computed once per change."""
        with self.lock:
            if not_down not in self._queues:
                rel = {image: self.entries[image].rel for image in self.loss_rows}
                excluded = {rel[i] for i, r in self.ratings.items() if r["rating"] == EXCLUDE_RATING and i in rel}
                order = suspect_order({rel[i]: rows for i, rows in self.loss_rows.items()}, {rel[i]: self.captions[i] for i in rel},
                                      fine={rel[i]: r["caption_sha1"] for i, r in self.fine.items() if i in rel},
                                      excluded=excluded, not_down=not_down)
                by_rel = {path: image for image, path in rel.items()}
                self._queues[not_down] = [by_rel[path] for path in order]
            return self._queues[not_down]

    def _rank_of(self, image: str) -> int | None:
        if self._ranks is None:
            self._ranks = {i: rank for rank, i in enumerate(self.queue(), 1)}
        return self._ranks.get(image)

    def _queue_changed(self) -> None:
        self._queues.clear()
        self._ranks = None

    def set_fine(self, image: str, fine: bool = True, *, seen: str | None = None) -> ImageInfo:
        """Mark the image's caption fine (it leaves the review queue while it stays this text), or take that back.
        `seen`: the caption the person judged, checked against the caption now."""
        with self.lock:
            entry = self.entry(image)
            current = self.captions[image]
            if seen is not None and " ".join(seen.split()) != current:
                raise WorkspaceError("conflict", f"{entry.rel}: the caption changed to {current!r} since you looked at it; look again")
            if fine:
                self.fine[image] = {"caption_sha1": caption_sha1(current), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": self.status.step}
            elif self.fine.pop(image, None) is None:
                return self.info(image)
            self._write_fine()
            self._queue_changed()
            self._history({"action": "fine" if fine else "unfine", "image": entry.rel, "id": image, "caption": current})
            info = self.info(image)
            self._publish_counts()
        self.emit("caption_updated", info)
        return info

    # ------------------------------------------------------------------ actions from the page

    def set_caption(self, image: str, text: str, *, action: str = "edit", previous: str | None = None) -> ImageInfo:
        """Write `text` as the image's caption (its .txt, atomically), keep the old text in the history."""
        new = normalize_caption_text(text)
        with self.lock:
            entry = self.entry(image)
            current = self.captions[image]
            if previous is not None and " ".join(previous.split()) != current:
                raise WorkspaceError("conflict", f"{entry.rel}: the caption changed to {current!r} since you loaded it; reload and edit again")
            if new == current:
                return self.info(image)
            old_raw = self._write_caption_file(entry, new)
            self.captions[image] = new
            self.modified.add(image)
            self._queue_changed()
            self._history({"action": action, "image": entry.rel, "id": image, "old": old_raw,
                           "old_source": "txt" if old_raw is not None else "metadata.jsonl", "old_caption": current, "new": new})
            self._write_live()
            info = self.info(image)
            self._publish_counts()
        self.emit("caption_updated", info)
        return info

    def _write_caption_file(self, entry: Entry, text: str) -> str | None:
        """Replace the sidecar; return its previous raw text (None when the caption came from metadata.jsonl)."""
        path = entry.caption_path
        if not inside(path.parent, self.root_real):
            raise WorkspaceError("not_writable", f"{entry.rel}: its folder leads outside the dataset; edit it by hand")
        if path.is_symlink():
            raise WorkspaceError("not_writable", f"{entry.rel}: its caption file {path.name} is a symbolic link; edit it by hand")
        old_raw, mode = None, new_file_mode()
        if path.exists():
            if not path.is_file():
                raise WorkspaceError("not_writable", f"{entry.rel}: {path.name} is not a regular file")
            try:
                old_raw = path.read_bytes().decode("utf-8-sig", errors="replace")
                mode = path.stat().st_mode & 0o7777
            except OSError as error:
                raise WorkspaceError("not_writable", f"{entry.rel}: cannot read {path.name} ({error.strerror})") from None
        if old_raw is not None and old_raw.endswith("\n"):
            text += "\n"  # keep the file's own style: some tools write a final newline, some do not
        try:
            write_text_atomic(path, text, mode=mode)
        except OSError as error:
            raise WorkspaceError("not_writable", f"{entry.rel}: cannot write {path.name} ({error.strerror})") from None
        return old_raw

    def accept(self, image: str, seen: str | None = None) -> ImageInfo:
        """The model's latest caption becomes the caption. `seen`: what the page showed, checked against it."""
        with self.lock:
            model = self.model_captions.get(image)
            self.entry(image)
            if model is None or not model.text.strip():
                raise WorkspaceError("conflict", "there is no model caption for this image yet; use 'caption now' first")
            if seen is not None and " ".join(model.text.split()) != seen:
                raise WorkspaceError("conflict", f"the model caption is now {model.text!r}; look at it again before accepting")
            return self.set_caption(image, model.text, action="accept")

    def set_rating(self, image: str, quality: int) -> ImageInfo:
        with self.lock:
            entry = self.entry(image)
            before = self.ratings.get(image, {}).get("rating")
            self.ratings[image] = {"rating": quality, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": self.status.step}
            self._write_ratings()
            self._queue_changed()
            if EXCLUDE_RATING in (before, quality):
                self._write_live()
            self._history({"action": "rate", "image": entry.rel, "id": image, "old_rating": before, "rating": quality})
            info = self.info(image)
            self._publish_counts()
        self.emit("caption_updated", info)
        return info

    def request_captions(self, images: list[str], *, can_generate: bool) -> int:
        if not can_generate:
            raise WorkspaceError("unavailable", "no model to caption with (training finished, or review without --model)")
        with self.lock:
            for image in images:
                self.entry(image)
            fresh = [i for i in images if i not in self.pending]
            if len(self.pending) + len(fresh) > MAX_PENDING_CAPTIONS:
                raise WorkspaceError("busy", f"{len(self.pending)} images are already waiting to be captioned; try again later")
            for image in fresh:
                self.pending[image] = None
            self.changed.notify_all()
            self._publish_counts()
            return len(self.pending)

    def take_pending(self, limit: int) -> list[str]:
        with self.lock:
            taken = []
            while self.pending and len(taken) < limit:
                taken.append(self.pending.popitem(last=False)[0])
            if taken:
                self._publish_counts()
            return taken

    def record_model_captions(self, pairs: list[tuple[str, str]], step: int | None) -> None:
        with self.lock:
            for image, text in pairs:
                if image in self.entries:
                    self.model_captions[image] = ModelCaption(text=text, step=step)
            infos = [self.info(image) for image, _ in pairs if image in self.entries]
            self._publish_counts()
        if infos:
            self.emit("model_captions", infos)

    def set_control(self, *, pause: bool | None = None, save: bool | None = None) -> None:
        with self.lock:
            if pause is not None:
                self.pause_requested = pause
            if save is not None:
                self.save_requested = save
            self.status = self.status.model_copy(update={"pause_requested": self.pause_requested})
            self.changed.notify_all()

    # ------------------------------------------------------------------ status

    def update_status(self, **fields: Any) -> None:
        with self.lock:
            self.status = self.status.model_copy(update={**fields, **self.counts(), "pause_requested": self.pause_requested})

    def _publish_counts(self) -> None:
        self.status = self.status.model_copy(update=self.counts())

    def emit(self, kind: str, payload: Any) -> None:
        for listener in list(self.listeners):
            listener(kind, payload)


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None
