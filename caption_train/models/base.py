"""The protocol every model family implements, the registry, and model-config loading with clear errors.

    @register
    class BlipFamily(ModelFamily):
        model_types = ("blip",)
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from caption_train.errors import UserError
from caption_train.packing import packed_rows
# IGNORE_INDEX is defined beside the loss and imported from here by the families (one definition).
from caption_train.models.loss import (  # noqa: F401
    IGNORE_INDEX, LOGIT_CHUNK_ELEMENTS, CaptionLoss, StashingHead, UnknownLogitTransform, target_loss,
)

DEFAULT_NEW_TOKENS = 40  # longest caption generate() writes when not told (the caption command's --max_new_tokens default)

_REGISTRY: dict[str, "ModelFamily"] = {}
_FALLBACKS: list["ModelFamily"] = []  # families asked, in registration order, about model types nobody registered


class ModelFamily:
    """What the trainer needs to know about one family of image-to-text models."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    fallback_description: str = ""
    """Non-empty for a generic family that also takes model types no family registered (see `handles_model_type`):
    how the unsupported-model error describes what it takes."""

    def handles_model_type(self, model_type: str) -> bool:
        """For a generic family: whether it takes `model_type`, which no family registered by name."""
        return False

    # ---- loading
    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        """(model, processor) with `overrides` applied to the model config. Weights in float32 unless overridden.
        (Label smoothing is the loss's: caption_loss.)"""
        raise NotImplementedError

    def training_processor(self, name_or_path: str, model_config: dict[str, Any], config: Any) -> Any:
        """The processor `load` returns for these `model_config` overrides, without loading any weights (what
        `lint --model` builds training batches with). `config`: the model's config (resolve_family's)."""
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError, KeyError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model {name_or_path}: could not load its processor ({reason}); the processor files must be saved beside the model") from None

    def max_text_length(self, model: torch.nn.Module) -> int:
        """Longest token sequence the text side accepts: what training caps max_length at."""
        return self.text_length_limit(unwrap_peft(model).config)

    def text_length_limit(self, config: Any) -> int:
        """`max_text_length` from the model's config alone, so `lint --model` reports the trainer's limit without
        loading any weights."""
        raise NotImplementedError

    # ---- adapters
    def lora_targets(self) -> list[str] | str:
        raise NotImplementedError

    def ia3_targets(self) -> tuple[list[str] | str, list[str] | str]:
        """(target_modules, feedforward_modules); the second must be a subset of the first."""
        raise NotImplementedError

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The image encoder, so callers can freeze it, run it without gradients, or cache its outputs."""
        raise NotImplementedError

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The text side (decoder / language model): what `--compile` compiles."""
        raise NotImplementedError

    # ---- a frozen vision tower, computed once (features.py)
    supports_feature_cache: bool = False
    """True when the family implements the methods below (image_features and feature_inputs have defaults that fit
    a tower whose frozen twin, a `FrozenVisionTower`, takes its own output as pixel_values), so its frozen tower's
    features can be cached."""

    variable_image_features: bool = False
    """True when each image's features have their own token count (chat VLMs: it follows the image's size). The
    cache then holds one [tokens, width] tensor per image, the loader still loads every image (the prompt's
    placeholders are expanded for it), and the family implements image_feature_width, image_token_counts,
    estimate_feature_shape and batch_image_features instead of image_feature_shape and image_features."""

    def feature_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """What computes the cached features: none of it may train for the cache to be used, and its weights name
        the disk cache's folder. Default: the vision tower."""
        return [self.vision_tower(model)]

    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        """Make a vision tower without trainable parameters run in eval mode without autograd, and accept the
        features `image_features` returned (through `feature_inputs`) in place of pixels. Default: nothing more
        than its parameters not requiring gradients."""

    def image_feature_shape(self, model: torch.nn.Module, processor: Any) -> tuple[int, ...]:
        """Shape of one image's features (without the batch dimension), for sizing the cache. `processor` for
        families whose feature size follows the image processor's output size rather than the model config."""
        raise NotImplementedError

    def image_features(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen tower's output for a batch of pixel_values, as the text side consumes it (no autograd).
        Default: the tower's last_hidden_state."""
        with torch.inference_mode():
            tower = self.vision_tower(model)
            features = tower(pixel_values=pixel_values.to(model_dtype(tower))).last_hidden_state
        return features.clone()  # a normal tensor again, usable in autograd

    def feature_inputs(self, features: torch.Tensor, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Model keyword arguments that feed precomputed `features` instead of pixel_values. Default: the
        features as pixel_values, which a `FrozenVisionTower` takes in place of pixels."""
        return {"pixel_values": features}

    # ---- prompts
    default_prompt: str | None = None
    """The instruction / task prompt the family trains and captions with (chat VLMs, Florence-2, PaliGemma);
    None for families whose captions start from nothing (BLIP, GIT), which then take no --prompt in training."""

    def training_prompt(self, prompt: str | None) -> str | None:
        """The prompt to train with: `prompt` (from --prompt) or the family's default; an error where none is taken."""
        if prompt is not None and self.default_prompt is None:
            raise UserError(f"--prompt {prompt!r}: the {self.name} family trains without a prompt (captions start from nothing); remove --prompt")
        return prompt if prompt is not None else self.default_prompt

    def prompt_line(self, prompt: str | None, origin: str) -> str:
        """The start-up line naming the prompt a command uses: `prompt` (where it came from: `origin`), or when
        None the family's default."""
        if prompt is None and self.default_prompt is None:
            return f"prompt: none (the {self.name} family captions from the image alone)"
        if prompt is None:
            return f"prompt: {self.default_prompt!r} (the {self.name} family's default)"
        return f"prompt: {prompt!r} ({origin})"

    # ---- data
    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        """A training batch with labels: the one place tokenization and label masking happen. Only caption tokens
        (and the end token after them) are targets; `prompt` is what `training_prompt` returned.

        An image may be None when its features come from the cache: pixel_values then holds only the images
        that were loaded, in order (and is absent when none was).
        """
        raise NotImplementedError

    def pixel_inputs(self, processor: Any, images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        """pixel_values for the images that are not None, in order ({} when none is): the processor's image
        processor alone. A family whose image processor returns more (image sizes, masks) overrides this."""
        loaded = [image for image in images if image is not None]
        if not loaded:
            return {}
        return {"pixel_values": processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]}

    # ---- the loss, computed where the labels are (models/loss.py)
    def output_head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The module that turns the text side's last hidden states into vocabulary logits, called once per forward
        on [rows, positions, width] (`model` without peft or DDP around it). None: the loss scores the full logits."""
        return None

    def label_shift(self, model: torch.nn.Module) -> int:
        """How far a label is ahead of the position whose logits predict it: 1 for a decoder-only model (its forward
        shifts the labels), 0 for an encoder-decoder (the labels are the decoder's next tokens already)."""
        return 1

    def logit_softcap(self, model: torch.nn.Module) -> float | None:
        """The soft cap (cap * tanh(logits / cap)) the model's forward applies to the head's output, if any. Default:
        the text config's final_logit_softcapping where the forward reads it: PaliGemma's does, Gemma 3's image-text
        model does not (transformers 5.25), though its config sets one."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(config, "final_logit_softcapping", None)
        code = inspect.unwrap(type(model).forward).__code__
        return cap if cap and "final_logit_softcapping" in (*code.co_names, *code.co_consts) else None

    def loss_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The forward's keyword arguments without labels: whatever the model would have built from the labels (an
        encoder-decoder's decoder inputs) is the family's to add. No cache: nothing is generated."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        if "use_cache" in inspect.signature(type(model).forward).parameters:
            inputs["use_cache"] = False
        return inputs

    def caption_loss(self, model: torch.nn.Module, batch: dict[str, Any], *, label_smoothing: float = 0.0,
                     rows: torch.Tensor | None = None, chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> CaptionLoss:
        """The batch's caption loss (mean over its target tokens, `label_smoothing` applied) and each row's summed
        plain cross-entropy and target count, with the output layer applied at the target positions only. `model`
        may be wrapped (peft, DDP): the forward goes through the wrapper. `rows`: see models/loss.target_loss."""
        if rows is None:  # a packed batch's rows are its samples' segments (packing.py), else each row is a sample
            rows = packed_rows(batch)
        inner = unwrap_peft(_unwrap_parallel(model))
        full_logits = _shards_parameters(model) or inner.__dict__.get("_caption_train_full_logits", False)
        head = None if full_logits else self.output_head(inner)
        if head is not None:
            swap_class(head, StashingHead)
        kwargs = dict(shift=self.label_shift(inner), softcap=self.logit_softcap(inner), label_smoothing=label_smoothing, rows=rows,
                      chunk_elements=chunk_elements)
        inputs = self.loss_inputs(inner, batch)
        checked = inner.__dict__.get("_caption_train_logits_checked", False)
        try:
            result = target_loss(model, inputs, batch["labels"], head=head, check_logits=not checked, **kwargs)
        except UnknownLogitTransform as err:
            # A forward that post-processes its logits in a way this family does not know: the model's own logits
            # from now on (this batch again too), rather than a loss that differs from the model's own.
            print(f"loss: {type(inner).__name__}: {err}; computing logits at every position for it (more memory than at the caption tokens alone)",
                  file=sys.stderr, flush=True)
            inner.__dict__["_caption_train_full_logits"] = True
            result = target_loss(model, inputs, batch["labels"], head=None, **kwargs)
        inner.__dict__["_caption_train_logits_checked"] = True
        return result

    def use_full_logits(self, model: torch.nn.Module) -> None:
        """Score this model's full logits from now on (--full_logits): the model's own output layer at every position."""
        unwrap_peft(_unwrap_parallel(model)).__dict__["_caption_train_full_logits"] = True

    def loss_note(self, model: torch.nn.Module) -> str | None:
        """One start-up line when this model's loss does not skip the positions without targets, else None."""
        inner = unwrap_peft(model)
        if inner.__dict__.get("_caption_train_full_logits", False):
            return "loss: logits at every position (--full_logits; the default computes them at the caption's target tokens only)"
        if self.output_head(inner) is not None:
            return None
        return (f"loss: no output layer known for {type(unwrap_peft(model)).__name__} in the {self.name} family; "
                "computing logits at every position (more memory than at the caption tokens alone)")

    # ---- row lengths (the length-grouped sampler, data/batching.py)
    def prompt_token_counter(self, processor: Any, prompt: str | None) -> Callable[[int, int], int] | None:
        """How many tokens come before the caption in the row of a (width, height) image, from the size alone (no
        pixels decoded), for a family whose rows hold a number of image tokens that follows the image's size (Qwen2-VL);
        None where that number is the same for every image, so that rows differ by their caption alone (the default).
        `prompt`: what `training_prompt` returned."""
        return None

    # ---- packing (packing.py): a batch's rows in one sequence without padding
    def packing_refusal(self, model: torch.nn.Module) -> str | None:
        """Why this model cannot take a batch's rows packed into one sequence (a few words, for the start-up line and
        the `--packing on` error), or None where it can: a decoder-only text side whose attention transformers masks
        per row from position ids that restart at each row. Default: it cannot."""
        return f"the {self.name} family's models take one row per sequence"

    def row_position_ids(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Each row's position ids in the padded `batch`, numbered as the model numbers the row on its own
        ([rows, length]; values at padding are unused): what a packed sequence restarts at each row. Default: 0, 1,
        ... from each row's first token."""
        return (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    # ---- inference
    def generation_pixels(self, processor: Any, images: Sequence[Image.Image], features: torch.Tensor | None) -> torch.Tensor:
        """pixel_values for generate(): the images' pixels, or their cached `features`, which a frozen tower
        (FrozenVisionTower) takes in their place."""
        if features is not None:
            return self.feature_inputs(features)["pixel_values"]
        return self.pixel_inputs(processor, images)["pixel_values"]

    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: torch.Tensor | None = None, **generate_kwargs: Any) -> list[str]:
        """Greedy captions for `images`. `features` (only from a family with supports_feature_cache, its frozen
        tower's cached output for these images) stand in for the images' pixels."""
        raise NotImplementedError

    def new_token_budget(self, model: torch.nn.Module, prompt_length: int, requested: int | None, prompt: str | None) -> int:
        """max_new_tokens for generate(): `requested` (default 40) capped so that the `prompt_length` tokens in front
        of the caption and the caption fit the text model's positions (past them it would index off its position
        embeddings); a UserError when the prompt alone leaves no room."""
        limit = self.max_text_length(model)
        room = limit - prompt_length
        if room < 1:
            raise UserError(f"--prompt {prompt!r}: it takes {prompt_length} of the text model's {limit} positions (start token included), "
                            "which leaves no room for a caption; use a shorter prompt")
        return min(requested or DEFAULT_NEW_TOKENS, room)


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a family findable by each of its `model_types`."""
    instance = cls()
    for model_type in cls.model_types:
        _REGISTRY[model_type] = instance
    if cls.fallback_description:
        _FALLBACKS.append(instance)
    return cls


def registered_families() -> dict[str, ModelFamily]:
    return dict(_REGISTRY)


def prompt_family_names() -> tuple[list[str], list[str]]:
    """(names of the families that take a prompt, names of those that refuse one), from the registry (generic
    families included), for help texts that stay right when a family is added."""
    families = list(dict.fromkeys([*_REGISTRY.values(), *_FALLBACKS]))
    taking = sorted(family.name for family in families if family.default_prompt is not None)
    refusing = sorted(family.name for family in families if family.default_prompt is None)
    return taking, refusing


def family_for_model_type(model_type: str, source: str) -> ModelFamily:
    """The family registered for `model_type`, else the first generic family that takes it."""
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    for family in _FALLBACKS:
        if family.handles_model_type(model_type):
            return family
    supported = ", ".join(sorted(_REGISTRY) + [family.fallback_description for family in _FALLBACKS])
    raise UserError(f"model {source}: model type {model_type!r} is not a supported image-to-text family (supported: {supported})")


def _looks_like_path(name_or_path: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else (or anything on disk) is a local path.
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path or Path(name_or_path).exists()


def load_model_config(name_or_path: str) -> Any:
    """AutoConfig for a hub id or local folder, with errors that say what was looked for."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if _looks_like_path(name_or_path):
        if not path.exists():
            raise UserError(f"--model_name_or_path {name_or_path}: no such folder; pass a local model folder or a hub id like Salesforce/blip-image-captioning-base")
        if not (path / "config.json").is_file():
            raise UserError(f"--model_name_or_path {name_or_path}: no config.json there; pass a folder written by save_pretrained (or a run's final/ with the caption command)")
    else:
        from caption_train.hub import hub_problem

        if (problem := hub_problem(name_or_path)) is not None:  # at once, not after minutes of retries
            raise UserError(f"--model_name_or_path {name_or_path}: {problem}")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model_name_or_path {name_or_path}: could not load the model config ({reason}); check the id, your network, or pass a local folder") from None


# What a processor is saved as. A tokenizer's vocabulary: tokenizer.json (fast), or the slow tokenizers' vocab.txt
# (BERT), vocab.json (+ merges.txt, BPE), *.model (SentencePiece), *.tiktoken. Without one, transformers builds an
# empty tokenizer without a word of warning. The image processor's settings: preprocessor_config.json, or (what
# transformers 5 writes) the image_processor table of processor_config.json.
TOKENIZER_VOCABULARY = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.tiktoken")
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


def missing_processor_files(folder: str | Path) -> list[str]:
    """What a local model folder lacks of its processor, one description per part (empty when all is there)."""
    import json

    folder = Path(folder).expanduser()
    missing = []
    if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_VOCABULARY):
        missing.append(f"the tokenizer ({' / '.join(TOKENIZER_VOCABULARY)}, with tokenizer_config.json)")
    image_processor = (folder / IMAGE_PROCESSOR_CONFIG).is_file()
    if not image_processor and (folder / PROCESSOR_CONFIG).is_file():
        try:
            image_processor = "image_processor" in json.loads((folder / PROCESSOR_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            pass  # unreadable: counts as missing
    if not image_processor:
        missing.append(f"the image processor config ({IMAGE_PROCESSOR_CONFIG}, or {PROCESSOR_CONFIG} with an image_processor table)")
    return missing


def check_processor_files(name_or_path: str) -> None:
    """For a local model folder: one line naming what it lacks of its processor, before anything is loaded (hub
    ids are checked by loading them)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return
    missing = missing_processor_files(path)
    if missing:
        raise UserError(f"model {name_or_path}: its processor files are missing: {' and '.join(missing)}; save the model's processor "
                        "beside it (processor.save_pretrained(folder)) or copy those files from the model it was made from")


def load_processor(name_or_path: str, cls: Any = None, **kwargs: Any) -> Any:
    """The processor saved with a model (`cls`, default AutoProcessor, with `kwargs`), or a one-line UserError
    naming the folder and what is missing or wrong, instead of transformers' traceback."""
    if cls is None:
        from transformers import AutoProcessor as cls
    check_processor_files(name_or_path)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except ImportError as err:  # e.g. SmolVLM(2)'s processor needs num2words
        raise UserError(missing_package_message(name_or_path, err)) from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {name_or_path}: could not load its processor ({reason}); the processor files must be saved beside the model") from None


def missing_package_message(name_or_path: str, err: ImportError) -> str:
    """One line naming the package a processor could not import and the pip command that installs it."""
    import re

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    match = re.search(r"pip install (?:-U )?[`'\"]?([A-Za-z0-9_.\-]+)", text) or re.search(r"`([A-Za-z0-9_.\-]+)`", text)
    package = err.name.split(".")[0] if err.name else (match.group(1) if match else None)
    if package is None:
        return f"model {name_or_path}: its processor needs a package that is not installed ({text})"
    return f"model {name_or_path}: its processor needs the {package} package, which is not installed: pip install {package}"


def resolve_family(name_or_path: str) -> tuple[ModelFamily, Any]:
    config = load_model_config(name_or_path)
    return family_for_model_type(getattr(config, "model_type", ""), name_or_path), config


def apply_config_overrides(config: Any, overrides: dict[str, Any], sub_configs: Sequence[str], source: str = "model_config") -> None:
    """Set `overrides` on a (composite) model config.

    `{text_config = {...}}` targets one sub-config; a plain key is set wherever it exists (top level and every
    sub-config that has it), so `{hidden_dropout_prob = 0.1}` reaches the text decoder without knowing where it lives.
    Unknown keys are an error, since a silently ignored override is the bug the original tool had.
    """
    problems = []
    for key, value in overrides.items():
        if key in sub_configs:
            sub = getattr(config, key)
            if not isinstance(value, dict):
                problems.append(f"{source}.{key} must be a table")
                continue
            for sub_key, sub_value in value.items():
                if not hasattr(sub, sub_key):
                    problems.append(f"{source}.{key}: unknown key {sub_key!r}")
                else:
                    setattr(sub, sub_key, sub_value)
            continue
        holders = [config] if hasattr(config, key) else []
        holders += [getattr(config, name) for name in sub_configs if hasattr(getattr(config, name), key)]
        if not holders:
            problems.append(f"{source}: unknown key {key!r} (not in the model config or its {', '.join(sub_configs)})")
        for holder in holders:
            setattr(holder, key, value)
    if problems:
        raise UserError("; ".join(problems))


def pop_load_kwargs(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `model_config` into from_pretrained kwargs (dtype, attn_implementation, quantization_config) and
    config overrides. The trainer adds quantization_config for --quantize (quantize.py)."""
    overrides = dict(overrides)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    dtype = overrides.pop("dtype", overrides.pop("torch_dtype", None))
    if dtype is not None:
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UserError(f"model_config.dtype: {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
        kwargs["dtype"] = getattr(torch, dtype)
    if "attn_implementation" in overrides:
        kwargs["attn_implementation"] = overrides.pop("attn_implementation")
    if "quantization_config" in overrides:
        kwargs["quantization_config"] = overrides.pop("quantization_config")
    return kwargs, overrides


@contextlib.contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside, as they were after;
    also a decorator. For loads and saves whose progress the caller shows itself (start-up lines, its own bar): the
    bars printed around those at every start, save and merge. The hub's download bars stay as they were (a first
    download is work nothing of ours shows)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars_on, downloads_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # turns the hub's bars off too...
    if downloads_on:
        enable_progress_bars()  # ...so they go back on
    try:
        yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()  # (the hub's too)
        if not downloads_on:
            disable_progress_bars()


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    """Give `module` the behaviour of `mixin` (methods that override its class's) without touching its weights,
    state-dict keys or peft layers inside it: its class becomes a subclass of (mixin, its class)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    key = (mixin, cls)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    module.__class__ = _SWAPPED[key]


_SWAPPED: dict[tuple[type, type], type] = {}


class EvalOnly:
    """Mixin (through `swap_class`) for a frozen module that stays in eval mode whatever the model's mode: its
    dropout off, so the features it computes are the ones a cache holds."""

    def train(self, mode: bool = True) -> torch.nn.Module:
        return super().train(False)


class FrozenVisionTower(EvalOnly):
    """Mixin (through `swap_class`) for a vision tower with no trainable parameter: always in eval mode, run
    without autograd, and accepting its own output (image features from the cache) in place of pixel_values.

    By default a 3-D tensor ([batch, tokens, width]) is features and a 4-D one is pixels; a family whose model
    checks the pixels' rank before the tower sees them overrides `cached_features`. Features are cast to the
    tower's dtype (the dtype its own output has without autocast): a bf16 cache entry read by an fp32 model is
    cast back exactly, and the layer that reads it casts it under autocast as it casts the computed output.
    """

    def cached_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """`pixel_values` as features when they are the tower's output rather than pixels, else None."""
        return pixel_values if pixel_values.dim() == 3 else None

    def tower_output(self, features: torch.Tensor) -> Any:
        """What the tower's forward returns for `features` (its last_hidden_state)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=features)

    def forward(self, pixel_values: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        features = self.cached_features(pixel_values) if pixel_values is not None else None
        if features is None:
            with torch.inference_mode():
                features = super().forward(pixel_values, *args, **kwargs).last_hidden_state
            features = features.clone()  # a normal tensor again, usable in autograd
        else:
            features = features.to(model_dtype(self))
        return self.tower_output(features)


class FrozenPooledVisionTower(FrozenVisionTower):
    """A frozen ViT whose pooler output is its post_layernorm over the [CLS] token (BLIP, BLIP-2)."""

    def tower_output(self, features: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        with torch.no_grad():
            pooled = self.post_layernorm(features[:, 0, :].to(self.post_layernorm.weight.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


def _unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or other accelerate) wrapper."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _shards_parameters(model: torch.nn.Module) -> bool:
    """FSDP / DeepSpeed: the head's weights are whole only inside the wrapped forward, so the loss cannot apply the
    head after it; such a model scores its full logits."""
    if type(model).__name__ == "DeepSpeedEngine":
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, (FullyShardedDataParallel, FSDPModule)) or isinstance(_unwrap_parallel(model), FSDPModule)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype inputs to `model` are cast to: that of its first weight outside a normalization layer. Weights
    need not share one dtype (under bf16 autocast norms and what trains are fp32 beside bf16 frozen weights:
    caption_train/weights.py), so pass the module that reads the input, e.g. the vision tower for pixels."""
    from caption_train.weights import is_norm

    for module in model.modules():
        if not is_norm(module):
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    return param.dtype
    return next(model.parameters()).dtype


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_model(inputs: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `inputs` on the model's device, floating ones (pixels) in the dtype of its first weight outside
    a norm (model_dtype: the vision tower's input layer, which comes first), the rest as they are."""
    dtype, device = model_dtype(model), model_device(model)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
