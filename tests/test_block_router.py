"""router_sharing="block" (MixLoRA form): one router per parent module, computed once per forward.

A toy model with an ``attn`` block (q, k, v read the same input) and an ``mlp`` block (``down``
reads a different input) is checked against an eager reference written here, in which the
block's routing is computed once from the block's input: outputs and gradients, every expert
path, T = 1, 7, 100, float32 and bfloat16. Then: one set of router parameters per block, one
router call per block and forward, save/load, checkpointing, and the config errors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import interpreted_triton_kernels, needs_triton_interpreter
from tiny_models import random_batch, tiny_llama
from torch import nn

from molora import MoLoRAConfig, MoLoRAModel, get_molora_model
from molora.core.routing import RoutingContext
from molora.inject import inject_molora

IN, N, R, TASKS = 16, 4, 3, 3
IMPLS = ["eager", "dense", "grouped", "grouped_bmm", "hybrid", "auto"]
ROUTERS = {
    "top1": dict(router="topk", top_k=1),
    "top2": dict(router="topk", top_k=2),
    "topp": dict(router="topp", top_p=0.6),
    "task": dict(router="task", num_tasks=TASKS),
    "soft": dict(router="soft"),
}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({n: nn.Linear(IN, IN) for n in ("q", "k", "v")})
        self.mlp = nn.ModuleDict({"up": nn.Linear(IN, 2 * IN), "down": nn.Linear(2 * IN, IN)})

    def forward(self, x):
        a = self.attn["q"](x) + self.attn["k"](x) * self.attn["v"](x)
        return self.mlp["down"](torch.tanh(self.mlp["up"](a)))


def toy(kind: str, impl: str, seed: int):
    torch.manual_seed(seed)
    model, context = Toy(), RoutingContext()
    cfg = MoLoRAConfig(
        target_modules=["q", "k", "v", "up", "down"], num_experts=N, r=R, lora_alpha=R, router_sharing="block",
        expert_impl=impl, router_init_std=0.5, **ROUTERS[kind],
    )  # fmt: skip
    layers, _ = inject_molora(model, cfg, context)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.2)
    return model, layers, context


def lora(layer, x, gates):
    y = nn.functional.linear(x, layer.base_layer.weight.float(), layer.base_layer.bias.float())
    for i in range(N):
        y = y + layer.scaling * gates[:, i : i + 1] * (x @ layer.lora_A[i].float().t() @ layer.lora_B[i].float().t())
    return y


def gates(layer, x, task_ids, chosen):
    """The block router's float32 gates; with ``chosen`` (bf16 runs) on the model's chosen experts,
    whose decisions a rounding of the block's input may flip on near ties."""
    routing = layer.router(x, task_ids)
    if chosen is None:
        return routing.weights.float()
    probs = torch.softmax(routing.logits.float(), -1) * chosen
    return probs / probs.sum(-1, keepdim=True) if getattr(layer.router, "top_k", 1) not in (None, 1) else probs


def reference(model, x, task_ids, chosen=(None, None)):
    """The block's routing once, from the block's input, for every layer of the block."""
    attn, mlp = model.attn, model.mlp
    x = x.float()
    g_attn = gates(attn["q"], x, task_ids, chosen[0])
    a = lora(attn["q"], x, g_attn) + lora(attn["k"], x, g_attn) * lora(attn["v"], x, g_attn)
    g_mlp = gates(mlp["up"], a, task_ids, chosen[1])
    return lora(mlp["down"], torch.tanh(lora(mlp["up"], a, g_mlp)), g_mlp)


def run(model, x, grad_out, fn):
    x = x.detach().clone().requires_grad_(True)
    named = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + [p for _, p in named], grad_out.to(y.dtype))
    return y.float(), {n: g.float() for n, g in zip(["x"] + [n for n, _ in named], grads)}


