"""Tiny offline BLIP captioner, tokenizer and colored-shapes dataset, for tests and the demo (no hub needed).

    from caption_train.tiny import make_shapes_dataset, build_tiny_blip
    pairs = make_shapes_dataset("data/shapes", 240, seed=0)          # data/shapes/part0/img_0000.png + .txt
    model_dir = build_tiny_blip("models/tiny-blip", [c for _, c in pairs])
    # BlipForConditionalGeneration.from_pretrained(model_dir), BlipProcessor.from_pretrained(model_dir)
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from caption_train.files import give_default_modes

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

# ----------------------------------------------------------------------------
# dataset: one colored shape per image, caption "a <color> <shape>"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Every (color, shape) pair in a fixed order; image i gets pair i % len, so classes stay balanced for any n.
_COMBOS: list[tuple[str, str]] = list(itertools.product(COLORS, SHAPES))


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        # A square of the circle's area would look small next to it; 0.85 r keeps their visual weight similar.
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_shapes_dataset(
    out_dir, n: int, *, seed: int = 0, size: int = 64, subfolders: int = 2
) -> list[tuple[Path, str]]:
    """Write `n` PNGs of one colored shape each, with `.txt` captions, spread over `part<k>/` subfolders.

    Deterministic: the same arguments give byte-identical files. `subfolders=0` writes straight into `out_dir`.
    Returns `[(image_path, caption), ...]` in index order.
    """
    from PIL import Image, ImageDraw

    if n < 0:
        raise ValueError(f"n={n}: the number of images must be >= 0")
    if size < 16:
        raise ValueError(f"size={size}: images smaller than 16 px leave no room for a recognisable shape")
    if subfolders < 0:
        raise ValueError(f"subfolders={subfolders}: must be >= 0")
    out_dir = Path(out_dir)
    # A private generator, so callers' use of the global `random` state neither changes nor is changed by us.
    rng = random.Random(seed)
    pairs: list[tuple[Path, str]] = []
    for i in range(n):
        color, shape = _COMBOS[i % len(_COMBOS)]
        # Jitter is mild on purpose: the task should stay easy enough to learn from scratch in minutes on a CPU.
        r = size * rng.uniform(0.22, 0.32)
        margin = r + 2
        cx = rng.uniform(margin, size - margin)
        cy = rng.uniform(margin, size - margin)
        bg = tuple(rng.randint(232, 250) for _ in range(3))
        image = Image.new("RGB", (size, size), bg)
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, COLORS[color])

        folder = out_dir / f"part{i % subfolders}" if subfolders else out_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:04d}.png"
        caption = f"a {color} {shape}"
        image.save(path, format="PNG")
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        pairs.append((path, caption))
    return pairs


def shape_caption_accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after strip + lowercase (0.0 for empty input)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        return 0.0
    hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references))
    return hits / len(references)


# ----------------------------------------------------------------------------
# tokenizer: a tiny WordPiece vocab shaped like BLIP's BERT tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BLIP's decoder starts from [DEC], which is an added token in the real BLIP tokenizer too.
DEC_TOKEN = "[DEC]"
# Words that prompts and demo captions use; trained in so they stay whole tokens whatever captions are given.
_BASE_WORDS = (
    "a an the of and with on in at to is photo photography picture image drawing painting "
    "small large big background white black gray shape color colored "
    + " ".join(COLORS)
    + " "
    + " ".join(SHAPES)
)


def build_tokenizer(texts: Iterable[str], *, max_length: int, vocab_size: int = 200) -> BertTokenizerFast:
    """Train a lowercasing WordPiece tokenizer on `texts` and wrap it as a BERT tokenizer with `[DEC]` as BOS.

    Encodes as `[CLS] ... [SEP]` like BLIP's processor tokenizer; `model_max_length=max_length`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    # transformers 5 has only the tokenizers-backed class; BertTokenizerFast is an alias of BertTokenizer.
    from transformers import BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    # show_progress=False: the trainer's progress output is blank lines on stdout, noise in tests and the demo.
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend.train_from_iterator(itertools.chain([_BASE_WORDS], texts), trainer=trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )

    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        model_max_length=max_length,
        do_lower_case=True,
    )
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


# ----------------------------------------------------------------------------
# model: a randomly initialised, small BLIP captioner saved like a hub checkpoint


def build_tiny_blip(
    out_dir,
    texts: Iterable[str],
    *,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> Path:
    """Save a random-weight `BlipForConditionalGeneration` and its `BlipProcessor` to `out_dir`; return it.

    The tokenizer is trained on `texts`. Load back with the ordinary `from_pretrained(out_dir)` calls.
    """
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    from caption_train.models.base import quiet_transformers_bars

    try:
        # The PIL processor directly: it saves as "BlipImageProcessor" all the same, skips the torchvision-missing
        # warning, and gives the same pixels whether or not torchvision is installed.
        from transformers.models.blip import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers releases before the PIL/torchvision backend split
        from transformers import BlipImageProcessor as ImageProcessor

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    out_dir = Path(out_dir)

    tokenizer = build_tokenizer(texts, max_length=max_position_embeddings)
    vision_config = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        # BLIP's vision default (1e-10) sets position embeddings to ~0, fine for loading pretrained weights but a
        # slow start when training from scratch, which is all this model is for.
        initializer_range=0.02,
    )
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        encoder_hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        # generate() stops on sep_token_id; eos must agree so generation configs derived from it stop there too.
        eos_token_id=tokenizer.sep_token_id,
    )
    config = BlipConfig(
        vision_config=vision_config,
        text_config=text_config,
        projection_dim=hidden_size,
        image_text_hidden_size=hidden_size,
    )
    # Seed only a forked RNG so building a model does not reset the caller's global torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.eval()

    image_processor = ImageProcessor(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers_bars():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    give_default_modes(out_dir)  # transformers writes model.safetensors 0600 through a temp file
    return out_dir
