"""The router fused into the dense path's down-projection: same outputs and gradients as the
separate GEMMs (and as the eager reference), and it runs only where it is the same computation."""

from unittest import mock

import pytest
import torch
from torch import nn

from molora.core import layer as layer_module
from molora.core.choose import choose_impl
from molora.core.fused import fused_route
from molora.core.layer import MoLoRALinear
from routers import SoftRouter, TopKRouter, TopPRouter

IN, OUT, N, R = 24, 20, 4, 3


def _layer(router: str, impl: str = "dense", **kwargs) -> MoLoRALinear:
    torch.manual_seed(0)
    routers = {
        "soft": lambda: SoftRouter(IN, num_experts=N, init_std=0.5),
        "top2": lambda: TopKRouter(IN, num_experts=N, top_k=2, init_std=0.5),
        "top1": lambda: TopKRouter(IN, num_experts=N, top_k=1, init_std=0.5),
        "topp": lambda: TopPRouter(IN, num_experts=N, top_p=0.6, init_std=0.5),
    }
    layer = MoLoRALinear(
        nn.Linear(IN, OUT), num_experts=N, r=R, lora_alpha=4, router=routers[router](), expert_impl=impl, **kwargs
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _run(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [layer.lora_A, layer.lora_B, *layer.router.parameters()]
    return y, torch.autograd.grad(y, [x, *params], grad_out)


@pytest.mark.parametrize("router", ["soft", "top2", "top1", "topp"])
@pytest.mark.parametrize("impl", ["dense", "auto"])
@pytest.mark.parametrize("num_tokens", [1, 7, 100])
def test_fused_router_matches_the_separate_gemms_and_eager(router, impl, num_tokens):
    layer = _layer(router, impl)
    x = torch.randn(num_tokens, IN)
    grad_out = torch.randn(num_tokens, OUT)
    calls = []
    real = layer_module.fused_route

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    with mock.patch.object(layer_module, "fused_route", spy):
        y, grads = _run(layer, x, grad_out)
    indices = layer.router(x).indices
    runs_dense = indices is None or choose_impl(x, layer.lora_A, layer.lora_B, indices) == "dense"
    fused_expected = impl == "dense" or runs_dense  # auto fuses exactly when it runs dense
    assert calls == [fused_expected]
    with mock.patch.object(layer_module, "fused_route", lambda *a: None):  # the separate GEMMs
        y_ref, grads_ref = _run(layer, x, grad_out)
        layer.expert_impl = "eager"
        y_eager, grads_eager = _run(layer, x, grad_out)
    for want in ((y_ref, grads_ref), (y_eager, grads_eager)):
        torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5)
        for g, g_want in zip(grads, want[1]):
            torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-5)


def test_fusion_only_where_it_is_the_same_computation():
    x = torch.randn(5, IN)
    assert fused_route(_layer("soft"), x) is not None
    assert fused_route(_layer("soft"), x.to(torch.bfloat16)) is None  # bf16 would round the logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_route(_layer("soft"), x) is None
    dropout = _layer("soft", lora_dropout=0.1)
    assert fused_route(dropout.train(), x) is None and fused_route(dropout.eval(), x) is not None
    jitter = _layer("top2")
    jitter.router.jitter_noise = 0.2
    assert fused_route(jitter.train(), x) is None and fused_route(jitter.eval(), x) is not None
    assert fused_route(_layer("soft", share_lora_A=True), x) is None
    assert fused_route(_layer("top2", impl="grouped"), x) is None
