"""``molora bench kernels --aot``: every Triton launch compiled for sm_80 and sm_90, no GPU needed.

Prints, per distinct compilation (kernel, dtype, R_P2 or autotune candidate, target):
registers, spill bytes and shared memory per thread/program, an estimated occupancy, and
whether it fits (``molora.core.kernels.aot``: shared memory within the target's limit, spills
within the budget). Writes the table into ``benchmarks/RESULTS-gpu.md`` (section
``aot_kernels``) and the per-compilation cache ``benchmarks/aot-cache.json`` that
tests/test_aot.py reads (it compiles only what the cache lacks, plus a few spot checks).

    molora bench kernels --aot                  # ~220 compilations, ~15 min on 2 cores when the cache is stale
    molora bench kernels --aot --no-compile     # the table from the cache only
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from molora.apps.bench.report import format_table, update_markdown

CACHE = "benchmarks/aot-cache.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aot", action="store_true", help="compile every launch for sm_80/sm_90 (no GPU needed)")
    parser.add_argument("--markdown", default="benchmarks/RESULTS-gpu.md", metavar="PATH", help="results file")
    parser.add_argument("--cache", default=CACHE, metavar="PATH", help="compiled-resources cache (JSON)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations (default: CPU count)")
    parser.add_argument("--no-compile", action="store_true", help="use only the cache; leave out what it lacks")


_INPUT = {"sparse_fwd_kernel": "x_ptr", "sparse_bwd_pairs_kernel": "g_ptr", "wgrad_kernel": "src_ptr",
          "dense_up_kernel": "src_ptr", "dense_down_kernel": "m_ptr"}  # fmt: skip


def _dtype(spec) -> str:
    """The activation dtype a program was compiled for (its input pointer's element type)."""
    return dict(spec.signature)[_INPUT[spec.kernel]].lstrip("*")


def _setting(spec) -> str:
    consts = dict(spec.constexprs)
    blocks = " ".join(f"{k}={consts[k]}" for k in ("R_P2", "BM", "BK", "BN", "BC", "BD") if k in consts)
    layout = ""
    if spec.kernel.startswith("dense"):
        layout = " M=A" if consts.get("s_md") == 1 else " M=B^T"
    return f"{blocks} w{spec.num_warps} s{spec.num_stages}{layout}"


def table_rows(rows) -> list[list[str]]:
    """One line per (kernel, dtype, setting): sm_80 and sm_90 side by side."""
    from molora.core.kernels import aot

    grouped = defaultdict(dict)
    for row in rows:
        grouped[(row.spec.kernel, _dtype(row.spec), _setting(row.spec))][row.spec.cc] = row
    out = []
    for (kernel, dtype, setting), by_cc in sorted(grouped.items()):
        cells = [kernel, dtype, setting]
        for cc in aot.TARGETS:
            row = by_cc.get(cc)
            if row is None:
                cells += ["-"] * 2
                continue
            bad = aot.problems(row)
            cells.append(
                row.error[:40]
                if row.error
                else f"{row.regs} / {row.spill_bytes} B / {row.smem // 1024} KB / {row.occupancy():.0%}"
            )
            cells.append("yes" if not bad else "NO: " + "; ".join(bad))
        out.append(cells)
    return out


HEADERS = ["kernel", "dtype", "setting", "sm_80 regs / spill / smem / occ", "fits sm_80",
           "sm_90 regs / spill / smem / occ", "fits sm_90"]  # fmt: skip


def summary(rows, compiled: int, seconds: float, total: int) -> str:
    from molora.core.kernels import aot

    bad = [row for row in rows if aot.problems(row)]
    return (
        f"{len(rows)} of {total} compilations in the table ({compiled} compiled now in {seconds:.0f} s, the rest "
        f"from the cache); {len(bad)} over a limit. Limits: shared memory <= {aot.SMEM_LIMIT[80] // 1024} KB "
        f"(sm_80) / {aot.SMEM_LIMIT[90] // 1024} KB (sm_90) per program, spills <= {aot.SPILL_BUDGET} B per thread."
    )


def markdown(rows, text: str) -> str:
    import triton

    lines = [
        "## Triton kernels compiled ahead of time (`molora bench kernels --aot`)",
        "",
        f"triton {triton.__version__}, ptxas from its wheel, no GPU. Every launch `expert_impl=\"triton\"` can make "
        "(N in 2..64, r in 4..128, bf16/fp16/fp32, dense and sparse routing, shared A or not, every autotune "
        "candidate) compiles to one of these programs. occ: estimated resident warps per SM over 64 "
        "(by warps, registers and shared memory).",
        "",
        text,
        "",
        format_table(HEADERS, table_rows(rows), markdown=True),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not args.aot:
        print("molora bench kernels: only --aot is implemented (device timings: `molora bench layer`).")
        return 2
    from molora.core.experts import EXPERT_IMPLS
    from molora.core.kernels import aot

    start = time.monotonic()
    specs = aot.collect(EXPERT_IMPLS["triton"])
    cache = aot.load_cache(args.cache)
    def progress(done: int, total: int) -> None:
        aot.save_cache(args.cache, cache, specs)
        print(f"compiled {min(done, total)}/{total} ({time.monotonic() - start:.0f} s); saved {args.cache}", flush=True)

    rows, compiled = aot.build_rows(
        specs, cache, compile_missing=not args.no_compile, jobs=args.jobs, on_chunk=progress
    )
    text = summary(rows, compiled, time.monotonic() - start, len(specs))
    print(format_table(HEADERS, table_rows(rows)))
    print(text)
    update_markdown(args.markdown, "aot_kernels", markdown(rows, text))
    print(f"updated {args.markdown}")
    return 1 if any(aot.problems(row) for row in rows) else 0
