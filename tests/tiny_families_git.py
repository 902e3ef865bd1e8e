"""Tiny offline models of the GIT / Florence-2 / BLIP-2 (OPT and Flan-T5) families, saved with save_pretrained (no hub needed).

    from tiny_families_git import build_tiny_git
    model_dir = build_tiny_git(tmp_path / "git", ["a red circle", "a blue square"])
    # GitForCausalLM.from_pretrained(model_dir), GitProcessor.from_pretrained(model_dir)

Each builder trains its tokenizer on `texts`, builds a random-weight model from a small config and writes both
like a hub checkpoint, so the families load them through the ordinary from_pretrained path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from caption_train.files import give_default_modes
from caption_train.models.base import quiet_transformers_bars
from caption_train.tiny import build_tokenizer


def _save(out_dir: Path, model, processor) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    give_default_modes(out_dir)
    return out_dir


def _seeded(seed: int, make):
    """make() under a forked, seeded torch RNG, so building a model leaves the caller's random state alone."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# ----------------------------------------------------------------------------
# GIT: a BERT WordPiece tokenizer ([CLS] caption [SEP]) and a CLIP-style image processor, like microsoft/git-base


def build_tiny_git(out_dir, texts: Iterable[str], *, image_size: int = 32, patch_size: int = 16, hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 32, seed: int = 0) -> Path:
    from transformers import GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    # build_tokenizer also adds BLIP's [DEC] as bos_token; GIT never uses it, which keeps the family honest:
    # GIT starts from [CLS] (config.bos_token_id), not from whatever the tokenizer calls bos.
    tokenizer = build_tokenizer(texts, max_length=max_position_embeddings)
    config = GitConfig(
        vision_config=dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size),
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = _seeded(seed, lambda: GitForCausalLM(config).eval())
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return _save(Path(out_dir), model, GitProcessor(image_processor, tokenizer))


# ----------------------------------------------------------------------------
# Florence-2: a BART-style byte-level BPE tokenizer with the <image> placeholder, a CLIP-style image processor
# that says how many image tokens the vision tower yields, and a small DaViT + BART.

FLORENCE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
# The sentences Florence2Processor turns the caption task tokens into; trained in so prompts tokenize compactly.
FLORENCE_PROMPTS = ("What does the image describe?", "Describe in detail what is shown in the image.",
                    "Describe with a paragraph what is shown in the image.")


def build_bart_tokenizer(texts: Iterable[str], *, max_length: int, vocab_size: int = 500):
    """A byte-level BPE tokenizer laid out like BART's (<s> text </s>, pad 1) with Florence-2's <image> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=FLORENCE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(texts) + list(FLORENCE_PROMPTS)
    backend.train_from_iterator(corpus * 20, trainer=trainer)  # repeated, so whole words earn their merges
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return BartTokenizer(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         mask_token="<mask>", extra_special_tokens={"image_token": "<image>"}, model_max_length=max_length)


def build_tiny_florence2(out_dir, texts: Iterable[str], *, image_size: int = 32, hidden_size: int = 64, num_layers: int = 2,
                         num_heads: int = 2, max_position_embeddings: int = 64, tie_word_embeddings: bool = True,
                         seed: int = 0) -> Path:
    """`tie_word_embeddings=True` as in the real checkpoints; a random tied model echoes its last input token
    (<s>), so it captions every image with the empty string: untie it where a test needs varied captions."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_bart_tokenizer(texts, max_length=max_position_embeddings)
    # Two DaViT stages (strides 4 and 2): image_size / 8 squared spatial tokens plus one temporal token.
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
                  embed_dim=[32, hidden_size], num_heads=[2, 4], num_groups=[2, 4], window_size=4,
                  projection_dim=hidden_size, drop_path_rate=0.0)
    text = dict(model_type="bart", vocab_size=len(tokenizer), d_model=hidden_size, encoder_layers=num_layers, decoder_layers=num_layers,
                encoder_attention_heads=num_heads, decoder_attention_heads=num_heads, encoder_ffn_dim=2 * hidden_size,
                decoder_ffn_dim=2 * hidden_size, max_position_embeddings=max_position_embeddings,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
                             tie_word_embeddings=tie_word_embeddings)
    model = _seeded(seed, lambda: Florence2ForConditionalGeneration(config).eval())
    image_tokens = (image_size // 8) ** 2 + 1
    image_processor = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                            image_seq_length=image_tokens)
    return _save(Path(out_dir), model, Florence2Processor(image_processor=image_processor, tokenizer=tokenizer))


