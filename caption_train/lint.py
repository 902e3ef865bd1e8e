"""The `lint` command: check a dataset folder before training, in one report. Reads only; never writes there.

    caption-train lint dataset/                          # human-readable report; exit 1 when there are errors
    caption-train lint dataset/ --model runs/x/final     # also what training with that model truncates
    caption-train lint dataset/ --trigger mychar         # diffusion checks: name the trigger word(s)
    caption-train lint dataset/ --json > lint.json       # the same report as one JSON object

    report = lint_dataset("dataset", tokenizer=processor.tokenizer, max_tokens=128, decode=False)
    report = lint_dataset("dataset", training=load_training_view("runs/x/final"), encoders=[clip_counter()])
    report = summarize_scan(scan_dataset("dataset", probe=False), tokenizer=tok)   # the trainer's start-up check:
    for line in report.summary_lines():                  # no second walk, no image opened; the short form
        print(line)

Errors are what training would lose: an image it skips (unreadable, corrupt, truncated or too large; no caption,
an empty, unreadable or non-UTF-8 caption), a metadata.jsonl line it cannot use, or no usable pair at all.
Warnings are what it trains on but maybe not as meant (duplicates with differing captions, captions training
truncates, caption characters the tokenizer reads as its unknown token, animated images, extensions that lie,
extreme shapes, tag spelling variants; for diffusion datasets, diffusion_lint: captions over CLIP's 77 or T5's 512
tokens, boilerplate tags, tags fused into a trigger word, repeated tags, near-identical captions) and files that
look like data but are never read (captions without images, .gif/.tiff images, symlinked folders). See CODES.

With a model (`--model`, or the trainer's own), caption lengths are what training does: the family's own collate
at the max_length training uses (min(max_length, the model's limit)), with the prompt, chat template and image
tokens in the same row, run once as training runs it and once without a limit; a caption loses tokens when the
two differ. No weights are loaded (the processor only).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caption_train import diffusion_lint
from caption_train.data import scan
from caption_train.data.captions import split_parts
from caption_train.data.images import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageLoadError,
    is_image_file,
    load_rgb,
    read_header,
    verify_image,
)
from caption_train.errors import UserError
from caption_train.text import plural, printable
from caption_train.text_encoders import TokenCounter, clip_counter, t5_counter

ERROR, WARNING = "error", "warning"
TINY_SIDE = 16  # px; smaller images carry almost nothing once upscaled to the model's input (384 px for BLIP)
MAX_ASPECT = 10.0  # the BLIP processor resizes to a square without keeping the aspect ratio

# code -> (severity, title). Errors: training would skip the image (or the metadata line). Warnings: training
# uses it, but maybe not as meant; or the file looks like training data and is never read.
CODES: dict[str, tuple[str, str]] = {
    "unreadable_image": (ERROR, "unreadable image (corrupt, truncated, too large, not an image)"),
    "missing_caption": (ERROR, "image without caption"),
    "empty_caption": (ERROR, "empty or whitespace-only caption"),
    "caption_not_utf8": (ERROR, "caption not UTF-8"),
    "unreadable_caption": (ERROR, "unreadable caption file"),
    "bad_metadata_line": (ERROR, "unusable metadata.jsonl line"),
    "unreadable_metadata": (ERROR, "unreadable metadata.jsonl"),
    "no_usable_pairs": (ERROR, "no usable image+caption pair"),
    "training_refuses": (ERROR, "training stops on this caption (the model's batch builder refuses it)"),
    "duplicate_image_conflict": (WARNING, "identical images with differing captions"),
    "duplicate_image": (WARNING, "identical images with the same caption"),
    "long_caption": (WARNING, "caption longer than the token limit (truncated in training)"),
    "clip_too_long": (WARNING, "caption over CLIP's 77 tokens (SD 1.x, SDXL)"),
    "t5_too_long": (WARNING, "caption over T5's 512 tokens (Flux, SD3)"),
    "boilerplate_tag": (WARNING, "tag in nearly every caption (boilerplate)"),
    "trigger_cooccurrence": (WARNING, "tag that always comes with a trigger word"),
    "duplicate_tag": (WARNING, "same tag twice in one caption"),
    "near_identical_captions": (WARNING, "near-identical captions on different images"),
    "unknown_characters": (WARNING, "caption characters the tokenizer cannot write (read as its unknown token)"),
    "no_words_caption": (WARNING, "caption without letters or digits"),
    "tag_variants": (WARNING, "tag spelled several ways"),
    "shared_caption": (WARNING, "one caption file for several images"),
    "sidecar_overrides_metadata": (WARNING, "caption file and metadata.jsonl disagree (the .txt wins)"),
    "animated_image": (WARNING, "animated image (training uses the first frame)"),
    "wrong_extension": (WARNING, "file extension does not match its content"),
    "tiny_image": (WARNING, f"image smaller than {TINY_SIDE} px on a side"),
    "extreme_aspect_ratio": (WARNING, f"aspect ratio over {MAX_ASPECT:g}:1 (squashed to the model's square input)"),
    "orphan_caption": (WARNING, "caption file without an image"),
    "orphan_metadata": (WARNING, "metadata.jsonl entry without an image"),
    "unsupported_image": (WARNING, "image format caption-train does not read"),
    "symlinked_folder": (WARNING, "symlinked folder, not searched"),
}

# Image files that scan_dataset does not read: worth a warning, since users expect them to be training data.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jfif", ".jpe", ".jp2", ".ico", ".tga", ".psd", ".ppm", ".pgm", ".pbm", ".svg", ".dng", ".cr2", ".nef", ".raw", ".exr", ".hdr"}
)
# Other tools' caption extensions (kohya: .caption).
OTHER_CAPTION_EXTENSIONS = frozenset({".caption"})
_FORMATS_BY_EXTENSION = {".png": {"PNG"}, ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".webp": {"WEBP"}, ".bmp": {"BMP", "DIB"}}
_HASH_CHUNK = 1 << 20
# The trainer's start-up check tokenizes at most this many captions (evenly spaced), so that it costs the same
# for 5k and 5M images: ~0.3 s on a 2-core CPU, where the tokenizer manages ~15k captions/s.
STARTUP_TOKENIZED_CAPTIONS = 5000
# ... and loads at most this many images for the truncation check of a model whose prompt holds the image's tokens
# (chat VLMs: their count follows each image's size, so the image must be loaded and processed).
STARTUP_LOADED_IMAGES = 64
# One line under a finding code's header: why it matters (the diffusion checks and training's truncation).
WHY = {**diffusion_lint.WHY, "long_caption": "training cuts the caption off at max_length: its end is never learned"}
TEXT_ENCODERS = ("clip", "t5")


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Finding:
    code: str  # a key of CODES
    path: str  # relative to the dataset root, "/"-separated; "" for the dataset as a whole
    message: str  # one line

    @property
    def severity(self) -> str:
        return CODES[self.code][0]

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "path": self.path, "message": self.message}


@dataclass
class LintReport:
    """Everything lint_dataset found. `exit_code` is 1 when there are errors, else 0."""

    root: Path
    image_files: int = 0  # files with a supported image extension (hidden ones excluded)
    usable: int = 0  # image + caption pairs training would use
    caption_files: int = 0  # .txt files
    findings: list[Finding] = field(default_factory=list)
    modes: collections.Counter = field(default_factory=collections.Counter)
    formats: collections.Counter = field(default_factory=collections.Counter)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)  # per usable caption
    tokens: list[int] | None = None  # per usable caption, special tokens included; None without a tokenizer
    max_tokens: int | None = None
    tag_style: bool = False  # at least half the captions are comma-separated
    tag_counts: collections.Counter = field(default_factory=collections.Counter)
    decoded: bool = True  # every image fully decoded (False: header + end-of-file check only)
    images_checked: bool = True  # image files opened at all (False: the trainer's start-up check, captions only)
    hashed_files: int = 0  # files read in full to find duplicates (only those sharing a size with another)
    captions_tokenized: int = 0  # captions the token checks looked at (all, or an evenly spaced sample)
    unknown: "UnknownCharacters | None" = None  # None without a tokenizer, or when its vocabulary has no unknown token
    repeat_folders: dict[str, tuple[int, int]] = field(default_factory=dict)  # kohya `N_name` folder -> (N, images)
    repeats_on: bool = True  # training honours the repeat folders (kohya_repeats)
    training: "TruncationCheck | None" = None  # what training with a model does to the captions (--model)
    encoders: list["EncoderCheck"] = field(default_factory=list)  # diffusion text encoders' token counts
    triggers: list[str] = field(default_factory=list)  # trigger words the diffusion checks used

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def counts(self, severity: str) -> collections.Counter:
        return collections.Counter(f.code for f in self.findings if f.severity == severity)

    # ---- text

    def summary_lines(self) -> list[str]:
        """The dataset summary the trainer prints at start: one head line, then at most 6 indented ones.
        `format_text` has the full list."""
        head = f"dataset {_display(str(self.root))}: {plural(self.usable, 'image')} with captions"
        errors, n_warn = self.counts(ERROR), len(self.warnings)
        if errors:
            head += f"; skipped {sum(errors.values())} ({_format_counts(errors)})"
        if n_warn:
            head += f"; {plural(n_warn, 'warning')}"
        if self.findings or not self.images_checked:
            what = "list them" if self.images_checked else "list them and open every image" if self.findings else "open every image"
            head += f" ({what}: caption-train lint {_display(str(self.root))})"
        lines = [head]
        if n_warn:
            lines.append(f"  warnings: {_format_counts(self.counts(WARNING))}")
        for line in (self._repeat_line(short=True), self._image_line(), self._caption_line(), self._training_line(),
                     self._tag_line(), self._unknown_line(), self._diffusion_line()):
            if line:
                lines.append("  " + line)
        return lines

    def format_text(self, max_listed: int = 10) -> str:
        """The full human-readable report; at most `max_listed` files per finding code (0 = all)."""
        out = [f"caption-train lint {_display(str(self.root))}"]
        checked = "every image decoded" if self.decoded else "image headers and file ends checked (--quick)"
        out.append(f"  {plural(self.image_files, 'image file')}, {plural(self.usable, 'usable image+caption pair')}, {plural(self.caption_files, 'caption file')} ({checked}; {plural(self.hashed_files, 'file')} hashed for duplicates)")
        for severity, title in ((ERROR, "ERRORS: training skips these"), (WARNING, "WARNINGS: trained on, or ignored, maybe not as you meant")):
            findings = [f for f in self.findings if f.severity == severity]
            if not findings:
                continue
            out += ["", f"{title} ({len(findings)})"]
            by_code: dict[str, list[Finding]] = {}
            for finding in findings:
                by_code.setdefault(finding.code, []).append(finding)
            for code, group in by_code.items():
                out.append(f"  {CODES[code][1]} [{code}] ({len(group)})")
                if code in WHY:
                    out.append(f"    why: {WHY[code]}")
                shown = group if max_listed <= 0 else group[:max_listed]
                for finding in shown:
                    where = f"{finding.path}: " if finding.path else ""
                    out.append(f"    {where}{finding.message}")
                if len(shown) < len(group):
                    out.append(f"    ... and {len(group) - len(shown)} more (--max_listed 0 lists all)")
        out.append("")
        for line in (self._repeat_line(short=False), self._image_line(), self._caption_line(), self._training_line(),
                     self._tag_line(top=20), self._unknown_line(), self._encoder_line()):
            if line:
                out.append(line)
        out.append(f"result: {plural(len(self.errors), 'error')}, {plural(len(self.warnings), 'warning')}")
        return "\n".join(out)

    def _image_line(self) -> str:
        if not self.widths:
            return ""
        modes = collections.Counter({("1-bit" if mode == "1" else mode): n for mode, n in self.modes.items()})
        return (f"images: {_format_counts(self.formats)}; modes {_format_counts(modes)}; "
                f"width {_spread(self.widths)}, height {_spread(self.heights)} px")

    def _caption_line(self) -> str:
        if not self.words:
            return ""
        line = f"captions: {_spread(self.words)} words"
        if self.tokens is not None and self.tokens:
            over = sum(n > self.max_tokens for n in self.tokens) if self.max_tokens else 0
            limit = f", {over} over the limit of {self.max_tokens}" if self.max_tokens and self.training is None else ""
            line += f"; {_spread(self.tokens)} tokens{limit}{self._sample_note()}"
        elif self.tokens is None:
            line += " (token lengths and unknown characters not checked: pass --model)"
        return line

    def _training_line(self) -> str:
        check = self.training
        if check is None:
            return ""
        line = f"training with {_display(check.model)}: {check.describe_max_length()}"
        before = [n for n in check.before if n is not None]
        if before and max(before) > 1:
            line += f", {_spread(before)} of them before each caption (prompt, template, image tokens)"
        truncated = [n for n in check.lost if n > 0]
        if not check.checked:
            return line + "; no caption checked"
        line += f"; {len(truncated)} of {check.checked:,} captions truncated"
        if truncated:
            line += f" (losing {_spread(truncated)} tokens)"
        if check.refused:
            line += f"; {check.refused} refused"
        if check.checked + check.refused < self.usable:
            line += f" (in an evenly spaced sample of {check.checked + check.refused:,} of {self.usable:,})"
        return line

    def _encoder_line(self) -> str:
        """The diffusion text encoders' token counts (the full report's stats line)."""
        parts = []
        for check in self.encoders:
            if not check.counts:
                continue
            over = sum(n > check.counter.limit for n in check.counts)
            sample = f" in a sample of {len(check.counts):,}" if len(check.counts) < self.usable else ""
            parts.append(f"{check.counter.name} {_spread(check.counts)} tokens, {over} over {check.counter.limit}{sample} ({check.counter.source})")
        return "text encoders: " + "; ".join(parts) if parts else ""

    def _diffusion_line(self) -> str:
        """The diffusion checks in one line (the start-up summary); empty when they found nothing."""
        counts = self.counts(WARNING)
        parts = []
        for check in self.encoders:
            code = f"{check.counter.name.lower()}_too_long"
            if counts[code]:
                estimated = ", estimated" if not check.counter.exact else ""
                sample = f" of {len(check.counts):,} checked" if len(check.counts) < self.usable else ""
                parts.append(f"{counts[code]}{sample} over {check.counter.name}'s {check.counter.limit} tokens ({check.counter.models}{estimated})")
        names = {"boilerplate_tag": ("tag in nearly every caption", "tags in nearly every caption"),
                 "trigger_cooccurrence": ("tag fused into a trigger word", "tags fused into a trigger word"),
                 "duplicate_tag": ("caption repeating a tag", "captions repeating a tag"),
                 "near_identical_captions": ("group of near-identical captions", "groups of near-identical captions")}
        for code, (one, many) in names.items():
            if counts[code]:
                example = next(f for f in self.findings if f.code == code)
                shown = f": {example.message}" if counts[code] == 1 and code in ("boilerplate_tag", "trigger_cooccurrence") else ""
                parts.append(f"{plural(counts[code], one, many)}{shown}")
        return "for diffusion training: " + "; ".join(parts) if parts else ""

    def _sample_note(self) -> str:
        if self.captions_tokenized >= self.usable:
            return ""
        return f" (in an evenly spaced sample of {self.captions_tokenized:,} of {self.usable:,} captions)"

    def _repeat_line(self, short: bool) -> str:
        if not self.repeat_folders:
            return ""
        listed = scan.format_repeat_folders(self.repeat_folders)
        if not self.repeats_on:
            return f"repeat folders ignored (kohya_repeats = false): {listed}"
        if short:
            return f"repeat folders: {listed}"
        return f"repeat folders (training serves each image N times per epoch; kohya_repeats = false turns this off): {listed}"

    def _unknown_line(self) -> str:
        unknown = self.unknown
        if unknown is None or not unknown.flagged:
            return ""
        sample = f", an evenly spaced sample of {self.usable:,}" if unknown.checked < self.usable else ""
        share = f"{100 * unknown.flagged / unknown.checked:.1f}% of captions ({unknown.flagged:,} of {unknown.checked:,}{sample})"
        chars = ", ".join(f"{_char_name(ch)} ({n:,})" for ch, n in unknown.chars.most_common(8))
        rel, caption = unknown.example
        return (f"warning: {share} contain characters the tokenizer reads as {unknown.unk_token}, so the model can never "
                f"write them: {chars}; e.g. {rel}: {_quote(caption)}")

    def _tag_line(self, top: int = 8) -> str:
        if not self.tag_style or not self.tag_counts:
            return ""
        once = sum(1 for n in self.tag_counts.values() if n == 1)
        common = ", ".join(f"{_display(tag)} ({n})" for tag, n in self.tag_counts.most_common(top))
        return f"tags: {len(self.tag_counts)} distinct, {once} used once; most common: {common}"

    def _over_limit(self) -> int:
        if self.training is not None:
            return sum(n > 0 for n in self.training.lost)
        return sum(n > self.max_tokens for n in self.tokens) if self.max_tokens and self.tokens else 0

    # ---- machines

    def to_dict(self, top_tags: int = 50) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "exit_code": self.exit_code,
            "counts": {
                "image_files": self.image_files, "usable_pairs": self.usable, "caption_files": self.caption_files,
                "errors": len(self.errors), "warnings": len(self.warnings),
            },
            "error_counts": dict(self.counts(ERROR)),
            "warning_counts": dict(self.counts(WARNING)),
            "findings": [f.to_dict() for f in self.findings],
            "images": {
                "formats": dict(self.formats), "modes": dict(self.modes),
                "width": _stats(self.widths), "height": _stats(self.heights),
            },
            "captions": {
                "words": _stats(self.words),
                "tokens": None if self.tokens is None else {**_stats(self.tokens), "limit": self.max_tokens,
                                                            "over_limit": self._over_limit()},
            },
            "tags": {
                "tag_style": self.tag_style, "distinct": len(self.tag_counts),
                "top": [[tag, n] for tag, n in self.tag_counts.most_common(top_tags)] if self.tag_style else [],
            },
            "unknown_characters": None if self.unknown is None else {
                "captions_checked": self.unknown.checked, "captions_with_unknown": self.unknown.flagged,
                "unknown_token": self.unknown.unk_token,
                "top": [[ch, n] for ch, n in self.unknown.chars.most_common(50)],
            },
            "repeat_folders": {name: {"repeats": n, "images": count} for name, (n, count) in self.repeat_folders.items()},
            "training": None if self.training is None else self.training.to_dict(),
            "text_encoders": {check.counter.name: {"limit": check.counter.limit, "exact": check.counter.exact, "source": check.counter.source,
                                                   "checked": len(check.counts), "over_limit": sum(n > check.counter.limit for n in check.counts),
                                                   "tokens": _stats(check.counts)} for check in self.encoders},
            "triggers": self.triggers,
            "checks": {"decoded": self.decoded, "images_checked": self.images_checked, "hashed_files": self.hashed_files,
                       "captions_tokenized": self.captions_tokenized},
        }


# ---------------------------------------------------------------------------------------------
# Checking


@dataclass
class _Pair:
    rel: str
    path: Path
    caption: str
    info: ImageInfo


class _ScannedPair:
    """A scan's Sample seen as a _Pair without image info; `rel` is worked out only for the few that get a finding."""

    __slots__ = ("path", "caption", "_root")

    def __init__(self, sample: scan.Sample, root: Path):
        self.path, self.caption, self._root = sample.image_path, sample.caption, root

    @property
    def rel(self) -> str:
        return _rel(self.path, self._root)


