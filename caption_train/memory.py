"""Memory plan: a training run's peak memory, estimated before its first step, and what to do when it will not fit.

    plan = plan_memory(cfg, model=model, family=family, processor=processor, samples=train_samples, collate=collate,
                       accelerator=accelerator, lr=lr, enable_checkpointing=enable_gradient_checkpointing)
    for line in plan.lines():   # memory: about 17.8 GiB peak (weights 15.4 GiB bf16, adapter+optimizer 0.6 GiB, ...)
        print(line)
    with answer_out_of_memory(plan, step=lambda: run.global_step + 1):   # out of memory -> one line with suggestions
        train_one_epoch(run, epoch, progress)

What is counted, and how:
- weights: the loaded model's frozen parameters and buffers, by their real dtype (what is on the device now);
- adapter+optimizer: the trainable parameters, their gradients (the parameter's dtype) and the optimizer's state,
  measured by running the run's optimizer (with its optimizer_args) one step on two stand-in parameters of each
  trainable dtype, so AdamW's two moments (and amsgrad's third), Prodigy's s, p0, exp_avg and exp_avg_sq (p0 a
  scalar for a parameter that starts at zero, like LoRA's B) count as the optimizer really keeps them;
- activations: measured on probe steps (forward and backward through the training step's loss) at the longest
  rows the run will see: the longest caption, with, where the image sets the row's length (chat VLMs), the image
  with the most image tokens of up to 256 evenly spaced ones. On CUDA the allocator's own peak
  (max_memory_allocated) at the batch size; on a CPU, which has no allocator peak counter, the most bytes of tensor
  storage alive at once (a dispatch mode sees every tensor each operation makes, and a weak reference when it is
  freed), at one row and two, extrapolated along that line to the batch size.

The probe leaves the run as it was: RNG states, train/eval modes and batch-norm statistics are restored, its
gradients are dropped, and it logs, caches and writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caption_train.checkpoint import restore_rng_states, rng_states
from caption_train.config import TrainConfig, parse_memory_size
from caption_train.errors import UserError
from caption_train.models.base import IGNORE_INDEX, unwrap_peft

CAPTION_CANDIDATES = 32  # the longest captions by characters, tokenized to find the longest by tokens
IMAGE_HEADERS = 256  # images whose size is read (evenly spaced) to find the one with the most image tokens
IMAGE_CANDIDATES = 4  # of those, the largest by area and by longest side are loaded and tokenized
STAND_IN_SIZES = (64, 4096)  # elements of the two stand-in parameters the optimizer's state is measured on
QUANTIZED_BYTES_PER_WEIGHT = 0.53  # NF4 with double quantization: 4 bits and its scales (QLoRA paper: ~0.127 bit)
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Sizes


def format_bytes(n: float) -> str:
    """'17.8 GiB', '312 MiB', '1.9 MiB', '48 KiB': GiB with one decimal, smaller units with three significant digits."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size or unit == "KiB":
            value = n / size
            return f"{value:.1f} {unit}" if unit == "GiB" or value < 10 else f"{value:.0f} {unit}"
    raise AssertionError


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------
# Weights, gradients, optimizer state: counted from what is loaded


@dataclass(frozen=True)
class StateBytes:
    """Bytes the model and its training state hold between steps."""

    frozen: dict[str, int]  # dtype name -> bytes of frozen parameters and buffers
    trainable: int  # trainable parameters
    gradients: int  # their gradients (the parameter's dtype)
    optimizer: int  # the optimizer's state after its first step
    optimizer_note: str  # what that state is, e.g. "AdamW: exp_avg, exp_avg_sq, step"

    @property
    def weights(self) -> int:
        return sum(self.frozen.values())

    @property
    def training(self) -> int:
        return self.trainable + self.gradients + self.optimizer

    def describe_weights(self) -> str:
        """'15.4 GiB bf16', or by dtype where more than one holds 1% or more: '15.4 GiB (15.2 GiB bf16 + 0.2 GiB fp32)'."""
        parts = sorted(((b, name) for name, b in self.frozen.items() if b >= 0.01 * self.weights and b), reverse=True)
        if len(parts) == 1:
            return f"{format_bytes(self.weights)} {parts[0][1]}"
        if not parts:
            return format_bytes(self.weights)
        return f"{format_bytes(self.weights)} ({' + '.join(f'{format_bytes(b)} {name}' for b, name in parts)})"


