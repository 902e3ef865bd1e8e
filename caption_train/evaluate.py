"""The `evaluate` command: caption a folder of captioned images, score against the .txt captions, write a report.

    caption-train evaluate runs/x-20261126-141500/final heldout/       # prints a table; writes report.json + report.html
    caption-train evaluate Salesforce/blip-image-captioning-base heldout/ --output_dir evaluations

In Python (the trainer and the merge sweep use these):

    result = evaluate_samples(model, processor, family, samples, GenerationOptions(), batch_size=16)
    result.metrics                       # {"bleu4": ..., "rougeL": ..., "cider": ..., "exact_match": ..., ...}
    write_report(out_dir, result, model="...", dataset="...")
    record_samples(run_dir, rows, epoch=3, step=120)     # probe panel -> samples.jsonl + samples.html

Scores are from `caption_train.metrics` (0-100 scale). Generation runs in eval mode without gradients.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from caption_train.captioning import GenerationOptions, generate_captions
from caption_train.data.scan import Sample
from caption_train.errors import UserError
from caption_train.files import absolute_if_local, write_text_atomic
from caption_train.text import plural
from caption_train.metrics import ITEM_LABELS, METRIC_LABELS, score_captions
from caption_train.models import ModelFamily

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SAMPLES_JSONL = "samples.jsonl"
SAMPLES_HTML = "samples.html"
THUMBNAIL_SIZE = 128

# ---------------------------------------------------------------------------- generate + score


@dataclass
class EvalItem:
    image: Path
    reference: str
    prediction: str
    scores: dict[str, float]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    items: list[EvalItem]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


def score_predictions(predictions: Sequence[str], references: Sequence[str], *, tags: bool | None = None) -> dict[str, float]:
    """Corpus metrics for predictions vs references (keys of metrics.METRIC_LABELS; tag_* only for tag captions)."""
    return score_captions(predictions, references, tags=tags).corpus


def evaluate_samples(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: Sequence[Sample],
    options: GenerationOptions | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    tags: bool | None = None,
) -> EvalResult:
    """Caption every sample's image and score it against the sample's caption. Unreadable images are left out."""
    options = options or GenerationOptions()
    bar = tqdm(total=len(samples), desc="evaluating", unit="img", file=sys.stderr, dynamic_ncols=True) if progress else None
    start = time.perf_counter()
    predictions: dict[int, str] = {}
    unreadable = []
    try:
        for item in generate_captions(model, processor, family, [s.image_path for s in samples], options, batch_size=batch_size, num_workers=num_workers, progress=bar):
            if item.text is None:
                unreadable.append((item.path, item.error or "unreadable"))
            else:
                predictions[item.index] = item.text
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    kept = [i for i in range(len(samples)) if i in predictions]
    scores = score_captions([predictions[i] for i in kept], [samples[i].caption for i in kept], tags=tags)
    items = [EvalItem(samples[i].image_path, samples[i].caption, predictions[i], item_scores) for i, item_scores in zip(kept, scores.items)]
    return EvalResult(metrics=scores.corpus, items=items, unreadable=unreadable, seconds=seconds, options=options.describe())


def validation_scores(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    samples: Sequence[Sample],
    options: GenerationOptions | None = None,
    *,
    batch_size: int = 16,
    accelerator: Any = None,
    prefix: str = "val/",
) -> dict[str, float]:
    """Generation metrics on `samples` for the training loop: {"val/bleu4", "val/rougeL", "val/cider", ...}.

    Pass the unwrapped model. With an `accelerator` this is collective (every process must call it): each process
    captions its share of the samples under autocast, predictions are gathered, and every process gets the metrics.
    Eval mode and no_grad inside; the model's training mode is restored.
    """
    import contextlib

    options = options or GenerationOptions()
    indices = list(range(len(samples)))
    several = accelerator is not None and accelerator.num_processes > 1
    split = accelerator.split_between_processes(indices) if several else contextlib.nullcontext(indices)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with split as shard, autocast:
        paths = [samples[i].image_path for i in shard]
        mine = [(shard[c.index], c.text) for c in generate_captions(model, processor, family, paths, options, batch_size=batch_size)]
    if several:
        from accelerate.utils import gather_object

        mine = gather_object(mine)  # every process's (index, caption) pairs, on every process
    pairs = [(i, text) for i, text in sorted(mine) if text is not None]
    if not pairs:
        return {}
    metrics = score_predictions([text for _, text in pairs], [samples[i].caption for i, _ in pairs])
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def format_table(rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """A plain-text table: one row per (label, metrics), one column per metric any row has."""
    keys = [k for k in METRIC_LABELS if any(k in metrics for _, metrics in rows)]
    first = max([len("model")] + [len(label) for label, _ in rows])
    header = f"{'':<{first}}  " + "  ".join(f"{METRIC_LABELS[k]:>13}" for k in keys)
    lines = [header]
    for label, metrics in rows:
        cells = "  ".join(f"{metrics[k]:>13.2f}" if k in metrics else f"{'-':>13}" for k in keys)
        lines.append(f"{label:<{first}}  {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report files


def thumbnail_data_uri(path: str | os.PathLike, size: int = THUMBNAIL_SIZE) -> str | None:
    """A small JPEG of the image as a data: URI (so the report is one portable file), or None if it cannot be read."""
    from caption_train.data.images import ImageLoadError, load_rgb

    try:
        image = load_rgb(path)
    except ImageLoadError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def write_report(out_dir: Path, result: EvalResult, *, model: str, dataset: str | os.PathLike, thumbnails: int = THUMBNAIL_SIZE) -> tuple[Path, Path]:
    """Write report.json and report.html into `out_dir` (created if needed); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(dataset)
    data = {
        "model": absolute_if_local(model),  # absolute: the report must name the same folders wherever it is read
        "dataset": absolute_if_local(str(dataset)),
        "images": len(result.items),
        "unreadable": [{"file_name": _relative(p, root), "reason": r} for p, r in result.unreadable],
        "seconds": round(result.seconds, 3),
        "generation": result.options,
        "metrics": result.metrics,
        "items": [{"file_name": _relative(i.image, root), "reference": i.reference, "prediction": i.prediction, "scores": i.scores} for i in result.items],
    }
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    # File names need not be valid UTF-8 (they reach us as surrogate escapes); never fail over one.
    write_text_atomic(html_path, render_report_html(result, model=model, dataset=root, out_dir=out_dir, thumbnails=thumbnails), errors="backslashreplace")
    return json_path, html_path


