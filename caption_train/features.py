"""A frozen vision tower computed once: image features cached per image, in memory or on disk.

    plan = plan_feature_cache(cfg, family, model, processor, n_images=len(train))   # what `auto` decides, and why
    print(plan.message)       # "image features: vision tower frozen, no flips: caching in memory (32 x 0.9 MB)"
    cache = plan.build()      # FeatureCache or None
    dataset.skip_image = cache.skip_predicate()       # the loader stops decoding images whose features are known
    inputs = cache.model_inputs(batch, paths, model=model, family=family, processor=processor, autocast=...)

When no trainable parameter lives in the vision tower and images are not augmented (no random flip), the tower's
output for an image never changes during training, so every epoch after the first (and every later run on the same
data and model, with the disk cache) can skip it. That output is ~90% of a BLIP step on a CPU.

Entries are stored in the dtype the text side reads them in: bf16 under bf16 autocast (the cross-attention
projections cast them to bf16 anyway, so nothing is lost), fp16 under fp16, fp32 otherwise; so a cached step gives
the loss an uncached one gives. The disk cache lives outside the dataset (default ~/.cache/caption-train/features),
one safetensors file per image, read memory-mapped, in a folder named by a fingerprint of the tower's weights, the
image processor's config and the storage dtype; each file is named by a hash of the image file's bytes. A stale,
corrupt or unreadable entry is recomputed; a cache folder that cannot be written is reported once and not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from caption_train.errors import UserError
from caption_train.files import write_bytes_atomic
from caption_train.text import byte_size


CACHE_MODES = ("auto", "off", "memory", "disk")
MEMORY_SHARE = 0.25  # `auto` keeps features in memory while they take at most this share of the machine's RAM
LAYOUT_VERSION = 1  # bump when the stored format changes: old entries then live in another folder


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "caption-train" / "features"


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown (e.g. Windows): assume a modest machine


def storage_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


# ---------------------------------------------------------------------------------------------
# Deciding


@dataclass
class CachePlan:
    mode: str  # "off", "memory" or "disk"
    message: str  # one line for the start-up log, saying why
    dtype: torch.dtype = torch.float32
    cache_dir: Path | None = None
    fingerprint: str = ""

    def build(self) -> "FeatureCache | None":
        if self.mode == "memory":
            return FeatureCache(self.dtype)
        if self.mode == "disk":
            return FeatureCache(self.dtype, DiskStore(self.cache_dir / self.fingerprint, self.dtype))
        return None


def vision_is_frozen(family: Any, model: torch.nn.Module) -> bool:
    """Whether nothing that computes the cached features (the vision tower, and for chat VLMs its projector) trains."""
    return not any(p.requires_grad for module in family.feature_modules(model) for p in module.parameters())


def plan_feature_cache(*, requested: str, family: Any, model: torch.nn.Module, processor: Any, n_images: int,
                       random_flip: float, mixed_precision: str, cache_dir: str | None, dataset_dir: str,
                       sample_image: str | None = None) -> CachePlan:
    """What to do with image features, following --cache_image_features (auto|off|memory|disk). `sample_image`
    (a training image) sizes the features of a family whose feature count follows the image's size."""
    if not family.supports_feature_cache:
        if requested in ("memory", "disk"):
            raise UserError(f"--cache_image_features {requested}: the {family.name} family cannot cache image features yet; use auto or off")
        return CachePlan("off", f"image features: computed every step (the {family.name} family has no feature cache yet)")
    conflicts = []
    if not vision_is_frozen(family, model):
        if any(p.requires_grad for p in family.vision_tower(model).parameters()):
            conflicts.append("the vision tower has trainable parameters (adapter targets in it, or a full fine-tune without --freeze_vision_tower)")
        else:
            conflicts.append("the projector that turns the vision tower's output into image tokens has trainable parameters (a full fine-tune)")
    if random_flip > 0:
        conflicts.append(f"random_flip = {random_flip} changes the pixels every epoch")
    if requested in ("memory", "disk") and conflicts:
        raise UserError(f"--cache_image_features {requested}: cannot cache image features because {' and '.join(conflicts)}; "
                        "use --cache_image_features auto/off, or train the text side only without flips")
    if requested == "off":
        return CachePlan("off", "image features: not cached (--cache_image_features off)")
    if conflicts:
        return CachePlan("off", f"image features: computed every step, not cached: {' and '.join(conflicts)}")

    dtype = storage_dtype(mixed_precision)
    try:
        shape = _feature_shape(family, model, processor, sample_image)
    except UserError as err:  # e.g. a processor whose images have no fixed size: no fixed feature shape either
        if requested != "auto":
            raise
        return CachePlan("off", f"image features: computed every step, not cached: {err}")
    per_image = dtype.itemsize * int(torch.Size(shape).numel())
    total = per_image * n_images
    budget = int(physical_memory() * MEMORY_SHARE)
    mode = requested if requested != "auto" else ("memory" if total <= budget else "disk")
    sizes = f"{n_images} x {'about ' if family.variable_image_features else ''}{byte_size(per_image)} {str(dtype).removeprefix('torch.')}"
    if mode == "memory":
        why = "vision tower frozen, no flips" + ("" if requested == "memory" else f", fits in memory ({byte_size(total)} of a {byte_size(budget)} budget)")
        return CachePlan("memory", f"image features: {why}: caching in memory ({sizes})", dtype)

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    _refuse_inside_dataset(root, dataset_dir)
    fingerprint = model_fingerprint(family, model, processor, dtype)
    why = "vision tower frozen, no flips" + ("" if requested == "disk" else f", {byte_size(total)} is more than the memory budget ({byte_size(budget)})")
    return CachePlan("disk", f"image features: {why}: caching on disk in {root / fingerprint} ({sizes})", dtype, root, fingerprint)


