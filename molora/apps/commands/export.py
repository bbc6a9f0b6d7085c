"""``molora export``: a saved MoLoRA model -> PEFT LoRA adapter(s), or a merged base model.

    molora export RUN_OR_ADAPTER_DIR --out DIR [--task T|all] [--weights uniform|measured|FILE]
                  [--method cat|svd] [--rank R|auto [--tolerance TOL]] [--target peft|vllm]
                  [--fidelity-batches N] [--merge-into-base] [--base NAME_OR_PATH]

RUN_OR_ADAPTER_DIR is a folder written by ``MoLoRAModel.save_pretrained`` (it holds
``molora_config.json``) or a training run folder holding one: ``final/`` is preferred, then
the highest step (``checkpoints/step_<n>/adapter/`` or ``checkpoint-<n>/``), then the only
adapter folder found below it. Saves interrupted by a kill are first recovered, as the loaders
do, and hidden folders (saves in progress, leftovers) are never looked into. The base model
is loaded offline (``local_files_only``) from the ``base_model_name_or_path`` recorded in the
adapter, or from ``--base``, with the class named in its config's ``architectures``.

``--weights measured`` reads gates written by :func:`molora.merge.export.save_gates` (``gates.json``
or ``gates.safetensors``) from the adapter folder or the run folder, else the per-task mean
gates of the last eval in the run's ``metrics.jsonl`` (pooled over tasks, weighted by tokens,
unless ``--task`` is given); ``FILE`` reads a gates file from anywhere. Without ``--weights`` the task router's gates are used when ``--task`` is
given, and uniform weights otherwise.

The "rel. error" it prints is that of the factorization of the static merge (0 for ``cat``).
For a token-routed model (soft, topk, topp routers) the export replaces each token's gates by
static ones, which only approximates the routed model, whatever that error: the command prints
a note saying so. Task-router exports (``--task``) are exact per task.
``--target vllm`` writes what vLLM serves (:mod:`molora.merge.vllm`) and prints the
``vllm serve`` line with its ``--max-lora-rank``; ``--rank auto`` picks the smallest rank within
``--tolerance`` and prints the rank-versus-error table. When RUN_OR_ADAPTER_DIR is a training
run with eval files, the routed model is compared with each exported adapter on up to
``--fidelity-batches`` eval batches per task (default 4; 0 skips it) and the fidelity table is
printed beside the SVD truncation error (:mod:`molora.merge.fidelity`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from molora.apps.commands.export_distill import add_distill_args, distill_args, distill_rows

GATES_FILES = ("gates.json", "gates.safetensors")
METRICS = "metrics.jsonl"  # written by molora.training.loop; eval records hold per-task routing stats


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on the ``molora`` command line."""
    parser = subparsers.add_parser(
        "export",
        help="export merged PEFT LoRA adapters from a MoLoRA run or adapter",
        description=(
            "Collapse the experts with static gates w (N,) per layer into dW = s * sum_i w_i B_i A_i and "
            "write it as a PEFT LoRA adapter (or fold it into the base weights)."
        ),
    )
    parser.add_argument(
        "source", metavar="RUN_OR_ADAPTER_DIR", help="saved MoLoRA adapter, or a run folder holding one"
    )
    parser.add_argument("--out", required=True, help="output folder (adapter, one folder per task, or merged model)")
    parser.add_argument("--task", default=None, help="task id or name, or 'all' (one adapter folder per task)")
    parser.add_argument(
        "--weights",
        default=None,
        help="'uniform', 'measured' (gates.json / gates.safetensors beside the adapter or in the run), or a "
        "gates FILE; default: the task router's gates with --task, uniform otherwise",
    )
    parser.add_argument(
        "--method", choices=["cat", "svd", "distill"], default="cat",
        help="cat: exact; svd: best rank-R static merge; distill: a rank-R LoRA trained (from the svd merge) on "
        "the run's training data to match the routed model",
    )  # fmt: skip
    parser.add_argument(
        "--rank", type=_rank_arg, default=None,
        help="rank for --method svd (default: the expert rank r), or 'auto': the smallest within --tolerance",
    )
    _add_serving_args(parser)
    parser.add_argument("--merge-into-base", action="store_true", help="save the base model with dW folded in")
    parser.add_argument("--base", default=None, help="base model name or path (default: the one the adapter records)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _rank_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank must be an int or 'auto', got {value!r}") from None


