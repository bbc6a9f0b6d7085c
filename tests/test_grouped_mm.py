"""Grouped GEMMs (molora.core.kernels.grouped_mm): F.grouped_mm path vs the padded-bmm fallback vs a naive loop.

Odd sizes, empty groups (first, middle, last), a single group, zero rows, float32 and bfloat16.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from molora.core.kernels import grouped_mm
from molora.core.kernels.grouped_mm import gmm, gmm_wgrad

needs_grouped_mm = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="this torch has no F.grouped_mm")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach ``F.grouped_mm`` (a test then asserts which path ran)."""
    calls = []
    if hasattr(F, "grouped_mm"):
        real = F.grouped_mm

        def spy(*args, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


def reaches_kernel(use_kernel: bool, rows: int, *dims: int) -> bool:
    """Whether gmm/gmm_wgrad call F.grouped_mm: fp32 dims must be multiples of 4 (16 bytes)."""
    return use_kernel and hasattr(F, "grouped_mm") and rows > 0 and all(d % 4 == 0 for d in dims)


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
def test_gmm_matches_naive_loop(counts, use_kernel, k, p, kernel_calls):
    torch.manual_seed(sum(counts) + k)
    a = torch.randn(sum(counts), k)
    b = torch.randn(len(counts), k, p)
    got = gmm(a, b, offsets(counts), use_kernel=use_kernel)
    assert got.shape == (sum(counts), p)
    # (7, 5) and (1, 3) are misaligned for F.grouped_mm: they check the padded fallback
    assert len(kernel_calls) == int(reaches_kernel(use_kernel, sum(counts), k, p))
    torch.testing.assert_close(got, naive_gmm(a, b, counts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("k, p", [(7, 5), (16, 24), (1, 3)])
def test_gmm_wgrad_matches_naive_loop(counts, use_kernel, k, p, kernel_calls):
    torch.manual_seed(sum(counts) + p)
    a = torch.randn(sum(counts), k)
    b = torch.randn(sum(counts), p)
    got = gmm_wgrad(a, b, offsets(counts), use_kernel=use_kernel)
    assert len(kernel_calls) == int(reaches_kernel(use_kernel, sum(counts), k, p))
    assert got.shape == (len(counts), k, p)
    torch.testing.assert_close(got, naive_wgrad(a, b, counts), rtol=1e-5, atol=1e-5)
    for g, c in enumerate(counts):
        if c == 0:
            assert got[g].abs().max() == 0  # a group with no rows has a zero gradient


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [33, 2, 0, 17, 4, 1, 0, 9]])
@needs_grouped_mm
def test_kernel_and_padded_fallback_agree_on_transposed_views(counts, kernel_calls):
    """The expert code passes transposed views (A^T, B^T): both paths must accept them."""
    torch.manual_seed(0)
    a = torch.randn(sum(counts), 12)
    weights = torch.randn(len(counts), 8, 12)  # (G, r, in) as lora_A
    b = weights.transpose(1, 2)  # (G, in, r) view
    fast = gmm(a, b, offsets(counts), use_kernel=True)
    assert len(kernel_calls) == 1  # the transposed view reached F.grouped_mm
    slow = gmm(a, b, offsets(counts), use_kernel=False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    h = torch.randn(sum(counts), 8)
    fast_w = gmm_wgrad(h, a, offsets(counts), use_kernel=True)
    assert len(kernel_calls) == 2  # h^T (r, M), a transposed view, reached it too
    torch.testing.assert_close(fast_w, gmm_wgrad(h, a, offsets(counts), use_kernel=False), rtol=1e-5, atol=1e-5)
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


def _meta_operands():
    """Operands on the meta device: neither CPU (where every error is re-raised) nor CUDA."""
    a = torch.empty(8, 16, device="meta")
    b = torch.empty(2, 16, 8, device="meta")
    return a, b, torch.tensor([3, 8], dtype=torch.int32, device="meta")


@needs_grouped_mm
@pytest.mark.parametrize("fn", ["gmm", "gmm_wgrad"])
def test_out_of_memory_is_not_swallowed(monkeypatch, fn):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(F, "grouped_mm", oom)
    a, b, offs = _meta_operands()
    args = (a, b, offs) if fn == "gmm" else (a, torch.empty(8, 4, device="meta"), offs)
    with pytest.raises(torch.OutOfMemoryError):
        getattr(grouped_mm, fn)(*args)


@pytest.mark.parametrize(
    "err",
    [
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        *([torch.AcceleratorError("device-side assert triggered")] if hasattr(torch, "AcceleratorError") else []),
    ],
)
def test_device_errors_are_reraised(err):
    with pytest.raises(type(err)):
        grouped_mm._reraise_unless_unsupported(err, torch.empty(2, 2, device="meta"))


def test_unsupported_dtype_falls_back_with_one_warning(caplog):
    grouped_mm.warn_once.cache_clear()
    a = torch.empty(2, 2, device="meta", dtype=torch.float16)
    err = RuntimeError("grouped gemm is only supported for bfloat16 on sm90")
    with caplog.at_level(logging.WARNING, logger="molora"):
        grouped_mm._reraise_unless_unsupported(err, a)  # returns: the caller uses the padded bmm
        grouped_mm._reraise_unless_unsupported(err, a)
    assert [r.levelname for r in caplog.records].count("WARNING") == 1
    assert "padded-bmm" in caplog.text
    with pytest.raises(RuntimeError):  # on CPU nothing is swallowed
        grouped_mm._reraise_unless_unsupported(err, torch.empty(2, 2))


def _cuda_choice(monkeypatch, *, major: int, triton: bool, experts: int = 8, rank: int = 16, dtype=torch.bfloat16):
    from molora.core import choose

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(choose, "_triton_installed", lambda: triton)
    x = torch.empty(1, 4096, dtype=dtype).expand(4096, 4096)
    return choose._choose_cuda(x, torch.empty(experts, rank, 4096), torch.empty(experts, 4096, rank))


def test_auto_rules_on_cuda(monkeypatch, caplog):
    """The CUDA rules, with the device capability and triton's presence mocked (no GPU here)."""
    grouped_mm.warn_once.cache_clear()
    assert _cuda_choice(monkeypatch, major=9, triton=True) == "dense"  # N*r = 128 < 300: memory-bound floor
    assert _cuda_choice(monkeypatch, major=8, triton=True, experts=16) == "triton"  # 256 >= 150 on A100
    assert _cuda_choice(monkeypatch, major=9, triton=True, experts=16) == "dense"  # 256 < 300 on H100
    assert _cuda_choice(monkeypatch, major=9, triton=True, experts=64) == "triton"
    with caplog.at_level(logging.WARNING, logger="molora"):
        assert _cuda_choice(monkeypatch, major=9, triton=False, experts=64) == "grouped"
        assert _cuda_choice(monkeypatch, major=8, triton=False, experts=64) == "grouped"
        assert _cuda_choice(monkeypatch, major=8, triton=False, experts=16) == "hybrid"
    assert "pip install triton" in caplog.text
