"""Chat VLMs (Qwen2-VL / Qwen2.5-VL, SmolVLM / Idefics3, LLaVA, ...): any `AutoModelForImageTextToText` model whose
processor has a chat template, through that template: the prompt is the user turn with the image, the caption
is the assistant turn. A new VLM of this kind needs no new code.

    family, _ = resolve_family("Qwen/Qwen2-VL-2B-Instruct")
    model, processor = family.load("Qwen/Qwen2-VL-2B-Instruct", {"processor": {"max_pixels": 200704}})
    batch = family.collate(processor, images, ["a red circle", "a blue square"], max_length=512, prompt=family.default_prompt)
    loss = family.caption_loss(model, batch).loss  # logits at the caption tokens only (models/loss.py)

Labels: the prompt is tokenized exactly as generation tokenizes it (the processor on the rendered user turn, which
expands the image placeholders); the caption tokens and the end-of-turn token after them follow, and only those
are targets. Everything else (template, prompt, image tokens, padding) is -100.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from caption_train.errors import UserError
from caption_train.models.base import (
    IGNORE_INDEX,
    EvalOnly,
    ModelFamily,
    apply_config_overrides,
    load_model_config,
    load_processor as load_base_processor,
    model_device,
    pop_load_kwargs,
    register,
    swap_class,
    to_model,
    unwrap_peft,
)

# Stands in for the caption when the template is rendered once per prompt, to find what surrounds the answer.
_SENTINEL = "CAPTIONSENTINEL7Q"
# Language-model attention and MLP projections (Qwen2, Llama, SmolLM, Gemma, Mistral names); the language model is
# `language_model` (Qwen2-VL, LLaVA, Gemma 3) or `text_model` (Idefics3 / SmolVLM). The vision tower's own q/k/v
# projections (SigLIP, CLIP) do not match, so it stays frozen.
_LM = r".*\.(language_model|text_model)\.layers\.\d+\."
LORA_TARGETS = _LM + r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))$"
IA3_TARGETS = _LM + r"(self_attn\.(k_proj|v_proj)|mlp\.down_proj)$"
IA3_FEEDFORWARD = _LM + r"mlp\.down_proj$"
# What get_image_features returns besides the image tokens (pooler_output) that the cache may leave out.
_PLAIN_ENCODER_OUTPUTS = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")
_VISION_ATTRIBUTES = ("visual", "vision_tower", "vision_model")  # Qwen2-VL; LLaVA, Gemma 3; Idefics3, SmolVLM
# Model types whose packed batches give the padded batch's per-row losses and gradients (tests/test_packing.py;
# smolvlm is the Idefics3 model under its own name, tested where its processor's num2words is installed).
PACKED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "smolvlm")
# Model types that cannot take packed rows, and why (tests/test_packing.py shows it).
UNPACKABLE_MODEL_TYPES = {
    # transformers 5.25 builds the sliding-window layers' image-block mask by looking token types up at each token's
    # position within its row, which in a packed sequence is another row's token: a caption token would see ahead.
    "gemma3": "transformers 5.25 masks Gemma 3's sliding-window layers wrongly for packed rows (a caption token could attend to later ones)",
}
# (width, height) of the blank images that tell whether a processor's image token count follows the image's size:
# small and large, square, wide and tall.
_SIZE_PROBES = ((64, 64), (448, 448), (896, 448), (448, 896), (1536, 1024))


@dataclass(frozen=True)
class ChatTurns:
    """One prompt through a model's chat template: the generation prompt, and what the template writes around the
    answer (`before` the caption, e.g. a space; the `end_id` token after it, which generation must stop on)."""

    prompt_text: str
    before: str
    end_id: int


@register
class ChatVlmFamily(ModelFamily):
    name = "chat-vlm"
    model_types = ()  # every image-text-to-text model type no other family registered (handles_model_type)
    fallback_description = "any other image-text-to-text model whose processor has a chat template (chat-vlm)"
    default_prompt = "Write a caption for this image."
    # The feature cache holds what the model's get_image_features returns (the vision tower and the projector /
    # connector / merger that turns its output into image tokens), one [image tokens, width] tensor per image, fed back
    # through transformers' own `mm_encoder_outputs` argument. The count of image tokens follows each image's size, so
    # the loader still decodes every image (the prompt's placeholders are expanded for it); the towers' forward is what
    # is saved.
    supports_feature_cache = True
    variable_image_features = True

    def handles_model_type(self, model_type: str) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    # ---- loading
    def load(self, name_or_path: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
        from transformers import AutoModelForImageTextToText

        config = load_model_config(name_or_path)
        load_kwargs, overrides = pop_load_kwargs(overrides)
        processor_kwargs = _pop_processor_kwargs(overrides)
        sub_configs = tuple(name for name in getattr(config, "sub_configs", {}) if getattr(config, name, None) is not None)
        apply_config_overrides(config, overrides, sub_configs=sub_configs)
        processor = load_processor(name_or_path, config.model_type, processor_kwargs)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, config=config, **load_kwargs)
        return model, processor

    def training_processor(self, name_or_path: str, model_config: dict[str, Any], config: Any) -> Any:
        return load_processor(name_or_path, config.model_type, _pop_processor_kwargs(dict(model_config)))

    def text_length_limit(self, config: Any) -> int:
        text = getattr(config, "text_config", config)
        return int(getattr(text, "max_position_embeddings", None) or getattr(config, "max_position_embeddings"))

    # ---- adapters
    def lora_targets(self) -> str:
        return LORA_TARGETS

    def ia3_targets(self) -> tuple[str, str]:
        return IA3_TARGETS, IA3_FEEDFORWARD

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = unwrap_peft(model).model
        for attribute in _VISION_ATTRIBUTES:
            tower = getattr(inner, attribute, None)
            if isinstance(tower, torch.nn.Module):
                return tower
        raise UserError(f"model {type(inner).__name__}: no vision tower found (looked for {', '.join(_VISION_ATTRIBUTES)})")

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap_peft(model).get_decoder()

    def output_head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """`lm_head`, the output layer of every image-text-to-text model in transformers 5.25; a model laid out
        otherwise trains on its full logits (ModelFamily.loss_note says so at start-up)."""
        head = getattr(unwrap_peft(model), "lm_head", None)
        return head if isinstance(head, torch.nn.Module) else None

    def feature_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The vision tower and every other part of the model outside the language model (projector, connector,
        merger): what get_image_features runs, so what must be frozen for its output to be cached."""
        inner, text = unwrap_peft(model).model, self.text_model(model)
        return [module for module in inner.children() if module is not text]

    # ---- the feature cache (features.py): one [image tokens, width] tensor per image
    def freeze_vision_tower(self, model: torch.nn.Module) -> None:
        for module in self.feature_modules(model):
            if not any(p.requires_grad for p in module.parameters()):
                swap_class(module, EvalOnly)  # dropout off: the cached and the computed features must be the same

    def image_feature_width(self, model: torch.nn.Module) -> int:
        return unwrap_peft(model).get_input_embeddings().embedding_dim

    def image_token_counts(self, model: torch.nn.Module, input_ids: torch.Tensor) -> list[int]:
        """How many image placeholder tokens each row of `input_ids` holds: its image's feature count."""
        return (input_ids == _image_token_id(unwrap_peft(model).config)).sum(dim=1).tolist()

    def estimate_feature_shape(self, model: torch.nn.Module, processor: Any, image: Image.Image) -> tuple[int, int]:
        """One image's feature shape (other images' differ with their size), computed from `image`; also
        checks that this model's image features can be cached at all."""
        inputs = self.prompt_inputs(processor, [image], self.default_prompt)
        return tuple(self.batch_image_features(model, inputs)[0].shape)

    def batch_image_features(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each row's image features, [its image tokens, width], from the batch's pixels (no autograd): what the
        model's get_image_features returns, split by row."""
        base = unwrap_peft(model)
        encode = base.get_image_features
        accepted = inspect.signature(encode).parameters
        kwargs = to_model({k: v for k, v in inputs.items() if k in accepted and k != "kwargs"}, model)
        with torch.inference_mode():
            output = encode(**kwargs, return_dict=True)
        extra = [name for name, value in output.items() if name not in _PLAIN_ENCODER_OUTPUTS and value is not None]
        if extra:
            raise UserError(f"model {type(base).__name__}: its image encoder returns {', '.join(extra)} besides the image tokens, "
                            "which the feature cache does not hold; use --cache_image_features off")
        pooled = output.pooler_output
        base.__dict__["_caption_train_image_container"] = "sequence" if isinstance(pooled, (list, tuple)) else "tensor"
        parts = pooled if isinstance(pooled, (list, tuple)) else [pooled]
        flat = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
        counts = self.image_token_counts(model, inputs["input_ids"])
        if sum(counts) != flat.shape[0]:
            raise UserError(f"model {type(base).__name__}: {flat.shape[0]} image features for {sum(counts)} image tokens; use --cache_image_features off")
        return [rows.clone() for rows in flat.split(counts)]  # normal tensors again, usable in autograd

    def feature_inputs(self, features: Sequence[torch.Tensor], model: torch.nn.Module | None = None) -> dict[str, Any]:
        """The model's `mm_encoder_outputs` for each row's cached features, in the container its forward reads
        (Qwen2-VL and LLaVA concatenate a per-image sequence; Gemma 3 and Idefics3 take one tensor)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        container = unwrap_peft(model).__dict__.get("_caption_train_image_container") if model is not None else None
        if container is None:
            raise RuntimeError("feature_inputs before any image features were computed with this model")
        pooled = tuple(features) if container == "sequence" else torch.cat(list(features))
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}

    # ---- data
    def collate(self, processor: Any, images: Sequence[Image.Image | None], captions: Sequence[str], *, max_length: int,
                prompt: str | None = None) -> dict[str, torch.Tensor]:
        if any(image is None for image in images):
            raise ValueError(f"the {self.name} family needs every image loaded: its prompt holds one placeholder per image token")
        turns = chat_turns(processor, prompt or self.default_prompt)
        # The prompt exactly as generate() tokenizes it (image placeholders expanded for each image's size).
        encoded = processor(images=[[image] for image in images], text=[turns.prompt_text] * len(images), padding=True, return_tensors="pt")
        rows = [self._row(processor, encoded, i, turns, caption, max_length) for i, caption in enumerate(captions)]
        return _pad_rows(rows, processor.tokenizer) | _image_inputs(encoded)

    def _row(self, processor: Any, encoded: Any, i: int, turns: ChatTurns, caption: str, max_length: int) -> dict[str, list[int]]:
        """One sample's unpadded token lists: the prompt (masked), the caption and the end token (targets)."""
        keep = encoded["attention_mask"][i].bool()
        prompt_ids = encoded["input_ids"][i][keep].tolist()
        caption_ids = processor.tokenizer(turns.before + caption.strip(), add_special_tokens=False)["input_ids"]
        if not caption.strip() or not caption_ids:
            raise UserError(f"caption {caption!r} tokenizes to nothing with this model's tokenizer; fix or remove its .txt file")
        room = max_length - len(prompt_ids) - 1  # the end token always stays: the model must learn to stop
        if room < 1:
            raise UserError(f"max_length {max_length}: the prompt with its image takes {len(prompt_ids)} tokens, leaving no room for a caption; "
                            "raise --max_length, shorten --prompt, or cap the image size (model_config.processor, e.g. {max_pixels = 200704})")
        answer = caption_ids[:room] + [turns.end_id]
        row = {"input_ids": prompt_ids + answer, "attention_mask": [1] * (len(prompt_ids) + len(answer)),
               "labels": [IGNORE_INDEX] * len(prompt_ids) + answer}
        # Other per-token inputs (Qwen2-VL's mm_token_type_ids: which tokens are image tokens): text (0) for the answer.
        for key in _per_token_keys(encoded):
            row[key] = encoded[key][i][keep].tolist() + [0] * len(answer)
        return row

    def pixel_inputs(self, processor: Any, images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        loaded = [image for image in images if image is not None]
        if not loaded:
            return {}
        return dict(processor.image_processor(images=loaded, return_tensors="pt"))

    def prompt_inputs(self, processor: Any, images: Sequence[Image.Image], prompt: str | None) -> dict[str, torch.Tensor]:
        """The processor's inputs for captioning `images`: the generation prompt (left-padded: every row's prompt
        must end where generation starts) with each image's placeholders expanded, and the image inputs."""
        turns = chat_turns(processor, prompt or self.default_prompt)
        tokenizer = processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = processor(images=[[image] for image in images], text=[turns.prompt_text] * len(images), padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def prompt_token_counter(self, processor: Any, prompt: str | None) -> Callable[[int, int], int] | None:
        """The prompt's token count for a (width, height) image: the processor's own count of image tokens per size
        (`_get_num_multimodal_tokens`, arithmetic on the size) plus the template's, once both agree with the real
        processor on blank images of a few sizes; else the real processor on a blank image of each size met (memoized).
        None when those sizes all give the same count (LLaVA, Gemma 3: every image is resized to one size)."""
        measure = functools.lru_cache(maxsize=None)(lambda width, height: self._prompt_length(processor, prompt, width, height))
        measured = [measure(width, height) for width, height in _SIZE_PROBES]
        if len(set(measured)) == 1:
            return None
        per_size = _processor_image_tokens(processor)
        if per_size is not None:
            offsets = {count - per_size(width, height) for count, (width, height) in zip(measured, _SIZE_PROBES)}
            if len(offsets) == 1:  # the processor's arithmetic is exact for this processor: no image is processed
                offset = offsets.pop()
                return functools.lru_cache(maxsize=None)(lambda width, height: offset + per_size(width, height))
        return measure

    def _prompt_length(self, processor: Any, prompt: str | None, width: int, height: int) -> int:
        return int(self.prompt_inputs(processor, [Image.new("RGB", (width, height))], prompt)["input_ids"].shape[1])

    # ---- packing (packing.py)
    def packing_refusal(self, model: torch.nn.Module) -> str | None:
        model_type = unwrap_peft(model).config.model_type
        if model_type in UNPACKABLE_MODEL_TYPES:
            return UNPACKABLE_MODEL_TYPES[model_type]
        if model_type not in PACKED_MODEL_TYPES:
            return (f"packing is checked for {', '.join(PACKED_MODEL_TYPES)} (tests/test_packing.py), not yet for {model_type}")
        return None

    def row_position_ids(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """0, 1, ... per row; for a model with multi-axis rotary positions (Qwen2-VL/2.5-VL M-RoPE: time, height,
        width for image tokens), its get_rope_index on the padded batch, with the text positions in front: the
        [4, rows, length] transformers expects of packed 3D positions (it finds the rows in the first axis)."""
        text = super().row_position_ids(model, batch)
        rope_index = getattr(unwrap_peft(model).model, "get_rope_index", None)
        if rope_index is None:
            return text
        accepted = inspect.signature(rope_index).parameters
        positions, _ = rope_index(**{key: value for key, value in batch.items() if key in accepted})
        return torch.cat([text.unsqueeze(0), positions.to(text.device)])

    # ---- inference
    @torch.no_grad()
    def generate(self, model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], *, prompt: str | None = None,
                 features: Sequence[torch.Tensor] | None = None, **generate_kwargs: Any) -> list[str]:
        turns = chat_turns(processor, prompt or self.default_prompt)
        tokenizer = processor.tokenizer
        inputs = to_model(self.prompt_inputs(processor, images, prompt), model)
        if features is not None:  # the cached image features, in place of the tower's forward
            inputs.pop("pixel_values")
            inputs |= self.feature_inputs([f.to(model_device(model)) for f in features], model)
        prompt_length = inputs["input_ids"].shape[1]
        room = self.max_text_length(model) - prompt_length
        generate_kwargs["max_new_tokens"] = max(1, min(generate_kwargs.get("max_new_tokens") or 40, room))
        generate_kwargs.setdefault("eos_token_id", _stop_ids(model, turns.end_id))
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else turns.end_id)
        output = model.generate(**inputs, **generate_kwargs)
        return [text.strip() for text in tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------
# The chat template, the processor, and padding.


def chat_turns(processor: Any, prompt: str) -> ChatTurns:
    """Render `prompt` through the processor's chat template: once as a generation prompt, once followed by an
    answer, to learn what the template writes before the caption and which token ends the turn."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]
    prompt_text = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + answer, tokenize=False)
    rest = full[len(prompt_text):] if full.startswith(prompt_text) else ""
    if _SENTINEL not in rest:
        raise UserError(f"the model's chat template writes the assistant turn differently from its generation prompt ({prompt_text[-40:]!r}); "
                        "training would not match captioning; use a model whose template continues the generation prompt")
    before, after = rest.split(_SENTINEL, 1)
    tokenizer = processor.tokenizer
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    # The first token after the answer ends the turn (<|im_end|>, <end_of_utterance>, </s>); templates that write
    # nothing after the answer end with the tokenizer's EOS.
    end_id = after_ids[0] if after_ids else tokenizer.eos_token_id
    if end_id is None:
        raise UserError("the model's chat template writes nothing after the answer and its tokenizer has no eos_token: no token ends a caption")
    return ChatTurns(prompt_text=prompt_text, before=before, end_id=int(end_id))


def _pop_processor_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """model_config's `processor` table (e.g. {max_pixels = 200704}), taken out of `overrides`."""
    processor_kwargs = overrides.pop("processor", {})
    if not isinstance(processor_kwargs, dict):
        raise UserError("model_config.processor must be a table of processor settings, e.g. {max_pixels = 200704}")
    return processor_kwargs


def load_processor(name_or_path: str, model_type: str, kwargs: dict[str, Any]) -> Any:
    """The model's processor (with `kwargs`, e.g. max_pixels, passed to it); it must have a chat template.

    Captioning needs images only, so processors that also take a video processor (Qwen2-VL, SmolVLM) are built
    without it: without torchvision transformers cannot build a video processor, and those processors then refuse
    to be built at all. Doing it always (not only without torchvision) keeps saved checkpoints the same either way.
    """
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "AutoProcessor", transformers.AutoProcessor)
    if "video_processor" in getattr(cls, "get_attributes", lambda: [])():
        cls = image_only_processor_class(cls)
    processor = load_base_processor(name_or_path, cls, **kwargs)
    if not getattr(processor, "chat_template", None) or not hasattr(processor, "tokenizer"):
        raise UserError(f"model {name_or_path}: its processor has no chat template (chat_template.jinja); the {ChatVlmFamily.name} family "
                        "places the prompt and caption with it: add the model's template, or use a model that ships one")
    return processor


def image_only_processor_class(cls: type) -> type:
    """`cls` without its video processor: the same name (so it saves as `cls`), image processor and tokenizer only."""
    if cls in _IMAGE_ONLY:
        return _IMAGE_ONLY[cls]

    def get_attributes(klass: type) -> list[str]:
        return [name for name in cls.get_attributes() if name != "video_processor"]

    # SmolVLM's processor requires a video_processor argument: None (no videos). Given where from_pretrained builds
    # the processor, not by wrapping __init__, because transformers reads the accepted keyword names off __init__'s
    # own code. transformers 5.25 builds it through from_dict; earlier 5.x through from_args_and_dict.
    def from_args_and_dict(klass: type, args: Any, processor_dict: dict, **kwargs: Any) -> Any:
        kwargs.setdefault("video_processor", None)
        return cls.from_args_and_dict.__func__(klass, args, processor_dict, **kwargs)

    def from_dict(klass: type, processor_dict: dict, **kwargs: Any) -> Any:
        kwargs.setdefault("video_processor", None)
        return cls.from_dict.__func__(klass, processor_dict, **kwargs)

    image_only = type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes), "from_args_and_dict": classmethod(from_args_and_dict),
                                             "from_dict": classmethod(from_dict), "video_processor": _NoVideos(), "__module__": cls.__module__})
    _IMAGE_ONLY[cls] = image_only
    return image_only