@dataclass
class UnknownCharacters:
    """Captions with tokens the tokenizer could only read as its unknown token: the model can never write them."""

    unk_token: str
    checked: int = 0  # captions tokenized
    flagged: int = 0  # of those, captions with at least one unknown token
    chars: collections.Counter = field(default_factory=collections.Counter)  # character -> flagged captions with it
    example: tuple[str, str] = ("", "")  # (path, caption) of the first flagged caption


def lint_dataset(
    root: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    decode: bool = True,
    label: str = "DATASET_DIR",
    training: TrainingView | None = None,
    encoders: list[TokenCounter] | None = None,
    triggers: list[str] = (),
) -> LintReport:
    """Check every image and caption under `root` the way scan_dataset pairs them. Never writes to `root`.

    tokenizer: counts caption tokens (special tokens included, as training sees them) and flags captions over
        `max_tokens` (default: the tokenizer's model_max_length, when it has a real one).
    training: what training with a model does instead (load_training_view): its tokenizer, and the captions it
        truncates, from its own batches.
    encoders: diffusion text encoders to count tokens for (default: CLIP and T5, exact where a tokenizer is at
        hand, else estimated); triggers: trigger words for the co-occurrence check (kohya folder names are added).
    decode: fully decode every image (finds any corrupt pixel data; ~5 ms per 512 px JPEG). False reads only
        headers and each file's last bytes, decoding just the files that look truncated (images.verify_image).
    Duplicates: only files whose size equals another image's are read and hashed, so a dataset of distinct
    JPEGs costs one stat per file; the worst case (many same-size files, e.g. BMPs) reads each file once.
    Raises UserError only when `root` is not a folder; everything else becomes a Finding.
    """
    root = scan._check_root(root, label=label)
    report = LintReport(root=root, decoded=decode)
    findings = report.findings

    metadata, metadata_used = _lint_metadata(root, findings), set()
    pairs: list[_Pair] = []
    for dirpath, dirnames, filenames in scan.walk_dataset(root):
        folder = Path(dirpath)
        for name in dirnames:
            if os.path.islink(folder / name):
                target = _display(os.readlink(folder / name))
                findings.append(Finding("symlinked_folder", _rel(folder / name, root), f"links to {target}; symlinked folders are not searched (copy or bind-mount the images in)"))
        _lint_folder(root, folder, dirnames, filenames, metadata, metadata_used, pairs, report)

    for key in sorted(set(metadata) - metadata_used):
        findings.append(Finding("orphan_metadata", scan.METADATA_FILE, f"entry for {_display(key)}: no such image in the dataset (or it is hidden)"))
    report.usable = len(pairs)
    if not pairs:
        findings.append(Finding("no_usable_pairs", "", f"no image has a usable caption; {scan.EXPECTED_LAYOUT}"))
    report.repeat_folders = scan.repeat_folders((p.path for p in pairs), root)
    same_image = _lint_duplicates(pairs, report)
    _lint_captions(pairs, report, tokenizer, max_tokens, training=training, encoders=encoders, triggers=triggers, same_image=same_image)
    return report


