"""``molora train CONFIG.yaml [dotted.key=value ...] [--resume | --resume-from CHECKPOINT] [--debug]``.

User errors: molora validates what the user gives (the run config, the data files, the base
model, a checkpoint to resume) before or while it builds the run, and reports each problem as a
``ValueError`` (``RunConfigError`` is one) or an ``OSError`` (``FileNotFoundError``,
``FileExistsError``, ``PermissionError``, a full disk, ...) whose message names the file, line
or field; ``NotImplementedError`` marks a set-up molora does not support. Those are printed as
one line, ``molora train: error: ...``, with exit status 2. Every other exception (``TypeError``,
``KeyError``, ``IndexError``, ``RuntimeError``, ``AssertionError``, ...) is a bug, in molora or
below it, and keeps its traceback. ``--debug`` shows the traceback of user errors too.

Under ``torchrun`` or ``accelerate launch`` every process meets the same user error: rank 0 prints
it (once, not once per rank) and every rank exits 2. The other ranks record their message in the
launcher's error file (``TORCHELASTIC_ERROR_FILE``), so that an error met on them alone is named
in the launcher's failure summary. The launcher then prints that summary with its own
traceback (``ChildFailedError``); it does so for any process that exits with a failure status,
so it cannot be silenced without hiding the failure from the shell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a MoLoRA model from a YAML config",
        description=(
            "Train a MoLoRA model. CONFIG.yaml has sections model, molora, data, train; "
            "dotted overrides follow it, e.g. molora.num_experts=4 train.max_steps=10. "
            "Multi-GPU: accelerate launch -m molora.cli train CONFIG.yaml ..."
        ),
    )
    parser.add_argument("config", help="the YAML run config")
    # REMAINDER, then a second parse in run(): flags may come anywhere among the overrides
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="dotted overrides, values parsed as YAML"
    )
    _add_flags(parser)
    return parser


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    parser.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="continue from this checkpoint folder (RUN_DIR/checkpoints/step_...)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")


def _split_flags(args: argparse.Namespace) -> str | None:
    """Move flags found among the overrides onto ``args``; an error message or None."""
    flags = argparse.ArgumentParser(prog="molora train", add_help=False)
    _add_flags(flags)
    found, rest = flags.parse_known_args(args.overrides)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        return f"unrecognized options {unknown}; options: --resume, --resume-from CHECKPOINT, --dry-run, --debug"
    args.overrides = rest
    args.resume = args.resume or found.resume
    args.resume_from = args.resume_from or found.resume_from
    args.dry_run = args.dry_run or found.dry_run
    args.debug = args.debug or found.debug
    if args.resume and args.resume_from:
        return "give --resume (newest checkpoint) or --resume-from CHECKPOINT, not both"
    return None


USER_ERRORS = (ValueError, OSError, NotImplementedError)  # see the module docstring


def run(args: argparse.Namespace) -> int:
    """Run ``molora train``; returns the exit status (2: a user error, printed in one line)."""
    problem = _split_flags(args)
    if problem:
        print(f"molora train: error: {problem}", file=sys.stderr)
        return 2
    try:
        return _train(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        report_user_error(f"molora train: error: {e}")
        return 2


def report_user_error(message: str) -> None:
    """Print ``message`` on stderr once: on rank 0 of a launched run (``RANK``), or with no launcher.

    Other ranks write it to the launcher's error file instead (torchrun's JSON format), where the
    launcher's failure summary shows it.
    """
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
        return
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
        try:
            with open(error_file, "w") as f:
                json.dump({"message": record}, f)
        except OSError:
            pass  # the launcher then reports the exit status alone


def _train(args: argparse.Namespace) -> int:
    from molora.training.run_config import load_run_config

    config = load_run_config(args.config, args.overrides)
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    from molora.training.loop import train

    train(config, resume=args.resume_from or args.resume or None)
    return 0
