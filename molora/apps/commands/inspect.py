"""``molora inspect RUN_DIR``: print a run's summary; write ``routing.png`` and ``metrics.png``.

``molora inspect ADAPTER_DIR`` (a saved MoLoRA adapter, or a PEFT adapter such as an export)
prints what it holds (:mod:`molora.apps.commands.inspect_adapter`).

Saves interrupted by a kill are recovered first, as the loaders do (hidden temporary folders
are never read). In a run folder that cannot be written (read-only), the plots go to a new
temporary folder instead, with a note saying where."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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


def _routing_text(routing: dict[str, Any]) -> str:
    """Specialization of one task's routing, means over layers: the gate entropy and max gate
    (what a dense router's load cannot show), and for sparse routers the load's CV."""
    from molora.core.routing_health import row_health

    rows = [row_health(row) for row in routing.values() if row.get("tokens", 1) > 0]
    if not rows:
        return ""
    parts = []
    known = [r for r in rows if r["entropy"] is not None]
    if known:
        parts.append(f"gate entropy {sum(r['entropy'] for r in known) / len(known):.3f}")
        parts.append(f"max gate {sum(r['max_gate'] for r in known) / len(known):.3f}")
    if not rows[0]["dense"]:
        parts.append(f"load cv {sum(r['usage_cv'] for r in rows) / len(rows):.3f}")
    else:  # per layer: experts differ between layers, so a mean of the gate mass per expert would look uniform
        parts.append(f"top-expert gate mass {sum(max(r['usage']) for r in rows) / len(rows):.3f}")
    return ", " + ", ".join(parts)


def _run_molora_section(run_dir: Path) -> dict[str, Any]:
    """The ``molora`` section of the run's ``run_config.yaml`` ({} when missing or unreadable)."""
    import yaml

    try:
        section = (yaml.safe_load((run_dir / "run_config.yaml").read_text()) or {}).get("molora")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return {}
    return section if isinstance(section, dict) else {}


def _expert_variant(run_dir: Path) -> str:
    """``" (DoRA)"``, ``" (PiSSA init pissa_niter_4)"`` or ``""`` (plain LoRA experts), from the
    run's ``run_config.yaml``."""
    molora = _run_molora_section(run_dir)
    parts = ["DoRA"] if molora.get("use_dora") is True else []
    init = molora.get("init_lora_weights")
    if isinstance(init, str) and init.startswith("pissa"):
        parts.append(f"PiSSA init {init}")
    return f" ({', '.join(parts)})" if parts else ""


def summarize(run_dir: Path, records: list[dict[str, Any]], eval_record: dict[str, Any] | None) -> str:
    """The text printed by ``molora inspect``."""
    from molora.training.run_dir import checkpoint_dirs

    lines = [f"run: {run_dir}"]
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        lines.append(
            f"  finished: {s['steps']} steps, router={s['router']}, experts={s['num_experts']}{_expert_variant(run_dir)}, "
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
        n = None
        for task, m in eval_record["tasks"].items():
            routing = eval_record.get("routing", {}).get(task, {})
            n = n or next((len(v["load"]) for v in routing.values()), None)
            lines.append(
                f"    {task:<{width}}  loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  "
                f"({m['examples']} examples{_routing_text(routing)})"
            )
        if n:
            lines.append(
                "    (means over layers. gate entropy: normalized entropy of the router's probabilities, 1 = uniform "
                f"routing, 0 = one expert; max gate: mean largest gate, uniform = 1/N = {1 / n:.3f}; top-expert gate "
                "mass: the largest expert's share of a layer's gate weight (dense routers, whose load is always 1); load cv: coefficient of "
                "variation of the expert load (sparse routers, 0 = balanced))"
            )
    else:
        lines.append("  no evaluation recorded")
    return "\n".join(lines)


def _router(run_dir: Path) -> str | None:
    """The run's router, from summary.json or run_config.yaml (None: unknown)."""
    if (run_dir / "summary.json").is_file():
        try:
            return json.loads((run_dir / "summary.json").read_text()).get("router")
        except (OSError, ValueError, AttributeError):
            return None
    return _run_molora_section(run_dir).get("router")


def format_samples(run_dir: Path, width: int = 60) -> str | None:
    """The latest eval samples of a run (``samples.jsonl``, ``train.eval_samples``), or None."""
    from molora.training.samples import SAMPLES, latest_samples

    record = latest_samples(run_dir / SAMPLES)
    if record is None:
        return None

    def short(text: str) -> str:
        text = text.replace("\n", "\u23ce")
        return text if len(text) <= width else text[: width - 1] + "\u2026"

    lines = [f"eval samples at step {record['step']} (greedy; {SAMPLES}):"]
    for task, rows in record.get("tasks", {}).items():
        for row in rows:
            lines.append(f"  [{task}] {short(row['prompt'])!r} -> {short(row['completion'])!r} (reference {short(row['reference'])!r})")
    return "\n".join(lines)


def _plot_folder(run_dir: Path) -> Path:
    """``run_dir`` when plots can be written there, else a new temporary folder (with a note)."""
    try:
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".molora-inspect-", delete=True)
    except OSError as e:
        folder = Path(tempfile.mkdtemp(prefix="molora-inspect-"))
        print(f"note: cannot write plots into {run_dir} ({e.strerror or e}); writing them to {folder}", file=sys.stderr)
        return folder
    probe.close()
    return run_dir


def _write_plots(run_dir: Path, records: list[dict[str, Any]], eval_record: dict[str, Any] | None) -> list[Path]:
    """metrics.png and routing.png in :func:`_plot_folder`."""
    from molora.apps import plots

    folder = _plot_folder(run_dir)
    written = [plots.plot_metrics(records, folder / "metrics.png", title=run_dir.name)]
    if eval_record is not None and eval_record.get("routing"):
        router = _router(run_dir)
        first = next(iter(eval_record["routing"].values()))
        _, label = plots.routing_quantity(router, first)
        title = f"{run_dir.name}: {label} per task and layer (eval at step {eval_record['step']})"
        written.append(plots.plot_routing(eval_record["routing"], folder / "routing.png", title=title, router=router))
    return written


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    from molora.apps.commands.inspect_adapter import describe_adapter, is_adapter_dir
    from molora.atomic import recover_directory, recover_tree

    recover_directory(run_dir)  # the same recovery as the loaders (no-op while a writer is at work)
    if run_dir.is_dir():
        recover_tree(run_dir)

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
    samples = format_samples(run_dir)
    if samples:
        print(samples)
    if args.no_plots:
        return 0
    from molora.apps import plots

    try:
        plots.require_matplotlib()
    except ImportError as e:
        print(f"plots skipped: {e}", file=sys.stderr)
        return 0
    try:
        written = _write_plots(run_dir, records, eval_record)
    except OSError as e:
        print(f"molora inspect: plots not written ({e}); the summary above is complete", file=sys.stderr)
        return 0
    for path in written:
        print(f"wrote {path}")
    return 0
