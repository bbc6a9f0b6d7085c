"""Shared benchmark plumbing: interleaved timing, saved-activation bytes, tables, RESULTS.md.

Timings on a shared machine are noisy, so every variant of a benchmark runs in one process,
round-robin (the order rotates every round so no variant always follows the same
neighbour), and the table reports medians and ratios taken from that one run.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from molora.atomic import atomic_write_text


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    before_each: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of every fn, measured round-robin.

    ``clock="cpu"`` measures the CPU time of this process (``time.process_time``) instead of
    wall time: with one torch thread on a machine shared with other jobs, it leaves out the
    time the process waits for a core, which is most of the noise (it still includes cache
    and memory-bandwidth contention). CUDA timings are always wall time.

    Args:
        fns: name -> zero-argument callable (one fwd+bwd, one training step, ...).
        repeats: timed rounds; every round calls every fn once.
        warmup: untimed rounds first.
        device: synchronized around each call on CUDA.
        before_each: called untimed before each call (to reset grads, say).
        clock: "wall" or "cpu" (see above).

    Returns:
        name -> list of `repeats` durations in seconds.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"`clock` must be 'wall' or 'cpu', got {clock!r}")
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_idx in range(warmup + repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each(name)
            synchronize(device)
            start = now()
            fns[name]()
            synchronize(device)
            if round_idx >= warmup:
                times[name].append(now() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def saved_tensors(fn: Callable[[], object], exclude: list[torch.Tensor] = ()) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every distinct storage autograd saves while running fn.

    Storages of ``exclude`` (parameters, frozen weights) are skipped: they are not
    activations. Views of one storage count once, at the storage's size. This is
    deterministic, unlike allocator peaks on CPU.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and storage.nbytes():
                old = found.get(ptr)
                if old is None or storage.nbytes() > old[1]:
                    found[ptr] = (tuple(t.shape), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(found.values())


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] = ()) -> int:
    """Total bytes of the activations autograd saves while running fn (see saved_tensors)."""
    return sum(nbytes for _, nbytes in saved_tensors(fn, exclude))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    """Machine and library versions, for the header of a results section."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = "not installed"
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads={torch.get_num_threads()}"
    try:
        info["load average"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", "molora", "routers"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            info["molora commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def format_table(headers: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def command_line() -> str:
    """How this benchmark was started, for the results header."""
    if not sys.argv:
        return ""
    script, args = sys.argv[0], sys.argv[1:]
    name = Path(script).name
    if name.endswith(".py"):
        try:
            script = os.path.relpath(script)
        except ValueError:
            pass
        return " ".join(["python", script, *args])
    return " ".join(["molora" if name in ("molora", "cli.py") else name, *args])


_HEADER = """# molora benchmarks

Generated by `benchmarks/bench_layer.py --markdown` and `benchmarks/bench_train.py --markdown`
(or `molora bench layer|train --markdown benchmarks/RESULTS.md`). Each section is replaced
by the script that owns it; do not edit by hand. Ratios are measured in one run, all
variants interleaved round-robin; medians.
"""


def update_markdown(path: str | os.PathLike, section: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- {section}:begin/end -->`` markers."""
    path = Path(path)
    text = path.read_text() if path.exists() else _HEADER
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def environment_markdown(info: dict[str, str], command: str) -> str:
    lines = [f"- {key}: {value}" for key, value in info.items()]
    lines.append(f"- command: `{command}`")
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    """``--device``: "auto" is CUDA when available, else CPU; any other name as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cuda_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """MiB the CUDA allocator peaks at above what is live, while ``fn()`` runs."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def write_section(
    path: str | os.PathLike,
    section: str,
    *,
    title: str,
    info: dict[str, str],
    shape: str,
    headers: list[str],
    rows: list[list[str]],
    notes: list[str] = (),
) -> None:
    """Write a benchmark's results as one RESULTS.md section, and say so.

    Args:
        path: the markdown file (created with a header when missing).
        section: the section's marker name, e.g. ``bench_layer_cpu``.
        title: the section's heading (without ``##``).
        info: the environment (:func:`environment`), listed with the command line.
        shape: the line that describes the measured setting.
        headers: the table's column names.
        rows: the table's rows.
        notes: bullet lines after the table, under "Notes:".
    """
    body = "\n\n".join(
        [
            f"## {title}",
            environment_markdown(info, command_line()),
            shape,
            format_table(headers, rows, markdown=True),
            *(["Notes:\n" + "\n".join(notes)] if notes else []),
        ]
    )
    update_markdown(path, section, body)
    print(f"updated {path}")
