"""Parameter counts and training-memory estimates of the hub checkpoints each family is meant for, offline.

    python benchmarks/model_sizes.py          # prints the Markdown table in README.md ("Model sizes and memory")

No download: each checkpoint's architecture (the numbers from its config.json that change parameter shapes) is
written out below, the model is built from it with transformers on the meta device (shapes only, no memory), and
its parameters are counted: in all, in the vision tower and in the text model (as our family finds them:
`family.vision_tower` / `family.text_model`), and the LoRA r=16 parameters our family's default targets
(`family.lora_targets()`) add, counted by peft itself on the meta model. The total is checked against the size the
model card or paper states (column "published", with the count's difference from it); a checkpoint whose count
is off by more than 2% fails the run.

Memory is then computed from the counts, per training setup (bytes per parameter; GiB = 2^30 bytes):
  - LoRA, bf16 weights (caption-train's default wherever training computes in bf16, i.e. `auto` on a GPU with bf16
    or a CPU with native bf16: caption_train/weights.py): frozen weights 2 B + adapter 16 B (fp32 weight 4,
    gradient 4, AdamW's two moments 8). The norms, held in fp32, are < 0.01% of the parameters: left out.
  - LoRA, fp32 weights (the default where training computes in fp32: `--mixed_precision no`, or `auto` on hardware
    without fast bf16; or `model_config.dtype = "float32"`): 4 B + adapter 16 B.
  - Full fine-tune (`peft_module = "none"`, bf16 autocast): 16 B per parameter (fp32 weight, gradient, two moments);
    all parameters train (vision tower too, unless `freeze_vision_tower`).
  - QLoRA 4-bit (bitsandbytes NF4 with double quantization): every nn.Linear weight except the output layer at
    0.516 B (4 bits + an 8-bit scale per 64 weights + an fp32 scale per 256 scales), everything else bf16 2 B, plus
    the adapter's 16 B.
Left out of every column: activations (they grow with batch size x sequence length, image tokens included, and
shrink with gradient checkpointing), the CUDA context (~0.5 GiB) and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA_RANK = 16
GIB = 2**30
# Bytes per parameter (see the module docstring).
BF16, FP32 = 2, 4
TRAINED = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Checkpoint:
    hub_id: str
    published: float
    """Parameters the model card / paper states, in billions (the cross-check)."""
    model_type: str
    config: dict
    """The config.json values that set parameter shapes; everything else is the config class's default."""
    tied_copy_in_file: bool = False
    """The checkpoint file stores the tied output layer a second time, and the published size counts it."""


# ---------------------------------------------------------------------------------------------
# The checkpoints. Each dict holds the shape-setting values of that hub checkpoint's config.json;
# the comment above it says where the numbers were read.

