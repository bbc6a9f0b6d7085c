"""The PEFT LoRA adapter folder an export writes: file names, ``adapter_config.json`` content,
and the atomic export folder (which keeps the user's own files and refuses foreign folders)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from molora.atomic import atomic_directory
from molora.io import base_model_name

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MERGE_REPORT",
    "export_directory",
    "peft_adapter_config",
    "peft_target_modules",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_REPORT = "merge_report.json"


def export_directory(path: Path):
    """:func:`molora.atomic.atomic_directory`, refusing to write into a folder that is not a
    previous export; in a previous export, files the export did not write are kept."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / MERGE_REPORT).exists():
        raise FileExistsError(
            f"export path {path} is a non-empty folder that is not a previous molora export; "
            "choose an empty or new folder"
        )
    return atomic_directory(path, owned=lambda name: _is_export_entry(path / name))


def _is_export_entry(entry: Path) -> bool:
    """An entry a previous export wrote (replaced by the new export); anything else is the user's."""
    if entry.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_REPORT):
        return True
    return entry.is_dir() and (entry / ADAPTER_CONFIG).is_file() and (entry / ADAPTER_WEIGHTS).is_file()


def _peft_task_type(base: nn.Module) -> str | None:
    cls = type(base).__name__
    return "CAUSAL_LM" if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel") else None


def peft_target_modules(base: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (e.g. ["q_proj", "v_proj"]) when they select exactly ``names``, else full names."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    selected = {n for n, _ in base.named_modules() if n and n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(names) else sorted(names)


def peft_adapter_config(
    base: nn.Module,
    ranks: Mapping[str, int],
    *,
    fan_in_fan_out: bool,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """PEFT ``adapter_config.json`` content for per-module ``ranks`` with PEFT scaling 1.

    The most common rank is ``r``; the others go to ``rank_pattern`` and ``alpha_pattern``
    keyed by the regex-escaped full module name (PEFT matches ``(.*\\.)?(key)$``).
    """
    common = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(n): k for n, k in sorted(ranks.items()) if k != common}
    return {
        "peft_type": "LORA",
        "task_type": _peft_task_type(base),
        "base_model_name_or_path": base_model_name(base),
        "r": common,
        "lora_alpha": common,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": peft_target_modules(base, sorted(ranks)),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
