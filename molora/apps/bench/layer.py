"""One linear layer, forward+backward: frozen base, PEFT LoRA, and every molora compute path.

Gradients are taken for x, the adapters and the router (W0 frozen), as in fine-tuning. All
variants run interleaved in one process; the table gives medians and ratios to the frozen
base linear and to PEFT LoRA of the same rank r, plus the activation memory: on CPU the bytes
autograd saves (``saved_tensors_hooks``; deterministic), on CUDA ``max_memory_allocated``
above the inputs during one fwd+bwd.

    python benchmarks/bench_layer.py                   # CPU: T=2048, d=1024, N=8, r=16, top-2
    molora bench layer --threads 1 --clock cpu --markdown benchmarks/RESULTS.md

On a machine whose cores are shared with other jobs, wall-clock timings of multi-threaded
runs swing by 2x and more between runs (each OpenMP region can wait for a descheduled
thread); ``--threads 1 --clock cpu`` (process CPU time) is the stable measurement.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
from torch import nn

from molora.apps.bench.report import (
    cuda_peak_mib,
    environment,
    format_table,
    median,
    resolve_device,
    saved_bytes,
    time_interleaved,
    write_section,
)
from molora.core.experts import EXPERT_IMPLS
from molora.core.layer import MoLoRALinear
from routers import SoftRouter, TaskRouter, TopKRouter, TopPRouter

ROUTER_KINDS = ("topk", "soft", "task", "task_topk")
# Expert structures and routers of issue 10: (router kind, MoLoRALinear keyword arguments).
FORMS = {
    "hydra": ("topk", {"share_lora_A": True}),
    "shared1": ("topk", {"num_shared_experts": 1}),
    "topp": ("topp", {}),
}
MOLORA_IMPLS = ("auto", "dense", "grouped", "grouped_bmm", "hybrid", "eager")
BASES = ("dense", "nf4", "int8")
_CPU_DEFAULTS = {"tokens": 2048, "dim": 1024, "dtype": "float32"}
_CUDA_DEFAULTS = {"tokens": 4096, "dim": 4096, "dtype": "bfloat16"}


@dataclass
class Variant:
    """One row of the table: a module to run on x (batch, seq, in) and its trainable tensors."""

    name: str
    module: nn.Module
    trainable: list[torch.Tensor]
    frozen: list[torch.Tensor] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", "-T", type=int, default=None, help="T (CPU 2048, CUDA 4096)")
    parser.add_argument("--dim", "-d", type=int, default=None, help="in = out features (CPU 1024, CUDA 4096)")
    parser.add_argument("--out-features", type=int, default=None, help="out features if different from --dim")
    parser.add_argument("--experts", "-N", type=int, default=8)
    parser.add_argument("--rank", "-r", type=int, default=16)
    parser.add_argument("--top-k", "-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences T is split into (task ids are per sequence)")
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--routers", default="topk,soft,task", help=f"comma list of {ROUTER_KINDS}")
    parser.add_argument("--impls", default=",".join(MOLORA_IMPLS), help="comma list of molora expert paths")
    parser.add_argument("--forms", default="", help=f"comma list of {tuple(FORMS)} (top-p: p = --top-p)")
    parser.add_argument("--top-p", type=float, default=0.5, help="p of the top-p form")
    parser.add_argument("--form-impls", default="auto", help="comma list of molora expert paths for --forms")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA rows")
    parser.add_argument(
        "--base",
        choices=BASES,
        default="dense",
        help="the frozen W0: dense in --dtype, or bitsandbytes nf4 (QLoRA) / int8 computing in --dtype",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (use with --threads 1 on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="also print a torch.profiler table for it")
    parser.add_argument("--section", default=None, help="RESULTS.md section name (default bench_layer_<device>)")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write/update this section of RESULTS.md")


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, int, int, int]:
    """(device, dtype, tokens, in features, out features), the device's defaults where unset."""
    device = resolve_device(args.device)
    defaults = _CUDA_DEFAULTS if device.type == "cuda" else _CPU_DEFAULTS
    dtype = getattr(torch, args.dtype or defaults["dtype"])
    tokens = args.tokens or defaults["tokens"]
    in_features = args.dim or defaults["dim"]
    out_features = args.out_features or in_features
    return device, dtype, tokens, in_features, out_features


def _frozen_linear(in_features: int, out_features: int, device, dtype) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    layer.weight.requires_grad_(False)
    return layer


