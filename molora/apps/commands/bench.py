"""`molora bench {layer,train,kernels,recipes,gpu} [flags]`: the benchmarks of ``molora.apps.bench`` (see benchmarks/RESULTS.md)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "layer": "one linear layer fwd+bwd: frozen base, PEFT LoRA and every molora expert path",
    "train": "training steps of a Llama-shaped model: PEFT LoRA, molora routers, mixlora",
    "kernels": "--aot: every Triton launch compiled for sm_80/sm_90 (regs, smem, spills) -> benchmarks/RESULTS-gpu.md",
    "recipes": "router lr ratio x aux weight x router kind on the demo tasks and a tiny causal LM -> benchmarks/recipes.json",
    "distill": "the routed top-k model vs its SVD static merge vs its distilled LoRA (fidelity, accuracy)",
    "gpu": "the GPU check: pytest -m gpu, layer and training benchmarks in bf16 -> benchmarks/RESULTS-gpu.md",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark the expert compute paths", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"molora.apps.bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"molora.apps.bench.{args.benchmark}")
    return int(module.run(args) or 0)
