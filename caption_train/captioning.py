"""The `caption` command: caption every image under a folder with a trained model, `<image>.txt` beside each.

    caption-train caption runs/x-20261126-141500/final new_images/        # new_images/**/img.png -> img.txt
    caption-train caption runs/x/final new_images/ --output_jsonl captions.jsonl --num_beams 3
    caption-train caption Salesforce/blip-image-captioning-base photos/ --prompt "a photography of"

In Python, `generate_captions(model, processor, family, paths, GenerationOptions())` yields one `Captioned` per
path, in order; the evaluator and the merge sweep use it too. Images are decoded in DataLoader workers and
captioned in batches; unreadable images are reported and skipped, never fatal. An empty generation writes no
caption (a later run tries the image again) unless `--keep_empty`: an empty `.txt` would read as "done" to the next
run and as an empty caption to training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from caption_train.data.images import IMAGE_EXTENSIONS, ImageLoadError, is_image_file, load_rgb
from caption_train.data.scan import caption_path_for, walk_dataset
from caption_train.errors import UserError
from caption_train.files import write_text_atomic
from caption_train.text import plural
from caption_train.models import ModelFamily

# ---------------------------------------------------------------------------- decoding options


@dataclass
class GenerationOptions:
    """How captions are decoded. Greedy by default; sampling when temperature or top_p is set."""

    num_beams: int = 1
    max_new_tokens: int = 40
    min_length: int = 0  # minimum number of generated tokens (transformers' min_new_tokens)
    repetition_penalty: float = 1.0
    temperature: float | None = None
    top_p: float | None = None
    prompt: str | None = None  # text the caption starts from (conditional captioning); it is part of the output

    @property
    def sampling(self) -> bool:
        return self.temperature is not None or self.top_p is not None

    def problems(self) -> list[str]:
        found = []
        if self.num_beams < 1:
            found.append(f"--num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            found.append(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_length <= self.max_new_tokens:
            found.append(f"--min_length must be between 0 and --max_new_tokens ({self.max_new_tokens}), got {self.min_length}")
        if self.repetition_penalty <= 0:
            found.append(f"--repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.temperature is not None and self.temperature <= 0:
            found.append(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append(f"--top_p must be in (0, 1], got {self.top_p}")
        return found

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "do_sample": self.sampling}
        if self.min_length:
            kwargs["min_new_tokens"] = self.min_length
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in {**self.generate_kwargs(), "prompt": self.prompt}.items() if v is not None}


# ---------------------------------------------------------------------------- batched generation


@dataclass
class Captioned:
    index: int
    path: Path
    text: str | None  # None when the image could not be read
    error: str | None = None


class ImageFiles(torch.utils.data.Dataset):
    """(index, RGB image or None, error or None) per path: decoding happens in DataLoader workers."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            return index, load_rgb(self.paths[index]), None
        except ImageLoadError as err:
            return index, None, err.reason


def _keep_list(items: list) -> list:
    return items  # module-level: the default collate would try to stack PIL images


@torch.no_grad()
def generate_captions(
    model: torch.nn.Module,
    processor: Any,
    family: ModelFamily,
    paths: Sequence[str | os.PathLike],
    options: GenerationOptions | None = None,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: tqdm | None = None,
) -> Iterator[Captioned]:
    """Caption `paths` in order, `batch_size` at a time, in eval mode without gradients (training mode is restored)."""
    options = options or GenerationOptions()
    loader = torch.utils.data.DataLoader(ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_list, shuffle=False)
    kwargs = options.generate_kwargs()
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            loaded = [(index, image) for index, image, _ in batch if image is not None]
            texts = family.generate(model, processor, [image for _, image in loaded], prompt=options.prompt, **kwargs) if loaded else []
            by_index = {index: text for (index, _), text in zip(loaded, texts)}
            for index, _, error in batch:
                yield Captioned(index, Path(paths[index]), by_index.get(index), error)
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- the folder


def find_images(root: Path) -> list[Path]:
    """Images under `root`, recursively, sorted; hidden files and folders skipped (as the trainer's scan does)."""
    return [Path(dirpath, name) for dirpath, _, filenames in walk_dataset(root) for name in filenames if is_image_file(name)]


def check_images_dir(images_dir: str | os.PathLike, label: str = "IMAGES_DIR") -> tuple[Path, list[Path]]:
    if not os.fspath(images_dir).strip():  # Path("") would silently mean the current directory
        raise UserError(f"{label} is empty; pass the folder that holds the images")
    root = Path(images_dir).expanduser()
    if not root.exists():
        raise UserError(f"{label} {images_dir}: no such directory")
    if not root.is_dir():
        raise UserError(f"{label} {images_dir}: is a file, not a directory; pass the folder that holds the images")
    images = find_images(root)
    if not images:
        raise UserError(f"{label} {images_dir}: no images found (searched recursively for {' '.join(sorted(IMAGE_EXTENSIONS))}; hidden files and folders are skipped)")
    return root, images


