"""The ``molora`` command line: ``molora train|export|inspect|check-vllm|bench|demo``.

Each subcommand lives in ``molora.apps.commands.<name>`` (dashes as underscores) with ``add_parser(subparsers)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``molora
--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "train a MoLoRA model from a YAML config",
    "export": "export merged PEFT LoRA adapters from a MoLoRA run or adapter",
    "inspect": "summarize a run and plot its routing",
    "check-vllm": "check that vLLM's LoRA loader takes a PEFT adapter folder as it is",
    "bench": "benchmark the expert compute paths",
    "demo": "the offline multitask demo on a real pretrained model",
}


def _module(command: str) -> str:
    return f"molora.apps.commands.{command.replace('-', '_')}"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molora", description="Mixture-of-LoRA-experts for transformers models.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        if name == selected:
            importlib.import_module(_module(name)).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if selected is None:
        parser.print_help()
        return 0 if not argv else 2
    module = importlib.import_module(_module(selected))
    if not getattr(args, "no_progress", False):
        return int(module.run(args) or 0)
    from molora.training.quiet import transformers_progress

    with transformers_progress(False):  # --no-progress: no "Loading weights" / "Writing shards" bars either
        return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
