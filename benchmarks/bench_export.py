"""Export time and peak memory for a 7B-shaped layer set (DESIGN §7), CPU, no real model.

Every targeted layer of a Llama-7B-shaped model (32 layers x q, k, v, o, gate, up, down;
hidden 4096, intermediate 11008) gets random stacked factors A (N, r, in), B (N, out, r)
with N=8, r=16, and molora.merge.export's pure functions merge them: "cat" (exact, rank N r = 128)
and "svd" to rank 16 (QR of the stacked factors + SVD of the 128 x 128 core). The merged
factors of all layers are kept, as the exporter keeps them for the one safetensors file.

Each method runs in its own subprocess so that its peak resident memory
(``resource.getrusage().ru_maxrss``) is its own; "over base" subtracts the RSS measured
after imports and before the first layer. Random factor generation is not timed.

    python benchmarks/bench_export.py                 # 32 layers, about 30 s on 1 core
    python benchmarks/bench_export.py --layers 4      # quick check
    python benchmarks/bench_export.py --threads 2     # compare thread counts
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from molora.merge.export import merge_factors  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 11008
MODULES = {  # name: (in, out)
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}


def _rss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(method: str, rank: int | None, layers: int, experts: int, r: int) -> dict:
    g = torch.Generator().manual_seed(0)
    base_rss = _rss_mib()
    seconds, kept_bytes, max_err, out_rank = 0.0, 0, 0.0, 0
    kept = []
    for _ in range(layers):
        for d_in, d_out in MODULES.values():
            lora_A = torch.randn(experts, r, d_in, generator=g) / d_in**0.5  # (N, r, in)
            lora_B = torch.randn(experts, d_out, r, generator=g) / r**0.5  # (N, out, r)
            w = torch.softmax(torch.randn(experts, generator=g), 0)  # (N,)
            t0 = time.perf_counter()
            f = merge_factors(lora_A, lora_B, w, 2.0, method=method, rank=rank)
            seconds += time.perf_counter() - t0
            kept.append(f)
            kept_bytes += (f.lora_A.numel() + f.lora_B.numel()) * 4
            max_err = max(max_err, f.rel_error)
            out_rank = f.lora_A.shape[0]
            del lora_A, lora_B
    return {
        "seconds": seconds,
        "layers": layers * len(MODULES),
        "rank": out_rank,
        "max_rel_error": max_err,
        "output_mib": kept_bytes / 2**20,
        "peak_rss_mib": _rss_mib(),
        "base_rss_mib": base_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (7 modules each)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--svd-rank", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the tall-skinny QRs gain little from threads, and on shared, "
        "oversubscribed cores extra threads spin-wait: 3-4x slower in our runs)",
    )
    parser.add_argument("--worker", choices=["cat", "svd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        rank = args.svd_rank if args.worker == "svd" else None
        print(json.dumps(_worker(args.worker, rank, args.layers, args.experts, args.r)))
        return

    rows = []
    for method in ("cat", "svd"):
        cmd = [sys.executable, __file__, "--worker", method, "--layers", str(args.layers),
               "--experts", str(args.experts), "--r", str(args.r), "--svd-rank", str(args.svd_rank),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append((method, json.loads(out.strip().splitlines()[-1])))

    print(f"7B-shaped export: {args.layers} layers x {len(MODULES)} modules, N={args.experts}, "
          f"r={args.r}, hidden={HIDDEN}, intermediate={INTERMEDIATE}, torch threads={args.threads}")
    header = f"{'method':<8} {'rank':>5} {'modules':>8} {'time s':>8} {'ms/module':>10} " \
             f"{'max rel err':>12} {'output MiB':>11} {'peak RSS MiB':>13} {'over base MiB':>14}"
    print(header)
    print("-" * len(header))
    for method, m in rows:
        name = method if method == "cat" else f"svd-{args.svd_rank}"
        print(f"{name:<8} {m['rank']:>5} {m['layers']:>8} {m['seconds']:>8.2f} "
              f"{1000 * m['seconds'] / m['layers']:>10.2f} {m['max_rel_error']:>12.4f} "
              f"{m['output_mib']:>11.1f} {m['peak_rss_mib']:>13.0f} "
              f"{m['peak_rss_mib'] - m['base_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