# ----------------------------------------------------------------------------
# BLIP-2 with an OPT decoder: a GPT-2-style byte-level BPE tokenizer laid out like OPT's (</s> is bos and eos and is
# put before every text), an <image> placeholder repeated num_query_tokens times, and a small ViT + Q-Former + OPT.

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3


def build_opt_tokenizer(texts: Iterable[str], *, max_length: int, vocab_size: int = 500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts) * 20, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    return GPT2Tokenizer(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         add_bos_token=True, model_max_length=max_length)


def build_tiny_blip2(out_dir, texts: Iterable[str], *, image_size: int = 32, patch_size: int = 16, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 2, num_query_tokens: int = 4, max_position_embeddings: int = 64,
                     seed: int = 0) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    try:
        from transformers.models.blip import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    tokenizer = build_opt_tokenizer(texts, max_length=max_position_embeddings)
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size})
    # Blip2Processor adds its <image> placeholder to the tokenizer (as the hub's BLIP-2 processors do): build it first.
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size)
    qformer = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                   num_attention_heads=num_heads, encoder_hidden_size=hidden_size, vocab_size=len(tokenizer),
                   max_position_embeddings=max_position_embeddings)
    text = dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=hidden_size, ffn_dim=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, word_embed_proj_dim=hidden_size,
                max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = _seeded(seed, lambda: Blip2ForConditionalGeneration(config).eval())
    return _save(Path(out_dir), model, processor)


# ----------------------------------------------------------------------------
# BLIP-2 with Flan-T5: a T5 (Unigram, "▁"-prefixed words) tokenizer with T5's ids (<pad> 0, </s> 1, <unk> 2) and no
# bos, the <image> placeholder, and a small ViT + Q-Former + gated-GELU T5 encoder-decoder.


def _with_random_query_tokens(model):
    import torch

    with torch.no_grad():
        model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)
    return model


def build_t5_tokenizer(texts: Iterable[str], *, max_length: int = 512):
    """Every word of `texts` is one piece; other text falls back to single characters (else <unk>)."""
    import string

    from transformers import T5Tokenizer

    words = sorted({word for text in texts for word in text.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in words]
    vocab += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_tiny_blip2_t5(out_dir, texts: Iterable[str], *, image_size: int = 32, patch_size: int = 16, hidden_size: int = 64,
                        num_layers: int = 2, num_heads: int = 2, num_query_tokens: int = 4, initializer_factor: float = 0.2,
                        seed: int = 0) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    try:
        from transformers.models.blip import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    tokenizer = build_t5_tokenizer(texts)
    processor = Blip2Processor(ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer,
                               num_query_tokens=num_query_tokens)  # adds <image> to the tokenizer
    # Trained from scratch, so not transformers' pretrained-loading defaults (as build_tiny_blip does for BLIP): the
    # ViT's initializer_range 1e-10 makes its output ~1e-6, and the query tokens start at zero, where the Q-Former's
    # embedding LayerNorm (eps 1e-12) has a gradient of ~1e6 per unit: the first step's query-token gradient was ~1e16,
    # which fills AdamW's second moment and stalls the image path while the decoder learns the caption prior alone
    # (every image then got one caption). Normal(0, 0.02) query tokens are the original BLIP-2's initialisation.
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, initializer_range=0.02)
    qformer = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                   num_attention_heads=num_heads, encoder_hidden_size=hidden_size, vocab_size=len(tokenizer))
    # Flan-T5: gated-GELU feed-forward, untied output embeddings, the decoder starts from pad. T5's initialisation
    # (output embeddings of std 1) gives a random 64-wide model logits of std ~8 and a loss ~27, whose gradients the
    # trainer's max_grad_norm clips to nothing: a small initializer_factor keeps the random model's loss near log(vocab).
    text = dict(model_type="t5", vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2,
                num_heads=2, d_kv=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=initializer_factor,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    assert not config.use_decoder_only_language_model
    model = _seeded(seed, lambda: _with_random_query_tokens(Blip2ForConditionalGeneration(config).eval()))
    return _save(Path(out_dir), model, processor)