# What the scanner's skip reasons are called in a report.
_SCAN_CODES = {
    scan.MISSING_CAPTION: "missing_caption", scan.EMPTY_CAPTION: "empty_caption", scan.CAPTION_NOT_UTF8: "caption_not_utf8",
    scan.UNREADABLE_CAPTION: "unreadable_caption", scan.UNREADABLE_IMAGE: "unreadable_image",
}


def summarize_scan(
    result: scan.ScanResult,
    *,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    repeats: bool = True,
    max_tokenized: int = STARTUP_TOKENIZED_CAPTIONS,
    training: TrainingView | None = None,
    encoders: list[TokenCounter] | None = None,
) -> LintReport:
    """The trainer's start-up check, built from the scan it trains on: no second walk, no image opened.

    Reports what the scan skipped, the repeat folders (`repeats`: whether training honours them), and the caption
    checks (words, tags, token lengths and unknown characters, the last two on at most `max_tokenized` evenly spaced
    captions, so the cost does not grow with the dataset; training's truncation likewise, on at most
    STARTUP_LOADED_IMAGES images where it must load them), and the diffusion checks (text-encoder limits on the
    same sample, the others on every caption). Images are checked when first loaded; `lint_dataset` (the `lint`
    command) does every check.
    """
    root = result.root
    report = LintReport(root=root, decoded=False, images_checked=result.probed, repeats_on=repeats)
    for path, reason in result.problems:
        report.findings.append(Finding(_SCAN_CODES.get(reason, "unreadable_image"), _rel(path, root), reason))
    for _ in range(result.skipped[scan.BAD_METADATA_LINE]):
        report.findings.append(Finding("bad_metadata_line", scan.METADATA_FILE, "not a JSON object with string \"file_name\" and \"text\""))
    report.image_files = len(result.samples) + len(result.problems)
    report.usable = len(result.samples)
    report.repeat_folders = result.repeat_folders
    pairs = [_ScannedPair(sample, root) for sample in result.samples]
    _lint_captions(pairs, report, tokenizer, max_tokens, max_tokenized=max_tokenized, training=training, encoders=encoders)
    return report