def _add_serving_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="--rank auto: largest relative Frobenius error allowed on any layer (default 1e-3)")
    parser.add_argument("--target", choices=["peft", "vllm"], default="peft",
                        help="vllm: one rank from vLLM's set on every module, checked with vLLM's loading rules")
    parser.add_argument("--fidelity-batches", type=int, default=4, metavar="N",
                        help="eval batches per task of the run to compare routed and exported models on (0: skip)")
    add_distill_args(parser)


def _fidelity_batches(source: Path, adapter_dir: Path, n: int) -> Any:
    """The run's eval batches for the fidelity report, or None (not a run, no eval data, or n = 0)."""
    from molora.training.eval_data import run_eval_batches

    for folder in _search_folders(adapter_dir, source):
        if (batches := run_eval_batches(folder, max_batches=n)) is not None:
            print(f"fidelity: {len(batches)} eval batches of the run in {folder}", file=sys.stderr)
            return batches
    if n > 0:
        print("fidelity: not measured (no training run with eval files around the adapter)", file=sys.stderr)
    return None


def print_export(report: dict[str, Any], out: Path, task: Any) -> None:
    """The per-layer tables, the auto-rank and fidelity tables, and how to serve the export."""
    from molora.merge.fidelity import format_fidelity_table
    from molora.merge.rank import format_rank_table

    reports = report if task == "all" else {"": report}
    for folder, rep in reports.items():
        print(format_report(rep, title=f"\n[{folder}] -> {out / folder}" if folder else None))
        if rep.get("auto"):
            print(format_rank_table(rep["auto"]))
    if any(rep.get("distill") for rep in reports.values()):
        for folder, rep in reports.items():
            d = rep["distill"]
            print(
                f"distill{f' [{folder}]' if folder else ''}: {d['steps']} steps (best at {d['best_step']}), held-out "
                f"{'KL' if d['objective'] == 'kl_logits' else 'MSE'} {d['holdout_start']:.3e} (svd start) -> "
                f"{d['holdout_best']:.3e}"
            )
    if any(rep.get("fidelity") for rep in reports.values()):
        if any(rep.get("distill") for rep in reports.values()):
            print("\nfidelity on eval data (routed model vs the svd static merge and the distilled adapter, same rank):")
            print(format_fidelity_table(distill_rows(reports, out)))
        else:
            print("\nfidelity of the static merge (routed model vs exported adapter):")
            print(format_fidelity_table({folder or out.name: rep for folder, rep in reports.items()}))
    quantized = next((rep["quantized_base"] for rep in reports.values() if rep.get("quantized_base")), None)
    if quantized:
        print(f"\nnote: {quantized['merge']}")
    if any(rep.get("serve") for rep in reports.values()):
        from molora.merge.vllm import serve_command

        rank = max(rep["max_lora_rank"] for rep in reports.values())
        folders = {folder or out.name: out / folder if folder else out for folder in reports}
        print(f"\nvLLM-ready (check: molora check-vllm FOLDER); serve with --max-lora-rank {rank}:")
        print(f"  {serve_command(folders, rank, next(iter(reports.values())).get('base_model'))}")


