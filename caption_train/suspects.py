"""The `suspects` command: every image's caption loss under a trained model, ranked highest first: the captions to
check first, for a dataset and a model without a training run.

    caption-train suspects runs/x-20261126-141500/final dataset/     # -> suspects/x-20261126-141500-final-on-dataset/
    caption-train suspects runs/x/final dataset/ --top 50 --output_dir checks/x
    caption-train suspects Salesforce/blip-image-captioning-base dataset/ --dtype float32

The loss is the one training writes per image (sample_losses.jsonl, sample_losses.py): the mean token
cross-entropy over the caption's target tokens, without label smoothing, from the family's own collate (the label
rule training uses) at the max_length and prompt the run recorded in its config.toml (`--prompt` / `--max_length`
override them), in eval mode without gradients. For the numbers of a run's last epoch, load the model in the
precision it trained in (`--dtype float32` for a run with `--mixed_precision no`).

The output folder (never inside the dataset) holds:
- `scored.jsonl`: every image scored so far, in the order computed, one line each as it is done (flushed): an
  interrupted run continues from it (a last line cut short is dropped); an image whose caption changed since is
  scored again;
- `suspects.json`: what the scores are of (model, base model, dataset, prompt, max_length, dtype): a rerun with any
  of them changed is refused, `--overwrite` starts afresh;
- `suspects.jsonl` and `suspects.html`, written at the end: the `--top` highest-loss images, ranked, each with
  `{"rank", "image", "loss", "tokens", "caption_sha1", "caption", "model_caption"}` (sample_losses.jsonl's keys
  without the epoch, plus the rank, the caption and the model's own caption).
"""

from __future__ import annotations

import argparse
import collections
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from caption_train.data.scan import CAPTION_NOT_UTF8, EMPTY_CAPTION, UNREADABLE_CAPTION, UNREADABLE_IMAGE, Sample
from caption_train.errors import UserError
from caption_train.files import absolute_if_local, write_text_atomic
from caption_train.hooks import caption_sha1
from caption_train.sample_losses import relative_image
from caption_train.text import plural, printable

SCORED_FILE = "scored.jsonl"
META_FILE = "suspects.json"
SUSPECTS_JSONL = "suspects.jsonl"
SUSPECTS_HTML = "suspects.html"
DEFAULT_OUTPUT_DIR = "suspects"
DEFAULT_TOP = 100
SCORED_LINE_START = b'{"image": '  # how every scored.jsonl line starts: only such a torn last line is ours to cut
CAPTION_PROBLEMS = (EMPTY_CAPTION, CAPTION_NOT_UTF8, UNREADABLE_CAPTION)


@dataclass
class Scored:
    """One image's loss under the model, and the model's own caption of it."""

    image: str  # relative to the dataset folder
    loss: float
    tokens: int
    caption_sha1: str
    caption: str
    model_caption: str

    def record(self) -> dict[str, Any]:
        return {"image": self.image, "loss": self.loss, "tokens": self.tokens, "caption_sha1": self.caption_sha1,
                "caption": self.caption, "model_caption": self.model_caption}


