"""Routers: the DESIGN §4 formulas, float32 math, and clear errors."""

import pytest
import torch

from routers import ROUTERS, SoftRouter, TaskRouter, TopKRouter, build_router


def test_soft_router_is_softmax_of_linear_gate():
    router = SoftRouter(12, num_experts=5)
    x = torch.randn(7, 12)
    out = router(x)
    logits = x @ router.weight.t()
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.weights, torch.softmax(logits, -1))
    assert out.indices is None


def test_topk_router_renormalizes_the_k_largest():
    torch.manual_seed(0)
    router = TopKRouter(12, num_experts=6, top_k=2, init_std=1.0)
    x = torch.randn(50, 12)
    out = router(x)
    probs = torch.softmax(out.logits, -1)
    assert out.indices.shape == (50, 2)
    for t in range(50):
        chosen = set(out.indices[t].tolist())
        expected_set = set(probs[t].topk(2).indices.tolist())
        assert chosen == expected_set
        denom = probs[t, list(chosen)].sum()
        for i in range(6):
            want = probs[t, i] / denom if i in chosen else 0.0
            assert abs(out.weights[t, i].item() - float(want)) < 1e-6
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(50))


def test_topk_equal_to_n_is_soft():
    torch.manual_seed(0)
    soft = SoftRouter(8, num_experts=4)
    topk = TopKRouter(8, num_experts=4, top_k=4)
    topk.load_state_dict(soft.state_dict())
    x = torch.randn(9, 8)
    torch.testing.assert_close(topk(x).weights, soft(x).weights)


def test_router_math_runs_in_float32_for_bf16_input():
    router = TopKRouter(8, num_experts=4, top_k=2)
    out = router(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=2, jitter_noise=0.5)
    x = torch.randn(20, 8)
    router.eval()
    torch.testing.assert_close(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_task_router_routes_by_task_id_and_topk():
    router = TaskRouter(num_experts=4, num_tasks=3, top_k=2, init_std=1.0)
    ids = torch.tensor([0, 2, 2, 1])
    out = router(torch.zeros(4, 8), ids)
    torch.testing.assert_close(out.logits, router.table[ids])
    for t, task in enumerate(ids.tolist()):
        torch.testing.assert_close(out.weights[t], router.task_weights(task))
    assert (out.weights > 0).sum(-1).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "task_ids, message",
    [(None, "needs `task_ids`"), (torch.tensor([0, 3]), r"num_tasks=3"), (torch.tensor([-1, 0]), r"num_tasks=3")],
)
def test_task_router_rejects_missing_or_out_of_range_ids(task_ids, message):
    router = TaskRouter(num_experts=4, num_tasks=3)
    with pytest.raises(ValueError, match=message):
        router(torch.zeros(2, 8), task_ids)


def test_debug_mode_raises_on_nan_logits():
    router = SoftRouter(4, num_experts=2, debug=True)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        router(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))


def test_registry_and_errors():
    assert sorted(ROUTERS) == ["soft", "task", "topk", "topp"]
    assert isinstance(build_router("topk", 8, num_experts=4, top_k=1), TopKRouter)
    with pytest.raises(ValueError, match=r"unknown router 'nope'; choose one of \['soft', 'task', 'topk', 'topp'\]"):
        build_router("nope", 8, num_experts=4)
    with pytest.raises(ValueError, match=r"`top_k` must be in \[1, num_experts=4\], got 5"):
        TopKRouter(8, num_experts=4, top_k=5)


def test_routers_package_never_imports_molora():
    import ast
    import pathlib

    import routers

    for path in pathlib.Path(routers.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "molora" for n in names), path


@pytest.mark.parametrize("router_cls", [SoftRouter, TopKRouter])
def test_router_logits_are_float32_under_bf16_autocast(router_cls):
    """Autocast used to round the gate GEMM to bf16: ~1% of tokens picked other top-2 experts."""
    torch.manual_seed(0)
    kwargs = {"top_k": 2} if router_cls is TopKRouter else {}
    router = router_cls(64, num_experts=8, init_std=1.0, **kwargs)
    x = torch.randn(512, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, x @ router.weight.t(), rtol=1e-5, atol=1e-5)


def test_router_saves_a_bf16_input_not_a_float32_copy():
    router = SoftRouter(256, num_experts=8)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        router(x).weights.sum().backward()
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big), [(t.dtype, tuple(t.shape)) for t in big]
    assert x.grad.dtype == torch.bfloat16 and router.weight.grad.dtype == torch.float32


def test_top1_router_gets_a_gradient():
    """A renormalized single gate is always 1: the router learned nothing (3e-6 vs 98 with k=2)."""
    torch.manual_seed(0)
    router = TopKRouter(16, num_experts=4, top_k=1, init_std=0.5)
    x = torch.randn(32, 16)
    out = router(x)
    probs = torch.softmax(out.logits, -1)
    torch.testing.assert_close(out.weights.gather(1, out.indices), probs.gather(1, out.indices))  # raw p
    (out.weights * torch.randn(32, 4)).sum().backward()
    assert router.weight.grad.abs().max() > 1e-2


@pytest.mark.parametrize("normalize, top_k", [(True, 1), (False, 2)])
def test_normalize_top_k_overrides_the_default(normalize, top_k):
    torch.manual_seed(0)
    router = TopKRouter(16, num_experts=4, top_k=top_k, init_std=0.5, normalize_top_k=normalize)
    task = TaskRouter(num_experts=4, num_tasks=2, top_k=top_k, init_std=0.5, normalize_top_k=normalize)
    for out in (router(torch.randn(9, 16)), task(None, torch.tensor([0, 1, 1]))):
        sums = out.weights.sum(-1)
        if normalize:
            torch.testing.assert_close(sums, torch.ones_like(sums))
        else:
            assert (sums < 1 - 1e-4).all()
