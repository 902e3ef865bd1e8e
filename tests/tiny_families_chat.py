"""Tiny offline chat VLMs (Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM, LLaVA, Gemma 3) and PaliGemma for the family tests.

    model_dir = build_tiny_qwen2_vl(tmp_path / "qwen", texts)
    # AutoModelForImageTextToText.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)

Each builder trains a byte-level BPE tokenizer on `texts` (plus the chat template's words), adds the special
tokens its processor needs (image placeholders, turn markers), writes a chat template in the model's own style,
and saves a random-weight model and its processor with save_pretrained, so the real loading path runs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Iterable

from caption_train.files import give_default_modes
from caption_train.models.base import quiet_transformers_bars
from caption_train.models.chat_vlm import image_only_processor_class

# Words the templates and prompts use, trained in so they stay short token sequences.
_TEMPLATE_WORDS = "system user assistant User Assistant USER ASSISTANT You are a helpful Write caption for this image Describe it Image"

# Qwen2-VL's own template, reduced to the parts a single-image caption conversation uses.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM's template shape: "User:<image>prompt<end_of_utterance>\nAssistant: caption<end_of_utterance>\n".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# LLaVA-1.5's template shape: "USER: <image>\nprompt ASSISTANT: caption</s>".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Gemma 3's template shape: "<bos><start_of_turn>user\n<start_of_image>prompt<end_of_turn>\n<start_of_turn>model\ncaption<end_of_turn>\n".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_bpe_tokenizer(texts: Iterable[str], specials: list[str], *, vocab_size: int = 400, bos: str | None = None,
                        eos: str, pad: str, max_length: int = 512, extra: dict[str, str] | None = None):
    """A byte-level BPE tokenizer trained on `texts`, with `specials` as whole special tokens (ids 0..)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(itertools.chain([_TEMPLATE_WORDS], texts), trainer=trainer)
    kwargs = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {}) | ({"extra_special_tokens": extra} if extra else {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **kwargs)


def _save(out_dir: Path, model, processor) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    give_default_modes(out_dir)
    return out_dir


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def build_tiny_qwen2_vl(out_dir, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2,
                        max_pixels: int = 56 * 56, seed: int = 0, model_type: str = "qwen2_vl") -> Path:
    """A random-weight Qwen2-VL (or Qwen2.5-VL with model_type="qwen2_5_vl") and its processor, with no video
    processor (none is needed for images; building one needs torchvision)."""
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model, Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model, Qwen2VLProcessor as Processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = build_bpe_tokenizer(texts, specials, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    heads = 4
    vision = dict(depth=num_layers, embed_dim=hidden_size, hidden_size=hidden_size, num_heads=heads, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if model_type == "qwen2_5_vl":
        vision |= dict(intermediate_size=2 * hidden_size, out_hidden_size=hidden_size, fullatt_block_indexes=[num_layers - 1], window_size=56)
        vision.pop("embed_dim")
    half_head = hidden_size // heads // 2
    section = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                    vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = _seeded(seed, lambda: Model(config))
    # As in the base (not -Instruct) Qwen2-VL checkpoints: generation stops on <|endoftext|> only, so captions end
    # at <|im_end|> only because the family adds the template's end-of-turn token to the stop ids.
    model.generation_config.eos_token_id = ids["<|endoftext|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class(Processor)(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return _save(Path(out_dir), model, processor)


def build_tiny_qwen2_5_vl(out_dir, texts: Iterable[str], **kwargs) -> Path:
    return build_tiny_qwen2_vl(out_dir, texts, model_type="qwen2_5_vl", **kwargs)


def _llama_text(tokenizer, hidden_size: int, num_layers: int, *, bos: str | None, eos: str, pad: str) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=ids(bos) if bos else None, eos_token_id=ids(eos), pad_token_id=ids(pad))


def build_tiny_idefics3(out_dir, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2, image_size: int = 32,
                        patch_size: int = 8, seed: int = 0) -> Path:
    """A random-weight Idefics3 (SmolVLM-256M/500M/2B are this model type) at `image_size` px, one image tile."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    tokenizer = build_bpe_tokenizer(texts, specials, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    scale_factor = 2
    seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    text = _llama_text(tokenizer, hidden_size, num_layers, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>")
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = _seeded(seed, lambda: Idefics3ForConditionalGeneration(config))
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=SMOLVLM_TEMPLATE)
    return _save(Path(out_dir), model, processor)


def build_tiny_llava(out_dir, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2, image_size: int = 32,
                     patch_size: int = 8, seed: int = 0) -> Path:
    """A random-weight LLaVA (CLIP vision tower + Llama; JoyCaption is this model type) at `image_size` px."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tokenizer = build_bpe_tokenizer(texts, specials, bos="<s>", eos="</s>", pad="<pad>")
    vision = dict(model_type="clip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size)
    text = _llama_text(tokenizer, hidden_size, num_layers, bos="<s>", eos="</s>", pad="<pad>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _seeded(seed, lambda: LlavaForConditionalGeneration(config))
    model.generation_config.eos_token_id = text["eos_token_id"]
    model.generation_config.pad_token_id = text["pad_token_id"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return _save(Path(out_dir), model, processor)


def build_tiny_paligemma(out_dir, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2, image_size: int = 56,
                         patch_size: int = 8, seed: int = 0) -> Path:
    """A random-weight PaliGemma (SigLIP + Gemma) at `image_size` px and its processor (prefix + suffix)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    tokenizer = build_bpe_tokenizer(itertools.chain(texts, ["caption en"]), specials, bos="<bos>", eos="<eos>", pad="<pad>")
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2  # saved in preprocessor_config.json, as on the hub
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds its <locNNNN>/<segNNN> tokens
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(model_type="siglip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = dict(model_type="gemma", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=hidden_size // 4,
                max_position_embeddings=512, bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"), pad_token_id=ids("<pad>"))
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"), projection_dim=hidden_size,
                             hidden_size=hidden_size)
    model = _seeded(seed, lambda: PaliGemmaForConditionalGeneration(config))
    model.generation_config.eos_token_id = ids("<eos>")
    model.generation_config.pad_token_id = ids("<pad>")
    return _save(Path(out_dir), model, processor)


def build_tiny_gemma3(out_dir, texts: Iterable[str], *, hidden_size: int = 64, num_layers: int = 2, image_size: int = 32,
                      patch_size: int = 8, tokens_per_image: int = 4, seed: int = 0) -> Path:
    """A random-weight Gemma 3 (SigLIP + Gemma 3 text) at `image_size` px, `tokens_per_image` image tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = build_bpe_tokenizer(itertools.chain(texts, ["model"]), specials, bos="<bos>", eos="<eos>", pad="<pad>", extra=extra)
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(model_type="siglip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = dict(model_type="gemma3_text", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=hidden_size // 4,
                query_pre_attn_scalar=hidden_size // 4, sliding_window=512, max_position_embeddings=512,
                bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"), pad_token_id=ids("<pad>"))
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image, boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    model = _seeded(seed, lambda: Gemma3ForConditionalGeneration(config))
    # As Gemma 3's own generation config: <eos> and <end_of_turn> both end a reply.
    model.generation_config.eos_token_id = [ids("<eos>"), ids("<end_of_turn>")]
    model.generation_config.pad_token_id = ids("<pad>")
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_image, chat_template=GEMMA3_TEMPLATE)
    return _save(Path(out_dir), model, processor)


def build_tiny_smolvlm2(out_dir, texts: Iterable[str], **kwargs) -> Path:
    """A SmolVLM2 (`smolvlm` model type: the Idefics3 architecture under its own name, whose processor needs
    num2words). Its processor cannot be built here to save it (that also needs torchvision's video processor), so
    this is the tiny Idefics3 with config.json naming `smolvlm`: loading builds SmolVLMProcessor from the files."""
    out_dir = build_tiny_idefics3(out_dir, texts, **kwargs)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "smolvlm"
    config["architectures"] = ["SmolVLMForConditionalGeneration"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


HAS_NUM2WORDS = importlib.util.find_spec("num2words") is not None
BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "qwen2_5_vl": build_tiny_qwen2_5_vl, "idefics3": build_tiny_idefics3, "llava": build_tiny_llava,
            "gemma3": build_tiny_gemma3} | ({"smolvlm": build_tiny_smolvlm2} if HAS_NUM2WORDS else {})
# The token each template writes after the answer: the end-of-turn token training teaches and generation stops on.
END_TOKENS = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "idefics3": "<end_of_utterance>", "llava": "</s>", "gemma3": "<end_of_turn>",
              "smolvlm": "<end_of_utterance>"}
