"""Whole training steps of a Llama-shaped model built from config, all linear layers targeted.

Variants (same base weights, same batch): PEFT LoRA r and k*r, molora (top-k of N, soft N,
task), and the ``mixlora`` package from PyPI (MixLoRA: LoRA on attention, a top-k MoE of LoRA
experts on the FFN, same r and N, random weights) when it is installed. mixlora is never a
molora dependency: install it in the benchmark environment only
(``pip install --no-deps mixlora==0.2.3``); if it is missing or fails beside this
transformers, its row says why.

One step = forward with labels (molora adds its balancing loss), backward, AdamW step. The
table gives tokens/s (median step), the ratio of step time to PEFT LoRA r, trainable
parameters and memory: activation bytes saved by autograd on CPU (deterministic), allocator
peak on CUDA.

    python benchmarks/bench_train.py --threads 1 --clock cpu --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("peft_r", "peft_kr", "molora_topk", "molora_soft", "molora_task", "mixlora")
# Expert structures and routers of issue 10 (not in the default run): top-k with a shared A,
# top-k with one shared expert, top-p (p = 0.5), top-k with one router per block.
FORMS = {
    "molora_hydra": ("topk", {"share_lora_A": True}),
    "molora_shared1": ("topk", {"num_shared_experts": 1}),
    "molora_topp": ("topp", {"top_p": 0.5}),
    "molora_block": ("topk", {"router_sharing": "block"}),
}


@dataclass
class TrainVariant:
    name: str
    step: Callable[[], float] | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    frozen: list[torch.Tensor] = field(default_factory=list)
    forward: Callable[[], object] | None = None
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="FFN size (default ~2.7x hidden, as Llama)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", "-N", type=int, default=8)
    parser.add_argument("--rank", "-r", type=int, default=16)
    parser.add_argument("--top-k", "-k", type=int, default=2)
    parser.add_argument("--num-tasks", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS + tuple(FORMS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (use with --threads 1 on a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each model's forward (PEFT, molora; mixlora stays eager)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section", default=None, help="RESULTS.md section name (default bench_train_<device>)")
    parser.add_argument("--markdown", default=None, metavar="PATH")


def _llama(args, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = args.intermediate or round(args.hidden * 8 / 3 / 64) * 64
    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def _make_step(model: nn.Module, params: list[torch.Tensor], batch: dict, compile: bool = False):
    """(step, forward) closures; ``compile``: the forward (and its backward) run torch.compile'd."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(model) if compile else model

    def forward():
        return model(**batch)

    def step() -> float:
        loss = forward().loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, forward


def _peft(base: nn.Module, rank: int, batch: dict, name: str, compile: bool = False) -> TrainVariant:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    _randomize_lora_b(model)
    params = [p for p in model.parameters() if p.requires_grad]
    step, forward = _make_step(model, params, batch, compile)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return TrainVariant(name, step, params, frozen, forward)


