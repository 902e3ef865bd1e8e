"""Gradient checkpointing with every family: the text side's layers are recomputed in backward, and the loss and the
adapter's gradients are those of a step without checkpointing (tiny local models of each family)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from caption_train.adapters import wrap_model
from caption_train.models import resolve_family

from tiny_every_family import BUILDERS

CAPTIONS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_dir(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def step(model_dir: Path, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward and backward of a LoRA-wrapped model: (loss, adapter gradients, forward calls of a Linear in the
    text side's first checkpointable layer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from caption_train.train import enable_gradient_checkpointing

    family, _ = resolve_family(str(model_dir))
    model, processor = family.load(str(model_dir), {})
    torch.manual_seed(0)
    model = wrap_model(model, family, "LoRA", {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    family.vision_tower(model).requires_grad_(False)
    family.freeze_vision_tower(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    layers = [m for m in family.text_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers, "the text side has no checkpointable layer"
    # transformers checkpoints the layer's forward (not its __call__, whose hooks would not see the recomputation),
    # so count the calls of a Linear inside it.
    inner = next(m for m in layers[0].modules() if isinstance(m, torch.nn.Linear))
    calls = [0]
    inner.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    batch = family.collate(processor, images, CAPTIONS, max_length=64, prompt=family.training_prompt(None))
    with torch.random.fork_rng():  # dropout (if any) sees the same numbers in both runs and in the recomputation
        torch.manual_seed(1)
        loss = model(**batch).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), grads, calls[0]


def test_checkpointing_recomputes_the_text_side_and_changes_no_gradient(model_dir):
    plain_loss, plain_grads, plain_calls = step(model_dir, checkpointing=False)
    loss, grads, calls = step(model_dir, checkpointing=True)
    assert (plain_calls, calls) == (1, 2)  # recomputed in backward: that is what saves the activations' memory
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)
