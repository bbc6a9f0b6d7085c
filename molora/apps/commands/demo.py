"""``molora demo``: the offline multitask demo (see :mod:`molora.apps.demo.run`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``molora demo [--out DIR] [--steps N] [--seed S] [--quick] [--config YAML]``."""
    parser = subparsers.add_parser(
        "demo",
        help="the offline multitask demo on a real pretrained model",
        description=(
            "Train MoLoRA with the task router, MoLoRA with top-k token routing and one shared "
            "PEFT LoRA of the same budget on all-MiniLM-L6-v2 over three real-text tasks read "
            "from installed packages; print their accuracy table, plot routing.png, export one "
            "PEFT adapter per task and check it. About 3 minutes on 2 CPU cores, no network."
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run folder (default: runs/demo-<timestamp>)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per model (default: from the config)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (default: from the config, 0)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (seconds): few examples and steps",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="demo settings (kind: demo), e.g. configs/demo.yaml (default: built-in, the same values)",
    )
    parser.add_argument(
        "--variants",
        nargs="?",
        type=int,
        const=3,
        default=0,
        metavar="SEEDS",
        help="compare the expert forms (shared LoRA, task, top-k, Hydra+task, task+1 shared expert, top-p, "
        "DoRA+task, PiSSA+task, PiSSA+top-k) at the same budget, mean +- std over SEEDS seeds "
        "(default 3; ~45 min on 2 cores)",
    )
    parser.add_argument(
        "--forms",
        default=None,
        metavar="KEYS",
        help="with --variants: a comma list of the forms to train (default all: shared-lora, molora-task, "
        "molora-topk, hydra-task, task-shared1, molora-topp, task-dora, task-pissa, topk-pissa)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    from molora.apps.demo.config import DemoConfig
    from molora.apps.demo.run import run_demo

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"molora demo: --steps must be >= 1, got {args.steps}")
    if args.variants < 0:
        raise SystemExit(f"molora demo: --variants takes a number of seeds >= 1, got {args.variants}")
    forms = args.forms.split(",") if args.forms else None
    if forms is not None and not args.variants:
        raise SystemExit("molora demo: --forms needs --variants")
    config = DemoConfig.from_yaml(args.config, quick=args.quick) if args.config else None
    results = run_demo(
        out_dir=args.out,
        steps=args.steps,
        seed=args.seed,
        quick=args.quick and config is None,
        config=config,
        progress=not args.no_progress,
        variants=args.variants,
        forms=forms,
    )
    return 0 if results["export_ok"] else 1
