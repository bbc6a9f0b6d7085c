"""Activation memory of the expert paths: O(T*k*r) for sparse routing, never O(T*N*out).

A deterministic size check on the tensors autograd saves (``saved_tensors_hooks``), not a
timing: the largest saved tensor of the sparse paths must stay far below T*k*out elements
(one (T*k, out) or (T, N, out) intermediate would fail), and the total must be about
T*k*r plus x itself.
"""

import pytest
import torch

from molora.apps.bench.report import saved_tensors
from molora.core.experts import EXPERT_IMPLS
from molora.core.layer import MoLoRALinear
from routers import TopKRouter

T, IN, OUT, N, R, K = 256, 64, 96, 8, 4, 2


def saved_elements(impl: str):
    torch.manual_seed(0)
    x = torch.randn(T, IN, requires_grad=True)
    A = torch.randn(N, R, IN, requires_grad=True)
    B = torch.randn(N, OUT, R, requires_grad=True)
    router = TopKRouter(IN, num_experts=N, top_k=K, init_std=0.5)
    routing = router(x)
    exclude = [x, A, B, *router.parameters()]
    # only the expert function is under the hook: the router's own saved tensors are not ours
    found = saved_tensors(lambda: EXPERT_IMPLS[impl](x, A, B, routing.weights, routing.indices, 2.0), exclude)
    return [(shape, nbytes // 4) for shape, nbytes in found]


@pytest.mark.parametrize("impl", ["grouped", "grouped_bmm", "hybrid"])
def test_sparse_paths_save_no_out_sized_activation(impl):
    found = saved_elements(impl)
    assert found, "the path saved nothing: the hook did not see it"
    largest = max(n for _, n in found)
    assert largest < T * K * OUT, f"{impl} saves a tensor of {largest} elements (shapes {found})"
    assert largest < T * N * OUT
    # x itself is excluded; what is left is O(T*k*r) (h, gates, the sort), with slack for indices
    total = sum(n for _, n in found)
    assert total <= 4 * T * K * R + 8 * T * K, f"{impl} saves {total} elements: {found}"


@pytest.mark.parametrize("impl", ["dense", "auto"])
def test_every_path_saves_at_most_order_t_n_r(impl):
    """dense (and auto, which may pick it) keep the (T, N*r) intermediate: O(T*N*r), never
    O(T*N*out) or O(T*k*out)."""
    found = saved_elements(impl)
    assert max(n for _, n in found) < T * K * OUT
    assert sum(n for _, n in found) <= 3 * T * N * R + 2 * T * N + OUT * N * R


def test_eager_reference_does_save_out_sized_activations():
    """The check has teeth: the eager loop keeps (T, out) products per expert."""
    found = saved_elements("eager")
    assert max(n for _, n in found) >= T * OUT


def test_layer_forward_saves_no_out_sized_activation():
    """Through MoLoRALinear (router included): nothing of size T*k*out is saved."""
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False)
    base.weight.requires_grad_(False)
    layer = MoLoRALinear(base, num_experts=N, r=R, lora_alpha=8, router=TopKRouter(IN, num_experts=N, top_k=K))
    x = torch.randn(4, T // 4, IN, requires_grad=True)
    found = saved_tensors(lambda: layer(x), [x, *layer.parameters()])
    assert max(nbytes // 4 for _, nbytes in found) < T * K * OUT
