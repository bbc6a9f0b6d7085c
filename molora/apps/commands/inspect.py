"""``molora inspect RUN_DIR``: print a run's summary; write ``routing.png`` and ``metrics.png``.

``molora inspect ADAPTER_DIR`` (a saved MoLoRA adapter, or a PEFT adapter such as an export)
prints what it holds (:mod:`molora.apps.commands.inspect_adapter`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help="summarize a run and plot its routing",
        description=(
            "Print the summary of a `molora train` run folder and write RUN_DIR/routing.png (expert load "
            "per task and layer, from the last evaluation, or --step) and RUN_DIR/metrics.png (curves)."
        ),
    )
    parser.add_argument("run_dir", help="the run folder (train.output_dir), or a saved adapter folder")
    parser.add_argument("--step", type=int, default=None, help="plot the routing of the eval at this step (default: the last)")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")
    return parser


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (a partial last line, from a killed run, is dropped).

    Raises:
        FileNotFoundError: no ``metrics.jsonl``.
        ValueError: a line before the last is not a JSON object.
    """
    from molora.training.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a molora run folder: metrics.jsonl is missing")
    return read_metrics(path)


def _entropy(load: list[float]) -> float:
    """Normalized entropy of a load vector (1 = perfectly balanced)."""
    total = sum(load)
    if total <= 0 or len(load) < 2:
        return float("nan")
    p = [x / total for x in load if x > 0]
    return -sum(x * math.log(x) for x in p) / math.log(len(load))


def summarize(run_dir: Path, records: list[dict[str, Any]], eval_record: dict[str, Any] | None) -> str:
    """The text printed by ``molora inspect``."""
    from molora.training.run_dir import checkpoint_dirs

    lines = [f"run: {run_dir}"]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        lines.append(
            f"  finished: {s['steps']} steps, router={s['router']}, experts={s['num_experts']}, "
            f"processes={s['num_processes']}, precision={s['mixed_precision']}, {s['wall_time_s']:.1f}s"
        )
        lines.append(f"  trainable params: {s['trainable_params']:,d} of {s['total_params']:,d}")
        if s.get("export"):
            lines.append(f"  per-task merged adapters: {s['export']}")
    else:
        lines.append("  (no summary.json: the run is unfinished or was interrupted)")
    ckpts = [p.name for p in checkpoint_dirs(run_dir)]
    lines.append(f"  checkpoints: {', '.join(ckpts) if ckpts else 'none'}")
    train = [r for r in records if r.get("type") == "train"]
    if train:
        first, last = train[0], train[-1]
        lines.append(
            f"  train loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})"
        )
    if eval_record is not None:
        lines.append(f"  eval at step {eval_record['step']}:")
        width = max(len(t) for t in eval_record["tasks"])
        for task, m in eval_record["tasks"].items():
            routing = eval_record.get("routing", {}).get(task, {})
            ent = [_entropy(v["load"]) for v in routing.values()]
            ent = [e for e in ent if not math.isnan(e)]
            balance = f", load balance {sum(ent) / len(ent):.3f}" if ent else ""
            lines.append(
                f"    {task:<{width}}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  ({m['examples']} examples{balance})"
            )
        lines.append("    (load balance: mean over layers of the normalized entropy of expert load, 1 = uniform)")
    else:
        lines.append("  no evaluation recorded")
    return "\n".join(lines)


def _router(run_dir: Path) -> str | None:
    """The run's router, from summary.json or run_config.yaml (None: unknown)."""
    import yaml

    try:
        if (run_dir / "summary.json").is_file():
            return json.loads((run_dir / "summary.json").read_text()).get("router")
        return (yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}).get("molora", {}).get("router")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    from molora.apps.commands.inspect_adapter import describe_adapter, is_adapter_dir

    if not (run_dir / "metrics.jsonl").is_file() and is_adapter_dir(run_dir):
        try:
            print(describe_adapter(run_dir))
        except (FileNotFoundError, ValueError) as e:
            print(f"molora inspect: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        records = load_metrics(run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"molora inspect: {e}", file=sys.stderr)
        return 2
    evals = [r for r in records if r.get("type") == "eval"]
    if args.step is not None:
        chosen = [r for r in evals if r["step"] == args.step]
        if not chosen:
            print(
                f"molora inspect: no eval at --step {args.step}; eval steps: {[r['step'] for r in evals]}",
                file=sys.stderr,
            )
            return 2
        eval_record = chosen[-1]
    else:
        eval_record = evals[-1] if evals else None
    print(summarize(run_dir, records, eval_record))
    if args.no_plots:
        return 0
    from molora.apps import plots

    try:
        plots.require_matplotlib()
    except ImportError as e:
        print(f"plots skipped: {e}", file=sys.stderr)
        return 0
    written = [plots.plot_metrics(records, run_dir / "metrics.png", title=run_dir.name)]
    if eval_record is not None and eval_record.get("routing"):
        router = _router(run_dir)
        first = next(iter(eval_record["routing"].values()))
        _, label = plots.routing_quantity(router, first)
        title = f"{run_dir.name}: {label} per task and layer (eval at step {eval_record['step']})"
        written.append(plots.plot_routing(eval_record["routing"], run_dir / "routing.png", title=title, router=router))
    for path in written:
        print(f"wrote {path}")
    return 0