_IMAGE_ONLY: dict[type, type] = {}


class _NoVideos:
    """The video processor of an image-only processor: SmolVLM's apply_chat_template reads its frame defaults
    (num_frames, fps) on every call, videos or not."""

    num_frames = None
    fps = None


def _per_token_keys(encoded: Any) -> list[str]:
    shape = encoded["input_ids"].shape
    return [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor) and v.shape == shape]


def _image_inputs(encoded: Any) -> dict[str, torch.Tensor]:
    per_token = set(_per_token_keys(encoded)) | {"input_ids", "attention_mask"}
    return {k: v for k, v in encoded.items() if k not in per_token and isinstance(v, torch.Tensor)}


def _pad_rows(rows: list[dict[str, list[int]]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Pad every row to the longest on the tokenizer's padding side: pads are masked and never targets."""
    length = max(len(row["input_ids"]) for row in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    batch: dict[str, list[list[int]]] = {key: [] for key in rows[0]}
    for row in rows:
        for key, values in row.items():
            pad = [fill.get(key, 0)] * (length - len(values))
            batch[key].append(pad + values if tokenizer.padding_side == "left" else values + pad)
    return {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}


def _image_token_id(config: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise UserError(f"model type {config.model_type!r}: its config names no image token (image_token_id); use --cache_image_features off")


def _stop_ids(model: torch.nn.Module, end_id: int) -> list[int]:
    """The model's own EOS ids plus the template's end-of-turn token (what training taught it to stop on)."""
    configured = unwrap_peft(model).generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return [end_id] + [i for i in configured if i != end_id]


def _processor_image_tokens(processor: Any) -> Callable[[int, int], int] | None:
    """The processor's count of image tokens for a (width, height) image from its size alone (the arithmetic
    transformers' processors expose for serving engines), or None where it has none."""
    count = getattr(processor, "_get_num_multimodal_tokens", None)
    if count is None:
        return None

    def per_size(width: int, height: int) -> int:
        return int(count(image_sizes=[(height, width)])["num_image_tokens"][0])

    try:
        per_size(*_SIZE_PROBES[0])
    except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError, IndexError):
        return None
    return per_size
