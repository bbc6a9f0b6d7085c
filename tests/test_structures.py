"""Expert structures: a shared A (HydraLoRA) and shared experts, on every compute path.

Each form is checked at the layer (MoLoRALinear) against an eager reference written here:
outputs AND gradients w.r.t. x, lora_A, lora_B, the router's parameters and the shared
experts, for top-1, top-2, task and soft routing, T = 1, 7, 100, float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import interpreted_triton_kernels, needs_triton_interpreter
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from molora.core.experts import EXPERT_IMPLS
from molora.core.layer import MoLoRALinear
from routers import SoftRouter, TaskRouter, TopKRouter

IN, OUT, N, R, M, TASKS = 24, 40, 4, 3, 2, 3
IMPLS = ["eager", "dense", "grouped", "grouped_bmm", "hybrid", "auto"]
FORMS = {"hydra": (True, 0), "shared": (False, M), "hydra_shared": (True, M)}


def make_router(kind: str) -> nn.Module:
    if kind == "soft":
        return SoftRouter(IN, num_experts=N, init_std=0.5)
    if kind in ("top1", "top2"):
        return TopKRouter(IN, num_experts=N, top_k=int(kind[-1]), init_std=0.5)
    return TaskRouter(num_experts=N, num_tasks=TASKS, init_std=0.5)


def make_layer(form: str, kind: str, impl: str, seed: int = 0) -> MoLoRALinear:
    """A layer of the given form with random (non-zero) B factors, so every term counts."""
    torch.manual_seed(seed)
    share, shared = FORMS[form]
    layer = MoLoRALinear(
        nn.Linear(IN, OUT),
        num_experts=N,
        r=R,
        lora_alpha=2.0,
        router=make_router(kind),
        expert_impl=impl,
        share_lora_A=share,
        num_shared_experts=shared,
    )
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        if shared:
            layer.lora_B_shared.normal_(0, 0.3)
    return layer


def reference(layer: MoLoRALinear, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """y = W0 x + b + s * sum_i G_i B_i A_i x + s * sum_j B_sh_j A_sh_j x, one expert at a time, in float32."""
    x = x.float()
    gates = layer.router(x, task_ids).weights.float()  # (T, N)
    y = nn.functional.linear(x, layer.base_layer.weight.float(), layer.base_layer.bias.float())
    for i in range(layer.num_experts):
        a = layer.lora_A[0 if layer.share_lora_A else i].float()  # (r, in)
        y = y + layer.scaling * gates[:, i : i + 1] * (x @ a.t() @ layer.lora_B[i].float().t())
    for j in range(layer.num_shared_experts):
        a, b = layer.lora_A_shared[j].float(), layer.lora_B_shared[j].float()
        y = y + layer.scaling * (x @ a.t() @ b.t())
    return y


def run(layer, x, task_ids, grad_out, fn):
    """Output and gradients w.r.t. x and every trainable parameter of the layer."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for _, p in sorted(layer.named_parameters()) if p.requires_grad]
    layer.routing_context.task_ids = task_ids
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], grad_out.to(y.dtype))
    names = ["x", *(n for n, p in sorted(layer.named_parameters()) if p.requires_grad)]
    return y.float(), {n: g.float() for n, g in zip(names, grads)}


def inputs(num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, IN, generator=g)
    return x, torch.randint(0, TASKS, (num_tokens,), generator=g), torch.randn(num_tokens, OUT, generator=g)


def check(form, kind, impl, num_tokens, dtype, tol):
    """The layer run in ``dtype`` (base layer in ``dtype``, adapter and router in float32, as a
    model under bf16 runs them) against the float32 reference."""
    layer = make_layer(form, kind, impl, seed=num_tokens)
    layer.base_layer.requires_grad_(False).to(dtype)
    x, task_ids, grad_out = inputs(num_tokens, seed=num_tokens)
    y_ref, g_ref = run(layer, x, task_ids, grad_out, lambda x: reference(layer, x, task_ids))
    y, g = run(layer, x.to(dtype), task_ids, grad_out, layer)
    scale = float(y_ref.detach().abs().max())
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * scale)
    router_param = "router.table" if kind == "task" else "router.weight"
    assert set(g) == set(g_ref) and {"x", "lora_A", "lora_B", router_param} <= set(g)
    assert ("lora_A_shared" in g) == (layer.num_shared_experts > 0)
    for name in g_ref:
        atol = tol * float(g_ref[name].abs().max()) + 1e-6
        torch.testing.assert_close(g[name], g_ref[name], rtol=tol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["top1", "top2", "task", "soft"])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_forms_match_eager_reference_float32(form, kind, impl, num_tokens):
    check(form, kind, impl, num_tokens, torch.float32, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["top2", "task", "soft"])
@pytest.mark.parametrize("form", ["hydra", "hydra_shared"])
def test_forms_match_eager_reference_bfloat16(form, kind, impl):
    check(form, kind, impl, 100, torch.bfloat16, 0.05)


def test_shared_A_has_one_down_projection_and_shared_experts_keep_theirs():
    layer = make_layer("hydra_shared", "top2", "dense")
    assert layer.lora_A.shape == (1, R, IN) and layer.lora_B.shape == (N, OUT, R)
    assert layer.lora_A_shared.shape == (M, R, IN) and layer.lora_B_shared.shape == (M, OUT, R)
    plain = make_layer("shared", "top2", "dense")
    assert not hasattr(make_layer("hydra", "top2", "dense"), "lora_A_shared")
    assert plain.lora_A.shape == (N, R, IN)
    fresh = MoLoRALinear(
        nn.Linear(IN, OUT), num_experts=N, r=R, lora_alpha=2, router=make_router("soft"), num_shared_experts=M
    )
    assert fresh.lora_B_shared.abs().max() == 0 and fresh.lora_A_shared.abs().max() > 0  # B zero at init


def _forward_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("impl", ["dense", "hybrid"])
def test_shared_A_down_projection_runs_once_per_token(impl):
    """dense and hybrid project x once, (T, r), with a shared A: N - 1 fewer down-projections
    than the same experts with N copies of A; dense's total is that plus the (T, N*r) up-projection."""
    T = 64
    x, A, B = torch.randn(T, IN), torch.randn(1, R, IN), torch.randn(N, OUT, R)
    weights = torch.softmax(torch.randn(T, N), -1)
    indices = None if impl == "dense" else weights.topk(2, dim=-1).indices
    flops = _forward_flops(EXPERT_IMPLS[impl], x, A, B, weights, indices, 1.0)
    expanded = _forward_flops(EXPERT_IMPLS[impl], x, A.expand(N, -1, -1).contiguous(), B, weights, indices, 1.0)
    down = 2 * T * IN * R
    assert expanded - flops == (N - 1) * down
    if impl == "dense":
        assert flops == down + 2 * T * N * R * OUT


def test_shared_experts_are_outside_routing():
    """Routing, statistics and balancing losses see the N routed experts only."""
    layer = make_layer("shared", "top2", "dense")
    layer(torch.randn(5, IN))
    assert layer.last_routing.weights.shape == (5, N) and layer.last_routing.indices.shape == (5, 2)


@needs_triton_interpreter
@pytest.mark.parametrize("kind", ["top2", "soft"])
@pytest.mark.parametrize("form", ["hydra", "hydra_shared"])
def test_triton_forms_match_eager_reference(form, kind):
    """The kernels run on h = A x (T, r) with an identity down-projection (see triton_experts)."""
    interpreted_triton_kernels()
    check(form, kind, "triton", 7, torch.float32, 1e-4)