def check(kind, impl, num_tokens, dtype, tol):
    model, layers, context = toy(kind, impl, seed=num_tokens)
    for layer in layers.values():
        layer.base_layer.to(dtype)
    g = torch.Generator().manual_seed(num_tokens)
    x, grad_out = torch.randn(num_tokens, IN, generator=g), torch.randn(num_tokens, IN, generator=g)
    task_ids = torch.randint(0, TASKS, (num_tokens,), generator=g)
    context.task_ids = task_ids
    y, grads = run(model, x.to(dtype), grad_out, model)
    chosen = (None, None)
    if dtype != torch.float32 and kind in ("top2", "topp"):
        chosen = tuple((layers[n].last_routing.weights > 0).float() for n in ("attn.q", "mlp.up"))
    y_ref, g_ref = run(model, x, grad_out, lambda x: reference(model, x, task_ids, chosen))
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * float(y_ref.detach().abs().max()))
    router_keys = {n for n in grads if ".router." in n}
    assert len(router_keys) == 2 and all(k.startswith(("attn.q.", "mlp.up.")) for k in router_keys)
    for name in g_ref:
        atol = tol * float(g_ref[name].abs().max()) + 1e-6
        torch.testing.assert_close(grads[name], g_ref[name], rtol=tol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(ROUTERS))
@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_block_router_matches_eager_reference_float32(kind, impl, num_tokens):
    check(kind, impl, num_tokens, torch.float32, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["top2", "topp", "task", "soft"])
def test_block_router_matches_eager_reference_bfloat16(kind, impl):
    check(kind, impl, 100, torch.bfloat16, 0.05)


def test_one_router_per_block_called_once_per_forward():
    model, layers, _ = toy("top2", "dense", seed=0)
    owners = {n for n, layer in layers.items() if layer.owns_router}
    assert owners == {"attn.q", "mlp.up"}
    assert layers["attn.k"].router is layers["attn.q"].router and layers["mlp.down"].router is layers["mlp.up"].router
    assert sum(".router." in n for n, _ in model.named_parameters()) == 2
    calls = []
    for name in owners:
        layers[name].router.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    model(torch.randn(5, IN))
    assert sorted(calls) == ["attn.q", "mlp.up"]
    assert layers["attn.v"].last_routing is layers["attn.q"].last_routing


def test_member_running_before_its_owner_is_an_error():
    model, layers, _ = toy("top2", "dense", seed=0)
    with pytest.raises(RuntimeError, match="router_sharing='block'.*'attn.q'"):
        layers["attn.k"](torch.randn(3, IN))


def _llama(**kwargs):
    cfg = MoLoRAConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"], num_experts=4, r=2,
        router_sharing="block", **kwargs,
    )  # fmt: skip
    model = get_molora_model(tiny_llama(seed=1), cfg)
    with torch.no_grad():
        for layer in model.molora_layers().values():
            layer.lora_B.normal_(std=0.5)
    return model


@pytest.mark.parametrize("kind", ["top2", "task"])
def test_save_load_round_trip_saves_each_block_router_once(tmp_path, kind):
    model = _llama(**ROUTERS[kind]).eval()
    batch = random_batch(batch=2, seq=7)
    extra = {"task_ids": torch.tensor([0, 2])} if kind == "task" else {}
    with torch.no_grad():
        before = model(**batch, **extra).logits
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "molora_model.safetensors"), "pt") as f:
        router_keys = sorted(k for k in f.keys() if ".router." in k)
    assert len(router_keys) == 4 and all(".q_proj." in k or ".gate_proj." in k for k in router_keys)
    loaded = MoLoRAModel.from_pretrained(tiny_llama(seed=1), tmp_path).eval()
    assert loaded.molora_config.router_sharing == "block"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, **extra).logits, before, rtol=0, atol=0)


def test_gradient_checkpointing_recomputes_the_block_routing():
    batch = random_batch(batch=2, seq=6)
    grads = []
    for checkpointing in (False, True):
        model = _llama(router="topk", top_k=2, router_aux_loss_coef=0.1).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".router." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_config_errors_name_router_sharing():
    with pytest.raises(ValueError, match="`router_sharing` must be one of"):
        MoLoRAConfig(router_sharing="model")
    with pytest.raises(ValueError, match="router_sharing='block'.*share one router"):
        _llama(num_experts_pattern={"k_proj": 2})


@needs_triton_interpreter
@pytest.mark.parametrize("kind", ["top2", "topp"])
def test_block_router_triton_matches_eager_reference(kind):
    interpreted_triton_kernels()
    check(kind, "triton", 7, torch.float32, 1e-4)
