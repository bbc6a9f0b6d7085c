"""``molora bench gpu``: every GPU check and measurement in one command, for one H100/H200, offline.

Steps, each in its own subprocess with a time limit (one failing step does not stop the rest;
the limits add up to under 6 minutes):

1. ``cpu``: the core CPU tests (:data:`CORE_CPU_TESTS`, CUDA hidden) under this machine's torch:
   how the torch floor below CI's (the GPU image's torch 2.11) is tested.
2. ``tests``: ``pytest -m gpu`` on tests/test_gpu.py and tests/test_gpu_real.py: every expert path
   (triton included) against eager in bf16; Triton against eager at 4096^2, T=4096, bf16, top-2,
   soft and task (outputs and gradients); a bf16 Llama-shaped training run whose loss falls;
   QLoRA on CUDA when bitsandbytes is installed.
3. ``layer``: the layer benchmark in bf16, T=4096, in=out=4096, N=8, r=16, for top-2, soft and
   task routing on every path, against the frozen base and PEFT LoRA r=16 (peak memory too).
4. ``train``: the training-step benchmark in bf16 of a Llama-shaped model (hidden 2048, all
   linear layers): PEFT LoRA r=16, molora top-2, soft and task, and MixLoRA when installed,
   tokens/s and allocator peak memory.

Nothing on this path imports ``datasets`` (the GPU machines do not have it). Results go to
``benchmarks/RESULTS-gpu.md`` (sections ``gpu_check``, ``gpu_layer``, ``gpu_train``), with the
device name, and are copied to ``$OUT`` when that variable is set. ``scripts/gpu_check.sh``
runs this. Without CUDA it prints why and exits 0 (nothing measured), or 3 with ``--require-cuda``.

    molora bench gpu                       # everything, under 6 minutes on an H100
    molora bench gpu --dry-run             # print the steps only
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from molora.apps.bench.report import update_markdown

EXIT_NO_CUDA = 3
LAYER_IMPLS = "auto,dense,grouped,grouped_bmm,hybrid,triton"
TRAIN_VARIANTS = "peft_r,molora_topk,molora_soft,molora_task,mixlora"
_CLI = [sys.executable, "-m", "molora.apps.cli", "bench"]
# CPU tests of the core (no datasets, no GPU, under a minute on 16 cores); run with CUDA hidden.
CORE_CPU_TESTS = [
    "tests/test_experts.py", "tests/test_routers.py", "tests/test_losses.py", "tests/test_config.py",
    "tests/test_grouped_mm.py", "tests/test_structures.py", "tests/test_topp.py", "tests/test_fused_router.py",
    "tests/test_model.py", "tests/test_io.py",
]  # fmt: skip
GPU_TESTS = ["tests/test_gpu.py", "tests/test_gpu_real.py"]
STEP_SECONDS = {"cpu": 90, "tests": 120, "layer": 60, "train": 80}  # sum: 350 s, under 6 minutes


@dataclass
class Step:
    """One subprocess of the check: a name, its command line and its time limit (s)."""

    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] | None = None  # added to the environment


@dataclass
class StepResult:
    name: str
    returncode: int | None  # None: timed out
    seconds: float
    tail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", default="benchmarks/RESULTS-gpu.md", metavar="PATH", help="results file")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"), help="also copy the results here (default $OUT)")
    parser.add_argument("--steps", default="cpu,tests,layer,train", help="comma list of cpu, tests, layer, train")
    parser.add_argument("--tokens", type=int, default=4096, help="layer benchmark T")
    parser.add_argument("--dim", type=int, default=4096, help="layer benchmark in = out")
    parser.add_argument("--impls", default=LAYER_IMPLS, help="molora paths in the layer benchmark")
    parser.add_argument("--hidden", type=int, default=2048, help="training benchmark hidden size")
    parser.add_argument("--layers", type=int, default=4, help="training benchmark decoder layers")
    parser.add_argument("--seq", type=int, default=1024, help="training benchmark sequence length")
    parser.add_argument("--batch", type=int, default=4, help="training benchmark batch")
    parser.add_argument("--variants", default=TRAIN_VARIANTS, help="training benchmark variants")
    parser.add_argument(
        "--step-timeout", type=int, default=None, help=f"seconds per step (default {STEP_SECONDS}: under 6 minutes)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    parser.add_argument("--require-cuda", action="store_true", help=f"exit {EXIT_NO_CUDA} when there is no CUDA")


def _layer_argv(args: argparse.Namespace) -> list[str]:
    """``molora bench layer`` in bf16 at the issue's shapes, every path, into the results file."""
    return [
        *_CLI, "layer", "--device", "cuda", "--dtype", "bfloat16", "--tokens", str(args.tokens),
        "--dim", str(args.dim), "--experts", "8", "--rank", "16", "--top-k", "2",
        "--routers", "topk,soft,task", "--impls", args.impls, "--repeats", "10", "--warmup", "3",
        "--markdown", args.markdown, "--section", "gpu_layer",
    ]  # fmt: skip