def _randomize_lora_b(model: nn.Module) -> None:
    """Non-zero B, as after some training (B = 0 at init would not change the timing, but keeps
    the losses of the variants apart from each other's for the sanity column)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)


def _molora(base: nn.Module, args, batch: dict, router: str, name: str, **extra) -> TrainVariant:
    from molora import MoLoRAConfig, get_molora_model

    kw: dict = {"router": router, **extra}
    if router == "topk":
        kw["top_k"] = args.top_k
    if router == "task":
        kw["num_tasks"] = args.num_tasks
    cfg = MoLoRAConfig(target_modules=TARGETS, num_experts=args.experts, r=args.rank, lora_alpha=2 * args.rank, **kw)
    model = get_molora_model(base, cfg)
    _randomize_lora_b(model)
    params = [p for p in model.parameters() if p.requires_grad]
    task_batch = dict(batch)
    if router == "task":
        task_batch["task_ids"] = (
            torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device) % args.num_tasks
        )
    step, forward = _make_step(model, params, task_batch, args.compile)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return TrainVariant(name, step, params, frozen, forward)


def _mixlora(base: nn.Module, args, batch: dict, name: str, dtype) -> TrainVariant:
    """MixLoRA (mixlora 0.2.3): LoRA on q/k/v/o, a top-k MoE of LoRA experts on gate/up/down.

    The package is written for inference from saved adapters, so the adapter weights are
    created here (random A, small random B, normal router) and made trainable; its LoRA
    modules assert dropout > 0, so dropout is built with p > 0 then replaced by identity to
    match the other variants (no dropout).
    """
    try:
        import mixlora
        from mixlora import MixLoraConfig, inject_adapter_in_model
    except Exception as exc:  # noqa: BLE001 - report any import failure in the table
        return TrainVariant(
            name,
            error=f"mixlora not importable ({type(exc).__name__}: {exc}); "
            "install it in the benchmark env: pip install --no-deps mixlora==0.2.3",
        )
    try:
        config = _mixlora_config(MixLoraConfig, args, dtype)
        weights = _mixlora_weights(base.config, args)
        weights = {k: v.to(device=batch["input_ids"].device, dtype=dtype) for k, v in weights.items()}
        inject_adapter_in_model(base, config, weights)
        params = _mixlora_trainable(base)
        step, forward = _make_step(base, params, batch)
        step()  # fail here, not in the timed loop, if it does not run beside this transformers
        frozen = list(base.parameters())
        return TrainVariant(f"{name} ({mixlora.__name__} {_version('mixlora')})", step, params, frozen, forward)
    except Exception as exc:  # noqa: BLE001 - a peer that does not run is a result, not a crash
        return TrainVariant(name, error=f"mixlora failed beside transformers: {type(exc).__name__}: {exc}"[:300])


def _mixlora_config(config_cls, args, dtype):
    """The ``MixLoraConfig`` (``config_cls``) of the benchmark: the targets, r, alpha, N and
    top-k of the molora variants."""
    config = config_cls.from_config(
        {
            "base_model_name_or_path": "random-llama",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "r": args.rank,
            "lora_alpha": 2 * args.rank,
            "lora_dropout": 0.05,
            "target_modules": TARGETS,
            "routing_strategy": "mixlora",
            "num_experts": args.experts,
            "top_k": args.top_k,
            "act_fn": "silu",
        }
    )
    config.adapter_name_ = "default"
    config.dtype_ = dtype
    config.check()
    return config


def _mixlora_weights(model_config, args) -> dict[str, torch.Tensor]:
    """Random MixLoRA adapter weights in the package's naming, seeded by ``args.seed`` (on CPU)."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    shapes = {proj: (hidden, hidden) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update({"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})  # (in, out)
    weights: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(args.seed)

    def lora(prefix: str, proj: str) -> None:
        fan_in, fan_out = shapes[proj]
        weights[f"{prefix}.lora_A.weight"] = (torch.rand(args.rank, fan_in, generator=gen) - 0.5) * (2 / fan_in**0.5)
        weights[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, args.rank, generator=gen) * 0.01

    for i in range(model_config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lora(f"mixlora.layers.{i}.self_attn.{proj}", proj)
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(args.experts, hidden, generator=gen) * 0.02
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for e in range(args.experts):
                lora(f"mixlora.layers.{i}.mlp.{proj}.experts.{e}", proj)
    return weights


def _mixlora_trainable(model: nn.Module) -> list[torch.Tensor]:
    """The injected adapters' tensors, made trainable, with their dropout replaced by identity."""
    params: list[torch.Tensor] = []
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(layer.self_attn, proj)
            module.dropout_ = nn.Identity()
            params += [module.lora_A.weight, module.lora_B.weight]
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_.requires_grad_(True)
        params.append(moe.gate_)
        for expert in moe.experts_.values():
            expert.dropout_ = nn.Identity()
            params += [expert.lora_A.weight, expert.lora_B.weight]
    for p in params:
        p.requires_grad_(True)
    return params


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def build_variants(args, device, dtype) -> tuple[list[TrainVariant], dict]:
    base = _llama(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids}
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in wanted:
        if name not in VARIANTS and name not in FORMS:
            raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS) + list(FORMS)}")
    kr = args.top_k * args.rank
    builders = {
        "peft_r": lambda m: _peft(m, args.rank, batch, f"peft_lora r={args.rank}", args.compile),
        "peft_kr": lambda m: _peft(m, kr, batch, f"peft_lora r={kr}", args.compile),
        "molora_topk": lambda m: _molora(m, args, batch, "topk", f"molora top{args.top_k} of {args.experts}"),
        "molora_soft": lambda m: _molora(m, args, batch, "soft", f"molora soft {args.experts}"),
        "molora_task": lambda m: _molora(m, args, batch, "task", f"molora task ({args.num_tasks} tasks)"),
        "mixlora": lambda m: _mixlora(m, args, batch, f"mixlora top{args.top_k} of {args.experts}", dtype),
    }
    for form, (router, extra) in FORMS.items():
        label = f"molora {form.removeprefix('molora_')} ({router}{'' if router == 'topp' else args.top_k} of {args.experts})"
        builders[form] = lambda m, router=router, extra=extra, label=label: _molora(
            m, args, batch, router, label, **extra
        )
    return [builders[name](copy.deepcopy(base)) for name in wanted], batch


