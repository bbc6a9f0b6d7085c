"""``molora bench gpu``: every GPU check and measurement in one command, for one H100/H200.

Steps, each in its own subprocess with a time limit (one failing step does not stop the rest):

1. ``pytest -m gpu -q``: every expert path (triton included) against eager in bf16 on CUDA.
2. The layer benchmark in bf16, T=4096, in=out=4096, N=8, r=16, for top-2, soft and task
   routing on every path, against the frozen base and PEFT LoRA r=16 (peak memory included).
3. The training-step benchmark in bf16 of a Llama-shaped model (hidden 2048, all linear
   layers): PEFT LoRA r=16, molora top-2, soft and task, and MixLoRA when installed.

Results go to ``benchmarks/RESULTS-gpu.md`` (sections ``gpu_check``, ``gpu_layer``,
``gpu_train``), with the device name, and are copied to ``$OUT`` when that variable is set
(the device tool brings back files written there). ``scripts/gpu_check.sh`` installs what
is missing first and runs this. Without CUDA it prints why and exits 0 (nothing measured),
or 3 with ``--require-cuda``.

    molora bench gpu                       # everything, ~5 minutes on an H100
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


@dataclass
class Step:
    """One subprocess of the check: a name, its command line and its time limit (s)."""

    name: str
    argv: list[str]
    timeout_s: int


@dataclass
class StepResult:
    name: str
    returncode: int | None  # None: timed out
    seconds: float
    tail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", default="benchmarks/RESULTS-gpu.md", metavar="PATH", help="results file")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"), help="also copy the results here (default $OUT)")
    parser.add_argument("--steps", default="tests,layer,train", help="comma list of tests, layer, train")
    parser.add_argument("--tokens", type=int, default=4096, help="layer benchmark T")
    parser.add_argument("--dim", type=int, default=4096, help="layer benchmark in = out")
    parser.add_argument("--impls", default=LAYER_IMPLS, help="molora paths in the layer benchmark")
    parser.add_argument("--hidden", type=int, default=2048, help="training benchmark hidden size")
    parser.add_argument("--layers", type=int, default=4, help="training benchmark decoder layers")
    parser.add_argument("--seq", type=int, default=1024, help="training benchmark sequence length")
    parser.add_argument("--batch", type=int, default=4, help="training benchmark batch")
    parser.add_argument("--variants", default=TRAIN_VARIANTS, help="training benchmark variants")
    parser.add_argument("--step-timeout", type=int, default=150, help="seconds per step (3 steps: under 8 minutes)")
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
    steps = {
        "tests": Step("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests"], args.step_timeout),
        "layer": Step("layer", _layer_argv(args), args.step_timeout),
        "train": Step("train", _train_argv(args), args.step_timeout),
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
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout_s)
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
