"""The caption loss computed only where the labels are (models/loss.py, ModelFamily.caption_loss) on a tiny model of
every family: the same loss, gradients and per-row sums as the model's own full-logits loss (fp32, 1e-5) on a padded
batch, label smoothing, chunks, the forward's autocast, soft-capped logits, peft, a model without a known head; the
memory it spares; and `caption-train train` training and validating with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caption_train.adapters import wrap_model
from caption_train.cli import main
from caption_train.data.images import load_rgb
from caption_train.models import resolve_family
from caption_train.models.base import IGNORE_INDEX
from caption_train.models.chat_vlm import ChatVlmFamily
from caption_train.models.paligemma import PaliGemmaFamily
from caption_train.tracking import read_metrics
from caption_train.train import TrainingHooks

from conftest import VOCAB_TEXTS, base_args
from tiny_every_family import BUILDERS as EVERY_FAMILY
from tiny_families_chat import BUILDERS as CHAT

BUILDERS = {**EVERY_FAMILY, **{arch: (lambda out, build=build: build(out, VOCAB_TEXTS)) for arch, build in CHAT.items()}}
# How transformers 5.25's own losses line logits up with labels, written out here rather than taken from the code
# under test: decoder-only models score label t + 1 at position t; the encoder-decoders' decoders score label t at
# position t; GIT's logits begin with its image tokens' positions.
SEQ2SEQ = {"blip2-t5", "florence2"}
# Rows of different lengths (captions; for chat VLMs also image sizes, so image-token counts), hence padding.
CAPTIONS = ["a red circle", "a very long caption about a blue square on a yellow background", "a"]
SIZES = [(32, 32), (64, 40), (40, 64)]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> a tiny model folder, each built once for the session when first asked for."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = BUILDERS[arch](tmp_path_factory.mktemp(arch))
        return built[arch]

    return get


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


def load(path: Path):
    family, _ = resolve_family(str(path))
    model, processor = family.load(str(path), {})
    return family, model.eval(), processor  # eval: dropout off, so two forwards compute the same thing


def padded_batch(family, processor) -> dict[str, torch.Tensor]:
    images = [Image.new("RGB", size, (40 * i, 120, 60)) for i, size in enumerate(SIZES)]
    batch = family.collate(processor, images, CAPTIONS, max_length=64, prompt=family.training_prompt(None))
    assert len(set((batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist())) == 3  # three target counts: padding in play
    return batch


def aligned(arch: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at the positions that predict a target [targets, vocab], the targets, their rows) from full logits."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    if arch not in SEQ2SEQ:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(keep)
    return logits[keep], labels[keep], rows[keep]


def row_sums(per_token: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows).index_add_(0, rows, per_token.detach().float())


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys() and expected
    for name, grad in expected.items():
        # 1e-5 of each tensor's own scale: some random tiny models have gradients of 1e16 in places (BLIP-2 OPT).
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5 * max(1.0, float(grad.abs().max())), msg=name)


# ---------------------------------------------------------------------------------------------
# every family: loss, gradients and per-row sums as the full-logits path


def test_loss_gradients_and_row_sums_equal_the_full_logits_path(arch, model_dirs):
    family, model, processor = load(model_dirs(arch))
    batch = padded_batch(family, processor)
    output = model(**batch)  # the model's own loss, from logits at every position
    expected = gradients(model, output.loss)

    result = family.caption_loss(model, batch)
    got = gradients(model, result.loss)

    assert abs(result.loss.item() - output.loss.item()) <= 1e-5
    assert_same_gradients(expected, got)  # every parameter trains here (full fine-tune): the head's gradient too
    logits, targets, rows = aligned(arch, output.logits.detach(), batch["labels"])
    torch.testing.assert_close(result.row_loss_sum, row_sums(F.cross_entropy(logits, targets, reduction="none"), rows, 3), rtol=1e-5, atol=1e-5)
    assert result.row_tokens.tolist() == torch.bincount(rows, minlength=3).tolist()
    assert result.row_loss_sum.dtype == torch.float32 and not result.row_loss_sum.requires_grad
    torch.testing.assert_close(result.row_mean(), result.row_loss_sum / result.row_tokens)


def test_smoothed_loss_in_chunks_equals_the_smoothed_cross_entropy_of_full_logits(arch, model_dirs):
    """label_smoothing 0.5 with three targets per chunk (each chunk's logits recomputed in backward), against
    F.cross_entropy(label_smoothing=0.5) of the full logits; the per-row sums stay plain cross-entropy."""
    family, model, processor = load(model_dirs(arch))
    batch = padded_batch(family, processor)
    logits, targets, rows = aligned(arch, model(**batch).logits, batch["labels"])
    smoothed = F.cross_entropy(logits, targets, label_smoothing=0.5)
    plain = F.cross_entropy(logits.detach(), targets, reduction="none")
    expected = gradients(model, smoothed)

    result = family.caption_loss(model, batch, label_smoothing=0.5, chunk_elements=3 * logits.shape[-1])
    got = gradients(model, result.loss)

    assert targets.numel() > 3 * 3  # more than three chunks, the last one partial where 3 does not divide the count
    # A random model predicts nearly uniformly, so smoothing moves its loss little; the tolerance is a tenth of that.
    margin = abs(smoothed.item() - float(plain.mean()))
    assert margin > 5e-5
    assert abs(result.loss.item() - smoothed.item()) <= min(1e-5, margin / 10)
    assert_same_gradients(expected, got)
    torch.testing.assert_close(result.row_loss_sum, row_sums(plain, rows, 3), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# what the model's forward does around its head


@pytest.mark.parametrize("arch, forward_caps", [("paligemma", True), ("gemma3", False)])
def test_soft_capped_logits_are_capped_as_the_models_forward_caps_them(model_dirs, arch, forward_caps):
    """PaliGemma's forward soft-caps its logits when the text config has final_logit_softcapping (PaliGemma 2);
    Gemma 3's image-text forward does not (transformers 5.25), though a Gemma 3 config sets one."""
    family, model, processor = load(model_dirs(arch))
    batch = padded_batch(family, processor)
    with torch.no_grad():
        uncapped = model(**batch).loss
        model.config.get_text_config().final_logit_softcapping = 0.05  # well inside these logits' range: it changes them
        try:
            own, result = model(**batch).loss, family.caption_loss(model, batch)
        finally:
            model.config.get_text_config().final_logit_softcapping = None
    assert (abs(float(own) - float(uncapped)) > 1e-3) == forward_caps
    assert abs(result.loss.item() - float(own)) <= 1e-5


class _KnowsNoSoftCap(PaliGemmaFamily):
    """PaliGemma as a family would see it that did not know the model soft-caps its logits (a future model's own
    post-processing after its head): the first forward's check must catch it."""

    def logit_softcap(self, model):
        return None


def test_logits_changed_after_the_head_in_an_unknown_way_are_caught_and_the_full_logits_used(model_dirs, capsys):
    family = _KnowsNoSoftCap()
    _, model, processor = load(model_dirs("paligemma"))
    batch = padded_batch(family, processor)
    capsys.readouterr()  # (the loading bar)
    model.config.get_text_config().final_logit_softcapping = 0.05
    try:
        output = model(**batch)
        expected = gradients(model, output.loss)
        result = family.caption_loss(model, batch)
        again = family.caption_loss(model, batch)  # later batches go straight to the full logits
    finally:
        model.config.get_text_config().final_logit_softcapping = None
    assert abs(result.loss.item() - output.loss.item()) <= 1e-5 and abs(again.loss.item() - output.loss.item()) <= 1e-5
    assert_same_gradients(expected, gradients(model, result.loss))
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "changes its output layer's result" in warning[0] and "computing logits at every position" in warning[0]


@pytest.mark.parametrize("arch", ["qwen2_vl", "blip"])
def test_the_head_runs_under_the_autocast_of_the_forward(model_dirs, arch):
    """Under bf16 autocast the model's own head multiplies in bf16; applied after the forward, the head must too."""
    family, model, processor = load(model_dirs(arch))
    batch = padded_batch(family, processor)
    with torch.no_grad():
        full_precision = model(**batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own, result = model(**batch).loss, family.caption_loss(model, batch)
    assert abs(float(own) - float(full_precision)) > 2e-5  # bf16 shows in the loss, so an fp32 head would too
    assert abs(result.loss.item() - float(own)) <= 1e-6


@pytest.mark.parametrize("arch", ["blip", "qwen2_vl", "blip2-t5"])
def test_a_lora_model_through_peft(model_dirs, arch):
    family, model, processor = load(model_dirs(arch))
    model = wrap_model(model, family, "LoRA", {}).eval()  # the new LoRA layers' dropout off too
    batch = padded_batch(family, processor)
    output = model(**batch)
    expected = gradients(model, output.loss)
    result = family.caption_loss(model, batch)
    assert abs(result.loss.item() - output.loss.item()) <= 1e-5
    assert_same_gradients(expected, gradients(model, result.loss))


class _LaidOutOtherwise(ChatVlmFamily):
    """A chat VLM whose output layer the family cannot name (a future layout): the loss scores its full logits."""

    def output_head(self, model):
        return None


def test_a_model_without_a_known_head_scores_its_full_logits_and_says_so(model_dirs):
    family = _LaidOutOtherwise()
    _, model, processor = load(model_dirs("qwen2_vl"))
    batch = padded_batch(family, processor)
    output = model(**batch)
    expected = gradients(model, output.loss)
    result = family.caption_loss(model, batch)
    assert abs(result.loss.item() - output.loss.item()) <= 1e-5
    assert_same_gradients(expected, gradients(model, result.loss))
    logits, targets, rows = aligned("qwen2_vl", output.logits.detach(), batch["labels"])
    torch.testing.assert_close(result.row_loss_sum, row_sums(F.cross_entropy(logits, targets, reduction="none"), rows, 3), rtol=1e-5, atol=1e-5)
    note = family.loss_note(model)
    assert note is not None and "\n" not in note and "computing logits at every position" in note
    assert ChatVlmFamily().loss_note(model) is None


def test_a_head_whose_forward_a_hook_replaced_still_gives_the_loss(model_dirs):
    """accelerate's module hooks (device maps, offloading) replace a module's forward on the instance: the head
    then computes real logits in the forward, and the loss scores those."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    family, model, processor = load(model_dirs("llava"))
    add_hook_to_module(model.lm_head, ModelHook())
    batch = padded_batch(family, processor)
    with torch.no_grad():
        own, result = model(**batch).loss, family.caption_loss(model, batch)
    assert abs(result.loss.item() - float(own)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# memory


def saved_for_backward(model: torch.nn.Module, loss_of) -> tuple[int, int]:
    """(bytes, largest tensor's bytes) that autograd keeps for backward while `loss_of()` runs, weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    gradients(model, loss)
    return sum(saved.values()), max(saved.values())


def test_logits_are_kept_for_the_caption_tokens_only(model_dirs):
    """A tiny Qwen2-VL with a 65,536-row output layer (LoRA): the full-logits path keeps [positions, vocab] fp32 for
    backward; the new path [targets, vocab], and with chunks none at all (each chunk's logits are recomputed)."""
    family, model, processor = load(model_dirs("qwen2_vl"))
    model.resize_token_embeddings(65536, mean_resizing=False)
    model = wrap_model(model, family, "LoRA", {}).eval()
    batch = padded_batch(family, processor)
    positions, targets = batch["input_ids"].numel(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    logits_bytes = 65536 * 4

    full, full_largest = saved_for_backward(model, lambda: model(**batch).loss)
    whole, whole_largest = saved_for_backward(model, lambda: family.caption_loss(model, batch).loss)
    chunked, chunked_largest = saved_for_backward(model, lambda: family.caption_loss(model, batch, chunk_elements=8 * 65536).loss)

    assert full_largest >= positions * logits_bytes  # the log-softmax of every position's logits
    assert whole_largest == targets * logits_bytes and whole < full - (positions - targets) * logits_bytes
    assert chunked_largest < 8 * logits_bytes and chunked < whole - (targets - 8) * logits_bytes


# ---------------------------------------------------------------------------------------------
# the training loop


class FullLogitsReference(TrainingHooks):
    """After every optimizer step, recompute that step's batch from its image paths (kept by the loop with its
    per-row losses) and score it the old way: the model's own forward, full logits, label smoothing written out.
    The run's lr is 1e-12, so the weights the step changed are the weights that made its loss."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.validation: list[float] = []

    def reference(self, run, samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = run.accelerator.unwrap_model(run.model)
        batch = run.family.collate(run.processor, [load_rgb(s.image_path) for s in samples], [s.caption for s in samples],
                                   max_length=min(run.cfg.max_length, run.family.max_text_length(model)))
        model.eval()
        with torch.no_grad():
            output = model(**batch)
        model.train()
        logits, targets, rows = aligned("blip", output.logits, batch["labels"])
        loss = F.cross_entropy(logits, targets, label_smoothing=run.cfg.label_smoothing)
        if not run.cfg.label_smoothing:
            torch.testing.assert_close(loss, output.loss)  # the written-out CE is the model's own loss
        return loss, row_sums(F.cross_entropy(logits, targets, reduction="none"), rows, len(samples)), torch.bincount(rows, minlength=len(samples))

    # A white-box check of the loop: these hooks read the loop's own Run behind the protocol's view (run._run), for
    # what the protocol does not show (the batch's kept per-row losses, family, processor, config).
    def on_step_end(self, view, epoch):
        run = view._run
        _, paths, _, row_loss_sum, row_tokens = run.batch_losses[-1]
        by_path = {str(s.image_path): s for s in run.train_dataset.samples}
        loss, rows, tokens = self.reference(run, [by_path[path] for path in paths])
        self.steps.append({"loss": float(loss), "rows": rows, "tokens": tokens, "kept": (row_loss_sum.cpu(), row_tokens.cpu()),
                           "kept_count": len(run.batch_losses)})

    def on_epoch_end(self, view, epoch):
        run = view._run
        self.validation.append(float(self.reference(run, run.val_samples)[0]))  # one validation batch (6 <= 8 images)


@pytest.mark.parametrize("smoothing", ["0", "0.3"])
def test_train_command_trains_and_validates_on_the_caption_loss(tmp_path, tiny_blip, shapes_dir, smoothing, monkeypatch):
    from caption_train import cli as cli_module

    reference = FullLogitsReference()
    monkeypatch.setattr(cli_module, "make_hooks", lambda cfg: reference)  # the command's own path; this hook in the page's place
    args = base_args(shapes_dir, tiny_blip, tmp_path, "--optimizer", "AdamW", "--lr", "1e-12", "--mixed_precision", "no",
                     "--label_smoothing", smoothing, "--validation_split", "0.25", "--num_sample_captions", "0", "--save_every_n_epochs", "0")
    assert main(["train", *args]) == 0
    metrics = read_metrics(next(tmp_path.glob("*/metrics.jsonl")))
    logged = [row["train/loss"] for row in metrics if "train/loss" in row]
    assert len(logged) == len(reference.steps) == 3  # 18 training images, batches of 8
    assert logged == pytest.approx([step["loss"] for step in reference.steps], rel=1e-5)
    for step_number, step in enumerate(reference.steps, start=1):
        kept_sum, kept_tokens = step["kept"]
        torch.testing.assert_close(kept_sum, step["rows"], rtol=1e-5, atol=1e-5)
        assert kept_tokens.tolist() == step["tokens"].tolist()
        assert step["kept_count"] == step_number  # one entry per batch of this epoch
    assert [row["val/loss"] for row in metrics if "val/loss" in row] == pytest.approx(reference.validation, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# several processes

_DDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
from PIL import Image
from caption_train.models import resolve_family

dist.init_process_group("gloo")
rank, path = dist.get_rank(), sys.argv[1]
family, _ = resolve_family(path)

def head_gradient(wrap):
    model, processor = family.load(path, {})
    images = [Image.new("RGB", (32 + 8 * rank, 32), (40 * i + 100 * rank, 120, 60)) for i in range(2)]
    captions = [["a red circle", "a blue square"], ["a very long caption about a yellow shape", "a"]][rank]
    batch = family.collate(processor, images, captions, max_length=64, prompt=family.training_prompt(None))
    wrapped = wrap(model)  # held until backward is done: DDP's reducer all-reduces from it
    family.caption_loss(wrapped, batch).loss.backward()
    return model.lm_head.weight.grad

def gather(tensor):
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts

synced = gather(head_gradient(torch.nn.parallel.DistributedDataParallel))
alone = gather(head_gradient(lambda model: model))
if rank == 0:
    print("ranks agree", torch.equal(synced[0], synced[1]), "differ alone", not torch.allclose(alone[0], alone[1]),
          "mean of ranks", torch.allclose(synced[0], (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-8))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_the_output_layers_gradient_is_averaged_over_processes_under_ddp(tmp_path, model_dirs):
    """The head runs after the DDP-wrapped forward: its gradient must still be all-reduced (2 CPU processes, gloo,
    a full fine-tune of a tiny Qwen2-VL on different rows per process)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ddp_head.py"
    script.write_text(_DDP_SCRIPT, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script),
                             str(model_dirs("qwen2_vl"))], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks agree True differ alone True mean of ranks True" in result.stdout


def test_full_logits_flag_trains_with_the_same_losses(tmp_path, tiny_blip, shapes_dir, capsys):
    """--full_logits (the models' own output layer at every position) reaches the loss, says so at start-up, and
    trains with the losses of the default (the output layer at the target positions only)."""
    logged = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        args = base_args(shapes_dir, tiny_blip, out, "--mixed_precision", "no", "--num_sample_captions", "0", "--save_every_n_epochs", "0",
                         "--epochs", "2", "--full_logits", flag)
        assert main(["train", *args]) == 0
        printed = capsys.readouterr().out
        assert ("loss: logits at every position (--full_logits" in printed) == (flag == "true"), printed
        logged[flag] = [row["train/loss"] for row in read_metrics(next(out.glob("*/metrics.jsonl"))) if "train/loss" in row]
    assert len(logged["true"]) == 6
    assert logged["true"] == pytest.approx(logged["false"], rel=1e-5, abs=1e-6)