CHECKPOINTS = [
    # Text config and vision config: whaler404/Hf-Learn transfomers_learn/api/models/multimodal_models/blip/blip.md
    # (this checkpoint's config.json). The hub's 247M counts the tied output layer twice (the file stores both).
    Checkpoint("Salesforce/blip-image-captioning-base", 0.247, "blip", {
        "text_config": {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "intermediate_size": 3072},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 384, "patch_size": 16},
    }, tied_copy_in_file=True),
    # No copy of this config.json found in the code corpus: ViT-L/16 at 384 px (BLIP paper, model card "ViT large
    # backbone") with the base text decoder cross-attending 1024-wide features. 446M + the stored tied copy = 470M.
    Checkpoint("Salesforce/blip-image-captioning-large", 0.470, "blip", {
        "text_config": {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 1024, "num_hidden_layers": 12,
                        "num_attention_heads": 12, "intermediate_size": 3072},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 16},
    }, tied_copy_in_file=True),
    # transformers' GitConfig defaults, documented as microsoft/git-base (models/git/configuration_git.py).
    Checkpoint("microsoft/git-base", 0.177, "git", {
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 1024,
    }),
    # No copy of this config.json found: GIT-base's decoder with CLIP ViT-L/14 at 224 px (GIT paper, GIT_LARGE).
    Checkpoint("microsoft/git-large", 0.394, "git", {
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 1024,
    }),
    # Vision and Q-Former: transformers' Blip2VisionConfig / Blip2QFormerConfig defaults, documented as this
    # checkpoint (models/blip_2/configuration_blip_2.py); OPT: the checkpoint's text_config (a copy in the code
    # corpus, found by its "_name_or_path": "facebook/opt-2.7b"; repository not shown by the index).
    Checkpoint("Salesforce/blip2-opt-2.7b", 3.74, "blip-2", {
        "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "qformer_config": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                           "intermediate_size": 3072, "cross_attention_frequency": 2, "encoder_hidden_size": 1408},
        "text_config": {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2560, "ffn_dim": 10240,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
                        "word_embed_proj_dim": 2560},
        "num_query_tokens": 32,
    }),
    # VinZh22/Florence-2_VisualCompressor Florence-2-base/config.json (microsoft's remote-code config; its
    # vision "dim_embed" is transformers' "embed_dim").
    Checkpoint("florence-community/Florence-2-base", 0.23, "florence2", {
        "vision_config": {"embed_dim": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32],
                          "depths": [1, 1, 9, 1], "window_size": 12, "projection_dim": 768},
        "text_config": {"vocab_size": 51289, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
                        "encoder_attention_heads": 12, "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
                        "decoder_ffn_dim": 3072, "max_position_embeddings": 1024},
    }),
    # Vision dims, d_model 1024 and 12 encoder layers: the Florence-2-large backbone config that X-VLA code embeds
    # (copies in the code corpus, found by "dim_embed": [256, 512, 1024, 2048]; repository not shown). Heads and
    # FFN width follow BART-large (d_model / 64 heads, 4 x d_model), decoder depth = encoder depth.
    Checkpoint("florence-community/Florence-2-large", 0.77, "florence2", {
        "vision_config": {"embed_dim": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64],
                          "num_groups": [8, 16, 32, 64], "depths": [1, 1, 9, 1], "window_size": 12,
                          "projection_dim": 1024},
        "text_config": {"vocab_size": 51289, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
                        "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                        "decoder_ffn_dim": 4096, "max_position_embeddings": 1024},
    }),
    # An idefics3 config.json with these numbers (scale_factor 4, untied embeddings) in the code corpus, found by
    # "vocab_size": 49280 (repository not shown); the model card names SmolLM2-135M + siglip-base-patch16-512.
    Checkpoint("HuggingFaceTB/SmolVLM-256M-Instruct", 0.256, "idefics3", {
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
        "text_config": {"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
                        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                        "tie_word_embeddings": False},
        "scale_factor": 4,
    }),
    # No copy of this config.json found: SmolLM2-1.7B (2048 wide, 24 layers, 8192 FFN: the shape mlx-vlm's
    # SmolVLM tests use) + SigLIP so400m/14 at 384 px (the same tower as PaliGemma's, below), 3x3 pixel shuffle.
    Checkpoint("HuggingFaceTB/SmolVLM-Instruct", 2.25, "idefics3", {
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"model_type": "llama", "vocab_size": 49155, "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "tie_word_embeddings": False},
        "scale_factor": 3,
    }),
    # whaler404/Hf-Learn transfomers_learn/api/models/multimodal_models/qwen2.5_vl/qwen2.5_vl.md (config.json).
    Checkpoint("Qwen/Qwen2.5-VL-3B-Instruct", 3.75, "qwen2_5_vl", {
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "tie_word_embeddings": True,
    }),
    # acproject/duorou docs/qwen2.5vl_graph.md (the loaded 7B model printed: every layer's shape).
    Checkpoint("Qwen/Qwen2.5-VL-7B-Instruct", 8.29, "qwen2_5_vl", {
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
        "tie_word_embeddings": False,
    }),
    # Llama-3.1-8B text config: mlx-vlm's copy of fancyfeast/llama-joycaption-beta-one-hf-llava's config.json (same
    # architecture as alpha two; file not shown by the index); vision: google/siglip-so400m-patch14-384, which
    # Spark-Init/single-image-captioner-webui models/joy_caption/config.py names, with so400m's dims as in
    # PaliGemma's config below. Published size: no model-card number; Llama-3.1-8B (8.03B) + so400m (0.43B).
    Checkpoint("fancyfeast/llama-joycaption-alpha-two-hf-llava", 8.48, "llava", {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "tie_word_embeddings": False},
        "image_token_index": 128077,
    }),
    # NishtiDoi/PaliGemma-Implementation paligemma-3b-pt-224/config.json. Published: keras-hub's preset metadata
    # (keras_hub/src/models/pali_gemma/pali_gemma_presets.py, 2,923,335,408).
    Checkpoint("google/paligemma-3b-pt-224", 2.92, "paligemma", {
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                          "projection_dim": 2048, "vision_use_head": False},
        "text_config": {"model_type": "gemma", "vocab_size": 257216, "hidden_size": 2048, "intermediate_size": 16384,
                        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256},
        "projection_dim": 2048, "image_token_index": 257152,
    }),
]


