"""The `merge` command on real adapters trained on the tiny BLIP: LoRA, IA3 and full fine-tunes, WiSE-FT alphas,
the alpha sweep, and refusing to clobber folders."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration

from caption_train.captioning import find_images
from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.inference import load_for_inference
from caption_train.merge import MERGE_INFO

from conftest import base_args
from test_files import umask  # noqa: F401 - the fixture


def train(out: Path, tiny_blip: Path, shapes_dir: Path, *extra: str) -> Path:
    assert main(["train", *base_args(shapes_dir, tiny_blip, out, "--save_every_n_epochs", "0", "--num_sample_captions", "0", *extra)]) == 0
    (final,) = out.glob("*/final")
    return final


@pytest.fixture(scope="module")
def lora_final(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    # A high LR so that the adapter visibly changes the captions: otherwise "same ids" would prove nothing.
    return train(tmp_path_factory.mktemp("lora"), tiny_blip, shapes_dir, "--epochs", "2", "--lr", "1e-2")


@pytest.fixture(scope="module")
def ia3_final(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    return train(tmp_path_factory.mktemp("ia3"), tiny_blip, shapes_dir, "--peft_module", "IA3", "--epochs", "3", "--lr", "0.3")


@pytest.fixture(scope="module")
def full_final(tmp_path_factory, tiny_blip, shapes_dir) -> Path:
    return train(tmp_path_factory.mktemp("full"), tiny_blip, shapes_dir, "--peft_module", "none", "--epochs", "1", "--lr", "1e-3")


@pytest.fixture(scope="module")
def probe_images(shapes_dir) -> list:
    return [load_rgb(p) for p in find_images(shapes_dir)[:8]]


def greedy_ids(model: torch.nn.Module, processor, images) -> torch.Tensor:
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        return model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=8, num_beams=1, do_sample=False)


def caption_logits(model: torch.nn.Module, processor, images) -> torch.Tensor:
    """Teacher-forced next-token logits for a fixed caption: a continuous view of what the weights do."""
    inputs = processor(images=images, text=["a red circle"] * len(images), return_tensors="pt")
    with torch.no_grad():
        return model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits


def load_merged(folder: Path):
    return BlipForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def assert_weights_at_alpha(merged_dir: Path, adapter: Path, base_model: Path, alpha: float) -> None:
    """The merged folder's weights equal base + alpha * (fine-tuned - base), with the fine-tuned weights from
    peft's own merge of the adapter (not from merge.py), and the difference from both ends is real."""
    base = BlipForConditionalGeneration.from_pretrained(base_model).state_dict()
    tuned = load_for_inference(adapter, merge_adapter=True)[0].state_dict()
    saved = BlipForConditionalGeneration.from_pretrained(merged_dir).state_dict()
    changed = [name for name in base if base[name].is_floating_point() and not torch.equal(base[name], tuned[name])]
    assert changed
    for name in changed:
        torch.testing.assert_close(saved[name], base[name] + alpha * (tuned[name] - base[name]), rtol=1e-5, atol=1e-6, msg=name)