@dataclass
class CaptionPlan:
    todo: list[Path]
    already_captioned: list[Path] = field(default_factory=list)  # a .txt exists, or a line in --output_jsonl
    name_clashes: list[Path] = field(default_factory=list)  # a.jpg when a.png already claims a.txt


def plan_captions(images: list[Path], *, overwrite: bool, to_jsonl: bool, root: Path | None = None, done: set[str] = frozenset()) -> CaptionPlan:
    """Which images to caption. For jsonl, `done` holds the file_names (relative to `root`) the file already has."""
    if to_jsonl:
        plan = CaptionPlan(todo=[])
        for image in images:
            (plan.already_captioned if jsonl_name(image, root) in done else plan.todo).append(image)
        return plan
    plan = CaptionPlan(todo=[])
    claimed: set[Path] = set()
    for image in images:
        target = caption_path_for(image)
        if target in claimed:
            plan.name_clashes.append(image)
        elif target.exists() and not overwrite:
            plan.already_captioned.append(image)
        else:
            plan.todo.append(image)
        claimed.add(target)
    return plan


# ---------------------------------------------------------------------------- --output_jsonl: append, resumable


# How every line we write starts; only such a last line is ours to repair.
JSONL_LINE_START = b'{"file_name": '


def jsonl_name(image: Path, root: Path | None) -> str:
    return image.relative_to(root).as_posix() if root is not None else image.as_posix()


def read_jsonl_done(jsonl: Path) -> set[str]:
    """file_names already in an --output_jsonl file; a half-written last line (a crash mid-write) is cut off.

    Any other line that is not a {"file_name", "text"} object means the file is not ours: refuse rather than append.
    """
    data = jsonl.read_bytes()
    done: set[str] = set()
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            row = json.loads(line)
            complete = line.endswith(b"\n") and isinstance(row, dict) and isinstance(row.get("file_name"), str)
        except ValueError:
            complete = False
        if not complete:
            if offset + len(line) == len(data) and line.startswith(JSONL_LINE_START):
                os.truncate(jsonl, offset)  # our last line, cut short by a crash: drop it, the image is captioned again
                break
            raise UserError(f"--output_jsonl {jsonl}: line {number} is not a {{\"file_name\", \"text\"}} object; pass another file, or --overwrite to replace it")
        done.add(row["file_name"])
        offset += len(line)
    return done


def open_jsonl(jsonl: Path, *, overwrite: bool) -> Any:
    """The --output_jsonl file opened for appending (emptied first with --overwrite; its mode is kept)."""
    try:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and jsonl.exists():
            write_text_atomic(jsonl, "")
        return jsonl.open("a", encoding="utf-8")
    except OSError as err:
        raise UserError(f"--output_jsonl {jsonl}: cannot write it ({err.strerror or err}); check the folder's permissions and free space") from None


def write_caption(path: Path, text: str) -> None:
    """Write a caption atomically: a crash never leaves a half-written caption."""
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise UserError(f"{path}: cannot write the caption ({err.strerror or err}); check the folder's permissions and free space") from None


# How many file names a summary line lists (of empty or unreadable images) before "...".
NAMES_SHOWN = 5


def first_names(paths: Sequence[Path], root: Path | None = None, limit: int = NAMES_SHOWN) -> str:
    """"a.png, b/c.png, ... (+3 more)": the first `limit` paths, relative to `root` where they are under it."""
    shown = [jsonl_name(p, root) if root is not None and p.is_relative_to(root) else p.as_posix() for p in paths[:limit]]
    return ", ".join(shown) + (f", ... (+{len(paths) - limit} more)" if len(paths) > limit else "")