# Both pages: a table on wide screens; under 640 px (a phone, upright) each row becomes a card, as on the interactive
# page: thumbnail and caption side by side, the model's caption below at full width, scores as labelled chips, the
# sortable headers as a row of buttons. Long tags and file names break anywhere rather than widen the page.
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;margin-bottom:16px} h1,.meta,.ref,.pred,.file{overflow-wrap:anywhere}
table{border-collapse:collapse} th,td{padding:4px 8px;border-bottom:1px solid #e4e4e4;vertical-align:middle;text-align:left}
th{background:#f6f6f6;position:sticky;top:0} th.sort{cursor:pointer;user-select:none} th.sort:hover{background:#eaeaea}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.metrics{display:flex;flex-wrap:wrap;gap:6px 24px;margin:8px 0} .metric{display:flex;flex-direction:column}
.metric .label{color:#666;font-size:12px} .metric .value{font-size:18px;font-variant-numeric:tabular-nums}
img{display:block;max-width:128px;max-height:128px;border-radius:3px} .file{color:#666;font-size:12px}
.ref{color:#225} .pred{color:#000;font-weight:500} .empty{color:#888;font-style:italic;font-weight:400}
.controls{margin:12px 0} input{padding:4px 8px;width:280px;max-width:100%;box-sizing:border-box}
@media (max-width:640px){
  body{margin:12px} h1{font-size:17px} .controls input{width:100%}
  table,tbody{display:block} thead tr{display:flex;flex-wrap:wrap;gap:6px}
  th{position:static;border:1px solid #ddd;border-radius:12px;padding:2px 10px;font-weight:500} th:not(.sort){display:none}
  tbody tr{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px 10px;padding:10px 0;border-bottom:1px solid #e4e4e4}
  tbody td{border:0;padding:0} td img{max-width:96px;max-height:96px}
  td.text{flex:1 1 0;min-width:0} td.pred,td.history{flex:1 1 100%;min-width:0;max-width:none}
  td.rank,td.score{order:1;padding:1px 6px;border-radius:3px;font-size:12px} td.rank::before{content:"#"}
  td.score::before{content:attr(data-label) " ";color:#555}
}
"""

_SCRIPT = """
const table = document.getElementById('items'), body = table.tBodies[0], sorted = document.getElementById('sorted');
// The line above the table says what the order is, so it must follow every click.
const describe = (th, asc) => {
  if (th.cellIndex === 0) return asc ? 'Sorted worst first by CIDEr-D' : 'Sorted best first by CIDEr-D';
  const numeric = body.rows.length > 0 && body.rows[0].cells[th.cellIndex].dataset.v !== undefined;
  return 'Sorted by ' + th.textContent + ', ' + (numeric ? (asc ? 'lowest first' : 'highest first') : (asc ? 'A to Z' : 'Z to A'));
};
table.querySelectorAll('th.sort').forEach((th, _) => th.addEventListener('click', () => {
  const col = th.cellIndex, asc = th.dataset.dir !== 'asc';
  table.querySelectorAll('th.sort').forEach(h => { h.dataset.dir = ''; h.textContent = h.textContent.replace(/ [▲▼]$/, ''); });
  sorted.textContent = describe(th, asc);
  th.dataset.dir = asc ? 'asc' : 'desc'; th.textContent += asc ? ' ▲' : ' ▼';
  const key = r => { const c = r.cells[col]; return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent.toLowerCase(); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
document.getElementById('filter').addEventListener('input', e => {
  const q = e.target.value.toLowerCase();
  [...body.rows].forEach(r => { r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none'; });
});
"""


def _score_color(value: float) -> str:
    """Red (0) to green (100) background, pale so text stays readable."""
    hue = max(0.0, min(value, 100.0)) * 1.2
    return f"hsl({hue:.0f},70%,88%)"


def _image_cell(path: Path, out_dir: Path, thumbnails: int) -> str:
    href = html.escape(os.path.relpath(path.resolve(), out_dir.resolve()).replace(os.sep, "/"), quote=True)
    uri = thumbnail_data_uri(path, thumbnails) if thumbnails else None
    inner = f'<img src="{uri}" alt="">' if uri else "(open)"
    return f'<a href="{href}">{inner}</a>'


def _prediction_html(text: str) -> str:
    """A model's caption, escaped; an empty one shows as "(empty)", set apart from captions that say so."""
    return html.escape(text) if text.strip() else '<span class="empty">(empty)</span>'


def render_report_html(result: EvalResult, *, model: str, dataset: Path, out_dir: Path, thumbnails: int = THUMBNAIL_SIZE) -> str:
    """One self-contained page: corpus metrics, then every item worst-first by CIDEr-D, sortable by any column."""
    esc = html.escape
    metric_keys = [k for k in METRIC_LABELS if k in result.metrics]
    item_keys = [k for k in ITEM_LABELS if result.items and k in result.items[0].scores]
    order = sorted(range(len(result.items)), key=lambda i: tuple(result.items[i].scores.get(k, 0.0) for k in ("cider", "rougeL", "bleu")))
    rows = []
    for rank, i in enumerate(order, 1):
        item = result.items[i]
        cells = "".join(
            f'<td class="num score" data-label="{ITEM_LABELS[k]}" data-v="{item.scores[k]:.6f}" style="background:{_score_color(item.scores[k])}">'
            + (("✓" if item.scores[k] else "✗") if k == "exact_match" else f"{item.scores[k]:.1f}")
            + "</td>"
            for k in item_keys
        )
        rows.append(
            f'<tr data-file="{esc(_relative(item.image, dataset), quote=True)}"><td class="num rank" data-v="{rank}">{rank}</td>'
            f'<td class="thumb">{_image_cell(item.image, out_dir, thumbnails)}</td>'
            f'<td class="text"><div class="ref">{esc(item.reference)}</div><div class="file">{esc(_relative(item.image, dataset))}</div></td>'
            f'<td class="pred">{_prediction_html(item.prediction)}</td>{cells}</tr>'
        )
    unreadable = "".join(f"<li>{esc(_relative(p, dataset))}: {esc(r)}</li>" for p, r in result.unreadable)
    options = ", ".join(f"{k}={v}" for k, v in result.options.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>caption-train evaluation: {esc(model)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(model)} on {esc(str(dataset))}</h1>
<div class="meta">{len(result.items)} images captioned in {result.seconds:.1f} s; {esc(options)}. Scores 0-100 (CIDEr-D x100, can exceed 100).</div>
<div class="metrics">{"".join(f'<div class="metric"><span class="label">{METRIC_LABELS[k]}</span><span class="value">{result.metrics[k]:.2f}</span></div>' for k in metric_keys)}</div>
{f"<p>Unreadable images, not scored:</p><ul>{unreadable}</ul>" if unreadable else ""}
<div class="controls"><input id="filter" placeholder="filter by text or file name"> <span id="sorted">Sorted worst first by CIDEr-D</span>; click a column to sort.</div>
<table id="items"><thead><tr><th class="sort">#</th><th>image</th><th class="sort">reference</th><th class="sort">prediction</th>
{"".join(f'<th class="sort">{ITEM_LABELS[k]}</th>' for k in item_keys)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------------------- training: the probe panel


def record_samples(run_dir: Path, rows: Sequence[dict[str, Any]], *, epoch: int, step: int) -> Path:
    """Add the probe panel's captions for `epoch` (rows of {"image", "truth", "prediction"}) to samples.jsonl and
    redraw samples.html, which shows each probe image's caption epoch by epoch. Returns the HTML path.

    Rows already there for this epoch or later are dropped first (a resumed run repeats those epochs), so the file
    always reads as one clean history. It is small (a few images per epoch) and rewritten atomically.
    """
    path = run_dir / SAMPLES_JSONL
    kept = [r for r in read_samples(run_dir) if r["epoch"] < epoch]
    new = [{"epoch": epoch, "step": step, "image": str(row["image"]), "truth": row["truth"], "prediction": row["prediction"]} for row in rows]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept + new))
    return write_samples_html(run_dir)


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / SAMPLES_JSONL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


_SAMPLES_STYLE = """
tbody td{vertical-align:top} td.pred{min-width:16em;max-width:40em} td.history{min-width:12em;max-width:40em}
.match{background:hsl(120,70%,88%)} summary{cursor:pointer;color:#446} ol{margin:4px 0;padding-left:0;list-style:none}
ol li{padding:1px 4px;border-radius:3px} .ep{display:inline-block;min-width:5.5em;color:#666;font-size:12px;font-variant-numeric:tabular-nums}
"""

# Shows the chosen epoch's caption in every row (the page works without it too: it then shows the latest).
_SAMPLES_SCRIPT = """
document.getElementById('epoch').addEventListener('change', e => {
  const epoch = e.target.value;
  document.querySelectorAll('td.pred').forEach(td => {
    let shown = false;
    td.querySelectorAll('[data-epoch]').forEach(el => { el.hidden = el.dataset.epoch !== epoch; shown ||= !el.hidden; });
    td.querySelector('.none').hidden = shown;
  });
});
"""


def _same_caption(prediction: str, truth: str) -> bool:
    return " ".join(prediction.lower().split()) == " ".join(truth.lower().split())


def _samples_row(image: str, truth: str, history: list[dict[str, Any]], latest: int, run_dir: Path, thumbnails: int) -> str:
    """One probe image: thumbnail, caption, the model's caption at the shown epoch, and its history on demand."""
    esc = html.escape

    def match_class(r: dict[str, Any]) -> str:
        return ' class="match"' if _same_caption(r["prediction"], truth) else ""

    shown = [f'<div data-epoch="{r["epoch"]}"{match_class(r)}{"" if r["epoch"] == latest else " hidden"}>{_prediction_html(r["prediction"])}</div>' for r in history]
    has_latest = any(r["epoch"] == latest for r in history)
    shown.append(f'<div class="none"{" hidden" if has_latest else ""}>(not captioned that epoch)</div>')
    items = "".join(
        f'<li{match_class(r)}><span class="ep">epoch {r["epoch"]}</span>{_prediction_html(r["prediction"])}</li>' for r in reversed(history)
    )
    first = next((r["epoch"] for r in history if _same_caption(r["prediction"], truth)), None)
    summary = f"{len(history)} epochs" + (f"; first right at epoch {first}" if first is not None else "")
    return (f'<tr data-file="{esc(image, quote=True)}"><td class="thumb">{_image_cell(Path(image), run_dir, thumbnails)}</td>'
            f'<td class="text"><div class="ref">{esc(truth)}</div><div class="file">{esc(Path(image).name)}</div></td>'
            f'<td class="pred">{"".join(shown)}</td>'
            f'<td class="history"><details><summary>{esc(summary)}</summary><ol>{items}</ol></details></td></tr>')


def write_samples_html(run_dir: Path, thumbnails: int = THUMBNAIL_SIZE) -> Path:
    """Render samples.jsonl as one row per probe image: thumbnail, caption, the model's caption at the latest
    epoch (a selector picks another), and the image's whole history in a fold. Four columns however many epochs
    (one column per epoch squeezed a 40-epoch run to a word per line)."""
    esc = html.escape
    records = read_samples(run_dir)
    epochs = sorted({r["epoch"] for r in records})
    latest = epochs[-1] if epochs else 0
    steps = {r["epoch"]: r["step"] for r in records}
    images: dict[str, dict[str, Any]] = {}
    for r in records:
        entry = images.setdefault(r["image"], {"truth": r["truth"], "history": []})
        entry["truth"] = r["truth"]  # the latest truth: captions may be fixed between epochs
        entry["history"].append(r)
    rows = [_samples_row(image, entry["truth"], sorted(entry["history"], key=lambda r: r["epoch"]), latest, run_dir, thumbnails)
            for image, entry in images.items()]
    options = "".join(f'<option value="{e}"{" selected" if e == latest else ""}>epoch {e} (step {steps[e]})</option>' for e in reversed(epochs))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>caption-train samples: {esc(run_dir.name)}</title><style>{_STYLE}{_SAMPLES_STYLE}</style></head>
<body><h1>{esc(run_dir.name)}: probe images by epoch</h1>
<div class="meta">The same images every epoch; green = prediction equals the caption. Source: {SAMPLES_JSONL}.</div>
<div class="controls"><label>model's caption at <select id="epoch">{options}</select></label> ({len(epochs)} epochs; open a row's history for every epoch)</div>
<table id="samples"><thead><tr><th>image</th><th>caption</th><th>model</th><th>history</th></tr></thead>
<tbody>{chr(10).join(rows)}</tbody></table>
<script>{_SAMPLES_SCRIPT}</script></body></html>
"""
    write_text_atomic(run_dir / SAMPLES_HTML, page, errors="backslashreplace")
    return run_dir / SAMPLES_HTML


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    from caption_train.captioning import command_parser, add_generation_arguments, add_model_arguments

    parser = command_parser("caption-train evaluate", "Caption DATASET_DIR's images and score them against their .txt captions.")
    parser.add_argument("model", metavar="MODEL", help="a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder of images with .txt captions beside them (or a metadata.jsonl)")
    parser.add_argument("--output_dir", default="evaluations", help="reports go to OUTPUT_DIR/eval-<model>-<timestamp>/ (default: evaluations)")
    parser.add_argument("--max_images", type=int, default=0, help="score only the first N images in sorted order (default: 0 = all)")
    parser.add_argument("--tags", choices=["auto", "on", "off"], default="auto", help="tag precision/recall/F1 of comma-separated captions (auto: when most captions have commas)")
    parser.add_argument("--thumbnail_size", type=int, default=THUMBNAIL_SIZE, help=f"thumbnail size in report.html, 0 for links only (default: {THUMBNAIL_SIZE})")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def load_eval_samples(dataset_dir: str, max_images: int = 0, label: str = "DATASET_DIR") -> tuple[Path, list[Sample], str]:
    """(root, samples, scan summary line) of an evaluation folder, with errors that name the argument."""
    from caption_train.data.scan import scan_dataset

    if not dataset_dir.strip():  # Path("") would silently mean the current directory
        raise UserError(f"{label} is empty; pass a folder of images with .txt captions")
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"{label} {dataset_dir}: {'is a file, not a directory' if root.exists() else 'no such directory'}; pass a folder of images with .txt captions")
    try:
        scan = scan_dataset(root)
    except UserError as err:
        raise UserError(str(err).replace("--dataset_dir", label, 1)) from None
    samples = scan.samples[:max_images] if max_images > 0 else scan.samples
    return root, samples, scan.summary()


def model_label(model: str) -> str:
    """A short name for report folders: runs/x-2026.../final -> x-2026...-final; org/name -> name."""
    path = Path(model)
    if path.name in ("final",) or path.name.startswith(("epoch-", "step-")):
        return f"{path.parent.name}-{path.name}"
    return path.name or "model"


def main(argv: list[str] | None = None) -> int:
    from caption_train.captioning import generation_options, load_model_for_command, prompt_origin
    from caption_train.checkpoint import new_run_dir
    from caption_train.inference import resolve_model_source

    args = parse_args(argv)
    options, problems = generation_options(args, model_dir=args.model)
    if args.max_images < 0:
        problems.append(f"--max_images must be >= 0, got {args.max_images}")
    if args.thumbnail_size < 0:
        problems.append(f"--thumbnail_size must be >= 0, got {args.thumbnail_size}")
    if problems:
        raise UserError("; ".join(problems))
    if not Path(args.dataset_dir).expanduser().is_dir():
        load_eval_samples(args.dataset_dir)  # raises the one-line error; local checks first, before the hub
    resolve_model_source(args.model, base_model=args.base_model)
    root, samples, summary = load_eval_samples(args.dataset_dir, args.max_images)
    print(summary, flush=True)

    model, processor, family, device = load_model_for_command(args)
    print(family.prompt_line(options.prompt, prompt_origin(args, args.model)), flush=True)
    torch.manual_seed(args.seed)
    tags = {"auto": None, "on": True, "off": False}[args.tags]
    result = evaluate_samples(model, processor, family, samples, options, batch_size=args.batch_size, num_workers=args.num_workers, progress=True, tags=tags)
    if not result.items:
        raise UserError(f"DATASET_DIR {args.dataset_dir}: none of the {plural(len(samples), 'image')} could be read")
    out_dir = new_run_dir(Path(args.output_dir), f"eval-{model_label(args.model)}")
    _, html_path = write_report(out_dir, result, model=args.model, dataset=root, thumbnails=args.thumbnail_size)
    rate = len(result.items) / result.seconds if result.seconds else 0.0
    print(f"{plural(len(result.items), 'image')} in {result.seconds:.1f} s ({rate:.1f} images/s) on {device}" + (f"; {len(result.unreadable)} unreadable, skipped" if result.unreadable else ""))
    print(format_table([(model_label(args.model), result.metrics)]))
    print(html_path, flush=True)  # the last line: the report to open
    return 0