def run(args: argparse.Namespace) -> int:
    """Build the variants, time their training steps, print the table (and update ``--markdown``).

    Returns:
        0.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    variants, _ = build_variants(args, device, dtype)
    runnable = [v for v in variants if v.error is None]
    times = time_interleaved(
        {v.name: v.step for v in runnable}, repeats=args.repeats, warmup=args.warmup, device=device, clock=args.clock
    )
    losses = {v.name: v.step() for v in runnable}
    memory = {v.name: _memory(v, device) for v in runnable}
    mem_header = "peak MiB" if device.type == "cuda" else "saved act MiB"
    headers = ["variant", "step ms", "tokens/s", f"x LoRA r={args.rank}", "trainable", mem_header, "loss"]
    rows = _rows(args, variants, times, memory, losses)
    shape = _shape(args, device, dtype)
    notes = _notes(variants)
    print(f"bench_train: {shape}")
    print(format_table(headers, rows))
    for note in notes:
        print(note)
    if args.markdown:
        write_section(
            args.markdown,
            args.section or f"bench_train_{device.type}",
            title="Training steps: Llama-shaped model, all linear layers",
            info={**environment(device), "mixlora": _version("mixlora")},
            shape=shape,
            headers=headers,
            rows=rows,
            notes=notes,
        )
    return 0


def _rows(args, variants: list[TrainVariant], times: dict, memory: dict, losses: dict) -> list[list[str]]:
    """One table row per variant; a variant that could not run gets dashes."""
    tokens = args.batch * args.seq
    ref = f"peft_lora r={args.rank}"
    ref_s = median(times[ref]) if ref in times else float("nan")
    rows = []
    for v in variants:
        if v.error:
            rows.append([v.name, "-", "-", "-", "-", "-", "-"])
            continue
        s = median(times[v.name])
        n_params = sum(p.numel() for p in v.params)
        rows.append(
            [
                v.name,
                f"{s * 1e3:.0f}",
                f"{tokens / s:.0f}",
                f"{s / ref_s:.3f}",
                f"{n_params / 1e6:.2f}M",
                f"{memory[v.name]:.0f}",
                f"{losses[v.name]:.3f}",
            ]
        )
    return rows


def _shape(args, device: torch.device, dtype: torch.dtype) -> str:
    """The line that describes the model, batch and timing of this run."""
    return (
        f"Llama from config: hidden={args.hidden}, layers={args.layers}, heads={args.heads}, vocab={args.vocab}, "
        f"seq={args.seq}, batch={args.batch} ({args.batch * args.seq} tokens/step), "
        f"{str(dtype).replace('torch.', '')}, {device.type}; "
        f"targets: all linear layers ({', '.join(TARGETS)}); N={args.experts}, r={args.rank}, top-{args.top_k}; "
        f"AdamW step; median of {args.repeats} interleaved steps after {args.warmup} warm-up, {args.clock} clock, "
        f"torch threads={torch.get_num_threads()}"
        + ("; torch.compile (inductor), warm-up compiles" if args.compile else "")
    )


def _notes(variants: list[TrainVariant]) -> list[str]:
    """Why a variant did not run, and (when mixlora ran) how it differs from molora."""
    notes = [f"- {v.name}: {v.error}" for v in variants if v.error]
    if any(v.name.startswith("mixlora") and v.error is None for v in variants):
        notes.append(
            "- mixlora (MixLoRA): one LoRA on each of q/k/v/o, and a top-k MoE of N LoRA experts on the FFN "
            "(gate/up/down) whose experts share W0; the base down_proj runs once per chosen expert (k times "
            "the base FFN down-projection), hence more activations. Set up here with random weights "
            "(the package loads saved adapters only), act_fn='silu' (its default None is not callable), "
            "dropout built with p=0.05 (it asserts p > 0) and then replaced by identity; no balancing loss."
        )
        notes.append(
            "- molora: N experts on every targeted layer, so more trainable parameters than mixlora at "
            "the same N and r; its loss includes the load-balancing term."
        )
    return notes


def _memory(variant: TrainVariant, device) -> float:
    """MiB: the allocator peak of one step (CUDA) or the activations autograd saves (CPU)."""
    if device.type == "cuda":
        return cuda_peak_mib(variant.step, device)
    return saved_bytes(variant.forward, [*variant.params, *variant.frozen]) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