@dataclass
class CaptionSummary:
    captioned: int = 0
    empty: list[Path] = field(default_factory=list)  # the model generated nothing for these
    keep_empty: bool = False  # --keep_empty: their (empty) captions were written all the same
    root: Path | None = None  # IMAGES_DIR, for shorter names in the messages
    already_captioned: int = 0
    name_clashes: int = 0
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    output_jsonl: Path | None = None

    def line(self) -> str:
        rate = self.captioned / self.seconds if self.seconds > 0 else 0.0
        where = f"wrote {self.output_jsonl}" if self.output_jsonl else "wrote a .txt beside each"
        text = f"captioned {plural(self.captioned, 'image')} in {self.seconds:.1f} s ({rate:.1f} images/s); {where}"
        skipped = []
        if self.already_captioned and self.output_jsonl:
            skipped.append(f"{self.already_captioned} already in it (pass --overwrite to start it afresh)")
        elif self.already_captioned:
            skipped.append(f"{self.already_captioned} that already had a .txt (pass --overwrite to replace them)")
        if self.name_clashes:
            skipped.append(f"{self.name_clashes} whose .txt another image with the same name already gets (e.g. a.png and a.jpg -> a.txt)")
        if self.unreadable:
            skipped.append(f"{len(self.unreadable)} unreadable")
        if skipped:
            text += "; skipped " + ", ".join(skipped)
        return text

    def empty_line(self) -> str | None:
        """The images the model captioned with nothing, and what became of them; None when there are none."""
        if not self.empty:
            return None
        names = first_names(self.empty, self.root)
        if self.keep_empty:
            return f"warning: the model generated nothing for {plural(len(self.empty), 'image')} ({names}); --keep_empty: empty captions written for them"
        where = "no line in the jsonl file" if self.output_jsonl else "no .txt"
        return (f"warning: the model generated nothing for {plural(len(self.empty), 'image')} ({names}): {where} written for them, "
                "so the next run tries them again; pass --keep_empty to write empty captions")


# ---------------------------------------------------------------------------- command line


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from caption_train.config import _Parser

    return _Parser(prog=prog, description=description)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base_model", default=None, help="base model of an adapter (default: the one recorded in its adapter_config.json)")
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype (default: auto = bfloat16 where the GPU or CPU runs it natively, float16 on other GPUs, else float32)")


def add_generation_arguments(parser: argparse.ArgumentParser, *, batch_size: int = 16) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--batch_size", type=int, default=batch_size, help=f"images per generate() call (default: {batch_size})")
    group.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding images (0 = in this process; default: 2)")
    group.add_argument("--num_beams", type=int, default=1, help="beam search width (1 = greedy; default: 1)")
    group.add_argument("--max_new_tokens", type=int, default=40, help="longest caption in tokens (default: 40; capped by the model)")
    group.add_argument("--min_length", type=int, default=0, help="shortest caption in generated tokens (default: 0)")
    group.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeated words (default: 1.0 = off)")
    group.add_argument("--temperature", type=float, default=None, help="sample instead of greedy/beam decoding, at this temperature")
    group.add_argument("--top_p", type=float, default=None, help="sample from the smallest token set with this probability mass (nucleus)")
    group.add_argument("--prompt", default=None, help='BLIP/GIT: text each caption starts from, e.g. "a photography of" (kept in the caption); '
                       'chat VLMs, Florence-2, PaliGemma: the instruction or task (default: the one a run was trained with, else the family\'s own)')
    group.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")


def trained_prompt(model_dir: str | None) -> str | None:
    """The --prompt a run's checkpoint folder was trained with (its config.toml), or None."""
    import tomllib

    config = Path(model_dir).expanduser() / "config.toml" if model_dir else None
    if config is None or not config.is_file():
        return None
    try:
        prompt = tomllib.loads(config.read_text(encoding="utf-8")).get("prompt")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return prompt if isinstance(prompt, str) and prompt else None


def prompt_origin(args: argparse.Namespace, model_dir: str | None) -> str:
    """Where `generation_options` took a prompt from, for the start-up line (`ModelFamily.prompt_line`)."""
    return "--prompt" if args.prompt else f"the one trained with, from {Path(model_dir or '') / 'config.toml'}"


def generation_options(args: argparse.Namespace, model_dir: str | None = None) -> tuple[GenerationOptions, list[str]]:
    """(options, problems) from parsed arguments; problems cover batch_size and num_workers too. Without --prompt,
    a run's checkpoint (`model_dir`) captions with the prompt it was trained with."""
    options = GenerationOptions(
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_length=args.min_length,
        repetition_penalty=args.repetition_penalty, temperature=args.temperature, top_p=args.top_p,
        prompt=args.prompt or trained_prompt(model_dir),
    )
    problems = options.problems()
    if args.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {args.num_workers}")
    return options, problems