def _train_argv(args: argparse.Namespace) -> list[str]:
    """``molora bench train`` in bf16, Llama-shaped (head dim 128), into the results file."""
    return [
        *_CLI, "train", "--device", "cuda", "--dtype", "bfloat16", "--hidden", str(args.hidden),
        "--layers", str(args.layers), "--heads", str(max(1, args.hidden // 128)), "--seq", str(args.seq),
        "--batch", str(args.batch), "--experts", "8", "--rank", "16", "--top-k", "2",
        "--variants", args.variants, "--repeats", "5", "--warmup", "2",
        "--markdown", args.markdown, "--section", "gpu_train",
    ]  # fmt: skip


def plan(args: argparse.Namespace) -> list[Step]:
    """The subprocesses to run, in order.

    Raises:
        ValueError: an unknown name in ``--steps``.
    """
    limit = {name: args.step_timeout or seconds for name, seconds in STEP_SECONDS.items()}
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    steps = {
        "cpu": Step("cpu", [*pytest, "-m", "not slow", *CORE_CPU_TESTS], limit["cpu"], {"CUDA_VISIBLE_DEVICES": ""}),
        "tests": Step("tests", [*pytest, "-m", "gpu", *GPU_TESTS], limit["tests"]),
        "layer": Step("layer", _layer_argv(args), limit["layer"]),
        "train": Step("train", _train_argv(args), limit["train"]),
    }
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(steps))
    if unknown:
        raise ValueError(f"`--steps` has unknown steps {unknown}; choose from {sorted(steps)}")
    return [steps[name] for name in wanted]


def run_step(step: Step) -> StepResult:
    """Run one step, streaming its output, and keep the last lines for the results file."""
    print(f"\n=== molora bench gpu: {step.name}: {' '.join(step.argv)}", flush=True)
    start = time.monotonic()
    try:
        env = {**os.environ, **(step.env or {})}
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout_s, env=env)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    print(output, flush=True)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return StepResult(step.name, code, time.monotonic() - start, "\n".join(lines[-3:]))


def device_name() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return f"{props.name} (sm{major}{minor}, {props.total_memory / 2**30:.0f} GiB)"


def summary_markdown(device: str, results: list[StepResult]) -> str:
    """The ``gpu_check`` section: device, versions and what each step did."""
    versions = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    lines = ["## GPU check (`molora bench gpu`)", "", f"- device: {device}"]
    lines += [f"- {key}: {value}" for key, value in versions.items()]
    lines += ["", "| step | status | seconds | last lines |", "|---|---|---|---|"]
    for r in results:
        status = "timed out" if r.returncode is None else ("ok" if r.returncode == 0 else f"exit {r.returncode}")
        tail = r.tail.replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} | {tail} |")
    return "\n".join(lines)


def write_results(markdown: str, out_dir: str | None, device: str, results: list[StepResult]) -> None:
    """Write the summary section into ``markdown`` and copy the file into ``out_dir``."""
    update_markdown(markdown, "gpu_check", summary_markdown(device, results))
    print(f"updated {markdown}")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(markdown, Path(out_dir) / Path(markdown).name)
        print(f"copied to {out_dir}")


def run(args: argparse.Namespace) -> int:
    steps = plan(args)
    if args.dry_run:
        for step in steps:
            print(f"{step.name} (<= {step.timeout_s} s): {' '.join(step.argv)}")
        return 0
    if not torch.cuda.is_available():
        print("molora bench gpu: no CUDA device here; nothing measured (run it on an H100/H200).")
        return EXIT_NO_CUDA if args.require_cuda else 0
    device = device_name()
    results = []
    for step in steps:
        results.append(run_step(step))
        write_results(args.markdown, args.out_dir, device, results)  # after each step: a kill keeps the rest
    failed = [r.name for r in results if r.returncode != 0]
    print(f"molora bench gpu: {device}; failed steps: {failed or 'none'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
