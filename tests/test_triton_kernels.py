"""``expert_impl="triton"`` on CPU under Triton's interpreter: outputs AND gradients equal eager.

The interpreter is chosen when a ``@triton.jit`` function is *defined*, triton's own library
(``tl.sum``...) included, so ``TRITON_INTERPRET=1`` must be set before triton is first
imported. ``conftest.py`` sets it on machines without CUDA, and these tests then run
in-process. Where triton was imported without it (a CUDA machine, or a process that imported
triton earlier), the checks here are skipped and ``test_interpreter_checks_in_subprocess`` runs
this file in a fresh ``python -m pytest`` with the variable set and CUDA hidden. Skipped when
triton is not installed (an optional extra: ``pip install molora[gpu]``).

The kernels' launches are counted (``launches``) so a test fails if a fallback ran instead.

bf16: the Triton 3.9 interpreter computes ``tl.dot`` on bf16 operands wrongly, so under the
interpreter the kernels upcast dot operands to fp32 (``UPCAST``); bf16 loads, stores, casts
and the fp32 accumulation are still exercised. Native bf16 dots are checked on CUDA by
``tests/test_gpu.py``.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_expert_memory import saved_elements  # noqa: E402
from test_experts import make_router, run  # noqa: E402
from triton.language import standard as _tl_standard  # noqa: E402

from molora.core.experts import EXPERT_IMPLS, choose_impl  # noqa: E402

IN, OUT, N, R = 24, 40, 4, 8
IN_PROCESS = type(_tl_standard.sum).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton imported without TRITON_INTERPRET=1: see the subprocess test"
)


@pytest.mark.skipif(IN_PROCESS, reason="the checks run in this process")
def test_interpreter_checks_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed, 1 skipped" in summary, summary  # only this test skips in there


@pytest.fixture(scope="module")
def interpreted():
    kernels = importlib.import_module("molora.core.kernels.triton_kernels")
    if not kernels.INTERPRETED:  # imported before the variable was set: rebuild its kernels
        kernels = importlib.reload(kernels)
    assert kernels.INTERPRETED
    return kernels


class _Spy:
    """Counts launches of one kernel (``kernel[grid](...)``) and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launches(interpreted, monkeypatch):
    spies = {}
    for name in [
        "sparse_fwd_kernel",
        "sparse_bwd_pairs_kernel",
        "wgrad_kernel",
        "dense_up_kernel",
        "dense_down_kernel",
    ]:
        spies[name] = _Spy(getattr(interpreted, name))
        monkeypatch.setattr(interpreted, name, spies[name])
    return spies


