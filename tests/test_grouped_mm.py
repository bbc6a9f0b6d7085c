"""Grouped GEMMs (molora.core.kernels.grouped_mm): F.grouped_mm path vs the padded-bmm fallback vs a naive loop.

Odd sizes, empty groups (first, middle, last), a single group, zero rows, float32 and bfloat16.
"""

import pytest
import torch

from molora.core.kernels.grouped_mm import gmm, gmm_wgrad


def offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def naive_gmm(a, b, counts):
    out, start = [], 0
    for g, c in enumerate(counts):
        out.append(a[start : start + c].float() @ b[g].float())
        start += c
    return torch.cat(out) if out else a.new_zeros(0, b.shape[-1]).float()


def naive_wgrad(a, b, counts):
    out, start = [], 0
    for c in counts:
        out.append(a[start : start + c].float().t() @ b[start : start + c].float())
        start += c
    return torch.stack(out)


COUNTS = [
    [5, 0, 3, 9],  # an empty group in the middle
    [0, 7, 1, 0],  # empty first and last groups
    [13],  # one group
    [1, 1, 1, 1, 1],
    [0, 0, 0],  # no rows at all
    [33, 2, 0, 17, 4, 1, 0, 9],
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("k, p", [(7, 5), (16, 24), (1, 3)])
def test_gmm_matches_naive_loop(counts, use_kernel, k, p):
    torch.manual_seed(sum(counts) + k)
    a = torch.randn(sum(counts), k)
    b = torch.randn(len(counts), k, p)
    got = gmm(a, b, offsets(counts), use_kernel=use_kernel)
    assert got.shape == (sum(counts), p)
    torch.testing.assert_close(got, naive_gmm(a, b, counts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("k, p", [(7, 5), (16, 24), (1, 3)])
def test_gmm_wgrad_matches_naive_loop(counts, use_kernel, k, p):
    torch.manual_seed(sum(counts) + p)
    a = torch.randn(sum(counts), k)
    b = torch.randn(sum(counts), p)
    got = gmm_wgrad(a, b, offsets(counts), use_kernel=use_kernel)
    assert got.shape == (len(counts), k, p)
    torch.testing.assert_close(got, naive_wgrad(a, b, counts), rtol=1e-5, atol=1e-5)
    for g, c in enumerate(counts):
        if c == 0:
            assert got[g].abs().max() == 0  # a group with no rows has a zero gradient


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [33, 2, 0, 17, 4, 1, 0, 9]])
def test_kernel_and_padded_fallback_agree_on_transposed_views(counts):
    """The expert code passes transposed views (A^T, B^T): both paths must accept them."""
    torch.manual_seed(0)
    a = torch.randn(sum(counts), 12)
    weights = torch.randn(len(counts), 6, 12)  # (G, r, in) as lora_A
    b = weights.transpose(1, 2)  # (G, in, r) view
    fast = gmm(a, b, offsets(counts), use_kernel=True)
    slow = gmm(a, b, offsets(counts), use_kernel=False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    h = torch.randn(sum(counts), 6)
    torch.testing.assert_close(
        gmm_wgrad(h, a, offsets(counts), use_kernel=True),
        gmm_wgrad(h, a, offsets(counts), use_kernel=False),
        rtol=1e-5,
        atol=1e-5,
    )
    # the orientation trick used for grad_B: (b^T a)^T == a^T b
    torch.testing.assert_close(
        gmm_wgrad(a, h, offsets(counts)), gmm_wgrad(h, a, offsets(counts)).transpose(1, 2), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bfloat16(use_kernel):
    counts = [9, 0, 4, 20]
    torch.manual_seed(1)
    a = torch.randn(sum(counts), 16, dtype=torch.bfloat16)
    b = torch.randn(len(counts), 16, 8, dtype=torch.bfloat16)
    got = gmm(a, b, offsets(counts), use_kernel=use_kernel)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), naive_gmm(a, b, counts), rtol=2e-2, atol=5e-2)
    c = torch.randn(sum(counts), 8, dtype=torch.bfloat16)
    wg = gmm_wgrad(a, c, offsets(counts), use_kernel=use_kernel)
    assert wg.dtype == torch.bfloat16
    torch.testing.assert_close(wg.float(), naive_wgrad(a, c, counts), rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("impl", ["grouped", "hybrid", "grouped_bmm"])
@pytest.mark.parametrize("needs", [("x",), ("A",), ("B",), ("w",), ("A", "B"), ("x", "w")])
def test_expert_functions_with_partial_gradients(impl, needs):
    """The custom autograd Functions skip GEMMs for inputs that need no gradient; what they do
    return must still match the eager reference."""
    from molora.core.experts import EXPERT_IMPLS

    torch.manual_seed(3)
    T, IN, OUT, N, R, K = 45, 20, 12, 6, 4, 2
    base = {
        "x": torch.randn(T, IN),
        "A": torch.randn(N, R, IN),
        "B": torch.randn(N, OUT, R),
        "w": torch.rand(T, K),
    }
    indices = torch.stack([torch.randperm(N)[:K] for _ in range(T)])  # (T, K) distinct experts
    grad_out = torch.randn(T, OUT)

    def run(name):
        leaves = {k: v.clone().requires_grad_(k in needs) for k, v in base.items()}
        weights = torch.zeros(T, N).scatter(1, indices, leaves["w"])
        y = EXPERT_IMPLS[name](leaves["x"], leaves["A"], leaves["B"], weights, indices, 1.5)
        return y, torch.autograd.grad(y, [leaves[k] for k in needs], grad_out)

    y, grads = run(impl)
    y_ref, grads_ref = run("eager")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def _operands(tokens, dim, experts, rank, top_k, device="cpu"):
    """Shape-only operands (expanded views: no memory) for the path chooser."""
    x = torch.empty(1, dim, device=device).expand(tokens, dim)
    lora_A = torch.empty(experts, rank, dim, device=device)
    lora_B = torch.empty(experts, dim, rank, device=device)
    indices = None if top_k is None else torch.zeros(1, top_k, dtype=torch.long, device=device).expand(tokens, top_k)
    return x, lora_A, lora_B, indices


def test_auto_path_choice():
    from molora.core.experts import choose_impl

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert choose_impl(*_operands(2048, 1024, 8, 16, None)) == "dense"  # dense routing
        assert choose_impl(*_operands(7, 1024, 8, 16, 2)) == "dense"  # tiny T
        assert choose_impl(*_operands(2048, 1024, 8, 16, 6)) == "dense"  # k > N/2
        assert choose_impl(*_operands(2048, 1024, 8, 16, 2)) == "grouped"  # CPU default shape
        assert choose_impl(*_operands(4096, 4096, 8, 16, 2)) == "hybrid"  # (T*k, d) buffers >= 32 MiB
        assert choose_impl(*_operands(4096, 4096, 64, 16, 2)) == "grouped"  # N*r too wide for hybrid
        torch.set_num_threads(2)
        assert choose_impl(*_operands(2048, 1024, 8, 16, 2)) == "dense"  # multi-threaded CPU
        assert choose_impl(*_operands(2048, 1024, 64, 16, 2)) == "grouped"
    finally:
        torch.set_num_threads(threads)
