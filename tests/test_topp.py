"""Top-p routing (MixLoRA): the router, every expert path, the balancing loss and the statistics.

Each path is checked at the layer against an eager reference written here (a loop over tokens
that builds S_t by the DESIGN §4 rule): outputs and gradients w.r.t. x, the factors and the
router, T = 1, 7, 100, float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import interpreted_triton_kernels, needs_triton_interpreter
from torch import nn

from molora import MoLoRAConfig
from molora.core.layer import MoLoRALinear
from molora.core.losses import load_balancing_loss
from routers import TopPRouter, fill_padding, route_topp

IN, OUT, N, R = 24, 40, 5, 3
IMPLS = ["eager", "dense", "grouped", "grouped_bmm", "hybrid", "auto"]
KINDS = {"p05": (0.5, None), "p09_cap2": (0.9, 2), "p1": (1.0, None)}


def chosen_sets(probs: torch.Tensor, top_p: float, top_k: int | None) -> list[list[int]]:
    """S_t, token by token: experts in order of probability until their sum reaches top_p."""
    sets = []
    for row in probs.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[: top_k or len(row)]
        chosen, mass = [], 0.0
        for i in order:
            if chosen and mass >= top_p:
                break
            chosen.append(i)
            mass += row[i]
        sets.append(chosen)
    return sets


def make_layer(kind: str, impl: str, share_lora_A: bool, seed: int) -> MoLoRALinear:
    torch.manual_seed(seed)
    top_p, top_k = KINDS[kind]
    router = TopPRouter(IN, num_experts=N, top_p=top_p, top_k=top_k, init_std=0.5)
    layer = MoLoRALinear(
        nn.Linear(IN, OUT),
        num_experts=N,
        r=R,
        lora_alpha=2.0,
        router=router,
        expert_impl=impl,
        share_lora_A=share_lora_A,
    )
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer


def reference(layer: MoLoRALinear, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    probs = torch.softmax(x @ layer.router.weight.float().t(), -1)  # (T, N)
    sets = chosen_sets(probs.detach(), layer.router.top_p, layer.router.top_k)
    y = nn.functional.linear(x, layer.base_layer.weight.float(), layer.base_layer.bias.float())
    rows = []
    for t, chosen in enumerate(sets):
        row = y[t]
        for i in chosen:
            a = layer.lora_A[0 if layer.share_lora_A else i].float()
            row = row + layer.scaling * probs[t, i] * (layer.lora_B[i].float() @ (a @ x[t]))
        rows.append(row)
    return torch.stack(rows)


def run(layer, x, grad_out, fn):
    x = x.detach().clone().requires_grad_(True)
    names = [n for n, p in sorted(layer.named_parameters()) if p.requires_grad]
    params = [dict(layer.named_parameters())[n] for n in names]
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], grad_out.to(y.dtype))
    return y.float(), {n: g.float() for n, g in zip(["x", *names], grads)}


def check(kind, impl, num_tokens, dtype, tol, share_lora_A=False):
    layer = make_layer(kind, impl, share_lora_A, seed=num_tokens)
    layer.base_layer.requires_grad_(False).to(dtype)
    g = torch.Generator().manual_seed(num_tokens)
    x, grad_out = torch.randn(num_tokens, IN, generator=g), torch.randn(num_tokens, OUT, generator=g)
    y_ref, g_ref = run(layer, x, grad_out, lambda x: reference(layer, x))
    y, grads = run(layer, x.to(dtype), grad_out, layer)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * float(y_ref.detach().abs().max()))
    assert set(grads) == set(g_ref) and "router.weight" in grads
    for name in g_ref:
        atol = tol * float(g_ref[name].abs().max()) + 1e-6
        torch.testing.assert_close(grads[name], g_ref[name], rtol=tol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_topp_matches_eager_reference_float32(kind, impl, num_tokens):
    check(kind, impl, num_tokens, torch.float32, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["p05", "p09_cap2"])
def test_topp_matches_eager_reference_bfloat16(kind, impl):
    check(kind, impl, 100, torch.bfloat16, 0.05)


@pytest.mark.parametrize("impl", ["dense", "grouped", "hybrid"])
def test_topp_with_shared_A_matches_eager_reference(impl):
    check("p05", impl, 7, torch.float32, 1e-4, share_lora_A=True)


def test_route_topp_pads_with_minus_one_and_keeps_raw_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(50, N) * 2
    probs = torch.softmax(logits, -1)
    for top_p, top_k in [(0.5, None), (0.8, 3), (1e-6, None), (1.0, None)]:
        out = route_topp(logits, top_p, top_k)
        assert out.padded and out.indices.shape == (50, top_k or N)
        for t, chosen in enumerate(chosen_sets(probs, top_p, top_k)):
            row = out.indices[t].tolist()
            assert row == chosen + [-1] * (len(row) - len(chosen))
            expected = torch.zeros(N).index_put_((torch.tensor(chosen),), probs[t, chosen])
            torch.testing.assert_close(out.weights[t], expected)
    assert (route_topp(logits, 1e-6).indices[:, 1:] == -1).all()  # at least one expert, and only one here


def test_fill_padding_gives_distinct_unused_experts():
    indices = torch.tensor([[2, -1, -1, -1], [0, 3, -1, -1], [1, 2, 3, 0], [4, -1, -1, -1]])
    filled = fill_padding(indices, N)
    assert (filled >= 0).all()
    for row, orig in zip(filled.tolist(), indices.tolist()):
        assert len(set(row)) == len(row)  # no (token, expert) pair twice
        assert row[: sum(i >= 0 for i in orig)] == [i for i in orig if i >= 0]


def test_topp_balancing_loss_matches_the_formula_loop_by_loop():
    """f_i = #{t : i in S_t} / sum_t |S_t| over real tokens; P_i the mean probability."""
    torch.manual_seed(1)
    logits = torch.randn(30, N) * 2
    mask = (torch.rand(30) > 0.3).long()
    out = route_topp(logits, 0.6, 3)
    probs = torch.softmax(logits, -1)
    counts, total, prob_sum, real = [0.0] * N, 0.0, [0.0] * N, 0.0
    for t in range(30):
        if not mask[t]:
            continue
        real += 1
        for i in out.indices[t].tolist():
            if i >= 0:
                counts[i] += 1
                total += 1
        for i in range(N):
            prob_sum[i] += float(probs[t, i])
    expected = N * sum(counts[i] / total * prob_sum[i] / real for i in range(N))
    torch.testing.assert_close(load_balancing_loss(logits, out.indices, mask), torch.tensor(expected))
    top2 = logits.topk(2, -1).indices  # top-k: the same formula as before (|S_t| = k)
    f = torch.zeros(N).scatter_add_(0, top2.reshape(-1), torch.ones(60)) / 60
    torch.testing.assert_close(load_balancing_loss(logits, top2), N * (f * probs.mean(0)).sum())