def _inputs(num_tokens: int, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(num_tokens, IN)
    A = (0.5 * torch.randn(N, R, IN)).requires_grad_(True)
    B = (0.5 * torch.randn(N, OUT, R)).requires_grad_(True)
    return x, A, B, torch.randint(0, 3, (num_tokens,)), torch.randn(num_tokens, OUT)


@needs_interpreter
@pytest.mark.parametrize("kind", ["top1", "top2", "soft", "task", "task_top2"])
@pytest.mark.parametrize("num_tokens", [1, 7, 37])
def test_triton_matches_eager_float32(launches, kind, num_tokens):
    router = make_router(kind)
    x, A, B, task_ids, grad_out = _inputs(num_tokens, num_tokens)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run("triton", router, x, A, B, task_ids, grad_out, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["x", "A", "B", "router"], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")
    sparse = kind in ("top1", "top2", "task_top2")
    counts = {name: spy.launches for name, spy in launches.items()}  # the kernels ran, no fallback
    if sparse:
        assert counts == {"sparse_fwd_kernel": 1, "sparse_bwd_pairs_kernel": 1, "wgrad_kernel": 2,
                          "dense_up_kernel": 0, "dense_down_kernel": 0}  # fmt: skip
    else:  # forward h and y, backward d(hg) and grad_x
        assert counts == {"sparse_fwd_kernel": 0, "sparse_bwd_pairs_kernel": 0, "wgrad_kernel": 0,
                          "dense_up_kernel": 2, "dense_down_kernel": 2}  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("kind", ["top2", "soft", "task_top2"])
def test_triton_matches_eager_bfloat16(launches, kind):
    router = make_router(kind)
    x, A, B, task_ids, grad_out = _inputs(37, 0)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run("triton", router, x, A, B, task_ids, grad_out, torch.bfloat16)
    scale = float(y_ref.detach().abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02 * scale)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.03 * float(b.abs().max()) + 1e-3)


@needs_interpreter
@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_that_receives_no_token(launches, top_k):
    router = make_router(f"top{top_k}")
    with torch.no_grad():
        router.weight[0] = -10.0 * router.weight[1:].abs().sum(0)  # expert 0 loses for positive x
    x = torch.rand(30, IN) + 0.1
    _, A, B, _, grad_out = _inputs(30, 1)
    assert 0 not in router(x).indices
    y_ref, g_ref = run("eager", router, x, A, B, None, grad_out, torch.float32)
    y, g = run("triton", router, x, A, B, None, grad_out, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert g[1][0].abs().max() == 0 and g[2][0].abs().max() == 0  # no token, no gradient
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert launches["sparse_fwd_kernel"].launches == 1


@needs_interpreter
@pytest.mark.parametrize("needs", [("x",), ("A",), ("B",), ("w",), ("A", "B")])
@pytest.mark.parametrize("sparse", [True, False])
def test_partial_gradients(interpreted, needs, sparse):
    """Only the requested gradients are computed; those match eager."""
    torch.manual_seed(3)
    T, K = 19, 2
    base = {"x": torch.randn(T, IN), "A": torch.randn(N, R, IN), "B": torch.randn(N, OUT, R), "w": torch.rand(T, N)}
    indices = torch.stack([torch.randperm(N)[:K] for _ in range(T)]) if sparse else None
    grad_out = torch.randn(T, OUT)

    def grads(name):
        leaves = {k: v.clone().requires_grad_(k in needs) for k, v in base.items()}
        w = leaves["w"] if indices is None else leaves["w"] * torch.zeros(T, N).scatter(1, indices, 1.0)
        y = EXPERT_IMPLS[name](leaves["x"], leaves["A"], leaves["B"], w, indices, 1.5)
        return torch.autograd.grad(y, [leaves[k] for k in needs], grad_out)

    for g, g_ref in zip(grads("triton"), grads("eager")):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_sparse_saves_no_out_sized_activation(interpreted):
    found = saved_elements("triton")  # T=256, top-2 of 8, r=4
    largest = max(n for _, n in found)
    assert largest <= 256 * 2 * 4, f"triton saves a tensor of {largest} elements (shapes {found})"


@needs_interpreter
def test_cpu_without_interpreter_raises_a_clear_error(interpreted, monkeypatch):
    monkeypatch.setattr(interpreted, "INTERPRETED", False)
    x, A, B, _, _ = _inputs(5, 0)
    weights = torch.full((5, N), 1.0 / N)
    with pytest.raises(RuntimeError, match='expert_impl="triton" runs on CUDA tensors.*TRITON_INTERPRET=1'):
        EXPERT_IMPLS["triton"](x, A, B, weights, None, 1.0)


def test_missing_triton_raises_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "molora.core.kernels.triton_experts", raising=False)
    monkeypatch.delitem(sys.modules, "molora.core.kernels.triton_kernels", raising=False)
    package = importlib.import_module("molora.core.kernels")
    for name in ["triton_experts", "triton_kernels"]:  # `from package import name` looks here first
        monkeypatch.delattr(package, name, raising=False)
    x, A, B, _, _ = _inputs(5, 0)
    with pytest.raises(ImportError, match=r'expert_impl="triton" needs triton: `pip install triton`'):
        EXPERT_IMPLS["triton"](x, A, B, torch.full((5, N), 0.25), None, 1.0)


def test_auto_never_picks_triton_on_cpu():
    x, A, B = torch.empty(4096, 64), torch.empty(64, 16, 64), torch.empty(64, 64, 16)
    assert choose_impl(x, A, B, torch.zeros(4096, 2, dtype=torch.long)) != "triton"


def _gpu_candidates():
    from molora.core.kernels import launch as L

    dense = [("dense", up, down) for up, down in zip(L.DENSE_UP, L.DENSE_DOWN)]
    sparse = [("sparse", L.sparse_blocks(r), None) for r in (16, 64, 128)]
    return dense + sparse


@needs_interpreter
@pytest.mark.parametrize("kind, first, second", _gpu_candidates(), ids=lambda c: getattr(c, "label", lambda: c)())
def test_every_gpu_launch_setting_matches_eager(interpreted, monkeypatch, kind, first, second):
    """Each autotune candidate and sparse block setting the GPU can run, here under the
    interpreter (block sizes are all the interpreter honours): outputs and gradients = eager."""
    from molora.core.kernels import launch as L

    if kind == "dense":
        monkeypatch.setitem(L.INTERPRETER_DENSE, "up", first)
        monkeypatch.setitem(L.INTERPRETER_DENSE, "down", second)
    else:
        monkeypatch.setattr(L, "INTERPRETER_SPARSE", first)
    router = make_router("soft" if kind == "dense" else "top2")
    x, A, B, task_ids, grad_out = _inputs(37, 5)
    y_ref, g_ref = run("eager", router, x, A, B, task_ids, grad_out, torch.float32)
    y, g = run("triton", router, x, A, B, task_ids, grad_out, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