def find_adapter_dir(source: str | os.PathLike) -> Path:
    """The MoLoRA adapter folder of a run or adapter folder (see module docstring).

    Raises:
        FileNotFoundError: no folder with ``molora_config.json`` at or below ``source``.
    """
    from molora.atomic import recover_directory, recover_tree
    from molora.io import CONFIG_NAME

    root = Path(source)
    recover_directory(root)  # a save of the folder itself killed between its two renames
    if not root.is_dir():
        raise FileNotFoundError(f"RUN_OR_ADAPTER_DIR {str(root)!r} is not a folder")
    recover_tree(root)  # the same recovery as the loaders, for final/ and every checkpoint
    if (root / CONFIG_NAME).is_file():
        return root
    if (root / "final" / CONFIG_NAME).is_file():
        return root / "final"
    found = sorted(  # hidden folders are saves in progress or leftovers, never an adapter to export
        p.parent for p in root.rglob(CONFIG_NAME) if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    steps = []
    for p in found:  # RUN/checkpoints/step_0000100/adapter, or HF-style checkpoint-100
        numbers = [
            int(m.group(1))
            for part in p.relative_to(root).parts
            if (m := re.fullmatch(r"(?:step_|checkpoint-)(\d+)", part))
        ]
        if numbers:
            steps.append((numbers[-1], p))
    if steps:
        return max(steps)[1]
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no MoLoRA adapter ({CONFIG_NAME}) in {str(root)!r} or below it")
    raise FileNotFoundError(
        f"several MoLoRA adapters below {str(root)!r}: {[str(p) for p in found[:5]]}; pass one of them"
    )


def load_base_model(name_or_path: str) -> Any:
    """Load a transformers model offline with the class its config's ``architectures`` names
    (a model class only), from safetensors only; a failure is one ValueError naming the folder."""
    import transformers

    from molora.training.base_model import load_pretrained, model_class

    field = f"base model {name_or_path!r}"
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{field}: no readable transformers config.json ({type(e).__name__}: {str(e)[:200]})") from e
    architectures = getattr(config, "architectures", None) or []
    cls = model_class(architectures[0], "config.json architectures[0]") if architectures else transformers.AutoModelForCausalLM
    return load_pretrained(cls, name_or_path, "base model", local_files_only=True)


def _last_eval_routing(metrics: Path) -> dict[str, dict] | None:
    """``routing`` of the last eval record of a training run's metrics.jsonl, if any."""
    from molora.training.metrics import read_metrics

    routing = None
    for record in read_metrics(metrics):
        if record.get("type") == "eval" and record.get("routing"):
            routing = record["routing"]
    return routing


def _pool_tasks(routing: dict[str, dict]) -> dict[str, list[float]]:
    """Token-weighted mean over tasks of per-task ``{layer: {"gates", "tokens"}}`` stats."""
    import torch

    sums: dict[str, list] = {}
    for stats in routing.values():
        for layer, s in stats.items():
            tokens = float(s.get("tokens", 1))
            acc = sums.setdefault(layer, [0.0, 0.0])
            acc[0] = acc[0] + torch.tensor(s["gates"], dtype=torch.float64) * tokens  # (N,)
            acc[1] += tokens
    return {layer: (g / max(t, 1.0)).tolist() for layer, (g, t) in sums.items()}


def _search_folders(adapter_dir: Path, source: Path) -> list[Path]:
    """The adapter folder and its parents up to the run folder (RUN/final -> RUN)."""
    folders = [adapter_dir]
    for parent in adapter_dir.parents:
        if source != parent and source not in parent.parents:
            break
        folders.append(parent)
    return list(dict.fromkeys([*folders, source]))


def _measured(adapter_dir: Path, source: Path, task: int | str | None) -> Any:
    """Measured gates: a gates file, else the last eval routing of the run's metrics.jsonl."""
    from molora.merge.export import gates_from_json, load_gates

    folders = _search_folders(adapter_dir, source)
    for folder in folders:
        for name in GATES_FILES:
            if (folder / name).is_file():
                return load_gates(folder / name)
    for folder in folders:
        if (folder / METRICS).is_file() and (routing := _last_eval_routing(folder / METRICS)):
            if task is not None:
                return gates_from_json(routing)  # {task name: {layer: (N,)}}
            return gates_from_json(_pool_tasks(routing))
    raise FileNotFoundError(
        f"--weights measured: no {' or '.join(GATES_FILES)} and no eval routing in {METRICS} at "
        f"{str(adapter_dir)!r} or {str(source)!r}; train with eval files (data.tasks.<task>.eval) so that "
        f"{METRICS} records the routing, or pass --weights FILE (gates saved with molora.merge.export.save_gates)"
    )


def _resolve_weights_arg(value: str | None, adapter_dir: Path, source: Path, task: int | str | None) -> Any:
    from molora.merge.export import load_gates

    if value is None or value == "uniform":
        return value
    if value == "measured":
        return _measured(adapter_dir, source, task)
    if Path(value).is_file():
        try:
            return load_gates(value)
        except Exception as e:  # noqa: BLE001 - JSON, safetensors or shape errors of a user file
            if not isinstance(e, (ValueError, KeyError, TypeError)) and type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"--weights {value!r} is not a readable gates file ({type(e).__name__}: {e})") from e
    raise ValueError(f"--weights must be 'uniform', 'measured' or an existing gates file, got {value!r}")


