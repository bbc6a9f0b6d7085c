"""Ahead-of-time compile check: every Triton launch ``expert_impl="triton"`` can make, built for
sm_80 (A100) and sm_90 (H100) on a machine without a GPU, with its shared memory, registers
and spills.

How: the launcher (``triton_experts``) runs forward and backward on small CPU tensors with its
kernel launches recorded instead of run (``_on_gpu`` answers True, ``_run`` records), for every
N in :data:`EXPERTS`, r in :data:`RANKS`, dtype (bf16, fp16, fp32 with ieee and tf32 dots),
dense and sparse routing, with and without a shared A (fp32 and the other shapes that
``launch.unsupported`` routes away record no launch). Each recorded launch is specialized as
Triton's JIT would specialize it (``native_specialize_impl``: ints equal to 1, multiples of 16,
16-byte aligned pointers) and expanded over its autotune candidates; identical compilations
are merged. Each is then compiled with ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` in
a worker process without ``TRITON_INTERPRET``; ptxas (in the triton wheel) reports registers
and spill bytes, ``metadata.shared`` the shared memory per program.

Budgets (what :func:`problems` enforces, and CI through tests/test_aot.py):

- shared memory per program <= the opt-in limit per block (:data:`SMEM_LIMIT`: 163 KB on A100,
  227 KB on H100, CUDA C++ Programming Guide, "Technical Specifications per Compute Capability");
- spills <= :data:`SPILL_BUDGET` bytes per thread (stores + loads of local memory), so that a
  chosen launch never trades registers for local-memory traffic in its inner loop.

Shapes: in = out = 256 stand for every multiple of 16 (Triton specializes on divisibility by
16, not on the value); other sizes are never launched (``launch.unsupported``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from molora.core.kernels import launch as L

EXPERTS = (2, 4, 8, 16, 32, 64)
RANKS = (4, 8, 16, 32, 64, 128)
TARGETS = (80, 90)
DIMS = (256,)  # every multiple of 16 compiles the same (the launcher routes other sizes away)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum)
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SPILL_BUDGET = 0  # bytes of spill stores + loads per thread
_TOKENS = 48  # rows of the recorded calls (do_not_specialize: any T compiles the same)


@dataclass(frozen=True)
class Spec:
    """One distinct compilation: kernel, JIT signature/attributes, constexprs, options, target."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    attrs: tuple[tuple[int, str], ...]  # (argument index, "D") where Triton assumes divisibility by 16
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int
    cc: int

    def key(self, source_key: str, triton_version: str) -> str:
        text = json.dumps([asdict(self), source_key, triton_version], default=str, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class Row:
    """A compiled spec's resources and where it was met (the dtypes/precision/N/r that launch it)."""

    spec: Spec
    regs: int = 0
    spill_bytes: int = 0  # spill stores + loads per thread
    smem: int = 0  # bytes per program
    error: str = ""
    launched_by: tuple[str, ...] = ()

    def occupancy(self) -> float:
        """Estimated resident warps per SM over the maximum (64): by warps, registers, shared memory."""
        warps = self.spec.num_warps
        regs_per_warp = -(-max(self.regs, 1) * 32 // 256) * 256
        blocks = min(32, 64 // warps, 65536 // (regs_per_warp * warps))
        if self.smem:
            blocks = min(blocks, SMEM_PER_SM[self.spec.cc] // (self.smem + 1024))
        return blocks * warps / 64


def _record(te, run_experts, case: dict) -> list[tuple[str, tuple, dict, tuple[L.Config, ...]]]:
    """The launches one forward+backward call of ``run_experts`` (``molora.core.experts.
    triton_experts``) makes: (kernel, args, constexprs, configs)."""
    calls = []

    def run(name, grid, args, consts, cfg, configs, interp):
        calls.append((name, args, consts, tuple(configs)))

    n, r, d, dtype = case["N"], case["r"], case["dim"], case["dtype"]
    if L.unsupported(n, r, dtype, r if case["shared"] else d, d, compiled=True):
        return []  # routed to dense/grouped on a GPU: never launched
    torch.manual_seed(0)
    x = torch.randn(_TOKENS, d, dtype=dtype, requires_grad=True)
    A = torch.randn(1 if case["shared"] else n, r, d, dtype=dtype, requires_grad=True)
    B = torch.randn(n, d, r, dtype=dtype, requires_grad=True)
    logits = torch.randn(_TOKENS, n)
    weights = logits.softmax(-1).to(dtype).requires_grad_(True)
    indices = None if case["dense"] else logits.topk(min(2, n), -1).indices
    if indices is not None:
        weights = weights * torch.zeros(_TOKENS, n, dtype=dtype).scatter(1, indices, 1.0)
    saved = te._on_gpu, te._run, torch.backends.cuda.matmul.allow_tf32
    te._on_gpu, te._run = (lambda _x: True), run
    torch.backends.cuda.matmul.allow_tf32 = case["prec"] == "tf32"
    try:
        if case["shared"]:
            A = A.expand(n, r, d)
        y = run_experts(x, A, B, weights, indices, 2.0)
        y.float().sum().backward()
    finally:
        te._on_gpu, te._run, torch.backends.cuda.matmul.allow_tf32 = saved
    return calls


def cases() -> list[dict]:
    """Every (routing, structure, N, r, dtype, precision, dims) the launcher is recorded on."""
    out = []
    for dtype in L.DTYPES:  # fp32 records nothing: routed away on a GPU (launch.unsupported)
        for prec in L.precisions(dtype):
            for n in EXPERTS:
                for r in RANKS:
                    for dense in (True, False):
                        for shared in (False, True):
                            for dim in DIMS:
                                out.append({"N": n, "r": r, "dtype": dtype, "prec": prec, "dense": dense,
                                            "shared": shared, "dim": dim})  # fmt: skip
    return out


def _label(case: dict) -> str:
    kind = ("dense" if case["dense"] else "top2") + ("+sharedA" if case["shared"] else "")
    prec = f"/{case['prec']}" if case["dtype"] == torch.float32 else ""
    return f"{L.DTYPES[case['dtype']]}{prec} {kind} N={case['N']} r={case['r']} d={case['dim']}"


def _specialize(kernel, args: tuple, consts: dict, config: L.Config, cc: int) -> Spec:
    """The signature, attributes and constexprs Triton's JIT would compile this launch with."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kernel = _jit(kernel)
    values = dict(zip([p.name for p in kernel.params if not p.is_constexpr], args)) | consts | config.kwargs
    signature, attrs, constexprs = [], [], {}
    for i, param in enumerate(kernel.params):
        arg = values[param.name]
        if param.is_constexpr:
            kind, attr = "constexpr", None
        else:
            kind, attr = native_specialize_impl(
                CUDABackend, arg, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
            )[:2]
        signature.append((param.name, kind))
        if kind == "constexpr":
            constexprs[param.name] = arg
        elif isinstance(attr, str) and attr:
            attrs.append((i, attr))
    return Spec(
        kernel.__name__, tuple(signature), tuple(attrs), tuple(sorted(constexprs.items())),
        config.num_warps, config.num_stages, cc,
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _jit(kernel):
    """The JITFunction of a kernel (rebuilt from its Python function under the interpreter)."""
    if hasattr(kernel, "params"):
        return kernel
    from triton.runtime.jit import JITFunction

    return JITFunction(kernel.fn, **kernel.kwargs)


def specs_for(case: dict, run_experts) -> list[Spec]:
    """The compilations one case (N, r, dtype, prec, dense, shared, dim) launches, on every target.

    ``run_experts``: ``molora.core.experts.triton_experts`` (passed in: ``experts`` imports this
    package), the entry point whose routing and shared-A handling decide what is launched.
    """
    from molora.core.kernels import triton_experts as te
    from molora.core.kernels import triton_kernels as K

    out = []
    for name, args, consts, configs in _record(te, run_experts, case):
        for config in configs:
            out += [_specialize(getattr(K, name), args, consts, config, cc) for cc in TARGETS]
    return out


def collect(run_experts, keep=None) -> dict[Spec, list[str]]:
    """Every distinct compilation the launcher can ask for, with the cases that ask for it
    (only the cases ``keep(case)`` accepts, when given)."""
    specs: dict[Spec, list[str]] = {}
    for case in cases():
        if keep is None or keep(case):
            for spec in specs_for(case, run_experts):
                specs.setdefault(spec, []).append(_label(case))
    return specs


def spec_key(spec: Spec) -> str:
    """Cache key of a spec: the spec, the kernels' source file and the Triton version."""
    import triton

    return spec.key(_source_hash(), triton.__version__)


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    from molora.core.kernels import triton_kernels as K

    with open(K.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_rows(
    specs: dict[Spec, list[str]],
    cache: dict[str, dict],
    compile_missing: bool = True,
    jobs: int | None = None,
    on_chunk=None,
) -> tuple[list[Row], int]:
    """Rows for ``specs`` from ``cache`` (key -> resources; updated in place with what was
    compiled), compiling the specs it lacks (or leaving them out). Returns (rows, compiled)."""
    keys = {spec: spec_key(spec) for spec in specs}
    missing = [spec for spec in specs if keys[spec] not in cache]
    if missing and compile_missing:
        for done, (spec, result) in enumerate(zip(missing, compile_specs(missing, jobs)), 1):
            cache[keys[spec]] = result
            if on_chunk is not None and (done % 8 == 0 or done == len(missing)):  # save progress
                on_chunk(done, len(missing))
    rows = [
        Row(spec, launched_by=tuple(labels), **cache[keys[spec]])
        for spec, labels in specs.items()
        if keys[spec] in cache
    ]
    return rows, len(missing) if compile_missing else 0


def load_cache(path: str) -> dict[str, dict]:
    try:
        with open(path) as f:
            return json.load(f)["rows"]
    except FileNotFoundError:
        return {}


def save_cache(path: str, cache: dict[str, dict], specs) -> None:
    """Keep only the rows of the current specs (an edited kernel drops its old rows)."""
    from molora.atomic import atomic_write_text

    live = {spec_key(spec) for spec in specs}
    kept = {k: v for k, v in sorted(cache.items()) if k in live}
    atomic_write_text(path, json.dumps({"rows": kept}, indent=0, sort_keys=True) + "\n")


def problems(row: Row) -> list[str]:
    """What makes a compiled launch unacceptable (empty: it fits)."""
    out = []
    if row.error:
        out.append(f"does not compile: {row.error}")
    if row.smem > SMEM_LIMIT[row.spec.cc]:
        out.append(f"shared memory {row.smem} B > {SMEM_LIMIT[row.spec.cc]} B")
    if row.spill_bytes > SPILL_BUDGET:
        out.append(f"spills {row.spill_bytes} B/thread > budget {SPILL_BUDGET} B")
    return out


_PTXAS = re.compile(r"Used (\d+) registers.*?(\d+) bytes spill stores, (\d+) bytes spill loads", re.S)


def compile_spec(spec: Spec) -> dict:
    """Compile one spec for its target (in a process without TRITON_INTERPRET); its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from molora.core.kernels import triton_kernels as K

    kernel = getattr(K, spec.kernel)
    signature = dict(spec.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in spec.attrs if a == "D"}
    source = ASTSource(kernel, signature, dict(spec.constexprs), attrs)
    log = io.StringIO()  # ptxas -v, printed by triton (TRITON_DUMP_PTXAS_LOG, TRITON_ALWAYS_COMPILE set by the worker)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", spec.cc, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
    except Exception as err:  # noqa: BLE001 - reported as a row (an out-of-resources compile error is data)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    found = _PTXAS.search(log.getvalue())
    if found is not None:
        regs, stores, loads = (int(g) for g in found.groups())
    else:  # no ptxas report: registers and the stack frame (spills live there) from cuobjdump
        regs, stores, loads = (*_cuobjdump(compiled.asm["cubin"]), 0)
    return {"regs": regs, "spill_bytes": stores + loads, "smem": int(compiled.metadata.shared)}


def _cuobjdump(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread, from ``cuobjdump -res-usage`` in the triton wheel."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _worker_main() -> None:  # python -m molora.core.kernels.aot < specs.json: one JSON result per line
    from concurrent.futures import ProcessPoolExecutor

    specs = [Spec(**{k: _tuples(v) for k, v in s.items()}) for s in json.load(sys.stdin)]
    jobs = int(os.environ.get("MOLORA_AOT_JOBS", os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for result in pool.map(compile_spec, specs, chunksize=1):
            print(json.dumps(result), flush=True)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def compile_specs(specs: list[Spec], jobs: int | None = None, timeout_s: int = 3600):
    """Compile specs in one fresh process (TRITON_INTERPRET unset, CUDA hidden), ``jobs`` at a
    time; yields each result, in order, as soon as it is ready."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, without its warning
    if jobs:
        env["MOLORA_AOT_JOBS"] = str(jobs)
    with tempfile.TemporaryFile("w+") as payload, tempfile.TemporaryFile("w+") as errors:
        json.dump([asdict(s) for s in specs], payload, default=str)
        payload.seek(0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "molora.core.kernels.aot"], stdin=payload, stdout=subprocess.PIPE,
            stderr=errors, text=True, env=env,
        )  # fmt: skip
        count = 0
        for line in proc.stdout:
            if line.startswith("{"):  # a result (anything else printed on stdout is not)
                count += 1
                yield json.loads(line)
        if proc.wait(timeout=timeout_s) != 0 or count != len(specs):
            errors.seek(0)
            raise RuntimeError(f"AOT compile worker failed ({proc.returncode}): {errors.read()[-3000:]}")


if __name__ == "__main__":
    _worker_main()
