"""The `merge` command: turn a trained adapter (or full fine-tune) into a standalone model, optionally WiSE-FT style.

    caption-train merge runs/x/final merged/                            # LoRA / IA3 folded into the base model
    caption-train merge runs/x/final merged/ --alpha 0.5                # halfway between base and fine-tuned
    caption-train merge runs/x/final merged/ --alpha_sweep 0,0.25,0.5,0.75,1 --eval_dir heldout/
    caption-train merge runs/full/final merged/ --alpha 0.7             # full fine-tune vs its base (config.toml)

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) interpolates weights,
theta = theta_base + alpha * (theta_finetuned - theta_base): alpha = 1 is the fine-tuned model, 0 the base, and
values between often keep most of the fine-tuning gain while forgetting less of what the base model knew.
It is done here on whole state dicts (after peft's merge_and_unload for adapters), so one code path serves
LoRA, IA3 and full fine-tunes; for LoRA it equals scaling the adapter's delta by alpha.

The output folder loads with `BlipForConditionalGeneration.from_pretrained(OUT_DIR)` /
`AutoProcessor.from_pretrained(OUT_DIR)` and with `caption-train caption OUT_DIR ...`; `merge_info.json`
records where it came from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from caption_train.errors import UserError
from caption_train.files import absolute_if_local, give_default_modes
from caption_train.models import ModelFamily, resolve_family
from caption_train.models.base import quiet_transformers_bars

MERGE_INFO = "merge_info.json"
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeInputs:
    """A model object (the base architecture, holding the fine-tuned weights) and the two weight sets."""

    model: torch.nn.Module
    processor: Any
    family: ModelFamily
    kind: str  # "LoRA", "IA3", ... (peft type) or "full"
    source: str  # the adapter / fine-tuned model folder
    base: str | None  # base model id or folder (None: a full model merged at alpha 1 without one)
    finetuned_state: dict[str, torch.Tensor]
    base_state: dict[str, torch.Tensor] | None


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _config_toml_base(model_dir: Path) -> str | None:
    """model_name_or_path from a checkpoint's config.toml (what a full fine-tune started from), if recorded."""
    path = model_dir / "config.toml"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle).get("model_name_or_path")
    except (OSError, tomllib.TOMLDecodeError):
        return None


@quiet_transformers_bars()
def load_merge_inputs(model_dir: str | os.PathLike, *, base_model: str | None = None, need_base: bool = True) -> MergeInputs:
    """Load the fine-tuned weights of `model_dir` (peft adapter or full model) and, if `need_base`, the base's."""
    from caption_train.inference import ADAPTER_CONFIG, load_processor, resolve_model_source

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"ADAPTER_DIR {model_dir}: {'is a file' if folder.exists() else 'no such folder'}; pass a run's final/ or epoch-N/ folder")
    source = resolve_model_source(str(folder), base_model=base_model, label="ADAPTER_DIR")
    if source.is_adapter:
        from peft import PeftModel

        kind = _peft_type(folder / ADAPTER_CONFIG)
        family, _ = resolve_family(source.base)
        model, base_processor = family.load(source.base, {})
        base_state = _clone_state(model) if need_base else None
        try:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError) as err:
            raise UserError(f"ADAPTER_DIR {model_dir}: peft cannot merge this {kind} adapter into the base weights ({err})") from None
        return MergeInputs(model, load_processor(str(folder), fallback=base_processor), family, kind, str(folder), source.base, _clone_state(model), base_state)

    # A full model: a full fine-tune's checkpoint, or an already merged model.
    family, _ = resolve_family(str(folder))
    model, processor = family.load(str(folder), {})
    base = base_model or _config_toml_base(folder)
    base_state = None
    if need_base:
        if base is None:
            raise UserError(f"ADAPTER_DIR {model_dir}: a full model with no config.toml naming its base model; pass --base_model to interpolate (or --alpha 1)")
        origin = "--base_model" if base_model else f"model_name_or_path in {folder / 'config.toml'}"
        try:
            base_source = resolve_model_source(base, label="base model")
        except UserError as err:
            raise UserError(f"base model not found: looked for {base} ({origin}); pass --base_model ({err})") from None
        if base_source.is_adapter:
            raise UserError(f"base model {base} ({origin}) is an adapter, not a model; pass --base_model with the model it was trained from")
        base_model_obj, _ = family.load(base_source.path, {})
        base_state = _clone_state(base_model_obj)
        del base_model_obj
    return MergeInputs(model, processor, family, "full", str(folder), base, _clone_state(model), base_state)


def _peft_type(adapter_config: Path) -> str:
    try:
        peft_type = json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type", "adapter")
    except (OSError, json.JSONDecodeError):
        return "adapter"
    return {"LORA": "LoRA"}.get(peft_type, peft_type)