@dataclass
class Tally:
    """What the run skipped, for the last lines."""

    unreadable: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (image, why the model's collate refused its caption)


# ---------------------------------------------------------------------------------------------
# the losses


@torch.no_grad()
def score_batch(model: torch.nn.Module, processor: Any, family: Any, images: Sequence[Any], captions: Sequence[str], *,
                max_length: int, prompt: str | None) -> list[tuple[float, int]]:
    """Each (image, caption)'s (mean token cross-entropy over its targets, target count), unsmoothed, through the
    family's collate and caption_loss: the per-row numbers training keeps (CaptionLoss.row_loss_sum / row_tokens)."""
    from caption_train.models.base import to_model

    batch = family.collate(processor, list(images), list(captions), max_length=max_length, prompt=prompt)
    result = family.caption_loss(model, to_model(batch, model))
    sums, tokens = result.row_loss_sum.tolist(), result.row_tokens.tolist()
    return [(total / count if count else math.nan, count) for total, count in zip(sums, tokens)]


def score_samples(model: torch.nn.Module, processor: Any, family: Any, samples: Sequence[Sample], root: Path, *, max_length: int,
                  prompt: str | None, batch_size: int, num_workers: int, max_new_tokens: int, out: Any, tally: Tally,
                  progress: tqdm | None = None) -> int:
    """Score `samples` batch by batch (eval mode), writing each as a scored.jsonl line to `out` as it is done;
    return how many were scored. Images that cannot be read, and captions the model's collate refuses, are counted
    in `tally`."""
    from caption_train.captioning import GenerationOptions, ImageFiles, _keep_list

    options = GenerationOptions(max_new_tokens=max_new_tokens, prompt=prompt)
    loader = torch.utils.data.DataLoader(ImageFiles([s.image_path for s in samples]), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_keep_list, shuffle=False)
    model.eval()
    done = 0
    for batch in loader:
        loaded = []
        for index, image, error in batch:
            if image is None:
                tally.unreadable.append(relative_image(str(samples[index].image_path), root))
                tqdm.write(f"skipped unreadable image {printable(str(samples[index].image_path))}: {error}", file=sys.stderr)
            else:
                loaded.append((samples[index], image))
        losses = _losses(model, processor, family, loaded, max_length=max_length, prompt=prompt, root=root, tally=tally)
        kept = [(sample, image, loss) for (sample, image), loss in zip(loaded, losses) if loss is not None]
        texts = family.generate(model, processor, [image for _, image, _ in kept], **options.generate_kwargs(), prompt=prompt) if kept else []
        for (sample, _, (loss, tokens)), text in zip(kept, texts):
            line = Scored(relative_image(str(sample.image_path), root), loss, tokens, caption_sha1(sample.caption), sample.caption, text)
            out.write(json.dumps(line.record(), ensure_ascii=False) + "\n")
            done += 1
        out.flush()  # a whole batch's lines at once: an interruption loses at most the batch in progress
        if progress is not None:
            progress.update(len(batch))
    return done


def _losses(model: torch.nn.Module, processor: Any, family: Any, loaded: list[tuple[Sample, Any]], *, max_length: int,
            prompt: str | None, root: Path, tally: Tally) -> list[tuple[float, int] | None]:
    """The batch's losses; where the family's collate refuses a caption (one that tokenizes to nothing, one with no
    room after the prompt), the others one by one and that one counted (None in its place)."""
    if not loaded:
        return []
    try:
        return score_batch(model, processor, family, [i for _, i in loaded], [s.caption for s, _ in loaded], max_length=max_length, prompt=prompt)
    except UserError:
        pass
    results: list[tuple[float, int] | None] = []
    for sample, image in loaded:
        try:
            results += score_batch(model, processor, family, [image], [sample.caption], max_length=max_length, prompt=prompt)
        except UserError as error:
            tally.refused.append((relative_image(str(sample.image_path), root), str(error)))
            results.append(None)
    return results


def ranked(scored: Sequence[Scored]) -> list[Scored]:
    """Highest loss first; a non-finite loss (a broken sample) before every finite one; ties by path."""
    return sorted(scored, key=lambda s: (0, 0.0, s.image) if not math.isfinite(s.loss) else (1, -s.loss, s.image))


# ---------------------------------------------------------------------------------------------
# the output folder: what it is of, what is done, the ranked files


def settings(model: str, base_model: str | None, dataset: Path, prompt: str | None, max_length: int, dtype: torch.dtype) -> dict[str, Any]:
    """What the scores in an output folder are of: another value of any of these gives other numbers."""
    return {"model": absolute_if_local(model), "base_model": absolute_if_local(base_model), "dataset": str(dataset.resolve()),
            "prompt": prompt, "max_length": max_length, "dtype": str(dtype).removeprefix("torch.")}


def check_output_dir(out_dir: Path, dataset: Path) -> None:
    """Never write into the dataset folder (its files are training data, and a run would scan ours)."""
    resolved, root = out_dir.expanduser().resolve(), dataset.resolve()
    if resolved == root or resolved.is_relative_to(root):
        raise UserError(f"--output_dir {out_dir}: inside DATASET_DIR {dataset}; suspects never writes into the dataset, pass a folder outside it")
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"--output_dir {out_dir}: is a file; pass a folder")