def _check_metadata(adapter_dir: Path, meta: Any) -> None:
    """The entries of ``molora_config.json`` have the types a saved adapter writes.

    Raises:
        ValueError: naming the file and the entry.
    """
    from molora.io import CONFIG_NAME

    for key, kind in (("config", dict), ("modules", dict), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(
                f"{adapter_dir / CONFIG_NAME}: {key!r} must be a JSON object, got {json.dumps(meta.get(key))[:60]}; "
                "the adapter is corrupt or not a MoLoRA adapter"
            )


def _parse_task(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    return int(value) if re.fullmatch(r"\d+", value) else value


def format_report(report: dict[str, Any], title: str | None = None) -> str:
    """A table of per-layer rank and relative Frobenius error of one export report."""
    rows = report["layers"]
    width = max([len("layer")] + [len(n) for n in rows])
    lines = [title] if title else []
    lines.append(f"{'layer':<{width}}  {'rank':>5}  {'rel. error':>10}")
    lines.append("-" * (width + 19))
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {row['rank']:>5}  {row['rel_error']:>10.3e}")
    errors = [row["rel_error"] for row in rows.values()]
    what = (
        "the distilled update's distance to the static merge"
        if report["method"] == "distill"
        else "of the factorization of the static merge"
    )
    lines.append(f"{len(rows)} layers, max rel. error {max(errors):.3e} ({what}), method {report['method']}")
    return "\n".join(lines)


def routing_note(router: str, task: int | str | None, method: str = "cat") -> str | None:
    """What the error above does not cover: static gates approximate token routing.

    Args:
        router: the model's router (``MoLoRAConfig.router``).
        task: ``--task`` (a task router's export of a task is exact).

    Returns:
        The note to print, or None when the export reproduces the model exactly.
    """
    if router == "task" and task is not None:
        return None
    if router == "task":
        return "note: the task router's gates were averaged (no --task): the export matches no single task exactly"
    if method == "distill":
        return (
            f"note: this model routes each token (router={router!r}); the distilled adapter was trained to match it "
            "and approximates it as the fidelity table shows (eval data it did not train on)"
        )
    return (
        f"note: the rel. error is the factorization's (0: exact), but this model routes each token (router={router!r}): "
        "the export's static gates only approximate token routing, so its outputs differ from the routed model's; "
        "compare them on your data before serving it"
    )


def _check_merge_out(out: Path, base_names: list[str | None], adapter_dir: Path, source: Path) -> None:
    """``--merge-into-base --out`` must not be (or hold) the base model folder: the merged model
    would replace the base, and the user's files in it, for good.

    Raises:
        ValueError: ``out`` is the base folder (given, recorded, or the run's ``base_model/``), after
            resolving symlinks, or a folder above it.
    """
    from molora.training.base_model import BASE_MODEL_DIR

    real_out = Path(os.path.realpath(out))
    bases = [Path(n) for n in base_names if n] + [f / BASE_MODEL_DIR for f in _search_folders(adapter_dir, source)]
    for base in bases:
        if not base.is_dir():
            continue
        real = Path(os.path.realpath(base))
        if real_out == real or real_out in real.parents:
            where = "is" if real_out == real else "holds"
            raise ValueError(
                f"--out {str(out)!r} {where} the base model folder {str(base)!r}: --merge-into-base would replace "
                "the base model and delete the files in it; write the merged model to another folder"
            )


def _model_files(folder: Path) -> list[str]:
    """What a saved transformers model must hold: its config and every weight file written."""
    return ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]


def _save_merged(model: Any, base_name: str, out: Path) -> None:
    """Save the merged transformers model (and its tokenizer, if it has one) atomically."""
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"--out {str(out)!r} is a non-empty folder that is not a saved model")
    from molora.atomic import atomic_directory

    with atomic_directory(out, expect=_model_files) as tmp:
        model.save_pretrained(str(tmp))
        try:
            import transformers

            transformers.AutoTokenizer.from_pretrained(base_name, local_files_only=True).save_pretrained(str(tmp))
        except Exception:  # noqa: BLE001 - a base without a tokenizer is fine
            pass


