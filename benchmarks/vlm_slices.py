"""Real-width chat-VLM slices for the benchmarks: a hub checkpoint's shapes with fewer decoder layers, offline.

    from vlm_slices import SLICES, build_slice
    model_dir = build_slice(SLICES["qwen2.5-vl-7b"], out / "qwen-2l", layers=2, texts=captions)
    # AutoModelForImageTextToText.from_pretrained(model_dir): Qwen2.5-VL-7B's widths, heads, vocabulary and vision
    # tower, 2 of its 28 decoder layers, random weights; the processor has a chat template the chat-vlm family takes

The shape-setting numbers come from `model_sizes.CHECKPOINTS` (imported, not copied), so these slices and the
README's memory table describe the same models. Each slice gets a locally written byte-level BPE tokenizer (trained
on `texts` so captions are short token sequences, then filled with never-produced entries up to the checkpoint's
real vocabulary size, so the embedding and output layer and the logits have their real width) and a processor in
the checkpoint's style, saved with save_pretrained. The vision tower keeps its full depth: only the decoder's layer
count changes, so peak(L) = a + b*L measured at two depths extrapolates to the full model.

Image tokens per image (the benchmark's 448 px images): Qwen2.5-VL 256 (one per 28x28 pixels), JoyCaption 729
(SigLIP so400m at 384 px, every patch, as JoyCaption's `vision_feature_select_strategy = "full"`), SmolVLM-256M 64
(one 512 px tile, 4x4 pixel shuffle; splitting off, so one tile per image).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO), str(REPO / "tests")):  # model_sizes, caption_train, tiny_families_chat
    if path not in sys.path:
        sys.path.insert(0, path)

from model_sizes import CHECKPOINTS, Checkpoint  # noqa: E402  (the shape-setting config numbers, one place)

# Llama 3's chat format, as JoyCaption (Llama-3.1-8B) uses it: header tokens around each role, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Slice:
    key: str
    """The name --models takes."""
    hub_id: str
    """The model_sizes.CHECKPOINTS entry whose shapes it has."""
    label: str
    image_tokens: int
    """Image tokens per benchmark image (checked against the processor after the build)."""
    build: Callable[..., Any]
    """(checkpoint config, layers, texts, chat_template or None) -> (model config, processor)."""

    @property
    def checkpoint(self) -> Checkpoint:
        return next(c for c in CHECKPOINTS if c.hub_id == self.hub_id)

    @property
    def full_layers(self) -> int:
        return int(self.checkpoint.config["text_config"]["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.checkpoint.config["text_config"]["vocab_size"])


# ---------------------------------------------------------------------------------------------
# Tokenizers of the real vocabulary size


def real_size_tokenizer(texts: Iterable[str], specials: list[str], size: int, *, bos: str | None, eos: str, pad: str,
                        max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (whole caption words become single tokens), its vocabulary
    filled with entries no merge produces up to `size` ids: the real vocabulary's size, never a real token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tiny_families_chat import build_bpe_tokenizer

    trained = build_bpe_tokenizer(texts, specials, vocab_size=4000, bos=bos, eos=eos, pad=pad, max_length=max_length)
    state = json.loads(trained.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    used = max(vocab.values()) + 1
    if used > size:
        raise ValueError(f"the trained vocabulary ({used}) is larger than the real one ({size})")
    vocab.update({f"<|unused_{i}|>": used + i for i in range(size - used)})
    kwargs = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), model_max_length=max_length, **kwargs)
    if len(tokenizer) != size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} entries, expected {size}")
    return tokenizer


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


# ---------------------------------------------------------------------------------------------
# One builder per checkpoint style: (config, processor)


def _qwen2_5_vl(shapes: dict, layers: int, texts: list[str], chat_template: str | None) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from caption_train.models.chat_vlm import image_only_processor_class
    from tiny_families_chat import QWEN_TEMPLATE

    text = copy.deepcopy(shapes["text_config"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = real_size_tokenizer(texts, specials, text["vocab_size"], bos=None, eos="<|im_end|>", pad="<|endoftext|>", max_length=32768)
    pad, end, start, v_start, v_end, image, video = _ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                                                         "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    text |= {"num_hidden_layers": layers, "max_position_embeddings": 128000, "bos_token_id": pad, "eos_token_id": end, "pad_token_id": pad,
             # Qwen2.5-VL-7B's M-RoPE split of each head's rotary half (temporal, height, width): 16 + 24 + 24 = 64.
             "rope_parameters": {"rope_type": "default", "mrope_section": [head_half // 4, 3 * head_half // 8, 3 * head_half // 8], "rope_theta": 1000000.0}}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(shapes["vision_config"]), image_token_id=image, video_token_id=video,
                              vision_start_token_id=v_start, vision_end_token_id=v_end, tie_word_embeddings=shapes.get("tie_word_embeddings", False))
    # The hub processor's pixel budget (min 4 x 28^2, max 16384 x 28^2): a 448 px image keeps its size, 16 x 16 tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                                chat_template=chat_template or QWEN_TEMPLATE)
    return config, processor


def _llava_joycaption(shapes: dict, layers: int, texts: list[str], chat_template: str | None) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision, text = dict(shapes["vision_config"]), copy.deepcopy(shapes["text_config"])
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>",
                "<|finetune_right_pad_id|>"]
    tokenizer = real_size_tokenizer(texts, specials, text["vocab_size"], bos="<|begin_of_text|>", eos="<|eot_id|>",
                                    pad="<|finetune_right_pad_id|>", max_length=131072)
    bos, eot, pad, image = _ids(tokenizer, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<image>")
    text |= {"num_hidden_layers": layers, "max_position_embeddings": 131072, "rope_theta": 500000.0, "bos_token_id": bos, "eos_token_id": eot,
             "pad_token_id": pad}
    size = vision["image_size"]
    tokens = (size // vision["patch_size"]) ** 2
    # JoyCaption's LLaVA settings: the SigLIP tower's second-to-last layer, every patch (SigLIP has no CLS token).
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image, image_seq_length=tokens, vision_feature_layer=-2,
                         vision_feature_select_strategy="full", projector_hidden_act="gelu")
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               chat_template=chat_template or LLAMA3_TEMPLATE)
    return config, processor


def _idefics3_smolvlm(shapes: dict, layers: int, texts: list[str], chat_template: str | None) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from tiny_families_chat import SMOLVLM_TEMPLATE

    vision, text = dict(shapes["vision_config"]), copy.deepcopy(shapes["text_config"])
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    tokenizer = real_size_tokenizer(texts, specials, text["vocab_size"], bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>",
                                    max_length=8192)
    bos, end, pad, image = _ids(tokenizer, "<|im_start|>", "<end_of_utterance>", "<|endoftext|>", "<image>")
    text |= {"num_hidden_layers": layers, "max_position_embeddings": 8192, "rope_theta": 100000.0, "bos_token_id": bos, "eos_token_id": end,
             "pad_token_id": pad}
    size, scale = vision["image_size"], shapes["scale_factor"]
    tokens = (size // vision["patch_size"]) ** 2 // scale**2
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale, image_token_id=image)
    # One 512 px tile per image (the hub processor would split a large image into several tiles plus a global one).
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens,
                                  chat_template=chat_template or SMOLVLM_TEMPLATE)
    return config, processor


SLICES: dict[str, Slice] = {s.key: s for s in (
    Slice("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B", 256, _qwen2_5_vl),
    Slice("joycaption", "fancyfeast/llama-joycaption-alpha-two-hf-llava", "JoyCaption (LLaVA: SigLIP so400m + Llama-3.1-8B)", 729,
          _llava_joycaption),
    Slice("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", "SmolVLM-256M", 64, _idefics3_smolvlm),
)}


# ---------------------------------------------------------------------------------------------
# Building and saving


def build_slice(spec: Slice, out_dir: Path, *, layers: int, texts: list[str], dtype: str = "bfloat16", seed: int = 0,
                chat_template: str | None = None) -> Path:
    """Build `spec` with `layers` decoder layers and random weights (seeded), save model and processor to `out_dir`.

    `dtype`: the dtype the weights are created and stored in (hub checkpoints store bf16; loading reads them into
    whatever dtype the loader asks). Building in bf16 halves the builder's memory and the disk used."""
    import torch
    from transformers import AutoModelForImageTextToText

    from caption_train.files import give_default_modes

    config, processor = spec.build(copy.deepcopy(spec.checkpoint.config), layers, texts, chat_template)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    give_default_modes(out_dir)
    return out_dir


def parameter_count(spec: Slice, layers: int) -> int:
    """Parameters of the slice with `layers` decoder layers, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    shapes = copy.deepcopy(spec.checkpoint.config)
    shapes["text_config"]["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.checkpoint.model_type, **shapes)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())