def _lint_folder(root: Path, folder: Path, dirnames: list[str], filenames: list[str], metadata: dict[str, str],
                 metadata_used: set[str], pairs: list[_Pair], report: LintReport) -> None:
    findings = report.findings
    names = set(filenames)
    captions = {n for n in filenames if n.lower().endswith(".txt")}
    report.caption_files += len(captions)
    accounted: set[str] = set()  # caption files that belong to something (so they are not orphans)
    # Caption files by lowercased stem, to explain near misses (IMG.png + img.txt, img.TXT, img.caption).
    near: dict[str, list[str]] = {}
    for n in filenames:
        if Path(n).suffix.lower() in {".txt", *OTHER_CAPTION_EXTENSIONS}:
            near.setdefault(Path(n).stem.lower(), []).append(n)

    stems: dict[str, list[str]] = {}
    for name in filenames:
        path = folder / name
        suffix = Path(name).suffix.lower()
        stem_txt = Path(name).stem + ".txt"
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            has = f" (its caption {_display(stem_txt)} is ignored too)" if stem_txt in names else ""
            accounted.add(stem_txt)
            findings.append(Finding("unsupported_image", _rel(path, root), f"{suffix} files are not read{has}; convert to one of {' '.join(sorted(IMAGE_EXTENSIONS))}"))
            continue
        if not is_image_file(name):
            continue
        report.image_files += 1
        rel = _rel(path, root)
        sidecar = folder / stem_txt if stem_txt in names else None
        if sidecar is not None:
            accounted.add(stem_txt)
            stems.setdefault(stem_txt, []).append(name)
        meta_key = scan._relative_key(path, root)
        meta_text = metadata.get(meta_key)
        if meta_text is not None:
            metadata_used.add(meta_key)
        caption, reason = scan._caption_for(path, sidecar, meta_text)
        if reason is not None:
            finding, explained = _caption_finding(reason, rel, path, sidecar, near.get(Path(name).stem.lower(), []))
            findings.append(finding)
            accounted.update(explained)  # a near-miss caption named in this finding is not also an orphan
        elif sidecar is not None and meta_text is not None and scan.normalize_caption(meta_text) != caption:
            findings.append(Finding("sidecar_overrides_metadata", rel, f"{_display(sidecar.name)} says {_quote(caption)}, metadata.jsonl says {_quote(scan.normalize_caption(meta_text))}; training uses the .txt"))

        info = _check_image(path, rel, report)
        if info is not None and reason is None:
            pairs.append(_Pair(rel, path, caption, info))

    for txt, images in stems.items():
        if len(images) > 1:
            findings.append(Finding("shared_caption", _rel(folder / txt, root), f"is the caption of {len(images)} images: {', '.join(_display(i) for i in images)}"))

    image_dirs = {d for d in dirnames if is_image_file(d)}
    for name in filenames:
        suffix = Path(name).suffix.lower()
        if name in accounted or (suffix != ".txt" and suffix not in OTHER_CAPTION_EXTENSIONS):
            continue
        stem = Path(name).stem
        if suffix in OTHER_CAPTION_EXTENSIONS:
            hint = f"caption-train reads .txt captions; rename it to {_display(stem)}.txt"
        elif any(Path(d).stem == stem for d in image_dirs):
            hint = f"{_display(next(d for d in image_dirs if Path(d).stem == stem))} is a folder, not an image"
        else:
            matches = [n for n in filenames if is_image_file(n) and Path(n).stem.lower() == stem.lower()]
            hint = (f"names must match exactly: {_display(matches[0])} needs {_display(Path(matches[0]).stem)}.txt"
                    if matches else "no image with this name beside it (ignored by training)")
        report.findings.append(Finding("orphan_caption", _rel(folder / name, root), hint))


def _caption_finding(reason: str, rel: str, path: Path, sidecar: Path | None, near: list[str]) -> tuple[Finding, list[str]]:
    """The finding for a caption problem, and the names of near-miss caption files it explains."""
    if reason == scan.MISSING_CAPTION:
        exact = Path(path).stem + ".txt"
        others = [n for n in near if n != exact]
        if sidecar is None and others:
            return Finding("missing_caption", rel, f"no {_display(exact)} (found {_display(others[0])}: caption names must match the image name exactly, with a lowercase .txt)"), others[:1]
        folder_hint = " (a folder has that name)" if (path.parent / exact).is_dir() else ""
        return Finding("missing_caption", rel, f"no {_display(exact)} beside it{folder_hint} and no metadata.jsonl entry"), []
    if reason == scan.EMPTY_CAPTION:
        source = _display(sidecar.name) if sidecar is not None else "its metadata.jsonl text"
        return Finding("empty_caption", rel, f"{source} is empty or whitespace only"), []
    if reason == scan.CAPTION_NOT_UTF8:
        return Finding("caption_not_utf8", rel, f"{_display(sidecar.name)}: {_utf8_problem(sidecar)}"), []
    try:
        scan.read_caption_bytes(sidecar)
        detail = "cannot be read"
    except OSError as error:
        detail = error.strerror or str(error)
        if str(sidecar) in detail:
            detail = detail.replace(str(sidecar) + ": ", "")
    return Finding("unreadable_caption", rel, f"{_display(sidecar.name)}: {detail}"), []


