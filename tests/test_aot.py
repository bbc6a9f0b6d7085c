"""The Triton kernels compiled ahead of time for sm_80 (A100) and sm_90 (H100), without a GPU.

``molora.core.kernels.aot`` records every launch ``expert_impl="triton"`` can make (N in 2..64,
r in 4..128, bf16/fp16, dense and sparse routing, shared A or not, every autotune candidate)
and compiles each distinct program with ``triton.compile`` for both targets. Compiling all of
them takes ~15 minutes on 2 cores, so their resources are kept in benchmarks/aot-cache.json,
keyed by the kernels' source, the exact compilation and the Triton version; CI compiles what
the cache lacks (a few at most, else it asks for `molora bench kernels --aot`) and recompiles
one heavy program per kernel to check the cache against the compiler. Budgets:
``aot.SMEM_LIMIT`` (163/227 KB) and ``aot.SPILL_BUDGET`` (0 bytes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from molora.core import experts  # noqa: E402
from molora.core.kernels import aot  # noqa: E402
from molora.core.kernels import launch as L  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / "benchmarks" / "aot-cache.json"
MAX_COMPILE_IN_CI = 6  # ~10 s each on 2 cores


@pytest.fixture(scope="module")
def specs() -> dict:
    return aot.collect(experts.triton_experts)


def _describe(row: aot.Row) -> str:
    return f"{row.spec.kernel} sm_{row.spec.cc} {dict(row.spec.constexprs)} w{row.spec.num_warps} ({row.launched_by[0]})"


def test_every_launch_fits_sm80_and_sm90(specs):
    cache = aot.load_cache(str(CACHE))
    missing = [spec for spec in specs if aot.spec_key(spec) not in cache]
    assert len(missing) <= MAX_COMPILE_IN_CI, (
        f"{len(missing)} of {len(specs)} launch programs are not in {CACHE.name} (a kernel, a launch setting or "
        "triton changed): run `molora bench kernels --aot` and commit benchmarks/aot-cache.json and RESULTS-gpu.md"
    )
    rows, _ = aot.build_rows(specs, cache, jobs=2)
    assert len(rows) == len(specs) and {row.spec.cc for row in rows} == {80, 90}
    assert {row.spec.kernel for row in rows} == {
        "sparse_fwd_kernel", "sparse_bwd_pairs_kernel", "wgrad_kernel", "dense_up_kernel", "dense_down_kernel"
    }  # fmt: skip
    bad = [f"{_describe(row)}: {'; '.join(aot.problems(row))}" for row in rows if aot.problems(row)]
    assert not bad, "\n".join(bad)


def test_cache_agrees_with_a_fresh_compile(specs):
    """One heavy program per kernel (largest R_P2 or tile), alternating targets, compiled now."""
    cache = aot.load_cache(str(CACHE))
    picks = {}
    for spec in specs:
        consts = dict(spec.constexprs)
        weight = (consts.get("R_P2", 0), consts.get("BM", 0) * max(consts.get("BN", 0), consts.get("BC", 0)))
        best = picks.get(spec.kernel)
        if aot.spec_key(spec) in cache and (best is None or weight > best[0]):
            picks[spec.kernel] = (weight, spec)
    chosen = [spec for _, spec in picks.values()]
    chosen = [s if i % 2 else _other_target(s, specs) for i, s in enumerate(chosen)]
    fresh = list(aot.compile_specs(chosen, jobs=2))
    for spec, result in zip(chosen, fresh):
        cached = cache.get(aot.spec_key(spec))
        if cached is not None:
            assert result == cached, f"{spec.kernel} sm_{spec.cc}: compiled {result}, cache says {cached}"
        assert not result.get("error"), result


def _other_target(spec: aot.Spec, specs) -> aot.Spec:
    from dataclasses import replace

    other = replace(spec, cc=80 if spec.cc == 90 else 90)
    return other if other in specs else spec


@pytest.mark.parametrize(
    "num_experts, rank, dense, shared",
    [(3, 12, False, False), (48, 100, True, False), (5, 24, False, True), (64, 128, True, True), (1, 8, True, False), (1, 32, False, False)],
)
def test_other_n_and_r_compile_to_checked_programs(specs, num_experts, rank, dense, shared):
    """N and r outside the table's grid launch programs the table has: the kernels' code
    depends on r's power of two only (sparse) or on neither (dense)."""
    case = {"N": num_experts, "r": rank, "dtype": torch.bfloat16, "prec": "tf32", "dense": dense, "shared": shared,
            "dim": 256}  # fmt: skip
    got = aot.specs_for(case, experts.triton_experts)
    if shared and rank % 16:
        assert got == []  # the kernels' in dim is r: not a multiple of 16, routed away
    else:
        assert got and all(spec in specs for spec in got)


def test_fp32_and_out_of_domain_shapes_record_no_launch():
    base = {"N": 8, "r": 16, "dtype": torch.bfloat16, "prec": "tf32", "dense": False, "shared": False, "dim": 256}
    assert aot.specs_for(base, experts.triton_experts)
    for change in [{"dtype": torch.float32, "prec": "ieee"}, {"N": 65}, {"r": 256}, {"r": 1}, {"dim": 200}]:
        assert aot.specs_for(base | change, experts.triton_experts) == [], change