def check_same_settings(out_dir: Path, wanted: dict[str, Any]) -> None:
    """Refuse to continue an output folder scored with other settings (the ranking would mix two models)."""
    path = out_dir / META_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (out_dir / SCORED_FILE).exists():
            raise UserError(f"--output_dir {out_dir}: holds {SCORED_FILE} but no {META_FILE}; pass another --output_dir, or --overwrite to start afresh") from None
        return
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read it ({error}); pass another --output_dir, or --overwrite to start afresh") from None
    changed = [key for key in wanted if recorded.get(key) != wanted[key]]
    if changed:
        details = ", ".join(f"{key} {recorded.get(key)!r} there, {wanted[key]!r} now" for key in changed)
        raise UserError(f"--output_dir {out_dir}: holds the losses of another run ({details}); pass another --output_dir, or --overwrite to start afresh")


def read_scored(path: Path) -> dict[str, Scored]:
    """scored.jsonl's lines by image (a later line wins: an image scored again after its caption changed). A last
    line cut short by an interruption is cut off the file; any other bad line means the file is not ours."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    scored: dict[str, Scored] = {}
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            record = json.loads(line)
            row = Scored(**record) if line.endswith(b"\n") and isinstance(record, dict) else None
        except (ValueError, TypeError):
            row = None
        if row is None:
            if offset + len(line) == len(data) and line.startswith(SCORED_LINE_START):
                os.truncate(path, offset)  # our last line, cut short: that image is scored again
                break
            raise UserError(f"{path}:{number}: not a line suspects writes; pass another --output_dir, or --overwrite to start afresh")
        scored[row.image] = row
        offset += len(line)
    return scored


def ranked_records(rows: Sequence[Scored], top: int) -> list[dict[str, Any]]:
    """suspects.jsonl's records: the `top` highest losses (0: all), ranked from 1."""
    chosen = ranked(rows)[: top or None]
    return [{"rank": rank, **row.record()} for rank, row in enumerate(chosen, 1)]


def write_ranked(out_dir: Path, records: list[dict[str, Any]], *, root: Path, meta: dict[str, Any], scored: int, skipped: str,
                 thumbnails: int) -> Path:
    """suspects.jsonl and suspects.html (atomically); returns the page's path."""
    write_text_atomic(out_dir / SUSPECTS_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), errors="backslashreplace")
    page = render_html(records, root=root, meta=meta, scored=scored, skipped=skipped, out_dir=out_dir, thumbnails=thumbnails)
    write_text_atomic(out_dir / SUSPECTS_HTML, page, errors="backslashreplace")
    return out_dir / SUSPECTS_HTML


_PAGE_STYLE = """
td.pred{min-width:12em;max-width:36em} .match{color:#383} .note{color:#666;font-size:12px}
"""

_PAGE_SCRIPT = """
document.getElementById('filter').addEventListener('input', e => {
  const q = e.target.value.toLowerCase();
  [...document.getElementById('items').tBodies[0].rows].forEach(r => { r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none'; });
});
"""


def render_html(records: list[dict[str, Any]], *, root: Path, meta: dict[str, Any], scored: int, skipped: str, out_dir: Path, thumbnails: int) -> str:
    """One self-contained page, highest loss first: rank, thumbnail, the caption (and file), the model's caption,
    the loss. The table becomes cards on a phone (evaluate's report style)."""
    from caption_train.evaluate import _STYLE, _image_cell, _prediction_html

    esc = html.escape
    rows = []
    for r in records:
        same = " ".join(r["model_caption"].lower().split()) == " ".join(r["caption"].lower().split())
        model = _prediction_html(r["model_caption"]) + (' <span class="note match">(the same)</span>' if same else "")
        rows.append(
            f'<tr data-file="{esc(r["image"], quote=True)}"><td class="num rank" data-v="{r["rank"]}">{r["rank"]}</td>'
            f'<td class="thumb">{_image_cell(root / r["image"], out_dir, thumbnails)}</td>'
            f'<td class="text"><div class="ref">{esc(r["caption"])}</div><div class="file">{esc(r["image"])}</div></td>'
            f'<td class="pred">{model}</td>'
            f'<td class="num score" data-label="loss" data-v="{r["loss"]:.6f}">{r["loss"]:.3f}</td></tr>')
    shown = f"the {len(records)} highest" if len(records) < scored else f"all {len(records)}"
    where = f"{meta['model']} on {meta['dataset']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>caption-train suspects: {esc(str(meta['model']))}</title><style>{_STYLE}{_PAGE_STYLE}</style></head>