def _quantized_linear(weight: torch.Tensor, kind: str, device, dtype) -> nn.Linear:
    """A bitsandbytes Linear4bit (NF4, computing in ``dtype``) or Linear8bitLt holding ``weight``."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    data = weight.detach().float().cpu()
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    return layer.to(device)  # quantizes


def _base_mib(variant: Variant) -> float:
    """MiB of the frozen base weight as stored (NF4 / int8 with their scales, or dense)."""
    total = 0
    for w in variant.frozen:
        total += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        scales = [state.absmax] if state is not None else [getattr(w, "SCB", None)]
        total += sum(t.numel() * t.element_size() for t in scales if isinstance(t, torch.Tensor))
    return total / 2**20


def _peft_lora(base: nn.Linear, rank: int, device, dtype) -> Variant:
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.ModuleDict({"proj": base})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]), holder)
    module = holder["proj"].to(device=device, dtype=dtype)
    trainable = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            if p.dim() == 2 and p.shape[0] != rank:  # lora_B (out, r): non-zero, as after training
                p.normal_(std=0.02)
    return Variant(f"peft_lora r={rank}", module, trainable, [base.weight])


def _router(kind: str, in_features: int, num_experts: int, top_k: int, num_tasks: int, top_p=0.5) -> nn.Module:
    if kind == "topp":
        return TopPRouter(in_features, num_experts=num_experts, top_p=top_p)
    if kind == "topk":
        return TopKRouter(in_features, num_experts=num_experts, top_k=top_k)
    if kind == "soft":
        return SoftRouter(in_features, num_experts=num_experts)
    if kind == "task":
        return TaskRouter(num_experts=num_experts, num_tasks=num_tasks)
    if kind == "task_topk":
        return TaskRouter(num_experts=num_experts, num_tasks=num_tasks, top_k=top_k)
    raise ValueError(f"unknown router kind {kind!r}; choose from {list(ROUTER_KINDS)}")


def _router_label(kind: str, top_k: int, num_experts: int) -> str:  # the --routers rows
    return {"topk": f"top{top_k}", "soft": f"soft{num_experts}", "task": "task", "task_topk": f"task-top{top_k}"}[kind]


def build_variants(args: argparse.Namespace, device, dtype, in_features: int, out_features: int) -> list[Variant]:
    """All rows, built with the same seed so that every variant sees the same W0."""
    torch.manual_seed(args.seed)
    base_weight = _frozen_linear(in_features, out_features, device, dtype).weight.detach().clone()

    def base_copy() -> nn.Linear:
        if args.base != "dense":
            return _quantized_linear(base_weight, args.base, device, dtype)
        layer = _frozen_linear(in_features, out_features, device, dtype)
        with torch.no_grad():
            layer.weight.copy_(base_weight)
        return layer

    base = base_copy()
    label = "base (frozen W0)" if args.base == "dense" else f"base (frozen W0, {args.base})"
    variants = [Variant(label, base, [], [base.weight])]
    if not args.no_peft:
        variants.append(_peft_lora(base_copy(), args.rank, device, dtype))
        variants.append(_peft_lora(base_copy(), args.top_k * args.rank, device, dtype))
    for kind in _names(args.routers):
        for impl in _names(args.impls):
            name = f"molora {_router_label(kind, args.top_k, args.experts)} {impl}"
            variants.append(_molora_layer(args, name, base_copy(), kind, impl, device, dtype))
    for form in _names(args.forms):
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {list(FORMS)}")
        kind, extra = FORMS[form]
        label = f"p={args.top_p}" if kind == "topp" else f"top{args.top_k}"
        for impl in _names(args.form_impls):
            name = f"molora {form} {label} {impl}"
            variants.append(_molora_layer(args, name, base_copy(), kind, impl, device, dtype, **extra))
    return variants


def _names(comma_list: str) -> list[str]:
    return [n.strip() for n in comma_list.split(",") if n.strip()]


def _molora_layer(args, name: str, layer_base: nn.Linear, kind: str, impl: str, device, dtype, **extra) -> Variant:
    """A MoLoRALinear row (B non-zero, as after training) on its own copy of W0."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {sorted(EXPERT_IMPLS)}")
    router = _router(kind, layer_base.in_features, args.experts, args.top_k, args.num_tasks, args.top_p)
    layer = MoLoRALinear(
        layer_base,
        num_experts=args.experts,
        r=args.rank,
        lora_alpha=2 * args.rank,
        router=router,
        expert_impl=impl,
        adapter_dtype=dtype,
        **extra,
    ).to(device)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)
        if extra.get("num_shared_experts"):
            layer.lora_B_shared.normal_(std=0.02)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    return Variant(name, layer, trainable, [layer_base.weight])


