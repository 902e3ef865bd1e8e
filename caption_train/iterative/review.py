"""`caption-train review DATASET_DIR [--model MODEL]`: the interactive page without training.

    caption-train review dataset --model Salesforce/blip-image-captioning-base
    caption-train review dataset --model runs/x-20261126-120000/final --listen 127.0.0.1:8765 --state_dir review-notes
    caption-train review dataset --losses runs/x-20261126-120000          # the review queue, without a model

Browse the dataset, caption any image with the model ("caption now") and compare with its caption on disk, fix
captions (written atomically to the image's .txt) or accept the model's, rate them 1-5. History and ratings
go to --state_dir (default ./caption-review/<dataset name>-<hash>/, reused by the next review of the same
dataset); nothing but the edited .txt files is ever written inside the dataset folder. Ctrl-C stops.

With a run's per-image losses (its sample_losses.jsonl: `--losses RUN_DIR_OR_FILE`, or found beside the
checkpoint `--model RUN/final` names) the page opens on the review queue, most suspect caption first
(ranking.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import typing
from pathlib import Path
from typing import Any

from caption_train.data.scan import _check_root, scan_dataset
from caption_train.errors import UserError
from caption_train.address import exposure_warning, is_loopback, parse_interactive
from caption_train.iterative.ranking import find_losses_file, read_sample_losses
from caption_train.iterative.store import Workspace, inside

BATCH = 8


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caption-train review", description="Browse and fix a dataset's captions in the interactive page, with a model's captions beside them (no training).")
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="Folder of images with .txt captions (searched recursively).")
    parser.add_argument("--model", default=None, help="A run's final/ (or epoch-N/), a merged model, or a hub id/path; without it the page only edits and rates.")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="[HOST:]PORT", help="Where to serve the page (default 127.0.0.1 and a free port).")
    parser.add_argument("--losses", default=None, metavar="RUN_DIR_OR_FILE", help="A run folder or its sample_losses.jsonl: open on the review queue, most suspect caption first (default: the run of --model RUN/final or RUN/epoch-N, when it has one).")
    parser.add_argument("--state_dir", default=None, help="Folder for history.jsonl, ratings.json and fine.json (default ./caption-review/<dataset>-<hash>/); must be outside the dataset.")
    return parser


def default_state_dir(dataset: Path) -> Path:
    digest = hashlib.blake2b(os.path.realpath(dataset).encode(), digest_size=4).hexdigest()
    return Path.cwd() / "caption-review" / f"{dataset.resolve().name or 'dataset'}-{digest}"


class Review:
    """The review session: a Workspace over the whole dataset, a PageServer, and a captioning loop."""

    def __init__(self, dataset_dir: str | Path, *, model: str | None = None, listen: str = "127.0.0.1:0",
                 state_dir: str | Path | None = None, token: str | None = None, losses: str | Path | None = None):
        from caption_train.iterative.server import bind_socket

        self.dataset = _check_root(dataset_dir, "DATASET_DIR")  # name review's own argument, not train's --dataset_dir
        host, port = parse_interactive(listen, "--listen")
        scan = scan_dataset(self.dataset)
        print(scan.summary(), flush=True)
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir(self.dataset)
        if inside(self.state_dir, os.path.realpath(self.dataset)):
            raise UserError(f"--state_dir {self.state_dir}: is inside the dataset {self.dataset}; pass a folder outside it (nothing but .txt captions is written there)")
        losses_file = find_losses_file(losses=losses, model=model)
        history = read_sample_losses(losses_file) if losses_file is not None else {}
        self.sock = bind_socket(host, port, "--listen")  # before loading a model: a busy port fails fast
        self.host, self.token, self.model_name = host, token, model
        self.model: Any = None
        self.prompt: str | None = None
        try:
            if model is not None:
                import torch

                from caption_train.captioning import trained_prompt
                from caption_train.inference import load_for_inference

                self.prompt = trained_prompt(model)  # a run's checkpoint captions with the prompt it was trained with

                self.model, self.processor, self.family = load_for_inference(model, device="cuda" if torch.cuda.is_available() else "cpu")
            self.workspace = Workspace(self.dataset, scan.samples, state_dir=self.state_dir, mode="review",
                                       log=lambda line: print(line, file=sys.stderr, flush=True))
            if losses_file is not None:
                self._rank(losses_file, history, explicit=losses is not None)
        except BaseException:
            self.sock.close()
            raise
        self.workspace.update_status(state="idle", model=model, can_generate=self.model is not None)
        self.server: Any = None

    def _rank(self, losses_file: Path, history: dict, *, explicit: bool) -> None:
        """Hand the run's losses to the page, and say what they cover."""
        shown = self.workspace.set_losses(history)
        if shown == 0 and history:
            where = f"{len(history)} images named in {losses_file}, none of them in {self.dataset}"
            if explicit:
                raise UserError(f"--losses {losses_file}: {where}; pass the dataset that run trained on")
            print(f"no review queue: {where} (a run on another dataset)", flush=True)
            return
        status = self.workspace.counts()
        print(f"review queue: {status['suspects']} of {shown} images with a loss, most suspect first "
              f"(epoch {status['loss_epoch']}'s loss, from {losses_file})", flush=True)

    def start(self) -> str:
        from caption_train.iterative.server import PageServer

        self.server = PageServer(self.workspace, self.host, 0, token=self.token, sock=self.sock, flag="--listen")
        self.server.start()
        print(f"captions are written to the .txt files in {self.dataset}; history and ratings: {self.state_dir}", flush=True)
        if not is_loopback(self.host):
            print(exposure_warning(self.host, self.server.port), file=sys.stderr, flush=True)
        print(f"interactive page: {self.server.url}", flush=True)
        return self.server.url

    def serve(self, stop: threading.Event | None = None) -> None:
        """Caption what the page asks for until `stop` is set (or Ctrl-C)."""
        from caption_train.iterative.hooks import caption_images

        workspace = self.workspace
        while stop is None or not stop.is_set():
            with workspace.changed:
                workspace.changed.wait_for(lambda: bool(workspace.pending), timeout=0.5)
            images = workspace.take_pending(BATCH)
            if images and self.model is not None:
                try:
                    caption_images(workspace, self.model, self.processor, self.family, images, step=None, prompt=self.prompt)
                except Exception as error:  # keep serving; show the failure on the page
                    workspace.record_model_captions([(image, f"(captioning failed: {type(error).__name__}: {error})") for image in images], None)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        elif self.sock is not None:
            self.sock.close()
        self.sock = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    review = Review(args.dataset_dir, model=args.model, listen=args.listen, state_dir=args.state_dir, losses=args.losses)
    try:
        review.start()
        review.serve()
    except KeyboardInterrupt:
        print("review stopped", file=sys.stderr, flush=True)
    finally:
        review.close()
    return 0