def test_routing_stats_report_mean_experts_per_token():
    from tiny_models import random_batch, tiny_llama

    from molora import get_molora_model

    cfg = MoLoRAConfig(target_modules=["q_proj"], num_experts=4, r=2, router="topp", top_p=0.5)
    model = get_molora_model(tiny_llama(num_hidden_layers=1), cfg)
    model(**random_batch(batch=2, seq=6))
    name, routing = next(iter(model._routings()))
    expected = float((routing.indices >= 0).sum()) / routing.indices.shape[0]
    assert model.routing_stats()[name]["experts_per_token"] == pytest.approx(expected)
    assert model.routing_report()[name]["all"]["experts_per_token"] == pytest.approx(expected)
    assert 1.0 <= expected <= 4.0


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_config_rejects_top_p_outside_0_1(top_p):
    with pytest.raises(ValueError, match="`top_p`"):
        MoLoRAConfig(router="topp", top_p=top_p)
    with pytest.raises(ValueError, match="`top_p`"):
        TopPRouter(IN, num_experts=N, top_p=top_p)


def test_config_top_p_only_for_topp_and_cap_checked():
    with pytest.raises(ValueError, match="`top_p` is only used by router='topp'"):
        MoLoRAConfig(router="topk", top_p=0.5)
    with pytest.raises(ValueError, match="`top_k`"):
        MoLoRAConfig(router="topp", top_p=0.5, num_experts=4, top_k=5)
    cfg = MoLoRAConfig(router="topp", top_p=0.5, top_k=2)
    assert MoLoRAConfig.from_dict(cfg.to_dict()) == cfg


@needs_triton_interpreter
@pytest.mark.parametrize("kind", ["p05", "p09_cap2"])
def test_topp_triton_matches_eager_reference(kind):
    interpreted_triton_kernels()
    check(kind, "triton", 7, torch.float32, 1e-4)