def _inputs(args, device, dtype, tokens: int, in_features: int, out_features: int):
    batch = args.batch if tokens % args.batch == 0 else 1
    x = torch.randn(batch, tokens // batch, in_features, device=device, dtype=dtype)
    grad_out = torch.randn(batch, tokens // batch, out_features, device=device, dtype=dtype)
    task_ids = torch.arange(batch, device=device) % args.num_tasks  # (batch,)
    return x, grad_out, task_ids


def run(args: argparse.Namespace) -> int:
    """Build the variants, time fwd+bwd of each, print the table (and update ``--markdown``).

    Returns:
        0.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, tokens, in_features, out_features = _resolve(args)
    variants = build_variants(args, device, dtype, in_features, out_features)
    x, grad_out, task_ids = _inputs(args, device, dtype, tokens, in_features, out_features)
    for v in variants:
        if isinstance(v.module, MoLoRALinear):
            v.module.routing_context.task_ids = task_ids
    x.requires_grad_(True)

    def reset(_name: str | None = None) -> None:
        x.grad = None
        for v in variants:
            for p in v.trainable:
                p.grad = None

    steps = {v.name: _fwd_bwd(v, x, grad_out) for v in variants}
    times = time_interleaved(
        steps, repeats=args.repeats, warmup=args.warmup, device=device, before_each=reset, clock=args.clock
    )
    memory = {v.name: _activation_memory(v, x, grad_out, device, reset) for v in variants}
    mem_header = "peak MiB" if device.type == "cuda" else "saved act MiB"
    headers = ["variant", "ms", "x base", f"x LoRA r={args.rank}", "min ms", mem_header, "W0 MiB", "adapter MiB"]
    rows = _rows(args, variants, times, memory)
    shape = (
        f"T={tokens}, in={in_features}, out={out_features}, N={args.experts}, r={args.rank}, top-{args.top_k}, "
        f"{str(dtype).replace('torch.', '')}, {device.type}, W0 {args.base}, fwd+bwd (grads: x, adapters, router; W0 frozen), "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up, {args.clock} clock, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"bench_layer: {shape}")
    print(format_table(headers, rows))
    if args.profile:
        _profile(args.profile, steps, reset)
    if args.markdown:
        write_section(
            args.markdown,
            args.section or f"bench_layer_{device.type}",
            title="Layer: forward+backward of one linear layer",
            info=environment(device),
            shape=shape,
            headers=headers,
            rows=rows,
        )
    return 0


def _fwd_bwd(variant: Variant, x: torch.Tensor, grad_out: torch.Tensor):
    """A zero-argument step: forward of ``x`` through the variant, backward of ``grad_out``."""

    def step():
        variant.module(x).backward(grad_out)

    return step


def _rows(args, variants: list[Variant], times: dict, memory: dict) -> list[list[str]]:
    """One table row per variant: median ms, ratios to the base and to PEFT LoRA r, memory."""
    base_ms = median(times[variants[0].name]) * 1e3
    peft_name = f"peft_lora r={args.rank}"
    peft_ms = median(times[peft_name]) * 1e3 if peft_name in times else float("nan")
    rows = []
    for v in variants:
        ms = median(times[v.name]) * 1e3
        rows.append(
            [
                v.name,
                f"{ms:.2f}",
                f"{ms / base_ms:.3f}",
                f"{ms / peft_ms:.3f}",
                f"{min(times[v.name]) * 1e3:.2f}",
                f"{memory[v.name]:.1f}",
                f"{_base_mib(v):.2f}",
                f"{sum(p.numel() * p.element_size() for p in v.trainable) / 2**20:.2f}",
            ]
        )
    return rows


def _activation_memory(variant: Variant, x, grad_out, device, reset) -> float:
    """MiB: saved activations (CPU) or the allocator peak above what is live (CUDA)."""
    reset()
    if device.type == "cuda":
        peak = cuda_peak_mib(_fwd_bwd(variant, x, grad_out), device)
        reset()
        return peak
    exclude = [*variant.trainable, *variant.frozen, x]
    nbytes = saved_bytes(lambda: variant.module(x), exclude)
    return nbytes / 2**20


def _profile(name: str, steps: dict, reset) -> None:
    matches = [name] if name in steps else [n for n in steps if name in n]
    if not matches:
        print(f"--profile {name!r} matches no variant; choose from {list(steps)}")
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for match in matches:
        reset()
        steps[match]()
        with profile(activities=activities) as prof:
            for _ in range(3):
                reset()
                steps[match]()
        print(f"\nprofile of {match!r} (3 fwd+bwd):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_layer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