@pytest.mark.parametrize(
    "args, reason",
    [
        ((65, 16, torch.bfloat16, 4096, 4096), "num_experts=65 > 64"),
        ((8, 256, torch.bfloat16, 4096, 4096), "r=256 > 128"),
        ((8, 16, torch.float32, 4096, 4096), "dtype torch.float32 on a GPU"),
        ((8, 16, torch.float64, 4096, 4096), "dtype torch.float64"),
        ((8, 16, torch.bfloat16, 4000, 4104), "in=4000, out=4104"),
    ],
)
def test_unsupported_names_why(args, reason):
    assert reason in L.unsupported(*args)
    assert L.unsupported(8, 16, torch.bfloat16, 4096, 4096) is None


def test_interpreter_domain_keeps_fp32_and_odd_dims():
    assert L.unsupported(8, 16, torch.float32, 24, 40, compiled=False) is None
    assert "num_experts=65" in L.unsupported(65, 16, torch.float32, 24, 40, compiled=False)


@pytest.mark.parametrize("dense", [True, False])
def test_triton_routes_unsupported_shapes_to_torch_paths(monkeypatch, dense):
    """N > 64 never reaches the kernels: ``triton`` runs dense/grouped, same result as eager."""
    monkeypatch.setattr(experts, "_triton_module", lambda: pytest.fail("the Triton kernels were called"))
    torch.manual_seed(0)
    n, T = 65, 9
    x = torch.randn(T, 16)
    A, B = torch.randn(n, 4, 16), torch.randn(n, 24, 4)
    logits = torch.randn(T, n)
    indices = None if dense else logits.topk(2, -1).indices
    weights = logits.softmax(-1)
    if indices is not None:
        weights = weights * torch.zeros(T, n).scatter(1, indices, 1.0)
    y = experts.EXPERT_IMPLS["triton"](x, A, B, weights, indices, 2.0)
    torch.testing.assert_close(y, experts.EXPERT_IMPLS["eager"](x, A, B, weights, indices, 2.0))


def test_sparse_blocks_give_big_ranks_more_warps_and_smaller_tiles():
    assert L.sparse_blocks(16).num_warps == 4 and L.sparse_blocks(32).num_warps == 4
    assert L.sparse_blocks(64).num_warps == 8 and L.sparse_blocks(128).num_warps == 8
    assert L.sparse_blocks(100).kwargs == {"BM": 64, "BK": 32, "BN": 32}  # R_P2 = 128


def test_occupancy_estimate():
    spec = aot.Spec("k", (), (), (), 4, 3, 90)
    assert aot.Row(spec, regs=32, smem=0).occupancy() == 1.0  # 16 blocks of 4 warps
    assert aot.Row(spec, regs=255, smem=0).occupancy() == 0.125  # 65536 / (256 * 128) = 2 blocks of 4 warps
    assert aot.Row(spec, regs=64, smem=100 * 1024).occupancy() == 2 * 4 / 64  # 228 KB / 101 KB = 2 blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_on_cuda_picks_triton_only_where_every_launch_was_checked(monkeypatch, dtype):
    """``auto``'s CUDA rules against the AOT domain, on CPU tensors (the device query faked)."""
    from molora.core import choose

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(choose, "_triton_installed", lambda: True)
    monkeypatch.setattr(choose, "warn_once", lambda message: None)
    picked = set()
    for n in (2, 8, 32, 64, 65, 128):
        for r in (1, 4, 16, 64, 128, 256):
            for shared in (False, True):
                for d in (4096, 4000):
                    x = torch.empty(2, d, dtype=dtype)
                    A, B = torch.empty(1 if shared else n, r, d, dtype=dtype), torch.empty(n, d, r, dtype=dtype)
                    choice = choose._choose_cuda(x, A, B)
                    picked.add(choice)
                    if choice == "triton":  # the domain whose launches the table holds (tests above)
                        assert L.unsupported(n, r, dtype, r if shared else d, d) is None, (n, r, shared, d)
    assert ("triton" in picked) == (dtype != torch.float32)


def test_cli_prints_and_writes_the_table(specs, monkeypatch, tmp_path, capsys):
    from molora.apps.cli import main

    monkeypatch.setattr(aot, "collect", lambda run_experts: specs)
    markdown = tmp_path / "RESULTS-gpu.md"
    argv = ["bench", "kernels", "--aot", "--no-compile", "--markdown", str(markdown), "--cache", str(CACHE)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sparse_fwd_kernel" in out and "dense_up_kernel" in out and "over a limit" in out
    text = markdown.read_text()
    assert "<!-- aot_kernels:begin -->" in text and "| sparse_fwd_kernel | bf16 | R_P2=128 BM=64 BK=32 BN=32 w8 s3 |" in text
    assert "NO:" not in text