def _utf8_problem(path: Path) -> str:
    try:
        data = scan.read_caption_bytes(path)
    except OSError as error:
        return f"cannot be read ({error})"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "saved as UTF-16 (Windows 'Unicode'); re-save it as UTF-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8 (Latin-1 or Windows-1252?); re-save it as UTF-8"
    return "not UTF-8; re-save it as UTF-8"


def _check_image(path: Path, rel: str, report: LintReport) -> ImageInfo | None:
    """Header (and full decode or end-of-file check); shape warnings; stats. None when it cannot be loaded."""
    findings = report.findings
    try:
        info = read_header(path)
        if report.decoded:
            load_rgb(path)
            problem = None
        else:
            problem = verify_image(path, info)
    except ImageLoadError as error:
        findings.append(Finding("unreadable_image", rel, error.reason))
        return None
    if problem is not None:
        findings.append(Finding("unreadable_image", rel, problem))
        return None
    report.formats[info.format] += 1
    report.modes[info.mode] += 1
    report.widths.append(info.width)
    report.heights.append(info.height)
    suffix = path.suffix.lower()
    if info.format not in _FORMATS_BY_EXTENSION.get(suffix, {info.format}):
        findings.append(Finding("wrong_extension", rel, f"named {suffix} but is {info.format}; training reads it, other tools may not"))
    if info.animated:
        findings.append(Finding("animated_image", rel, f"animated {info.format}: training uses the first frame only"))
    short, long = sorted((info.width, info.height))
    if short < TINY_SIDE:
        findings.append(Finding("tiny_image", rel, f"{info.width}x{info.height} px: upscaled to the model's input size, it carries little detail"))
    if long / short > MAX_ASPECT:
        findings.append(Finding("extreme_aspect_ratio", rel, f"{info.width}x{info.height} px: squashed to the model's square input; crop or pad it"))
    return info


def _lint_metadata(root: Path, findings: list[Finding]) -> dict[str, str]:
    bad_lines: list[int] = []
    try:
        metadata = scan._read_metadata(root / scan.METADATA_FILE, collections.Counter(), bad_lines)
    except UserError as error:
        findings.append(Finding("unreadable_metadata", scan.METADATA_FILE, str(error)))
        return {}
    for number in bad_lines:
        findings.append(Finding("bad_metadata_line", scan.METADATA_FILE, f"line {number}: not a JSON object with string \"file_name\" and \"text\""))
    return metadata


def _lint_duplicates(pairs: list[_Pair], report: LintReport) -> list[object]:
    """Group usable images by content hash, hashing only files whose size another file shares. Returns, per pair,
    an id that is the same for byte-identical images (its hash, else its index)."""
    by_size: dict[int, list[_Pair]] = {}
    for pair in pairs:
        by_size.setdefault(pair.info.file_size, []).append(pair)
    by_hash: dict[bytes, list[_Pair]] = {}
    identity: dict[int, object] = {}
    for group in by_size.values():
        if len(group) < 2:
            continue
        for pair in group:
            digest = _file_digest(pair.path)
            report.hashed_files += 1
            if digest is not None:
                by_hash.setdefault(digest, []).append(pair)
                identity[id(pair)] = digest
    for group in by_hash.values():
        if len(group) < 2:
            continue
        others = ", ".join(p.rel for p in group[1:6]) + (f" and {len(group) - 6} more" if len(group) > 6 else "")
        captions = list(dict.fromkeys(p.caption for p in group))
        if len(captions) > 1:
            shown = " / ".join(_quote(c) for c in captions[:3]) + (" / ..." if len(captions) > 3 else "")
            report.findings.append(Finding("duplicate_image_conflict", group[0].rel, f"same image as {others}; captions differ: {shown}"))
        else:
            report.findings.append(Finding("duplicate_image", group[0].rel, f"same image and caption as {others}; it counts {len(group)}x in every epoch"))
    return [identity.get(id(pair), index) for index, pair in enumerate(pairs)]


def _file_digest(path: Path) -> bytes | None:
    hasher = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                hasher.update(chunk)
    except OSError:
        return None
    return hasher.digest()


def _lint_captions(pairs: list, report: LintReport, tokenizer: Any, max_tokens: int | None, max_tokenized: int = 0, *,
                   training: TrainingView | None = None, encoders: list[TokenCounter] | None = None, triggers: list[str] = (),
                   same_image: list[object] | None = None) -> None:
    """Caption checks on `pairs` (_Pair or _ScannedPair); token checks on at most `max_tokenized` of them (0 = all).
    With `training`, its processor's tokenizer counts tokens and its batches say what is truncated."""
    captions = [p.caption for p in pairs]
    report.words = [len(c.split()) for c in captions]
    for pair in pairs:
        if not any(ch.isalnum() for ch in pair.caption):
            report.findings.append(Finding("no_words_caption", pair.rel, f"{_quote(pair.caption)} has no letters or digits"))
    if training is not None:
        tokenizer, max_tokens = getattr(training.processor, "tokenizer", training.processor), training.max_length
    if tokenizer is not None:
        if max_tokens is None:
            limit = getattr(tokenizer, "model_max_length", None)
            max_tokens = int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else None
        report.max_tokens = max_tokens
        sampled = _evenly_spaced(pairs, max_tokenized)
        report.captions_tokenized = len(sampled)
        report.tokens, unknown_spans = tokenize_captions(tokenizer, [p.caption for p in sampled])
        if max_tokens and training is None:
            for pair, n in zip(sampled, report.tokens):
                if n > max_tokens:
                    report.findings.append(Finding("long_caption", pair.rel, f"{n} tokens, over the limit of {max_tokens}: training truncates it, so its end is never learned"))
        if getattr(tokenizer, "unk_token_id", None) is not None:
            report.unknown = _unknown_characters(tokenizer, sampled, unknown_spans, report.findings)
    if training is not None and training.family.variable_image_features:  # every row its own image's tokens
        _check_truncation(training, _evenly_spaced(pairs, STARTUP_LOADED_IMAGES if max_tokenized else 0), report)
    elif training is not None:  # rows that do not depend on the image: longest captions first, until a batch fits
        _check_truncation(training, sampled, report, longest_first=report.tokens)
    report.tag_style = bool(captions) and sum("," in c for c in captions) * 2 >= len(captions)
    if report.tag_style:
        for caption in captions:
            report.tag_counts.update(set(split_parts(caption)))  # once per caption
        variants: dict[str, list[str]] = {}
        for tag in report.tag_counts:
            variants.setdefault(" ".join(tag.replace("_", " ").lower().split()), []).append(tag)
        for spellings in variants.values():
            if len(spellings) > 1:
                spellings.sort(key=lambda t: -report.tag_counts[t])
                listed = ", ".join(f"{_quote(t)} ({report.tag_counts[t]})" for t in spellings)
                report.findings.append(Finding("tag_variants", "", f"{listed}: the model learns them as different tags"))
    _lint_for_diffusion(pairs, report, max_tokenized, encoders, triggers, same_image)