def count_state(model: torch.nn.Module, optimizer: str, optimizer_args: dict[str, Any], lr: float) -> StateBytes:
    """The model's frozen bytes by dtype, its trainable bytes, and the gradients and optimizer state they will get."""
    frozen: dict[str, int] = {}
    trainable: list[torch.nn.Parameter] = []
    for parameter in model.parameters():  # each shared (tied) parameter once
        if parameter.requires_grad:
            trainable.append(parameter)
        else:
            name = _dtype_name(parameter.dtype)
            frozen[name] = frozen.get(name, 0) + _nbytes(parameter)
    for buffer in model.buffers():
        name = _dtype_name(buffer.dtype)
        frozen[name] = frozen.get(name, 0) + _nbytes(buffer)
    trained = sum(_nbytes(p) for p in trainable)
    state, note = optimizer_state_bytes(optimizer, optimizer_args, lr, trainable)
    return StateBytes(frozen=frozen, trainable=trained, gradients=trained, optimizer=state, optimizer_note=note)


def optimizer_state_bytes(name: str, args: dict[str, Any], lr: float, params: Sequence[torch.nn.Parameter]) -> tuple[int, str]:
    """Bytes of the state `name` (with `args`) keeps for `params` after its first step, and what that state is.

    Measured, not assumed: the optimizer runs one step on two stand-in parameters (of each dtype and device the
    trainable ones have, all-zero and not: Prodigy keeps a scalar p0 for a parameter that starts at zero); state
    bytes = a * elements + b per parameter, solved from the two sizes.
    """
    from caption_train.optim import build_optimizer

    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device, bool(p.detach().any())), []).append(p)
    total, keys = 0, []
    for (dtype, device, nonzero), members in groups.items():
        per_element, per_parameter, names = _measure_optimizer(build_optimizer, name, args, lr, dtype, device, nonzero)
        total += sum(math.ceil(per_element * p.numel() + per_parameter) for p in members)
        keys += [k for k in names if k not in keys]
    return total, f"{name}: {', '.join(keys)}" if keys else name


def _measure_optimizer(build: Callable, name: str, args: dict[str, Any], lr: float, dtype: torch.dtype, device: torch.device,
                       nonzero: bool) -> tuple[float, float, list[str]]:
    small, large = (torch.nn.Parameter(torch.full((n,), 0.5 if nonzero else 0.0, dtype=dtype, device=device)) for n in STAND_IN_SIZES)
    for p in (small, large):
        p.grad = torch.full_like(p, 0.01)
    optimizer = build(name, [small, large], lr=lr, args=args)
    optimizer.step()
    sizes = []
    names: list[str] = []
    for p in (small, large):
        tensors = [(key, value) for key, value in optimizer.state[p].items() if isinstance(value, torch.Tensor)]
        names += [key for key, _ in tensors if key not in names]
        sizes.append(sum(_nbytes(value) for _, value in tensors))
    per_element = (sizes[1] - sizes[0]) / (STAND_IN_SIZES[1] - STAND_IN_SIZES[0])
    return per_element, sizes[0] - per_element * STAND_IN_SIZES[0], names


# ---------------------------------------------------------------------------------------------
# The probe batch: the longest rows the run will see