def run(args: argparse.Namespace) -> int:
    """Run ``molora export``; returns the exit status."""
    from molora import MoLoRAModel
    from molora.io import read_metadata

    try:
        source = Path(args.source)
        adapter_dir = find_adapter_dir(source)
        meta = read_metadata(adapter_dir)
        _check_metadata(adapter_dir, meta)
        base_name = args.base or meta.get("base_model_name_or_path")
        if not base_name:
            raise ValueError(f"{adapter_dir} records no base model (base_model_name_or_path); pass --base")
        task = _parse_task(args.task)
        weights = _resolve_weights_arg(args.weights, adapter_dir, source, task)
        distill = distill_args(args, _search_folders(adapter_dir, source), adapter_dir)  # before the base loads: fail fast
        if args.merge_into_base and task == "all":
            raise ValueError("--merge-into-base takes one --task, not 'all'")
        if args.merge_into_base and (args.method != "cat" or args.rank is not None):
            raise ValueError(
                f"--merge-into-base folds the exact update into the weights: drop --method {args.method} / --rank"
            )
        out = Path(args.out)
        if args.merge_into_base:
            _check_merge_out(out, [base_name, meta.get("base_model_name_or_path")], adapter_dir, source)
        print(f"adapter: {adapter_dir}\nbase model: {base_name}", file=sys.stderr)
        base = load_base_model(base_name)
        model = MoLoRAModel.from_pretrained(base, adapter_dir)
        if args.merge_into_base:
            merged = model.merge_and_unload(weights=weights, task=task, progress=not args.no_progress)
            _save_merged(merged, base_name, out)
            print(f"merged model written to {out}")
            if note := routing_note(model.molora_config.router, task):
                print(note)
            return 0
        report = model.export_merged_adapter(
            out, weights=weights, task=task, method=args.method, rank=args.rank, progress=not args.no_progress,
            tolerance=args.tolerance, target=args.target,
            eval_batches=_fidelity_batches(source, adapter_dir, args.fidelity_batches),
            **distill,
        )
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        from molora.apps.cli_errors import EXPORT_FLAGS, cli_message

        print(f"molora export: error: {cli_message(str(err), EXPORT_FLAGS)}", file=sys.stderr)
        return 2
    print_export(report, out, task)
    if task != "all":
        print(f"adapter written to {out}")
    note = routing_note(model.molora_config.router, task, args.method)
    if note:
        print(note)
    return 0