def merge(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["merge", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lora_alpha_1_same_tokens_as_final_and_alpha_0_is_the_base(capsys, tmp_path, lora_final, tiny_blip, probe_images):
    code, out, _ = merge(capsys, str(lora_final), str(tmp_path / "a1"))
    assert code == 0 and out.strip().splitlines()[-1] == str(tmp_path / "a1")
    assert merge(capsys, str(lora_final), str(tmp_path / "a0"), "--alpha", "0")[0] == 0

    adapter, processor, _ = load_for_inference(lora_final)  # the unmerged PeftModel, as training saved it
    merged, merged_processor = load_merged(tmp_path / "a1")
    base = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    final_ids = greedy_ids(adapter, processor, probe_images)
    assert torch.equal(greedy_ids(merged, merged_processor, probe_images), final_ids)
    assert not torch.equal(greedy_ids(base, processor, probe_images), final_ids)  # the adapter changes captions

    at_zero, _ = load_merged(tmp_path / "a0")
    assert torch.equal(greedy_ids(at_zero, processor, probe_images), greedy_ids(base, processor, probe_images))
    base_state = base.state_dict()
    assert all(torch.equal(tensor, base_state[name]) for name, tensor in at_zero.state_dict().items())  # bit for bit

    info = json.loads((tmp_path / "a1" / MERGE_INFO).read_text())
    assert info["kind"] == "LoRA" and info["alpha"] == 1.0 and info["base_model"] == str(tiny_blip)
    assert not (tmp_path / "a1" / "adapter_config.json").exists()


def test_lora_half_alpha_is_the_weight_midpoint(capsys, tmp_path, lora_final, tiny_blip):
    assert merge(capsys, str(lora_final), str(tmp_path / "a1"))[0] == 0
    assert merge(capsys, str(lora_final), str(tmp_path / "half"), "--alpha", "0.5", "--dtype", "float32")[0] == 0
    base = BlipForConditionalGeneration.from_pretrained(tiny_blip).state_dict()
    full = BlipForConditionalGeneration.from_pretrained(tmp_path / "a1").state_dict()
    half = BlipForConditionalGeneration.from_pretrained(tmp_path / "half").state_dict()
    changed = [name for name in base if not torch.equal(base[name], full[name])]
    assert changed and any("text_decoder" in name and "query" in name for name in changed)
    for name in changed:
        torch.testing.assert_close(half[name], (base[name] + full[name]) / 2, rtol=1e-5, atol=1e-6)


def test_ia3_merge(capsys, tmp_path, ia3_final, tiny_blip, probe_images):
    assert merge(capsys, str(ia3_final), str(tmp_path / "ia3"))[0] == 0
    adapter, processor, _ = load_for_inference(ia3_final)
    merged, _ = load_merged(tmp_path / "ia3")
    assert torch.equal(greedy_ids(merged, processor, probe_images), greedy_ids(adapter, processor, probe_images))
    # IA3 moves the outputs less than the LoRA above, so compare logits rather than hope the argmax changes.
    base_model = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    adapter_logits = caption_logits(adapter, processor, probe_images)
    torch.testing.assert_close(caption_logits(merged, processor, probe_images), adapter_logits, rtol=1e-4, atol=1e-4)
    difference = (caption_logits(base_model, processor, probe_images) - adapter_logits).abs().max()
    assert difference > 1e-2
    base = base_model.state_dict()
    merged_state = merged.state_dict()
    changed = [name for name in base if not torch.equal(base[name], merged_state[name])]
    assert changed and all(name.endswith(".weight") for name in changed)  # IA3 rescales key/value/ff weights
    assert json.loads((tmp_path / "ia3" / MERGE_INFO).read_text())["kind"] == "IA3"


def test_full_finetune_interpolates_with_the_base_from_config_toml(capsys, tmp_path, full_final, tiny_blip, probe_images):
    assert merge(capsys, str(full_final), str(tmp_path / "w"), "--alpha", "0.25")[0] == 0
    info = json.loads((tmp_path / "w" / MERGE_INFO).read_text())
    assert info["kind"] == "full" and info["base_model"] == str(tiny_blip)
    base = BlipForConditionalGeneration.from_pretrained(tiny_blip).state_dict()
    tuned = BlipForConditionalGeneration.from_pretrained(full_final).state_dict()
    mixed = BlipForConditionalGeneration.from_pretrained(tmp_path / "w").state_dict()
    name = "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(base[name], tuned[name])
    torch.testing.assert_close(mixed[name], base[name] + 0.25 * (tuned[name] - base[name]), rtol=1e-5, atol=1e-6)
    # alpha 1 of a full model needs no base: the fine-tuned weights, without training state.
    assert merge(capsys, str(full_final), str(tmp_path / "same"), "--base_model", str(tmp_path / "nowhere"))[0] == 0
    assert not (tmp_path / "same" / "training_state.pt").exists()
    same, processor = load_merged(tmp_path / "same")
    tuned_model, _ = load_merged(full_final)
    assert torch.equal(greedy_ids(same, processor, probe_images), greedy_ids(tuned_model, processor, probe_images))


def test_alpha_sweep_keeps_the_best_by_cider(capsys, tmp_path, lora_final, tiny_blip, shapes_dir):
    code, out, _ = merge(capsys, str(lora_final), str(tmp_path / "best"), "--alpha_sweep", "0,0.5,1", "--eval_dir", str(shapes_dir),
                         "--num_workers", "0", "--max_new_tokens", "5", "--max_images", "12")
    assert code == 0
    assert "CIDEr-D" in out and "alpha 0.5" in out and " *" in out
    info = json.loads((tmp_path / "best" / MERGE_INFO).read_text())
    sweep = {row["alpha"]: row["metrics"] for row in info["sweep"]}
    assert set(sweep) == {0.0, 0.5, 1.0}
    best = max(sweep.values(), key=lambda m: m["cider"])["cider"]
    assert sweep[info["alpha"]]["cider"] == best
    # The saved weights are the chosen alpha's, not just its label.
    assert_weights_at_alpha(tmp_path / "best", lora_final, tiny_blip, info["alpha"])


def test_out_dir_is_never_clobbered(capsys, tmp_path, lora_final):
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    code, _, err = merge(capsys, str(lora_final), str(out_dir))
    assert code == 2 and "OUT_DIR" in err and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]

    assert merge(capsys, str(lora_final), str(out_dir), "--overwrite")[0] == 0
    assert (out_dir / "notes.txt").read_text() == "mine"  # a user file survives --overwrite
    assert (out_dir / "model.safetensors").is_file() and (out_dir / MERGE_INFO).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder cleaned up

    # An adapter folder as OUT_DIR would shadow the merged weights (and is the input here): refused even with --overwrite.
    code, _, err = merge(capsys, str(lora_final), str(lora_final), "--overwrite")
    assert code == 2 and "input" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "1.5"], "alpha 1.5: outside [0, 1]"),
        (["--alpha", "-0.1"], "pass --allow_extrapolation"),
        (["--alpha_sweep", "0,1"], "--alpha_sweep needs --eval_dir"),
        (["--alpha_sweep", "0,x"], "--alpha_sweep '0,x': expected comma-separated numbers"),
        (["--alpha", "0.5", "--alpha_sweep", "0,1", "--eval_dir", "."], "pass --alpha or --alpha_sweep, not both"),
    ],
)
def test_bad_alphas(capsys, tmp_path, lora_final, args, message):
    code, _, err = merge(capsys, str(lora_final), str(tmp_path / "out"), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_extrapolation_when_allowed(capsys, tmp_path, lora_final, tiny_blip):
    assert merge(capsys, str(lora_final), str(tmp_path / "x"), "--alpha", "1.5", "--allow_extrapolation")[0] == 0
    assert json.loads((tmp_path / "x" / MERGE_INFO).read_text())["alpha"] == 1.5
    assert_weights_at_alpha(tmp_path / "x", lora_final, tiny_blip, 1.5)


def test_missing_base_and_bad_sources(capsys, tmp_path, lora_final, full_final, tiny_blip):
    moved = tmp_path / "adapter"
    shutil.copytree(lora_final, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = merge(capsys, str(moved), str(tmp_path / "out"))
    assert code == 2 and f"adapter's base model not found: looked for {tmp_path / 'gone'}" in err and "--base_model" in err
    assert merge(capsys, str(moved), str(tmp_path / "out"), "--base_model", str(tiny_blip))[0] == 0

    bare = tmp_path / "bare"
    shutil.copytree(full_final, bare, ignore=shutil.ignore_patterns("config.toml"))
    code, _, err = merge(capsys, str(bare), str(tmp_path / "out2"), "--alpha", "0.5")
    assert code == 2 and "no config.toml naming its base model; pass --base_model" in err

    code, _, err = merge(capsys, str(tmp_path / "nothing"), str(tmp_path / "out3"))
    assert code == 2 and "ADAPTER_DIR" in err and "no such folder" in err


def test_merged_files_get_the_umask_mode_and_absolute_sources(capsys, tmp_path, lora_final, umask, monkeypatch):
    """model.safetensors (which transformers writes 0600 via a temp file) gets what open("w") would give; merge_info
    names the adapter absolutely, so a relative ADAPTER_DIR still means the same folder from anywhere else."""
    monkeypatch.chdir(lora_final.parent)
    assert merge(capsys, "final", str(tmp_path / "merged"))[0] == 0
    files = [p for p in (tmp_path / "merged").iterdir() if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}
    info = json.loads((tmp_path / "merged" / MERGE_INFO).read_text())
    assert info["merged_from"] == str(lora_final.resolve()) and os.path.isabs(info["base_model"])