def interpolate_state_dicts(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """theta_base + alpha * (theta_finetuned - theta_base) for every floating-point tensor; others from `finetuned`.

    torch.lerp is exact at both ends: alpha = 0 returns the base's values and alpha = 1 the fine-tuned ones bit for bit.
    """
    if base.keys() != finetuned.keys():
        only_base = sorted(base.keys() - finetuned.keys())[:3]
        only_ft = sorted(finetuned.keys() - base.keys())[:3]
        raise UserError(f"the base and fine-tuned models have different weights (only in base: {only_base}; only fine-tuned: {only_ft}); pass the right --base_model")
    merged = {}
    for name, ft in finetuned.items():
        b = base[name]
        if b.shape != ft.shape:
            raise UserError(f"weight {name}: base has shape {tuple(b.shape)}, fine-tuned {tuple(ft.shape)}; pass the right --base_model")
        if ft.is_floating_point():
            merged[name] = torch.lerp(b.to(ft.dtype), ft, alpha)
        else:
            merged[name] = ft.clone()
    return merged


def apply_alpha(inputs: MergeInputs, alpha: float) -> torch.nn.Module:
    """Load the alpha-interpolated weights into `inputs.model` (kept on its device and dtype) and return it."""
    if alpha == 1.0:
        state = inputs.finetuned_state
    else:
        if inputs.base_state is None:
            raise UserError("interpolating needs the base model's weights; pass --base_model")
        state = interpolate_state_dicts(inputs.base_state, inputs.finetuned_state, alpha)
    inputs.model.load_state_dict(state)
    return inputs.model


# ---------------------------------------------------------------------------- output folder


def check_out_dir(out_dir: Path, *, overwrite: bool, inputs: Sequence[str | None]) -> None:
    """Refuse an OUT_DIR that is an input, a file, non-empty (unless overwrite), or a peft adapter folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir}: is a file; pass a folder name")
    resolved = out_dir.resolve()
    for item in inputs:
        if item and Path(item).expanduser().exists() and Path(item).expanduser().resolve() == resolved:
            raise UserError(f"OUT_DIR {out_dir}: is an input of this merge; pass a new folder")
    if any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"OUT_DIR {out_dir}: exists and is not empty; pass a new folder, or --overwrite to write into it (only the files a merge writes are replaced)")
        if (out_dir / "adapter_config.json").exists():
            raise UserError(f"OUT_DIR {out_dir}: holds a peft adapter (adapter_config.json), which would shadow the merged model when loading; pass a new folder")


@quiet_transformers_bars()  # merge's own lines say what is written
def save_merged(model: torch.nn.Module, processor: Any, out_dir: Path, info: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> Path:
    """save_pretrained model + processor + merge_info.json into a hidden temp folder, then move the files into place.

    A new OUT_DIR appears whole (one rename); into an existing one, each file replaces only its namesake.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from this process id
    try:
        model.to(dtype).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        give_default_modes(tmp)  # transformers writes model.safetensors 0600 through a temp file
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return out_dir
        for item in sorted(tmp.iterdir()):
            target = out_dir / item.name
            if target.is_dir() and not item.is_dir():
                raise UserError(f"OUT_DIR {out_dir}: {item.name} is a folder there; move it away or pass a new folder")
            os.replace(item, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


# ---------------------------------------------------------------------------- command line


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--alpha_sweep {text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not alphas:
        raise UserError(f"--alpha_sweep {text!r}: no values; e.g. 0,0.25,0.5,0.75,1")
    return alphas


def parse_args(argv: list[str] | None):
    from caption_train.captioning import command_parser, add_generation_arguments

    parser = command_parser("caption-train merge", "Merge an adapter (or a full fine-tune) into a standalone model, optionally WiSE-FT interpolated with the base.")
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a run's final/ or epoch-N/ folder: a LoRA/IA3 adapter, or a full fine-tune")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the standalone model + processor are written")
    parser.add_argument("--alpha", type=float, default=None, help="weight of the fine-tuning: theta = base + alpha * (finetuned - base); 1 = fine-tuned, 0 = base (default: 1)")
    parser.add_argument("--alpha_sweep", default=None, metavar="A,B,...", help="evaluate each alpha on --eval_dir and keep the best by CIDEr-D")
    parser.add_argument("--eval_dir", default=None, help="captioned images to evaluate on (required by --alpha_sweep; with --alpha, prints its scores)")
    parser.add_argument("--max_images", type=int, default=0, help="evaluate on only the first N images of --eval_dir (default: 0 = all)")
    parser.add_argument("--allow_extrapolation", action="store_true", help="allow alpha outside [0, 1]")
    parser.add_argument("--base_model", default=None, help="base model (default: the adapter's base_model_name_or_path, or a full fine-tune's config.toml model_name_or_path)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR, replacing only the files the merge writes")
    parser.add_argument("--dtype", default="float32", choices=list(SAVE_DTYPES), help="dtype of the saved weights (default: float32)")
    parser.add_argument("--device", default="auto", help="device for --eval_dir evaluation (default: auto)")
    parser.add_argument("--eval_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="autocast precision of the --eval_dir evaluation; the weights are interpolated in float32 "
                             "(default: auto = bfloat16 where the GPU or CPU runs it natively, float16 on other GPUs, else float32)")
    add_generation_arguments(parser)
    return parser.parse_args(argv)


def _check_args(args) -> tuple[list[float], list[str]]:
    problems = []
    if args.alpha is not None and args.alpha_sweep is not None:
        problems.append("pass --alpha or --alpha_sweep, not both")
    alphas = parse_alphas(args.alpha_sweep) if args.alpha_sweep is not None else [1.0 if args.alpha is None else args.alpha]
    if args.alpha_sweep is not None and not args.eval_dir:
        problems.append("--alpha_sweep needs --eval_dir (captioned images to choose the best alpha on)")
    for alpha in alphas:
        if not math.isfinite(alpha):
            problems.append(f"alpha {alpha}: must be a finite number")
        elif not 0.0 <= alpha <= 1.0 and not args.allow_extrapolation:
            problems.append(f"alpha {alpha}: outside [0, 1] (0 = base, 1 = fine-tuned); pass --allow_extrapolation to go beyond")
    if args.max_images < 0:
        problems.append(f"--max_images must be >= 0, got {args.max_images}")
    return alphas, problems


def best_alpha(results: list[tuple[float, dict[str, float]]]) -> float:
    """Highest CIDEr-D; ties go to higher ROUGE-L, then to the smaller alpha (closer to the base: WiSE-FT's point)."""
    return max(results, key=lambda r: (r[1]["cider"], r[1]["rougeL"], -r[0]))[0]


def main(argv: list[str] | None = None) -> int:
    from caption_train.captioning import generation_options

    args = parse_args(argv)
    alphas, problems = _check_args(args)
    options, generation_problems = generation_options(args, model_dir=args.adapter_dir)
    problems += generation_problems if args.eval_dir else []
    if problems:
        raise UserError("; ".join(problems))
    out_dir = Path(args.out_dir).expanduser()
    check_out_dir(out_dir, overwrite=args.overwrite, inputs=[args.adapter_dir, args.base_model])
    eval_samples = None
    if args.eval_dir:
        from caption_train.evaluate import load_eval_samples

        _, eval_samples, summary = load_eval_samples(args.eval_dir, args.max_images, label="--eval_dir")
        print(summary, flush=True)

    inputs = load_merge_inputs(args.adapter_dir, base_model=args.base_model, need_base=any(a != 1.0 for a in alphas))
    print(f"merging {inputs.kind} {inputs.source}" + (f" with base {inputs.base}" if inputs.base else ""), flush=True)
    # Whatever dtype the checkpoints hold, the fine-tuning delta is computed and scaled in float32 and rounded once,
    # on saving: a delta below half a bf16 step of a weight would otherwise vanish before --alpha scales it.
    print(f"weights: merged in float32, saved as {args.dtype}", flush=True)
    sweep = evaluate_alphas(inputs, alphas, eval_samples, options, args) if eval_samples is not None else []
    chosen = best_alpha(sweep) if len(sweep) > 1 else alphas[0]

    inputs.model.to(device="cpu", dtype=torch.float32)  # back to full precision before loading the chosen weights
    model = apply_alpha(inputs, chosen)
    info = {
        # Absolute: the record must name the same folders from wherever it is read.
        "merged_from": absolute_if_local(inputs.source),
        "kind": inputs.kind,
        "base_model": absolute_if_local(inputs.base),
        "alpha": chosen,
        "dtype": args.dtype,
        "eval_dir": absolute_if_local(args.eval_dir),
        "sweep": [{"alpha": a, "metrics": m} for a, m in sweep] or None,
    }
    save_merged(model, inputs.processor, out_dir, info, dtype=SAVE_DTYPES[args.dtype])
    print(f"alpha {chosen:g}: wrote {out_dir}", flush=True)
    print(out_dir, flush=True)  # the last line: the merged model's folder
    return 0


def evaluate_alphas(inputs: MergeInputs, alphas: list[float], samples: list, options, args) -> list[tuple[float, dict[str, float]]]:
    """Evaluate each alpha on `samples` (float32 weights on --device, --eval_dtype autocast); print the table;
    return [(alpha, metrics)]."""
    from caption_train.evaluate import evaluate_samples, format_table
    from caption_train.inference import pick_device
    from caption_train.precision import inference_dtype

    device = pick_device(args.device)
    dtype = inference_dtype(args.eval_dtype, device)
    inputs.model.to(device)
    torch.manual_seed(args.seed)
    results = []
    for alpha in alphas:
        model = apply_alpha(inputs, alpha)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            result = evaluate_samples(model, inputs.processor, inputs.family, samples, options, batch_size=args.batch_size, num_workers=args.num_workers, progress=True)
        results.append((alpha, result.metrics))
    best = best_alpha(results) if len(results) > 1 else alphas[0]
    print(format_table([(f"alpha {a:g}" + (" *" if a == best and len(results) > 1 else ""), m) for a, m in results]), flush=True)
    return results