# ---------------------------------------------------------------------------------------------
# Counting


@dataclass(frozen=True)
class Sizes:
    family: str
    total: int
    vision: int
    text: int
    lora: int
    adapted: int
    """How many modules the family's default LoRA targets match."""
    quantizable: int
    """Weights bitsandbytes would store in 4 bits: every nn.Linear weight except the output layer's."""
    tied_copies: int
    """Parameters shared under a second name (a tied output layer), which count() counts once."""


def build_on_meta(checkpoint: Checkpoint) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(checkpoint.model_type, **checkpoint.config)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def quantizable(model: torch.nn.Module) -> int:
    output = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output)


def tied_copies(model: torch.nn.Module) -> int:
    """Parameters that appear under a second name (a tied output layer): counted once by count()."""
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) - count(model)


def lora_parameters(model: torch.nn.Module, targets: list[str] | str) -> tuple[int, int]:
    """(parameters, modules) LoRA r=16 on `targets` adds, as peft builds it on the meta model."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
    parameters = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    return parameters, sum(isinstance(m, LoraLayer) for m in peft_model.modules())


def measure(checkpoint: Checkpoint) -> Sizes:
    from caption_train.models import family_for_model_type

    family = family_for_model_type(checkpoint.model_type, checkpoint.hub_id)
    model = build_on_meta(checkpoint)
    sizes = dict(family=family.name, total=count(model), vision=count(family.vision_tower(model)),
                 text=count(family.text_model(model)), quantizable=quantizable(model), tied_copies=tied_copies(model))
    lora, adapted = lora_parameters(model, family.lora_targets())  # wraps the model: count everything else first
    return Sizes(**sizes, lora=lora, adapted=adapted)


def published_error(checkpoint: Checkpoint, sizes: Sizes) -> float:
    """counted / published - 1, counting what the checkpoint file stores."""
    stored = sizes.total + (sizes.tied_copies if checkpoint.tied_copy_in_file else 0)
    return stored / (checkpoint.published * 1e9) - 1


# ---------------------------------------------------------------------------------------------
# Memory (bytes per parameter: see the module docstring)


def memory_gib(sizes: Sizes) -> dict[str, float]:
    adapter = TRAINED * sizes.lora
    qlora_base = NF4 * sizes.quantizable + BF16 * (sizes.total - sizes.quantizable)
    return {
        "lora_bf16": (BF16 * sizes.total + adapter) / GIB,
        "lora_fp32": (FP32 * sizes.total + adapter) / GIB,
        "full": TRAINED * sizes.total / GIB,
        "qlora": (qlora_base + adapter) / GIB,
    }


def millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def counted(checkpoint: Checkpoint, sizes: Sizes) -> str:
    if checkpoint.tied_copy_in_file:
        return f"{millions(sizes.total)} (+{millions(sizes.tied_copies)} tied copy in the file)"
    return millions(sizes.total)


def table(rows: list[tuple[Checkpoint, Sizes]]) -> str:
    lines = [
        "| model | family | params | published | vision tower | text model | LoRA r=16: modules, params | "
        "LoRA, bf16 weights (default under bf16) | LoRA, fp32 weights (fp32 compute) | full fine-tune | QLoRA 4-bit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for checkpoint, sizes in rows:
        mem = memory_gib(sizes)
        lines.append(
            f"| {checkpoint.hub_id} | {sizes.family} | {counted(checkpoint, sizes)} | {checkpoint.published:g}B "
            f"({published_error(checkpoint, sizes):+.1%}) | {millions(sizes.vision)} | {millions(sizes.text)} | "
            f"{sizes.adapted}, {sizes.lora / 1e6:.1f}M | {mem['lora_bf16']:.1f} GiB | {mem['lora_fp32']:.1f} GiB | "
            f"{mem['full']:.1f} GiB | {mem['qlora']:.1f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest allowed |counted / published - 1|")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    start = time.perf_counter()
    rows, off = [], []
    for checkpoint in CHECKPOINTS:
        sizes = measure(checkpoint)
        rows.append((checkpoint, sizes))
        error = published_error(checkpoint, sizes)
        if abs(error) > args.tolerance:
            off.append(f"{checkpoint.hub_id}: counted {sizes.total:,}, published {checkpoint.published}B "
                       f"({error:+.1%})")
    print(table(rows))
    print(f"\n{len(rows)} checkpoints built on the meta device and counted in {time.perf_counter() - start:.0f} s")
    for line in off:
        print(f"OFF BY MORE THAN {args.tolerance:.1%}: {line}", file=sys.stderr)
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