def load_model_for_command(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, ModelFamily, torch.device]:
    """Resolve --device/--dtype and load MODEL (adapters merged into the base: same captions, faster)."""
    from caption_train.inference import load_for_inference, pick_device, pick_dtype
    from caption_train.precision import describe_inference_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    print(describe_inference_dtype(args.dtype, device), flush=True)
    model, processor, family = load_for_inference(args.model, base_model=args.base_model, device=device, dtype=dtype, merge_adapter=True)
    return model, processor, family, device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = command_parser("caption-train caption", "Caption every image under IMAGES_DIR (recursively), writing <image>.txt beside each.")
    parser.add_argument("model", metavar="MODEL", help="a run's final/ or epoch-N/ folder, a merged model folder, or a hub id")
    parser.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images, searched recursively")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .txt captions (or start an existing --output_jsonl file afresh instead of continuing it)")
    parser.add_argument("--output_jsonl", default=None, metavar="FILE", help='write {"file_name", "text"} lines (paths relative to IMAGES_DIR) to FILE instead of .txt files; an existing FILE is continued: images already in it are skipped')
    parser.add_argument("--keep_empty", action="store_true", help="when the model generates nothing for an image, write the empty caption "
                        "(with --prefix/--suffix) anyway; by default no .txt (or jsonl line) is written and a later run tries the image again")
    parser.add_argument("--prefix", default="", help='text put before every caption, e.g. "mystyle, " (trigger words)')
    parser.add_argument("--suffix", default="", help="text put after every caption")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options, problems = generation_options(args, model_dir=args.model)
    if problems:
        raise UserError("; ".join(problems))
    from caption_train.inference import resolve_model_source

    root, images = check_images_dir(args.images_dir)  # local checks first: a typo should not wait on the hub
    resolve_model_source(args.model, base_model=args.base_model)  # before loading anything heavy
    jsonl = Path(args.output_jsonl).expanduser() if args.output_jsonl else None
    done: set[str] = set()
    if jsonl is not None:
        if jsonl.is_dir():
            raise UserError(f"--output_jsonl {jsonl}: is a directory; pass a file name")
        if jsonl.exists() and not args.overwrite:
            done = read_jsonl_done(jsonl)  # continue an earlier run: skip what it already wrote
    plan = plan_captions(images, overwrite=args.overwrite, to_jsonl=jsonl is not None, root=root, done=done)
    summary = CaptionSummary(already_captioned=len(plan.already_captioned), name_clashes=len(plan.name_clashes), output_jsonl=jsonl,
                             keep_empty=args.keep_empty, root=root)
    if not plan.todo:
        where = f"are already in {jsonl}" if jsonl is not None else "already have a .txt"
        print(f"nothing to caption: all {plural(len(images), 'image')} under {root} {where} (pass --overwrite to replace them)", flush=True)
        return 0

    model, processor, family, device = load_model_for_command(args)
    torch.manual_seed(args.seed)
    print(f"captioning {plural(len(plan.todo), 'image')} under {root} with {args.model} on {device}", flush=True)
    print(family.prompt_line(options.prompt, prompt_origin(args, args.model)), flush=True)
    caption_into(model, processor, family, root, plan.todo, options, summary, jsonl=jsonl, overwrite=args.overwrite, prefix=args.prefix, suffix=args.suffix,
                 batch_size=args.batch_size, num_workers=args.num_workers)
    print(summary.line(), flush=True)
    if summary.empty_line():
        print(summary.empty_line(), flush=True)
    return 0


def caption_into(
    model: torch.nn.Module, processor: Any, family: ModelFamily, root: Path, paths: list[Path], options: GenerationOptions,
    summary: CaptionSummary, *, jsonl: Path | None, overwrite: bool = False, prefix: str = "", suffix: str = "", batch_size: int = 16,
    num_workers: int = 0,
) -> CaptionSummary:
    """Caption `paths`, writing .txt files (or appending lines to `jsonl`: --overwrite empties it first); fills in `summary`.

    An empty generation is listed in `summary.empty` and written only when `summary.keep_empty`: otherwise the image
    has no caption and no jsonl line, exactly as if it had not been captioned yet.

    Each jsonl line is written whole and flushed, so an interrupted run loses at most the line being written,
    which the next run drops (`read_jsonl_done`) before it continues.
    """
    handle = open_jsonl(jsonl, overwrite=overwrite) if jsonl is not None else None
    progress = tqdm(total=len(paths), desc="captioning", unit="img", file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for item in generate_captions(model, processor, family, paths, options, batch_size=batch_size, num_workers=num_workers, progress=progress):
            if item.text is None:
                summary.unreadable.append((item.path, item.error or "unreadable"))
                tqdm.write(f"skipped unreadable image {item.path}: {item.error}", file=sys.stderr)
                continue
            if not item.text.strip():
                summary.empty.append(item.path)
                if not summary.keep_empty:
                    continue
            text = f"{prefix}{item.text}{suffix}"
            if handle is not None:
                handle.write(json.dumps({"file_name": jsonl_name(item.path, root), "text": text}, ensure_ascii=False) + "\n")
                handle.flush()
            else:
                write_caption(caption_path_for(item.path), text)
            summary.captioned += 1
        if handle is not None:
            os.fsync(handle.fileno())
    finally:
        progress.close()
        if handle is not None:
            handle.close()
    summary.seconds = time.perf_counter() - start
    return summary