def _lint_for_diffusion(pairs: list, report: LintReport, max_tokenized: int, encoders: list[TokenCounter] | None,
                        triggers: list[str], same_image: list[object] | None) -> None:
    """The diffusion checks (diffusion_lint): text-encoder limits on at most `max_tokenized` captions, the rest on all."""
    captions = [p.caption for p in pairs]
    folder_of = [_repeat_folder(p.path, report.root) for p in pairs]
    report.triggers = sorted({diffusion_lint.normalize_tag(t) for t in triggers}
                             | diffusion_lint.kohya_triggers(report.repeat_folders, captions, folder_of))
    issues = diffusion_lint.caption_issues(captions, tag_style=report.tag_style, triggers=report.triggers, same_image=same_image)
    sampled = _evenly_spaced(list(range(len(pairs))), max_tokenized)
    for counter in default_encoders() if encoders is None else encoders:
        counts, over = diffusion_lint.encoder_limit_issues([captions[i] for i in sampled], counter)
        report.encoders.append(EncoderCheck(counter, counts))
        issues += [diffusion_lint.Issue(i.code, sampled[i.index], i.message) for i in over]
    for issue in issues:
        message = issue.message
        if issue.others:
            listed = ", ".join(pairs[i].rel for i in issue.others[:5]) + (f" and {len(issue.others) - 5} more" if len(issue.others) > 5 else "")
            message += f" (with {listed})"
        report.findings.append(Finding(issue.code, pairs[issue.index].rel, message))


def default_encoders(names: tuple[str, ...] = TEXT_ENCODERS, clip_tokenizer: str | None = None, t5_tokenizer: str | None = None) -> list[TokenCounter]:
    """The diffusion text encoders to check captions against: CLIP and T5 by default."""
    made = {"clip": lambda: clip_counter(clip_tokenizer), "t5": lambda: t5_counter(t5_tokenizer)}
    return [made[name]() for name in names]


def _repeat_folder(path: Path, root: Path) -> str | None:
    """The top-level folder an image is under (a kohya `N_name` folder, when it is one)."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _evenly_spaced(items: list, limit: int) -> list:
    """All of `items` when limit is 0 or not exceeded, else at most `limit` of them, evenly spaced (deterministic)."""
    if not limit or len(items) <= limit:
        return items
    return items[:: -(-len(items) // limit)]


def tokenize_captions(tokenizer: Any, captions: list[str], batch: int = 1024) -> tuple[list[int], dict[int, list[str]]]:
    """One batched pass: the token count of each caption as the collator encodes it (special tokens included, no
    truncation), and, for captions with unknown tokens, the source text of each (index -> spans).

    Only captions that have an unknown token are encoded again with offsets (slow tokenizers have none: their
    whole caption stands for the span), so a clean dataset pays for one plain pass.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    counts: list[int] = []
    spans: dict[int, list[str]] = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        # verbose=False: no "sequence length is longer than the maximum" warning; reporting that is our job.
        encoded = tokenizer(chunk, add_special_tokens=True, truncation=False, verbose=False)
        flagged = []
        for offset, ids in enumerate(encoded["input_ids"]):
            counts.append(len(ids))
            if unk is not None and unk in ids:
                flagged.append(offset)
        if flagged:
            found = _unknown_spans(tokenizer, [chunk[offset] for offset in flagged], unk)
            spans.update({start + offset: caption_spans for offset, caption_spans in zip(flagged, found)})
    return counts, spans


def count_tokens(tokenizer: Any, captions: list[str], batch: int = 1024) -> list[int]:
    """Token count of each caption as the collator encodes it (special tokens included, no truncation)."""
    return tokenize_captions(tokenizer, captions, batch)[0]


def _unknown_spans(tokenizer: Any, captions: list[str], unk: int) -> list[list[str]]:
    """Per caption, the source text of each unknown token (one batched call with offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return [[caption] for caption in captions]
    encoded = tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True)
    return [[caption[a:b] for token, (a, b) in zip(ids, offsets) if token == unk] or [caption]
            for caption, ids, offsets in zip(captions, encoded["input_ids"], encoded["offset_mapping"])]


def _unknown_characters(tokenizer: Any, pairs: list, spans: dict[int, list[str]], findings: list[Finding]) -> UnknownCharacters:
    """Which characters make the unknown tokens: within each unknown token's source text, those the tokenizer
    cannot read even on their own (a word-piece vocabulary turns a whole word into [UNK] for one odd character).
    A span without such a character (e.g. a word over the tokenizer's word-length limit) counts as itself."""
    unk = tokenizer.unk_token_id
    cache: dict[str, bool] = {}

    def unreadable(ch: str) -> bool:
        if ch not in cache:
            cache[ch] = not ch.isspace() and unk in tokenizer(ch, add_special_tokens=False, verbose=False)["input_ids"]
        return cache[ch]

    result = UnknownCharacters(unk_token=str(tokenizer.unk_token), checked=len(pairs), flagged=len(spans))
    for index, caption_spans in spans.items():
        pair = pairs[index]
        found = list(dict.fromkeys(ch for span in caption_spans for ch in span if unreadable(ch)))
        found = found or list(dict.fromkeys(span[:20] for span in caption_spans))
        result.chars.update(found)  # once per caption
        if result.example == ("", ""):
            result.example = (pair.rel, pair.caption)
        findings.append(Finding("unknown_characters", pair.rel, f"{', '.join(_char_name(ch) for ch in found[:5])} read as {result.unk_token}: {_quote(pair.caption)}"))
    return result


def _char_name(text: str) -> str:
    """'😀' U+1F600 for one character, so that invisible or look-alike characters can be found; repr otherwise."""
    shown = repr(_display(text))
    return f"{shown} U+{ord(text):04X}" if len(text) == 1 and not text.isascii() else shown


# ---------------------------------------------------------------------------------------------
# --model: what training does to the captions


@dataclass(frozen=True)
class TrainingView:
    """What training with a model needs to build its batches: the family, the processor (no weights), the prompt
    and the max_length it uses (min(requested, model_limit), as train.setup takes it)."""

    model: str
    family: Any  # ModelFamily
    processor: Any
    prompt: str | None
    requested: int  # --max_length, or training's default
    origin: str  # where `requested` came from, for the report
    model_limit: int  # family.text_length_limit of the model's config

    @property
    def max_length(self) -> int:
        return min(self.requested, self.model_limit)


@dataclass
class TruncationCheck:
    """What the training rows of the checked captions hold: per caption, the target tokens training cuts off and the
    tokens in its row before the caption (None where the family's row does not show them)."""

    view: TrainingView
    checked: int = 0
    lost: list[int] = field(default_factory=list)
    before: list[int | None] = field(default_factory=list)
    refused: int = 0  # captions the family's collate refused (a training_refuses finding each)

    @property
    def model(self) -> str:
        return self.view.model

    def describe_max_length(self) -> str:
        view = self.view
        if view.max_length == view.requested:
            return f"max_length {view.max_length} ({view.origin}, within the model's {view.model_limit})"
        return f"max_length {view.max_length} (the model's limit; {view.origin} is {view.requested})"

    def to_dict(self) -> dict[str, Any]:
        view = self.view
        return {"model": view.model, "max_length": view.max_length, "requested": view.requested, "origin": view.origin,
                "model_limit": view.model_limit, "prompt": view.prompt, "captions_checked": self.checked,
                "truncated": sum(n > 0 for n in self.lost), "refused": self.refused,
                "tokens_lost": _stats([n for n in self.lost if n > 0]), "tokens_before_caption": _stats([n for n in self.before if n is not None])}


@dataclass
class EncoderCheck:
    """A diffusion text encoder's token counts for the checked captions."""

    counter: TokenCounter
    counts: list[int] = field(default_factory=list)


def load_training_view(model: str, *, max_length: int | None = None, prompt: str | None = None,
                       model_config: dict[str, Any] | None = None) -> TrainingView | None:
    """How training with MODEL (a run's final/ or epoch-N/, a model folder or a hub id) builds its batches,
    loading its processor but no weights; None when no model family takes MODEL (then only its tokenizer counts).

    max_length: --max_length (default: training's default). prompt: --prompt (default: the family's, as in
    training). model_config: training's model_config (its `processor` table sets e.g. a chat VLM's max_pixels).
    For a run folder, the processor saved with it (what training used), the limit and family of its base model.
    """
    from caption_train.config import TrainConfig
    from caption_train.inference import resolve_model_source
    from caption_train.models import resolve_family

    source = resolve_model_source(model, label="--model")
    try:
        family, config = resolve_family(source.base or source.path)
    except UserError:
        return None
    prompt = family.training_prompt(prompt)  # an error where the family takes none, as in training
    verbosity = _quiet_transformers()
    try:
        processor = None
        if source.is_adapter:  # the processor saved beside the adapter, else the base model's
            try:
                processor = family.training_processor(source.path, model_config or {}, config)
            except UserError:
                processor = None
        if processor is None:
            processor = family.training_processor(source.base or source.path, model_config or {}, config)
    finally:
        _restore_transformers(verbosity)
    requested, origin = (max_length, "--max_length") if max_length is not None else (TrainConfig.__dataclass_fields__["max_length"].default, "training's default")
    return TrainingView(model=model, family=family, processor=processor, prompt=prompt, requested=requested, origin=origin,
                        model_limit=family.text_length_limit(config))


_UNLIMITED = 1 << 20  # a max_length no caption reaches: the rows training would build if it never cut
_COLLATE_BATCH = 32
_STAND_IN_SIZE = (224, 224)  # the image in the uncut rows: their caption targets never depend on the image


def _check_truncation(view: TrainingView, pairs: list, report: LintReport, longest_first: list[int] | None = None) -> None:
    """Build each caption's training row as training does (the family's collate at view.max_length, with its image
    where the prompt holds the image's tokens) and once without a limit; a caption loses the targets the two differ
    by. A caption the collate refuses (no room after the prompt, nothing to tokenize) is a training_refuses error.

    longest_first: the captions' token counts, for a family whose rows do not depend on the image (the same
    prompt before every caption): captions are checked longest first, and once a whole batch fits, the shorter
    ones fit too (their targets are the same tokenizer's, fewer); they count as checked and not truncated. Some
    families' collate runs the processor on a stand-in image per row, so checking every caption would cost one
    image-processor call each.
    """
    check = TruncationCheck(view)
    report.training = check
    needs_images = view.family.variable_image_features
    if longest_first is not None:
        pairs = [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: -longest_first[i])]
    for start in range(0, len(pairs), _COLLATE_BATCH):
        if longest_first is not None and start and not check.refused and not any(check.lost[-_COLLATE_BATCH:]):
            rest = len(pairs) - start  # shorter than a batch that fitted whole
            check.checked += rest
            check.lost += [0] * rest
            check.before += check.before[-1:] * rest
            break
        batch = pairs[start:start + _COLLATE_BATCH]
        images = [_load_image(pair.path) for pair in batch] if needs_images else [None] * len(batch)
        loaded = [(pair, image) for pair, image in zip(batch, images) if image is not None or not needs_images]
        batch, images = [pair for pair, _ in loaded], [image for _, image in loaded]
        rows = _training_rows(view, [pair.caption for pair in batch], images)
        if longest_first is not None and len(rows) > 1 and all(isinstance(row, str) for row in rows) and len(set(rows)) == 1:
            # The same refusal for every caption of a batch: the prompt leaves no room, for every caption.
            check.refused += len(pairs) - start
            report.findings.append(Finding("training_refuses", "", f"every caption: {rows[0]}"))
            break
        for pair, row in zip(batch, rows):
            if isinstance(row, str):
                check.refused += 1
                report.findings.append(Finding("training_refuses", pair.rel, row))
                continue
            kept, full, before = row
            check.checked += 1
            check.lost.append(full - kept)
            check.before.append(before)
            if full > kept:
                inside = f", {before} of them before the caption" if before and before > 1 else ""
                report.findings.append(Finding("long_caption", pair.rel, f"training keeps {kept} of its {full} target tokens (max_length {view.max_length}{inside}): {_quote(pair.caption)}"))