<body>
<h1>Captions to check first</h1>
<div class="meta">{esc(where)}: {shown} of {plural(scored, 'image')} by caption loss (mean token cross-entropy of the caption under the model; high = the model finds this caption unlikely for its image){esc(skipped)}.</div>
<div class="controls"><input id="filter" placeholder="filter by text or file name"></div>
<table id="items"><thead><tr><th>#</th><th>image</th><th>caption</th><th>model's caption</th><th>loss</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_PAGE_SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from caption_train.captioning import add_model_arguments, command_parser
    from caption_train.evaluate import THUMBNAIL_SIZE

    parser = command_parser("caption-train suspects", "Rank DATASET_DIR's captions by their loss under MODEL, highest first: the captions to check first "
                            "(suspects.jsonl and suspects.html in the output folder).")
    parser.add_argument("model", metavar="MODEL", help="a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder of images with .txt captions beside them (or a metadata.jsonl); only read")
    parser.add_argument("--output_dir", default=None, help=f"where the results go (default: {DEFAULT_OUTPUT_DIR}/<model>-on-<dataset folder name>/ here; "
                        "never inside DATASET_DIR); an existing one is continued")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"how many of the highest-loss images suspects.jsonl and suspects.html show (0 = all; default: {DEFAULT_TOP}); every image is scored")
    parser.add_argument("--overwrite", action="store_true", help="start the output folder afresh instead of continuing it")
    parser.add_argument("--prompt", default=None, help="the prompt the model was trained with (default: the one a run recorded in its config.toml, else the family's own)")
    parser.add_argument("--max_length", type=int, default=None, help="caption tokens kept, as in training (default: the run's recorded max_length, else the trainer's default)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per batch (default: 16)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding images (0 = in this process; default: 2)")
    parser.add_argument("--max_new_tokens", type=int, default=40, help="longest model caption in tokens (default: 40)")
    parser.add_argument("--thumbnail_size", type=int, default=THUMBNAIL_SIZE, help=f"thumbnail size in suspects.html, 0 for links only (default: {THUMBNAIL_SIZE})")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def recorded_config(model: str) -> dict[str, Any]:
    """The config.toml a run saved beside its checkpoint (empty for a model without one)."""
    import tomllib

    path = Path(model).expanduser() / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def problems_of(args: argparse.Namespace) -> list[str]:
    found = []
    for name, lowest in (("top", 0), ("batch_size", 1), ("num_workers", 0), ("max_new_tokens", 1), ("thumbnail_size", 0)):
        if getattr(args, name) < lowest:
            found.append(f"--{name} must be >= {lowest}, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 2:
        found.append(f"--max_length must be >= 2, got {args.max_length}")
    return found


def default_output_dir(model: str, dataset: Path) -> Path:
    from caption_train.evaluate import model_label

    return Path(DEFAULT_OUTPUT_DIR) / f"{model_label(model)}-on-{dataset.resolve().name}"


def load_samples(dataset_dir: str) -> tuple[Path, list[Sample], Any]:
    """(root, samples, scan) of DATASET_DIR, with errors naming the argument and the folder."""
    from caption_train.data.scan import scan_dataset

    if not dataset_dir.strip():
        raise UserError("DATASET_DIR is empty; pass a folder of images with .txt captions")
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"DATASET_DIR {dataset_dir}: {'is a file, not a directory' if root.exists() else 'no such directory'}; pass a folder of images with .txt captions")
    try:
        scan = scan_dataset(root)
    except UserError as err:
        raise UserError(str(err).replace("--dataset_dir", "DATASET_DIR", 1)) from None
    return root, scan.samples, scan


