"""CUDA checks (bf16): every expert path against eager, outputs and gradients; grouped GEMMs.

Marked ``gpu``; skipped without a CUDA device. On sm90+ ``F.grouped_mm`` runs its CUTLASS bf16
kernel; elsewhere torch's per-group fallback or molora's padded bmm. Either way the results
must match the eager reference within bf16 tolerances.
"""

import pytest
import torch

from molora.core.experts import EXPERT_IMPLS
from molora.core.kernels.grouped_mm import gmm, gmm_wgrad
from molora.core.layer import MoLoRALinear
from routers import SoftRouter, TaskRouter, TopKRouter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FAST = sorted(name for name in EXPERT_IMPLS if name != "eager")
IN, OUT, N, R = 64, 96, 8, 16


def make_router(kind: str):
    if kind == "soft":
        return SoftRouter(IN, num_experts=N, init_std=0.5)
    if kind == "top2":
        return TopKRouter(IN, num_experts=N, top_k=2, init_std=0.5)
    return TaskRouter(num_experts=N, num_tasks=3, top_k=2, init_std=0.5)


def run(impl, router, x, A, B, task_ids, grad_out, dtype):
    x = x.detach().to(dtype).requires_grad_(True)
    routing = router(x, task_ids)
    y = EXPERT_IMPLS[impl](x, A.to(dtype), B.to(dtype), routing.weights, routing.indices, 2.0)
    grads = torch.autograd.grad(y, [x, A, B, *router.parameters()], grad_out.to(y.dtype))
    return y.float(), [g.float() for g in grads]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("kind", ["soft", "top2", "task_top2"])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_paths_match_eager_bf16_cuda(impl, kind, num_tokens):
    torch.manual_seed(num_tokens)
    device = torch.device("cuda")
    router = make_router(kind).to(device)
    x = torch.randn(num_tokens, IN, device=device)
    A = (0.3 * torch.randn(N, R, IN, device=device)).requires_grad_(True)
    B = (0.3 * torch.randn(N, OUT, R, device=device)).requires_grad_(True)
    task_ids = torch.randint(0, 3, (num_tokens,), device=device)
    grad_out = torch.randn(num_tokens, OUT, device=device)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run(impl, router, x, A, B, task_ids, grad_out, torch.bfloat16)
    scale = float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02 * scale)
    for name, a, b in zip(["x", "A", "B", "router"], g, g_ref):
        torch.testing.assert_close(
            a, b, rtol=0.05, atol=0.03 * float(b.abs().max()) + 1e-3, msg=lambda m, name=name: f"grad {name}: {m}"
        )


@pytest.mark.parametrize("use_kernel", [True, False])
def test_grouped_mm_bf16_cuda(use_kernel, monkeypatch):
    """With use_kernel=True, F.grouped_mm must run and succeed: gmm's padded fallback would
    otherwise hide a failing kernel behind a correct result."""
    import torch.nn.functional as F

    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm

        def spy(*args, **kwargs):
            calls.append("called")
            out = real(*args, **kwargs)  # an exception propagates: recorded as no "ok"
            calls.append("ok")
            return out

        monkeypatch.setattr(F, "grouped_mm", spy)
    counts = [37, 0, 5, 130, 1, 0, 64, 19]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    torch.manual_seed(0)
    a = torch.randn(sum(counts), 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(len(counts), 64, 32, device="cuda", dtype=torch.bfloat16)
    got = gmm(a, b, offs, use_kernel=use_kernel)
    want, start = [], 0
    for g, c in enumerate(counts):
        want.append(a[start : start + c].float() @ b[g].float())
        start += c
    torch.testing.assert_close(got.float(), torch.cat(want), rtol=2e-2, atol=0.25)
    c = torch.randn(sum(counts), 32, device="cuda", dtype=torch.bfloat16)
    wg = gmm_wgrad(a, c, offs, use_kernel=use_kernel)
    start = 0
    for g, n in enumerate(counts):
        ref = a[start : start + n].float().t() @ c[start : start + n].float()
        torch.testing.assert_close(wg[g].float(), ref, rtol=2e-2, atol=0.5)
        start += n
    if use_kernel and hasattr(F, "grouped_mm"):
        assert calls == ["called", "ok"] * 2, f"F.grouped_mm did not run cleanly: {calls}"
    else:
        assert calls == []


@pytest.mark.parametrize("kind", ["soft", "top2", "task_top2"])
def test_triton_matches_eager_bf16_cuda(kind, monkeypatch):
    """The compiled Triton kernels (not the interpreter) against eager, and they did run."""
    pytest.importorskip("triton")
    from molora.core.kernels import triton_kernels

    if triton_kernels.INTERPRETED:
        pytest.skip("triton kernels were built for the interpreter in this process")
    launched = []
    name = "dense_up_kernel" if kind == "soft" else "sparse_fwd_kernel"
    kernel = getattr(triton_kernels, name)

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_kernels, name, Spy())
    test_paths_match_eager_bf16_cuda("triton", kind, 300)
    assert launched, f"{name} never launched"


def test_layer_bf16_cuda_matches_eager_layer():
    """A bf16 MoLoRALinear on CUDA with expert_impl='auto' against the same layer run eagerly."""
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, device="cuda", dtype=torch.bfloat16)
    layers = {}
    for impl in ["auto", "eager"]:
        torch.manual_seed(1)
        layer = MoLoRALinear(
            base, num_experts=N, r=R, lora_alpha=2 * R, router=TopKRouter(IN, num_experts=N, top_k=2), expert_impl=impl
        ).cuda()
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
        layers[impl] = layer
    x = torch.randn(4, 50, IN, device="cuda", dtype=torch.bfloat16)
    outs = {impl: layer(x) for impl, layer in layers.items()}
    torch.testing.assert_close(outs["auto"].float(), outs["eager"].float(), rtol=0.05, atol=0.05)
    for out in outs.values():
        out.float().square().mean().backward()
    for name in ["lora_A", "lora_B"]:
        a, b = getattr(layers["auto"], name).grad, getattr(layers["eager"], name).grad
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.03 * float(b.abs().max()) + 1e-4)


def test_auto_on_cuda_follows_the_roofline_rules():
    from molora.core.choose import dense_floor_rank
    from molora.core.experts import choose_impl

    x = torch.empty(512, IN, device="cuda", dtype=torch.bfloat16)
    A = torch.empty(N, R, IN, device="cuda", dtype=torch.bfloat16)
    B = torch.empty(N, OUT, R, device="cuda", dtype=torch.bfloat16)
    indices = torch.zeros(512, 2, dtype=torch.long, device="cuda")
    assert N * R < dense_floor_rank(x.device)
    assert choose_impl(x, A, B, indices) == "dense"  # N*r = 128: memory-bound, dense at the floor
    assert choose_impl(x, A, B, None) == "dense"
    wide_A = torch.empty(64, R, IN, device="cuda", dtype=torch.bfloat16)
    wide_B = torch.empty(64, OUT, R, device="cuda", dtype=torch.bfloat16)
    assert choose_impl(x, wide_A, wide_B, indices) in ("triton", "grouped", "hybrid")