def _feature_shape(family: Any, model: torch.nn.Module, processor: Any, sample_image: str | None) -> tuple[int, ...]:
    """One image's feature shape: fixed by the model, or (chat VLMs) that of `sample_image`, as an estimate."""
    if not family.variable_image_features:
        return family.image_feature_shape(model, processor)
    from caption_train.data.images import ImageLoadError, load_rgb

    try:
        image = load_rgb(sample_image) if sample_image else None
    except ImageLoadError:
        image = None
    if image is None:
        raise UserError("no readable training image to size the image features with")
    return family.estimate_feature_shape(model, processor, image)


def _refuse_inside_dataset(root: Path, dataset_dir: str) -> None:
    dataset = Path(dataset_dir).expanduser().resolve()
    resolved = root.resolve()
    if resolved == dataset or dataset in resolved.parents:
        raise UserError(f"--cache_dir {root}: is inside the dataset folder {dataset}; the trainer never writes there; pick a folder outside it")


def model_fingerprint(family: Any, model: torch.nn.Module, processor: Any, dtype: torch.dtype) -> str:
    """Names the cache folder: a hash of the vision tower's weights, the image processor config, the dtype."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{family.name}|{LAYOUT_VERSION}|{dtype}|".encode())
    image_processor = getattr(processor, "image_processor", processor)
    digest.update(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode())
    for module in family.feature_modules(model):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Storing


def file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DiskStore:
    """One safetensors file per image under `folder`, named by the image file's content hash."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder = folder
        self.dtype = dtype
        self.writable = True

    def key_for(self, image_path: str) -> str:
        return file_digest(image_path)

    def entry(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int | None, ...]) -> torch.Tensor | None:
        """The entry for `key` if it is readable and has `shape` (None: any size in that dimension) and the dtype."""
        from safetensors.torch import load_file

        path = self.entry(key)
        if not path.is_file():
            return None
        try:
            tensor = load_file(str(path))["features"]
        except Exception as error:  # a torn or foreign file: recompute it
            _warn_once(f"feature cache: unreadable entry {path} ({type(error).__name__}); recomputing it")
            return None
        if not _fits(tuple(tensor.shape), tuple(shape)) or tensor.dtype != self.dtype:
            _warn_once(f"feature cache: entry {path} has shape {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {self.dtype}; recomputing it")
            return None
        return tensor

    def save(self, key: str, tensor: torch.Tensor) -> None:
        if not self.writable:
            return
        from safetensors.torch import save

        path = self.entry(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: a reader sees no entry or a whole one. No fsync: a torn entry after a crash is recomputed.
            write_bytes_atomic(path, save({"features": tensor.contiguous()}), durable=False)
        except OSError as error:
            self.writable = False
            _warn_once(f"feature cache: cannot write to {self.folder} ({error.strerror or error}); "
                       "computing image features without storing them on disk")


def _fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Using


class SkipCached:
    """Picklable predicate for the dataset (and its DataLoader workers): is this image's feature already known,
    so the image need not be decoded? A snapshot for the memory cache, a file check for the disk cache."""

    def __init__(self, known: frozenset[str], disk: DiskStore | None):
        self.known = known
        self.disk = disk

    def __call__(self, image_path: str) -> bool:
        if self.disk is None:
            return image_path in self.known
        try:
            return self.disk.entry(self.disk.key_for(image_path)).is_file()
        except OSError:
            return False


class FeatureCache:
    """Image features by image: in memory (keyed by path) and, with a DiskStore, on disk (keyed by content)."""

    def __init__(self, dtype: torch.dtype, disk: DiskStore | None = None):
        self.dtype = dtype
        self.disk = disk
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def skip_predicate(self) -> SkipCached:
        """Call at the start of each epoch, before the loader's iterator (and its workers) are created."""
        return SkipCached(frozenset(self.memory), self.disk)

    def covers(self, image_paths: Iterable[str]) -> bool:
        """Whether every one of these images' features is known without reading an image (memory cache only:
        for the disk cache that would cost a hash of every file)."""
        return self.disk is None and all(path in self.memory for path in image_paths)

    def _lookup(self, path: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if self.disk is None:
            return self.memory.get(path)
        return self.disk.load(self.disk.key_for(path), shape)

    def _store(self, path: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", self.dtype)
        if self.disk is None:
            self.memory[path] = features
        else:
            self.disk.save(self.disk.key_for(path), features)

    def model_inputs(self, batch: dict[str, Any], paths: Sequence[str], *, model: torch.nn.Module, family: Any,
                     processor: Any, autocast: Callable[[], Any]) -> dict[str, Any]:
        """`batch` with pixel_values replaced by every image's features: read from the cache, or computed from
        the batch's pixels (and stored). An image the loader skipped as cached whose entry cannot be read now is
        loaded here and recomputed."""
        batch = dict(batch)
        pixel_rows = batch.pop("pixel_rows").tolist()
        if family.variable_image_features:
            return self._token_inputs(batch, paths, model=model, family=family, autocast=autocast)
        pixels = batch.pop("pixel_values", None)
        features = self.features_for(paths, model=model, family=family, processor=processor, autocast=autocast,
                                     pixels=pixels, pixel_rows=pixel_rows, device=batch["input_ids"].device)
        return batch | family.feature_inputs(features)

    def features_for(self, paths: Sequence[str], *, model: torch.nn.Module, family: Any, processor: Any,
                     autocast: Callable[[], Any], pixels: torch.Tensor | None = None, pixel_rows: Sequence[int] = (),
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Every image's features, [len(paths), *image_feature_shape], in the cache's dtype on `device`: read from
        the cache, else computed (from `pixels`, whose rows are `pixel_rows`, or from the image file) and stored.
        For a family with variable_image_features, a list of [tokens, width] tensors (computed from the files)."""
        if family.variable_image_features:
            return self._token_features_for(paths, model=model, family=family, processor=processor, autocast=autocast, device=device)
        shape = tuple(family.image_feature_shape(model, processor))
        found = self._complete(paths, [shape] * len(paths), lambda todo: self._compute(
            todo, list(pixel_rows), pixels, paths, model=model, family=family, processor=processor, autocast=autocast))
        return torch.stack([f.to(device, non_blocking=True) for f in found])

    def _complete(self, paths: Sequence[str], shapes: Sequence[tuple[int | None, ...]],
                  compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Every path's features in the cache's dtype: read from the cache where an entry of its shape is there,
        else from `compute(rows)` (the missing rows' features, in order), which are stored."""
        found = [self._lookup(path, shape) for path, shape in zip(paths, shapes)]
        todo = [row for row, features in enumerate(found) if features is None]
        self.hits += len(paths) - len(todo)
        self.misses += len(todo)
        if todo:
            for row, features in zip(todo, compute(todo)):
                self._store(paths[row], features)
                found[row] = features.to(self.dtype)
        return found

    def _compute(self, rows: list[int], pixel_rows: list[int], pixels: torch.Tensor | None, paths: Sequence[str], *,
                 model: torch.nn.Module, family: Any, processor: Any, autocast: Callable[[], Any]) -> torch.Tensor:
        position = {row: i for i, row in enumerate(pixel_rows)}
        if pixels is not None and all(row in position for row in rows):
            chosen = pixels[[position[row] for row in rows]]
        else:
            from caption_train.data.images import load_rgb

            chosen = family.pixel_inputs(processor, [load_rgb(paths[row]) for row in rows])["pixel_values"]
        device = next(model.parameters()).device
        with autocast():
            return family.image_features(model, chosen.to(device))

    # ---- families whose images have their own token counts (chat VLMs): one [tokens, width] tensor per image

    def _token_inputs(self, batch: dict[str, Any], paths: Sequence[str], *, model: torch.nn.Module, family: Any,
                      autocast: Callable[[], Any]) -> dict[str, Any]:
        """Every image was loaded (its placeholders are in the prompt): each row's features are read from the
        cache, or, when any is missing, computed for the whole batch from its pixels and the missing ones stored."""
        counts = family.image_token_counts(model, batch["input_ids"])
        width = family.image_feature_width(model)

        def compute(todo: list[int]) -> list[torch.Tensor]:
            with autocast():
                computed = family.batch_image_features(model, batch)  # the whole batch: its pixels cannot be split by row
            return [computed[row] for row in todo]

        found = self._complete(paths, [(count, width) for count in counts], compute)
        batch.pop("pixel_values")
        device = batch["input_ids"].device
        return batch | family.feature_inputs([features.to(device, non_blocking=True) for features in found], model)

    def _token_features_for(self, paths: Sequence[str], *, model: torch.nn.Module, family: Any, processor: Any,
                            autocast: Callable[[], Any], device: torch.device | str) -> list[torch.Tensor]:
        from caption_train.data.images import load_rgb

        def compute(todo: list[int]) -> list[torch.Tensor]:
            inputs = family.prompt_inputs(processor, [load_rgb(paths[row]) for row in todo], None)
            with autocast():
                return family.batch_image_features(model, inputs)

        found = self._complete(paths, [(None, family.image_feature_width(model))] * len(paths), compute)
        return [features.to(device, non_blocking=True) for features in found]