def _training_rows(view: TrainingView, captions: list[str], images: list) -> list:
    """Per caption (kept targets, all targets, tokens before the caption) or, where the collate refuses it, its
    one-line error. A refused batch is retried caption by caption, to name the ones training would stop on."""
    if not captions:
        return []
    try:
        cut = view.family.collate(view.processor, images, captions, max_length=view.max_length, prompt=view.prompt)
        stand_in = [None if image is None else _stand_in() for image in images]
        whole = view.family.collate(view.processor, stand_in, captions, max_length=_UNLIMITED, prompt=view.prompt)
    except UserError as error:
        if len(captions) == 1:
            return [str(error)]
        return [row for caption, image in zip(captions, images) for row in _training_rows(view, [caption], [image])]
    kept, full = _targets(cut), _targets(whole)
    return list(zip(kept, full, _before_caption(cut)))


def _targets(batch: dict[str, Any]) -> list[int]:
    from caption_train.models.base import IGNORE_INDEX

    return (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()


def _before_caption(batch: dict[str, Any]) -> list[int | None]:
    """Tokens in each row before its caption (prompt, template, image placeholders): the row's length less its
    targets, where the row is the one the labels line up with (a decoder's own inputs); None where it is not
    (an encoder-decoder's labels beside the encoder's inputs)."""
    from caption_train.models.base import IGNORE_INDEX

    labels = batch["labels"]
    mask = batch.get("decoder_attention_mask")
    if mask is None:
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        targets = labels != IGNORE_INDEX
        if ids is None or mask is None or ids.shape != labels.shape or not bool((ids[targets] == labels[targets]).all()):
            return [None] * len(labels)
    targets = (labels != IGNORE_INDEX).sum(dim=1)
    return (mask.sum(dim=1) - targets).tolist()


def _stand_in() -> Any:
    from PIL import Image

    return Image.new("RGB", _STAND_IN_SIZE)


def _load_image(path: Path) -> Any:
    """The image as training loads it, or None where it cannot be (training skips it too)."""
    try:
        return load_rgb(path)
    except (ImageLoadError, OSError):
        return None


def _quiet_transformers() -> int:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    return verbosity


def _restore_transformers(verbosity: int) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------
# --model: the tokenizer and its limit (a model no family takes)


def load_tokenizer(model: str) -> tuple[Any, int | None]:
    """(tokenizer, caption token limit) of MODEL: a run's final/ or epoch-N/, a model folder, or a hub id.

    The limit is the one training caps max_length at: the model family's `text_length_limit` of its config (the
    adapter's base model's for a run folder; e.g. BLIP-2's language-model positions less its query tokens), else,
    for a model no family takes, the text model's max_position_embeddings; else the tokenizer's model_max_length.
    """
    path = Path(model).expanduser()
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model):
        raise UserError(f"--model {model}: no such folder; pass a run's final/ folder, a model folder or a hub id")
    source = str(path) if path.exists() else model
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as first:  # noqa: BLE001 - any failure: try the processor, then report the first error
            try:
                tokenizer = AutoProcessor.from_pretrained(source).tokenizer
            except Exception:  # noqa: BLE001
                reason = (str(first).strip().splitlines() or [type(first).__name__])[0]
                raise UserError(f"--model {model}: could not load its tokenizer ({reason}); pass a run's final/ folder, a model folder or a hub id") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    limit = _training_limit(path if path.exists() else None, model)
    if limit is None:
        limits = [n for n in (_position_limit(path if path.exists() else None, model), getattr(tokenizer, "model_max_length", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        limit = min(limits) if limits else None
    return tokenizer, limit


def _training_limit(folder: Path | None, model: str) -> int | None:
    """The trainer's caption token limit (`ModelFamily.text_length_limit`), from the model's config without loading
    weights; None when no family takes the model or its config cannot be found."""
    from caption_train.models import resolve_family

    source = model
    if folder is not None and not (folder / "config.json").is_file():  # a run folder: its adapter's base model
        source = (_read_json(folder / "adapter_config.json") or {}).get("base_model_name_or_path")
    elif folder is not None:
        source = str(folder)
    if not source:
        return None
    try:
        family, config = resolve_family(source)
        return family.text_length_limit(config)
    except UserError:
        return None


def _position_limit(folder: Path | None, model: str) -> int | None:
    """The text model's max_position_embeddings, read from config.json files without loading any weights."""
    if folder is None:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).to_dict()
        except Exception:  # noqa: BLE001 - the tokenizer's own limit is the fallback
            return None
        return _limit_from_config(config)
    config = _read_json(folder / "config.json")
    if config is None:  # an adapter folder: its base model, when that is a local folder
        base = (_read_json(folder / "adapter_config.json") or {}).get("base_model_name_or_path")
        config = _read_json(Path(base) / "config.json") if base and Path(base).is_dir() else None
    return _limit_from_config(config) if config else None


def _limit_from_config(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _rel(path: Path, root: Path) -> str:
    return _display(path.relative_to(root).as_posix())


def _display(text: str) -> str:
    """Text safe to print on one line: undecodable file-name bytes as \\xNN, control characters escaped."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in printable(text))


def _quote(caption: str, limit: int = 60) -> str:
    shown = caption if len(caption) <= limit else caption[: limit - 3] + "..."
    return repr(_display(shown))


# Short names of finding codes for one-line counts ("3 caption not UTF-8"); other codes read as their words.
_SHORT = {
    "caption_not_utf8": "caption not UTF-8",
    "bad_metadata_line": "bad metadata.jsonl line",
    "unreadable_metadata": "unreadable metadata.jsonl",
    "no_usable_pairs": "no usable pair",
    "duplicate_image_conflict": "duplicate with differing captions",
    "duplicate_image": "duplicate image",
    "no_words_caption": "caption without words",
    "unknown_characters": "caption with unknown characters",
    "sidecar_overrides_metadata": ".txt overriding metadata.jsonl",
    "orphan_metadata": "metadata.jsonl entry without image",
    "orphan_caption": "caption without image",
    "unsupported_image": "unsupported image format",
    "tag_variants": "tag spelled several ways",
}


# Plurals of those names that are not the name + "s" ("2 captions with unknown characters").
_MANY = {
    "caption_not_utf8": "captions not UTF-8",
    "duplicate_image_conflict": "duplicates with differing captions",
    "no_words_caption": "captions without words",
    "unknown_characters": "captions with unknown characters",
    "sidecar_overrides_metadata": ".txt files overriding metadata.jsonl",
    "orphan_metadata": "metadata.jsonl entries without image",
    "orphan_caption": "captions without image",
    "unsupported_image": "images in an unsupported format",
    "tag_variants": "tags spelled several ways",
}


def _format_counts(counts: collections.Counter) -> str:
    def name(key: str, n: int) -> str:  # finding codes as words, pluralized; other keys (image formats) as they are
        if key not in CODES:
            return f"{n} {key}"
        return plural(n, _SHORT.get(key, key.replace("_", " ")), _MANY.get(key))

    return ", ".join(name(key, n) for key, n in counts.most_common())


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _spread(values: list[int]) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    mid_text = f"{mid:g}"
    return f"{low}" if low == high else f"{low}..{high} (median {mid_text})"


# ---------------------------------------------------------------------------------------------
# Command line


def _encoder_names(text: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    if names == ["both"]:
        return TEXT_ENCODERS
    unknown = [name for name in names if name not in TEXT_ENCODERS]
    if unknown or not names:
        raise UserError(f"--text_encoders {text!r}: use clip, t5, clip,t5 (both) or none")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    from caption_train.config import _Parser, parse_dict

    parser = _Parser(
        prog="caption-train lint",
        description="Check a dataset folder before training: what training would skip (errors, exit status 1) and "
                    "what it would use but maybe not as you meant (warnings). Reads only; writes nothing.",
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder of images with .txt captions beside them (or a metadata.jsonl)")
    parser.add_argument("--model", default=None, help="check captions against what training with this model does (its tokenizer, prompt, image tokens and max_length): a run's final/ folder, a model folder or a hub id")
    parser.add_argument("--max_length", type=int, default=None, help="the max_length you train with (default: training's, 128); training truncates at min(max_length, the model's limit)")
    parser.add_argument("--prompt", default=None, help="the --prompt you train with (chat VLMs, Florence-2, PaliGemma; default: the family's own)")
    parser.add_argument("--model_config", type=parse_dict, default=None, help="the model_config you train with, as a TOML inline table or JSON; its processor table sets a chat VLM's image size, e.g. '{processor = {max_pixels = 200704}}'")
    parser.add_argument("--trigger", action="append", default=[], metavar="WORD", help="a trigger word of a diffusion dataset (repeat for several): warns about tags that always come with it. Default: kohya folder names (10_mychar/) used as a tag")
    parser.add_argument("--text_encoders", default="clip,t5", help="diffusion text encoders to check caption lengths against: clip (77 tokens, SD 1.x/SDXL), t5 (512, Flux/SD3), clip,t5 (default) or none")
    parser.add_argument("--clip_tokenizer", default=None, metavar="DIR", help="a CLIP tokenizer folder (e.g. an SD model's tokenizer/) for exact CLIP counts (default: open_clip_torch's vocabulary if installed, else an estimate)")
    parser.add_argument("--t5_tokenizer", default=None, metavar="DIR", help="a T5 tokenizer folder (e.g. a Flux model's tokenizer_2/) for exact T5 counts (default: an estimate)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--quick", action="store_true", help="read image headers and file ends instead of decoding every image (finds truncated files, not all corrupt pixel data)")
    parser.add_argument("--strict", action="store_true", help="exit status 1 on warnings too")
    parser.add_argument("--max_listed", type=int, default=10, help="files listed per kind of problem in the text report (0 = all; default: 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max_length must be >= 2, got {args.max_length}")
    root = scan._check_root(args.dataset_dir, label="DATASET_DIR")
    for flag in ("max_length", "prompt", "model_config"):
        if getattr(args, flag) is not None and not args.model:
            raise UserError(f"--{flag} needs --model (it says how training with that model builds its batches)")
    encoders = default_encoders(_encoder_names(args.text_encoders), args.clip_tokenizer, args.t5_tokenizer)
    training = load_training_view(args.model, max_length=args.max_length, prompt=args.prompt, model_config=args.model_config) if args.model else None
    tokenizer, limit = (None, None)
    if args.model and training is None:  # no family takes the model: its tokenizer and limit only
        tokenizer, limit = load_tokenizer(args.model)
        if args.max_length is not None:
            limit = min(args.max_length, limit) if limit else args.max_length
    report = lint_dataset(root, tokenizer=tokenizer, max_tokens=limit, decode=not args.quick, training=training,
                          encoders=encoders, triggers=args.trigger)
    text = json.dumps(report.to_dict(), indent=1) if args.json else report.format_text(max_listed=args.max_listed)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `caption-train lint ... | head`: the reader has gone, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if report.errors or (args.strict and report.warnings) else 0
