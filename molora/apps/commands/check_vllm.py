"""``molora check-vllm ADAPTER_DIR [--max-lora-rank R] [--base NAME_OR_PATH]``: would vLLM serve it?

Applies vLLM's LoRA loading rules (:func:`molora.merge.vllm.check_vllm_adapter`) to any PEFT
adapter folder, molora's exports or not: one rank ``r`` (no rank/alpha patterns, which vLLM
ignores), ``r`` within ``--max-lora-rank``, no ``modules_to_save``, no DoRA, no bias, only
lora_A/lora_B tensors of the right rank. With ``--base`` (or the ``base_model_name_or_path``
the adapter records, when it is a local folder) the target modules and shapes are checked
against that model too. Exit status 0: servable as it is; 1: problems (listed); 2: usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check-vllm",
        help="check that vLLM's LoRA loader takes a PEFT adapter folder as it is",
        description="Check a PEFT LoRA adapter folder against vLLM's LoRA loading rules.",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with adapter_config.json")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank (default: any)")
    parser.add_argument("--base", default=None, help="the served model (name or local folder) to check modules against")
    return parser


def _base_model(args: argparse.Namespace, path: Path):
    from molora.apps.commands.export import load_base_model

    name = args.base
    if name is None:
        config = path / "adapter_config.json"
        recorded = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
        name = recorded if recorded and Path(recorded).is_dir() else None
    return (name, load_base_model(name)) if name else (None, None)


def run(args: argparse.Namespace) -> int:
    from molora.merge.vllm import VLLM_RANKS, check_vllm_adapter, serve_command

    path = Path(args.adapter_dir)
    if not path.is_dir():
        print(f"molora check-vllm: {str(path)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        name, base = _base_model(args, path)
    except (OSError, ValueError) as e:
        print(f"molora check-vllm: cannot load the base model: {e}", file=sys.stderr)
        return 2
    problems = check_vllm_adapter(path, max_lora_rank=args.max_lora_rank, base_model=base)
    if problems:
        print(f"{path}: vLLM would not serve this adapter as it is:")
        print("\n".join(f"  - {p}" for p in problems))
        print("re-export it with `molora export ... --target vllm`")
        return 1
    r = json.loads((path / "adapter_config.json").read_text())["r"]
    checked = f", modules checked against {name}" if base is not None else ""
    rank = next(k for k in VLLM_RANKS if k >= r)
    print(f"{path}: OK for vLLM (r={r}{checked}); serve with --max-lora-rank {rank}:")
    print(f"  {serve_command(path, rank, name)}")
    return 0