def main(argv: list[str] | None = None) -> int:
    from caption_train.captioning import load_model_for_command
    from caption_train.config import TrainConfig
    from caption_train.inference import pick_device, pick_dtype, resolve_model_source
    from caption_train.models import resolve_family

    args = parse_args(argv)
    if problems := problems_of(args):
        raise UserError("; ".join(problems))
    root, samples, scan = load_samples(args.dataset_dir)  # local checks first: a typo should not wait on the hub
    out_dir = Path(args.output_dir).expanduser() if args.output_dir else default_output_dir(args.model, root)
    check_output_dir(out_dir, root)
    source = resolve_model_source(args.model, base_model=args.base_model)
    print(scan.summary(), flush=True)

    family, _ = resolve_family(source.base or source.path)
    recorded = recorded_config(args.model)
    given = args.prompt if args.prompt is not None else recorded.get("prompt")
    prompt = family.training_prompt(given if isinstance(given, str) else None)
    max_length = args.max_length or int(recorded.get("max_length", TrainConfig.max_length))
    dtype = pick_dtype(args.dtype, pick_device(args.device))
    wanted = settings(args.model, args.base_model, root, prompt, max_length, dtype)
    scored_path = out_dir / SCORED_FILE
    if args.overwrite:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(scored_path, "")
    else:
        check_same_settings(out_dir, wanted)
    done = read_scored(scored_path)
    current = {relative_image(str(s.image_path), root): s for s in samples}
    todo = [s for rel, s in current.items() if rel not in done or done[rel].caption_sha1 != caption_sha1(s.caption)]

    tally = Tally()
    start = time.perf_counter()
    if todo:
        model, processor, family, device = load_model_for_command(args)
        max_length = min(max_length, family.max_text_length(model))
        origin = "--prompt" if args.prompt is not None else f"recorded in {Path(args.model) / 'config.toml'}" if isinstance(recorded.get("prompt"), str) else ""
        print(family.prompt_line(prompt, origin), flush=True)
        kept = len(current) - len(todo)
        print(f"scoring {plural(len(todo), 'image')} with {args.model} on {device}" + (f" ({kept} already in {scored_path})" if kept else ""), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / META_FILE, json.dumps(wanted, indent=1) + "\n")
        progress = tqdm(total=len(todo), desc="scoring", unit="img", file=sys.stderr, dynamic_ncols=True)
        try:
            with scored_path.open("a", encoding="utf-8") as out:
                score_samples(model, processor, family, todo, root, max_length=max_length, prompt=prompt, batch_size=args.batch_size,
                              num_workers=args.num_workers, max_new_tokens=args.max_new_tokens, out=out, tally=tally, progress=progress)
                os.fsync(out.fileno())
        finally:
            progress.close()
        done = read_scored(scored_path)
    else:
        print(f"nothing left to score: all {plural(len(current), 'image')} are in {scored_path} (pass --overwrite to score them again)", flush=True)

    rows = [done[rel] for rel, sample in current.items() if rel in done and done[rel].caption_sha1 == caption_sha1(sample.caption)]
    if not rows:
        raise UserError(f"DATASET_DIR {args.dataset_dir}: none of the {plural(len(samples), 'image')} could be scored" + _why(tally))
    skipped = skipped_note(scan.skipped, tally)
    records = ranked_records(rows, args.top)
    page = write_ranked(out_dir, records, root=root, meta=wanted, scored=len(rows), skipped=skipped, thumbnails=args.thumbnail_size)
    seconds = time.perf_counter() - start
    print(f"{plural(len(rows), 'image')} ranked by caption loss ({seconds:.1f} s){skipped}; the highest:", flush=True)
    for record in records[:5]:
        print(f"  {record['rank']}. {printable(record['image'])} {record['loss']:.3f}: {record['caption']!r} (model: {record['model_caption']!r})", flush=True)
    print(out_dir / SUSPECTS_JSONL, flush=True)
    print(page, flush=True)  # the last line: the page to open
    return 0


def skipped_note(skipped: Any, tally: Tally) -> str:
    """"; not ranked: 2 with an empty or unreadable caption, 1 unreadable image" (empty when nothing was skipped)."""
    parts = []
    if captions := sum(skipped[reason] for reason in CAPTION_PROBLEMS):
        parts.append(f"{captions} with an empty or unreadable caption")
    if images := len(tally.unreadable) + skipped.get(UNREADABLE_IMAGE, 0):
        parts.append(f"{plural(images, 'unreadable image')}")
    if tally.refused:
        parts.append(f"{len(tally.refused)} whose caption the model's collate refused (e.g. {tally.refused[0][0]}: {tally.refused[0][1]})")
    return "; not ranked: " + ", ".join(parts) if parts else ""


def _why(tally: Tally) -> str:
    return f" ({skipped_note(collections.Counter(), tally).removeprefix('; not ranked: ')})" if tally.unreadable or tally.refused else ""
