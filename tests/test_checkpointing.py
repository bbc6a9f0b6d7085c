"""Gradient checkpointing: the router losses keep their gradient, and a recomputation routes
with the task ids of its own forward (losses over two forwards, as DPO's)."""

import pytest
import torch
from tiny_models import random_batch, tiny_llama

from molora import MoLoRAConfig, get_molora_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model(router="topk", aux=0.5, **kwargs):
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=4, r=2, router=router, router_aux_loss_coef=aux, **kwargs)
    model = get_molora_model(tiny_llama(seed=1), cfg)
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.lora_B.normal_(std=0.5)  # B = 0 at init would hide the experts' gradients
    return model.train()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reentrant_checkpointing_is_refused_while_router_losses_are_on():
    model = _model()
    with pytest.raises(ValueError, match=r"reentrant gradient checkpointing .* drops the gradient of the router losses"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _model(aux=0.0).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # allowed


def test_reentrant_checkpointing_enabled_on_the_base_is_caught_at_forward():
    """Enabled on the base model directly, it used to drop the balancing loss' gradient silently."""
    model = _model()
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.base_model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match=r"router logits carry no gradient"):
        model(**random_batch())


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_default_checkpointing_keeps_the_aux_loss_gradient(router):
    kwargs = {"top_k": 2} if router == "topk" else {}
    plain, ckpt = _model(router, **kwargs), _model(router, **kwargs)
    ckpt.gradient_checkpointing_enable()
    batch = random_batch(pad_last=3)
    for model in (plain, ckpt):
        model(**batch)
        model.aux_loss().backward()
    want, got = _grads(plain), _grads(ckpt)
    assert want and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_recomputation_routes_with_the_task_ids_of_its_own_forward():
    """Two forwards, one backward: the recomputation used to read the last forward's ids."""
    plain, ckpt = _model("task", aux=0.0, num_tasks=2), _model("task", aux=0.0, num_tasks=2)
    ckpt.gradient_checkpointing_enable()
    batch = random_batch()
    weights = torch.randn(batch["input_ids"].shape + (128,))
    for model in (plain, ckpt):
        first = model(input_ids=batch["input_ids"], task_ids=torch.tensor([0, 1])).logits
        second = model(input_ids=batch["input_ids"], task_ids=torch.tensor([1, 1])).logits
        ((first - second) * weights).sum().backward()
    want, got = _grads(plain), _grads(ckpt)
    assert want and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