@dataclass
class ProbeBatch:
    """The items (image, caption, path) of the probe batch's row, and how long that row is."""

    item: tuple[Any, str, str]
    tokens: int  # the row's sequence length (input_ids; labels where there are none)

    def batch(self, collate: Callable, rows: int) -> dict[str, Any]:
        batch = collate([self.item] * rows)
        if batch is None:
            raise UserError(f"memory plan: the probe image {self.item[2]} could not be loaded")
        batch.pop("image_paths", None)
        batch.pop("pixel_rows", None)
        return batch


def longest_row(samples: Sequence[Any], family: Any, processor: Any, collate: Callable) -> ProbeBatch:
    """The longest caption (in training tokens, the family's own collate at the run's max_length) with, where the
    image sets the row's length (chat VLMs), the image giving the most image tokens of up to IMAGE_HEADERS."""
    from caption_train.data.images import ImageLoadError, load_rgb
    from PIL import Image

    stand_in = Image.new("RGB", (64, 64))
    caption = _longest_caption(samples, collate, stand_in)
    candidates = _largest_images(samples) if family.variable_image_features else samples[:IMAGE_CANDIDATES]
    best: ProbeBatch | None = None
    for sample in candidates:
        try:
            image = load_rgb(sample.image_path)
        except (ImageLoadError, OSError):
            continue
        try:
            batch = collate([(image, caption, str(sample.image_path))])
        except UserError:  # no room for a caption after this image's tokens: training refuses it too
            continue
        if batch is None:
            continue
        row = ProbeBatch((image, caption, str(sample.image_path)), _row_length(batch))
        if best is None or row.tokens > best.tokens:
            best = row
        if not family.variable_image_features:
            break  # every image is resized alike: any readable one will do
    if best is None:
        raise UserError("memory plan: no training row could be built from the images and captions it tried (unreadable images, or "
                        "captions training refuses); check the dataset with `caption-train lint DATASET_DIR --model MODEL`")
    return best


def _longest_caption(samples: Sequence[Any], collate: Callable, stand_in: Any) -> str:
    captions = list(dict.fromkeys(heapq.nlargest(CAPTION_CANDIDATES, (s.caption for s in samples), key=len)))
    try:
        batch = collate([(stand_in, c, "") for c in captions])
        targets = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    except UserError:  # one caption training refuses (it says which when it meets it): judge the others alone
        targets = []
        for caption in captions:
            try:
                targets.append(int((collate([(stand_in, caption, "")])["labels"] != IGNORE_INDEX).sum()))
            except UserError:
                targets.append(-1)
    return captions[max(range(len(captions)), key=targets.__getitem__)]


