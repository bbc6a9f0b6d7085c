"""``molora export --method distill``: its flags, the run's training batches it trains on, and
the rows that put the SVD static merge beside the distilled adapter in the fidelity table
(:mod:`molora.merge.distill`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_distill_args", "distill_args", "distill_rows"]


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """``--distill-batches``, ``--distill-steps``, ``--distill-lr``."""
    parser.add_argument("--distill-batches", type=int, default=32, metavar="N",
                        help="--method distill: training batches per task of the run to distill on (default 32)")
    parser.add_argument("--distill-steps", type=int, default=None, metavar="S",
                        help="--method distill: the most optimizer steps (default 300; stops early on held-out KL)")
    parser.add_argument("--distill-lr", type=float, default=None, metavar="LR",
                        help="--method distill: Adam learning rate of the student LoRA (default 1e-3)")


def distill_args(args: argparse.Namespace, folders: list[Path], adapter_dir: Path) -> dict[str, Any]:
    """``export_merged_adapter`` keywords of ``--method distill``: the training batches and settings
    of the first run among ``folders`` (the adapter folder and its parents up to the run)."""
    if args.method != "distill":
        return {}
    from molora.merge.distill import DistillConfig
    from molora.training.eval_data import run_train_batches

    if args.distill_batches < 1:
        raise ValueError(f"--distill-batches must be >= 1, got {args.distill_batches}")
    for folder in folders:
        if (batches := run_train_batches(folder, max_batches=args.distill_batches)) is not None:
            print(f"distill: {len(batches)} training batches of the run in {folder}", file=sys.stderr)
            overrides = {"steps": args.distill_steps, "lr": args.distill_lr}
            try:
                config = DistillConfig(**{k: v for k, v in overrides.items() if v is not None})
            except ValueError as e:
                raise ValueError(f"--distill-steps / --distill-lr: {e}") from e
            return {"distill_batches": batches, "distill_config": config}
    raise ValueError(
        f"--method distill trains on the run's training data: no training run with its training files around "
        f"{str(adapter_dir)!r}; pass the run folder (it holds run_config.yaml), or use --method svd"
    )


def distill_rows(reports: dict[str, Any], out: Path) -> dict[str, Any]:
    """Rows for the fidelity table: the SVD static merge beside the distilled adapter, per export."""
    rows = {}
    for folder, rep in reports.items():
        label = folder or out.name
        if rep.get("fidelity_static"):
            rank = rep["rank"]
            layers = {"all": {"rank": rank, "rel_error": rep["distill"]["svd_rel_error"]}}
            rows[f"{label} svd"] = {"layers": layers, "fidelity": rep["fidelity_static"]}
        if rep.get("distill"):  # its "svd err" column: n/a (it does not approximate the static merge)
            rep = {**rep, "layers": {"all": {"rank": rep["rank"], "rel_error": float("nan")}}}
        rows[f"{label} distill" if rep.get("distill") else label] = rep
    return rows
