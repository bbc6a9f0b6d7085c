"""``molora check-vllm ADAPTER_DIR [--max-lora-rank R] [--base NAME_OR_PATH]``: would vLLM serve it?

Applies vLLM 0.34's LoRA loading rules (:func:`molora.merge.vllm.check_vllm_adapter`; the
module docstring of :mod:`molora.merge.vllm` lists them) to any PEFT adapter folder, molora's
exports or not: every module's rank (``r``, per-module ``rank_pattern``) within
``--max-lora-rank``, no ``modules_to_save`` but classification heads, no DoRA, no bias or
``lora_bias``, no PiSSA/OLoRA/CorDA/LoftQ init, no ``layer_replication``, no ``fan_in_fan_out``
(GPT-2's Conv1D), only lora_A/lora_B tensors of each module's rank. Whether vLLM supports LoRA
for the model's architecture is not checked; the output says so. With ``--base`` (or the ``base_model_name_or_path``
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
    from molora.merge.vllm import NOT_CHECKED, VLLM_VERSION, check_vllm_adapter, max_rank, serve_command, vllm_rank

    path = Path(args.adapter_dir)
    if not path.is_dir():
        print(f"molora check-vllm: error: ADAPTER_DIR {str(path)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        name, base = _base_model(args, path)
    except (OSError, ValueError) as e:
        print(f"molora check-vllm: error: cannot load the base model (--base): {e}", file=sys.stderr)
        return 2
    problems = check_vllm_adapter(path, max_lora_rank=args.max_lora_rank, base_model=base)
    rules = f"checked against vLLM {VLLM_VERSION}'s LoRA loading rules; not checked: {NOT_CHECKED}"
    if problems:
        print(f"{path}: vLLM would not serve this adapter as it is:")
        print("\n".join(f"  - {p}" for p in problems))
        print(f"({rules})")
        print("re-export it with `molora export ... --target vllm`")
        return 1
    config = json.loads((path / "adapter_config.json").read_text())
    r = max_rank(config)
    checked = f", modules checked against {name}" if base is not None else ""
    ranks = f"r={config['r']}" + (f", max rank {r} (rank_pattern)" if r != config["r"] else "")
    rank = args.max_lora_rank or vllm_rank(r)
    print(f"{path}: OK for vLLM ({ranks}{checked}); serve with --max-lora-rank {rank}:")
    print(f"  {serve_command(path, rank, name)}")
    print(f"({rules})")
    return 0