def _largest_images(samples: Sequence[Any]) -> list[Any]:
    """The largest of up to IMAGE_HEADERS evenly spaced images, by area and by longest side (headers only)."""
    from PIL import Image

    step = max(1, -(-len(samples) // IMAGE_HEADERS))
    sized = []
    for sample in samples[::step]:
        try:
            with Image.open(sample.image_path) as image:
                sized.append((image.size, sample))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    by_area = heapq.nlargest(IMAGE_CANDIDATES, sized, key=lambda s: s[0][0] * s[0][1])
    by_side = heapq.nlargest(IMAGE_CANDIDATES, sized, key=lambda s: max(s[0]))
    chosen = list({id(sample): sample for _, sample in by_area + by_side}.values())
    return chosen or list(samples[:IMAGE_CANDIDATES])


def _row_length(batch: dict[str, Any]) -> int:
    ids = batch.get("input_ids")
    return int((ids if ids is not None else batch["labels"]).shape[1])


# ---------------------------------------------------------------------------------------------
# One probe step


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage alive at once, for a CPU, which has no allocator peak counter.

    Every tensor an operation returns whose storage is not one of the operation's inputs' (a view or an in-place
    result shares its input's) is a new allocation; a weak reference notices when its storage is freed. Storages
    made inside an operation and freed before it returns (a kernel's scratch) are not seen, nor the allocator's own
    overhead: the count is a tensor-level peak."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._alive: dict[int, tuple[Any, int]] = {}  # id(storage) -> (weak reference, bytes), while it lives

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for tensor in _tensors(out):
            if tensor.device != self.device or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._alive:
                continue
            if inputs is None:
                inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs)) if t.layout == torch.strided}
            if key not in inputs:
                self._track(storage, key)
        return out

    def _track(self, storage: Any, key: int) -> None:
        size = storage.nbytes()
        self._alive[key] = (weakref.ref(storage, lambda _, key=key: self._freed(key)), size)
        self.live += size
        self.peak = max(self.peak, self.live)

    def _freed(self, key: int) -> None:
        _, size = self._alive.pop(key, (None, 0))
        self.live -= size


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an operation's arguments or results (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def step_loss(family: Any, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The loss the training step computes: the family's caption loss (the output layer at the target positions only)."""
    return family.caption_loss(model, batch).loss


@dataclass
class Probe:
    """What a training step holds at its peak beyond what was allocated before it (activations, the gradients made
    so far, transients), at the run's batch size; None where the probe step ran out of memory."""

    peak: int | None
    per_row: float | None  # the peak's growth per row, where it was measured at two sizes
    seconds: float
    error: str | None = None

    def at(self, batch_size: int, rows: int) -> int | None:
        """The peak at `rows` rows instead of `batch_size` (a straight line through the measurements)."""
        if self.peak is None:
            return None
        per_row = self.per_row if self.per_row is not None else self.peak / batch_size
        return max(0, int(self.peak - per_row * (batch_size - rows)))


def is_out_of_memory(error: BaseException) -> bool:
    """An allocator failure: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory"))


def measure_step(model: torch.nn.Module, family: Any, row: ProbeBatch, collate: Callable, *, batch_size: int, sizes: Sequence[int],
                 autocast: Callable[[], Any], device: torch.device) -> Probe:
    """Probe steps of `sizes` rows of `row`; the peak at `batch_size` rows is measured (one size) or extrapolated
    along the line through two sizes (a step's memory grows linearly with its rows, from a part that does not: e.g.
    the low-precision copies of the weights autocast saves for backward)."""
    start = time.perf_counter()
    peaks = []
    for rows in sizes:
        peak, error = probe_step(model, family, row.batch(collate, rows), autocast=autocast, device=device)
        if error is not None:
            return Probe(None, None, time.perf_counter() - start, error)
        peaks.append(peak)
    seconds = time.perf_counter() - start
    if len(sizes) == 1:
        return Probe(peaks[0], None, seconds)
    per_row = max(0.0, (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]))  # (a tiny model's peak may fall at another moment)
    return Probe(int(peaks[0] + per_row * (batch_size - sizes[0])), per_row, seconds)


def probe_step(model: torch.nn.Module, family: Any, batch: dict[str, Any], *, autocast: Callable[[], Any],
               device: torch.device) -> tuple[int | None, str | None]:
    """Forward and backward once on `batch`: (peak bytes, None), or (None, the error) where memory ran out. The
    model and the RNGs are left as they were."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with _left_as_found(model):
        try:
            with _peak_counter(device) as counter:
                with autocast():
                    loss = step_loss(family, model, batch)
                loss.backward()
                del loss
            return counter(), None
        except BaseException as err:  # noqa: BLE001 - only allocator failures are answered; the rest re-raised
            if not is_out_of_memory(err):
                raise
            return None, _first_line(err)


@contextlib.contextmanager
def _peak_counter(device: torch.device) -> Iterator[Callable[[], int]]:
    """Yields a function returning the peak bytes allocated inside the block beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: torch.cuda.max_memory_allocated(device) - base
        torch.cuda.synchronize(device)
        return
    counter = LiveTensorBytes(device)
    with counter:
        yield lambda: counter.peak


@contextlib.contextmanager
def _left_as_found(model: torch.nn.Module) -> Iterator[None]:
    """Train mode for the probe (dropout masks are part of a step's memory); afterwards every module's mode,
    batch-norm statistics, the RNG states and the gradients are as they were."""
    modes = [(module, module.training) for module in model.modules()]
    norms = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    rng = rng_states()
    had_grad = {id(p) for p in model.parameters() if p.grad is not None}
    model.train()
    try:
        yield
    finally:
        for p in model.parameters():
            if id(p) not in had_grad:
                p.grad = None
        for module, training in modes:
            module.training = training
        for module, state in norms:
            module.load_state_dict(state)
        restore_rng_states(rng)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# What there is room for


@dataclass(frozen=True)
class Capacity:
    device: str  # "GPU" or "RAM"
    free: int  # free now plus what this run already holds (its weights): what the whole run may use
    budget: int | None  # --memory_budget

    @property
    def limit(self) -> int:
        return self.free if self.budget is None else min(self.free, self.budget)

    @property
    def limit_name(self) -> str:
        return "budget" if self.budget is not None and self.budget < self.free else "free" if self.device == "GPU" else "available"

    def describe(self) -> str:
        have = f"{self.device} has {format_bytes(self.free)} {'free' if self.device == 'GPU' else 'available'}"
        if self.budget is None:
            return have
        return f"budget {format_bytes(self.budget)} (--memory_budget; {have})"


def device_capacity(device: torch.device, held: int, budget: int | None) -> Capacity:
    """Free memory on `device` now plus `held` (the bytes of this run already on it), capped by `budget`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Capacity("GPU", int(free) + torch.cuda.memory_reserved(device), budget)
    return Capacity("RAM", available_ram() + held, budget)


def available_ram() -> int:
    """RAM a process may still take: MemAvailable (psutil's `available`), capped by a cgroup v2 memory limit and by
    the address space an RLIMIT_AS (`ulimit -v`) leaves."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        available = _meminfo("MemAvailable")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            available = min(available, max(0, soft - _status("VmSize")))
    except (ImportError, OSError, ValueError):
        pass
    return available


def _status(key: str) -> int:
    """A size from /proc/self/status, in bytes."""
    return _kib_line(Path("/proc/self/status"), key)


def _meminfo(key: str) -> int:
    return _kib_line(Path("/proc/meminfo"), key)


def _kib_line(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {key}")


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class MemoryPlan:
    """The estimate, what it is compared with, and the gradient checkpointing decision."""

    state: StateBytes
    batch_size: int
    accumulation: int
    tokens: int  # the probe row's length
    image_tokens: int | None  # of which image tokens (families whose row holds them)
    capacity: Capacity
    probe: Probe | None = None  # with gradient checkpointing as decided
    checkpointing: bool = False
    why: str = ""  # how checkpointing was decided
    other: Probe | None = None  # the probe with checkpointing the other way (measured when the run does not fit)
    quantizable: int = 0  # bytes of frozen Linear weights --quantize 4bit would shrink (CUDA only; 0 elsewhere)
    processor_hint: tuple[str, int] | None = None  # (processor key, pixels per image token) for a smaller image budget
    seconds: float = 0.0  # what the plan cost, probe steps included
    adapter: bool = True  # LoRA/IA3 (False: a full fine-tune, whose trained weights are the model's)

    # ---- the estimate
    def activations(self, probe: Probe | None = None, rows: int | None = None) -> int | None:
        """The step's peak less the gradients (counted with the training state), at `rows` (the batch size)."""
        peak = (probe or self.probe).at(self.batch_size, rows or self.batch_size)
        return None if peak is None else max(0, peak - self.state.gradients)

    def total(self, probe: Probe | None = None, rows: int | None = None) -> int | None:
        activations = self.activations(probe, rows)
        return None if activations is None else self.state.weights + self.state.training + activations

    @property
    def fits(self) -> bool:
        total = self.total()
        return total is not None and total <= self.capacity.limit

    # ---- what it prints
    def line(self) -> str:
        total, activations = self.total(), self.activations()
        label = "adapter+optimizer" if self.adapter else "trained weights+optimizer"
        measured = format_bytes(activations) if activations is not None else "more than there is (the probe step ran out of memory)"
        head = f"about {format_bytes(total)} peak" if total is not None else "more than there is"
        return (f"memory: {head} (weights {self.state.describe_weights()}, {label} {format_bytes(self.state.training)}, "
                f"activations {measured} at batch {self.batch_size}, {self.tokens} tokens); {self.capacity.describe()}; plan {self.seconds:.1f} s")

    def lines(self) -> list[str]:
        lines = [self.line(), f"gradient checkpointing: {'on' if self.checkpointing else 'off'} ({self.why})"]
        if not self.fits:
            lines.append(f"warning: memory: {self.overflow()}; it may run out of memory at step 1: {self.suggestions()}")
        return lines

    def overflow(self, probe: Probe | None = None) -> str:
        total = self.total(probe)
        room = f"the {format_bytes(self.capacity.limit)} {self.capacity.limit_name}"
        return f"about {format_bytes(total)}, more than {room}" if total is not None else f"the probe step ran out of memory ({room})"

    # ---- what would fit
    def suggestions(self) -> str:
        options = [option for option in (self._checkpointing_option(), self._batch_option(), self._image_option(), self._quantize_option(),
                                         self._adapter_option()) if option]
        if not options:
            return "no setting the plan knows of makes it smaller; use a device with more memory"
        return "try " + "; or ".join(options)

    def _room(self) -> int:
        """What is left for activations once the weights and the training state are in."""
        return self.capacity.limit - self.state.weights - self.state.training

    def _checkpointing_option(self) -> str | None:
        if self.checkpointing or self.other is None:
            return None
        after = self.total(self.other)
        saved = "it ran out of memory too" if after is None else f"about {format_bytes(max(0, (self.total() or 0) - after))} less" if self.total() else f"about {format_bytes(after)} in all"
        return f"--gradient_checkpointing true ({saved})"

    def _batch_option(self) -> str | None:
        if self.probe.peak is None or self.batch_size == 1:
            return None
        effective = self.batch_size * self.accumulation
        divisors = [b for b in range(self.batch_size - 1, 0, -1) if effective % b == 0]
        fitting = [b for b in divisors if (self.activations(rows=b) or 0) <= self._room()]
        batch = fitting[0] if fitting else 1
        saved = (self.activations() or 0) - (self.activations(rows=batch) or 0)
        if saved <= 0:
            return None
        return (f"--batch_size {batch} --gradient_accumulation_steps {effective // batch} (the same {effective} images per "
                f"optimizer step; about {format_bytes(saved)} less)")

    def _image_option(self) -> str | None:
        activations = self.activations()
        if not self.image_tokens or not activations:
            return None
        # Activations grow about linearly with a row's tokens: the row's length that would fit, and what is left
        # of the image's share of it.
        tokens = int(self.tokens * max(0, self._room()) / activations)
        keep = self.image_tokens - (self.tokens - tokens)
        if keep <= 0:
            return None  # the rest of the row alone is more than there is room for: smaller images cannot do it
        where = "model_config.processor"
        if self.processor_hint is not None:
            key, pixels = self.processor_hint
            where += f" {{{key} = {keep * pixels}}}"
        return f"smaller images: {where} (the longest row's image is {self.image_tokens} of its {self.tokens} tokens; about {keep} would fit)"

    def _quantize_option(self) -> str | None:
        if not self.quantizable:
            return None
        per_weight = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}.get(max(self.state.frozen, key=self.state.frozen.get), 4.0)
        saved = self.quantizable - int(self.quantizable / per_weight * QUANTIZED_BYTES_PER_WEIGHT)
        return f"--quantize 4bit (about {format_bytes(saved)} less)"

    def _adapter_option(self) -> str | None:
        if self.adapter:
            return None
        return f"an adapter (--peft_module LoRA) instead of a full fine-tune, whose trained weights, gradients and optimizer state take {format_bytes(self.state.training)}"

    def out_of_memory_message(self, step: int) -> str:
        total = self.total()
        planned = f"the plan estimated about {format_bytes(total)} of {format_bytes(self.capacity.limit)}" if total is not None else "the plan's probe step ran out too"
        return f"out of memory at step {step} (batch {self.batch_size}, rows up to {self.tokens} tokens; {planned}): {self.suggestions()}"


# ---------------------------------------------------------------------------------------------
# Building the plan


def plan_memory(cfg: TrainConfig, *, model: torch.nn.Module, family: Any, processor: Any, samples: Sequence[Any],
                collate: Callable, accelerator: Any, lr: float, enable_checkpointing: Callable[[torch.nn.Module], None],
                sharded: bool = False) -> MemoryPlan | None:
    """Decide gradient checkpointing (enabling it on `model` when it is on) and return the plan; None when
    --memory_plan is false or the model is to be sharded (FSDP: the whole model is not one process's to probe),
    and then checkpointing is on only when asked. `model` must be on its training device, not yet wrapped by
    accelerate, and not compiled. Raises a UserError when the probe step itself runs out of memory."""
    asked = cfg.gradient_checkpointing
    if not cfg.memory_plan or sharded or not samples:
        if asked is True:
            enable_checkpointing(model)
        return None
    start = time.perf_counter()
    device = accelerator.device
    state = count_state(model, cfg.optimizer, cfg.optimizer_args, lr)
    row = longest_row(samples, family, processor, collate)
    budget = parse_memory_size(cfg.memory_budget) if cfg.memory_budget else None
    plan = MemoryPlan(state=state, batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation_steps, tokens=row.tokens,
                      image_tokens=_count_image_tokens(family, model, row.batch(collate, 1)),
                      capacity=device_capacity(device, state.weights + state.trainable, budget),
                      quantizable=_quantizable_bytes(model, cfg, device), processor_hint=_processor_hint(processor),
                      adapter=cfg.peft_module != "none")
    # A GPU runs the probe at the batch size (its allocator counts exactly, quickly). A CPU counts tensors in Python
    # and computes slowly: one row and two, extrapolated to the batch size (a step's memory grows linearly with its
    # rows), three rows' compute instead of a batch's; a batch of three or fewer is probed whole.
    sizes = [cfg.batch_size] if device.type == "cuda" or cfg.batch_size <= 3 else [1, 2]

    def probe() -> Probe:
        return measure_step(model, family, row, collate, batch_size=cfg.batch_size, sizes=sizes, autocast=accelerator.autocast, device=device)

    if asked is True:
        enable_checkpointing(model)
        plan.checkpointing, plan.why, plan.probe = True, "--gradient_checkpointing true", probe()
    else:
        plan.probe = probe()
        plan.why = "auto: the run fits without it" if asked == "auto" else "--gradient_checkpointing false"
        if not plan.fits and _can_checkpoint(model):
            enable_checkpointing(model)
            checkpointed = probe()
            if asked == "auto":
                plan.why = f"auto: without it {plan.overflow()}"
                plan.other, plan.probe, plan.checkpointing = plan.probe, checkpointed, True
            else:
                _disable_checkpointing(model)
                plan.other = checkpointed
        elif not plan.fits and asked == "auto":
            plan.why = f"auto: {type(unwrap_peft(model)).__name__} does not support it"
    if not plan.fits and plan.probe.peak is not None and plan.probe.per_row is None and cfg.batch_size > 1:
        plan.probe = _with_slope(plan.probe, model, family, row, collate, cfg.batch_size, accelerator)  # for the batch suggestion
    plan.seconds = time.perf_counter() - start
    if plan.probe.peak is None:  # the step itself cannot run at this shape: say so now, before anything is written
        raise UserError(f"{plan.out_of_memory_message(1)} ({plan.probe.error})")
    if asked == "auto" and accelerator.num_processes > 1:
        _agree_on_checkpointing(plan, model, accelerator, enable_checkpointing)
    return plan


def _with_slope(probe: Probe, model: torch.nn.Module, family: Any, row: ProbeBatch, collate: Callable, batch_size: int, accelerator: Any) -> Probe:
    """`probe` with its growth per row, from one more probe step at one row."""
    one = measure_step(model, family, row, collate, batch_size=1, sizes=[1], autocast=accelerator.autocast, device=accelerator.device)
    if one.peak is None:
        return probe
    return dataclasses.replace(probe, per_row=max(0.0, (probe.peak - one.peak) / (batch_size - 1)), seconds=probe.seconds + one.seconds)


def _agree_on_checkpointing(plan: MemoryPlan, model: torch.nn.Module, accelerator: Any, enable: Callable[[torch.nn.Module], None]) -> None:
    """Under several processes, checkpointing is on everywhere when any process's plan turned it on."""
    votes = accelerator.reduce(torch.tensor([float(plan.checkpointing)], device=accelerator.device), reduction="sum")
    if votes.item() > 0 and not plan.checkpointing:
        enable(model)
        plan.checkpointing, plan.why = True, "auto: another process's plan needs it"


def _can_checkpoint(model: torch.nn.Module) -> bool:
    return bool(getattr(unwrap_peft(model), "supports_gradient_checkpointing", False))


def _disable_checkpointing(model: torch.nn.Module) -> None:
    base = unwrap_peft(model)
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()


def _count_image_tokens(family: Any, model: torch.nn.Module, batch: dict[str, Any]) -> int | None:
    """Image placeholder tokens in the probe row, where the row holds them (chat VLMs)."""
    if not family.variable_image_features or "input_ids" not in batch:
        return None
    return int(family.image_token_counts(model, batch["input_ids"])[0])


def _processor_hint(processor: Any) -> tuple[str, int] | None:
    """(`max_pixels`, pixels per image token) for processors that size images by a pixel budget (Qwen2-VL style:
    one token per merge_size^2 patches of patch_size^2 pixels); None for others."""
    image_processor = getattr(processor, "image_processor", None)
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if image_processor is None or not hasattr(image_processor, "max_pixels") or not isinstance(patch, int) or not isinstance(merge, int):
        return None
    return "max_pixels", (patch * merge) ** 2


def _quantizable_bytes(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> int:
    """Bytes of frozen nn.Linear weights that --quantize 4bit would store in ~4 bits (CUDA, adapters, not yet
    quantized); 0 where it is not an option."""
    if device.type != "cuda" or cfg.quantize != "none" or cfg.peft_module == "none":
        return 0
    from caption_train.quantize import is_quantized

    if is_quantized(unwrap_peft(model)):
        return 0
    return sum(_nbytes(m.weight) for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)


# ---------------------------------------------------------------------------------------------
# Out of memory in training


@contextlib.contextmanager
def answer_out_of_memory(plan: MemoryPlan | None, step: Callable[[], int], on_error: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Turn an allocator failure inside the block into one UserError line with the plan's suggestions."""
    try:
        yield
    except BaseException as error:  # noqa: BLE001 - re-raised unless it is an allocator failure
        if not is_out_of_memory(error):
            raise
        on_error()
        step_number = step()
        if plan is None:
            message = (f"out of memory at step {step_number}: try --gradient_checkpointing true, a smaller --batch_size with "
                       "--gradient_accumulation_steps, or smaller images; --memory_plan true estimates what fits")
        else:
            message = plan.out_of_memory_message(step_number)
        raise UserError(f"{message} ({_first_line(error)})") from None
