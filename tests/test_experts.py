"""Every expert compute path against the eager reference: outputs AND gradients.

Gradients are taken w.r.t. x, lora_A, lora_B and the router's parameters (through the gates),
for soft, top-1, top-2 and task routing, odd token counts, an expert that gets no token,
float32 and bfloat16.
"""

import pytest
import torch

from molora.core.experts import EXPERT_IMPLS, resolve_impl
from routers import SoftRouter, TaskRouter, TopKRouter

# "triton" runs on CUDA; on CPU only under Triton's interpreter: see test_triton_kernels.py
FAST = sorted(name for name in EXPERT_IMPLS if name not in ("eager", "triton"))
IN, OUT, N, R = 24, 40, 4, 8


def make_router(kind: str) -> torch.nn.Module:
    if kind == "soft":
        return SoftRouter(IN, num_experts=N, init_std=0.5)
    if kind == "top1":
        return TopKRouter(IN, num_experts=N, top_k=1, init_std=0.5)
    if kind == "top2":
        return TopKRouter(IN, num_experts=N, top_k=2, init_std=0.5)
    if kind == "task":
        return TaskRouter(num_experts=N, num_tasks=3, init_std=0.5)
    if kind == "task_top2":
        return TaskRouter(num_experts=N, num_tasks=3, top_k=2, init_std=0.5)
    raise AssertionError(kind)


def run(impl: str, router, x, A, B, task_ids, grad_out, dtype):
    """Output and grads of one path; parameters are cast to `dtype` as the layer does."""
    x = x.detach().to(dtype).requires_grad_(True)
    routing = router(x, task_ids)
    y = EXPERT_IMPLS[impl](x, A.to(dtype), B.to(dtype), routing.weights, routing.indices, 1.5)
    params = [x, A, B, *router.parameters()]
    grads = torch.autograd.grad(y, params, grad_out.to(y.dtype))
    return y.float(), [g.float() for g in grads]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kind", ["soft", "top1", "top2", "task", "task_top2"])
@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_fast_path_matches_eager_float32(impl, kind, num_tokens):
    torch.manual_seed(num_tokens)
    router = make_router(kind)
    x = torch.randn(num_tokens, IN)
    A = torch.randn(N, R, IN, requires_grad=True)
    B = torch.randn(N, OUT, R, requires_grad=True)
    task_ids = torch.randint(0, 3, (num_tokens,))
    grad_out = torch.randn(num_tokens, OUT)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run(impl, router, x, A, B, task_ids, grad_out, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["x", "A", "B", "router"], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kind", ["soft", "top2", "task_top2"])
def test_fast_path_matches_eager_bfloat16(impl, kind):
    torch.manual_seed(0)
    router = make_router(kind)
    x = torch.randn(37, IN)
    A = (0.3 * torch.randn(N, R, IN)).requires_grad_(True)
    B = (0.3 * torch.randn(N, OUT, R)).requires_grad_(True)
    task_ids = torch.randint(0, 3, (37,))
    grad_out = torch.randn(37, OUT)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run(impl, router, x, A, B, task_ids, grad_out, torch.bfloat16)
    scale = float(y_ref.detach().abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02 * scale)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.03 * float(b.abs().max()) + 1e-3)


@pytest.mark.parametrize("impl", FAST)
def test_expert_that_receives_no_token(impl):
    torch.manual_seed(0)
    router = make_router("top1")
    with torch.no_grad():
        router.weight[0] = -10.0 * router.weight[1:].abs().sum(0)  # expert 0 loses for positive x
    x = torch.rand(30, IN) + 0.1
    A = torch.randn(N, R, IN, requires_grad=True)
    B = torch.randn(N, OUT, R, requires_grad=True)
    assert 0 not in router(x).indices
    grad_out = torch.randn(30, OUT)
    y_ref, g_ref = run("eager", router, x, A, B, None, grad_out, torch.float32)
    y, g = run(impl, router, x, A, B, None, grad_out, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert g[1][0].abs().max() == 0 and g[2][0].abs().max() == 0  # no token, no gradient
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_all_tokens_on_one_expert_and_zero_tokens():
    torch.manual_seed(0)
    A, B = torch.randn(N, R, IN), torch.randn(N, OUT, R)
    x = torch.randn(5, IN)
    weights = torch.zeros(5, N)
    weights[:, 2] = 1.0
    indices = torch.full((5, 1), 2)
    want = x @ A[2].t() @ B[2].t()
    for impl in [*FAST, "eager"]:
        torch.testing.assert_close(EXPERT_IMPLS[impl](x, A, B, weights, indices, 1.0), want, rtol=1e-4, atol=1e-4)
        empty = EXPERT_IMPLS[impl](x[:0], A, B, weights[:0], indices[:0], 1.0)
        assert empty.shape == (0, OUT)


def test_resolve_impl_names():
    assert resolve_impl("auto", sparse=False) is EXPERT_IMPLS["dense"]  # dense routing: nothing to choose
    assert resolve_impl("auto", sparse=True) is EXPERT_IMPLS["auto"]  # sparse: chosen per call by shapes
    assert resolve_impl("eager", sparse=True) is EXPERT_IMPLS["eager"]
    with pytest.raises(ValueError, match=r"unknown `expert_impl` 'fast'; choose one of \['auto'"):
        resolve_impl("fast", sparse=True)
