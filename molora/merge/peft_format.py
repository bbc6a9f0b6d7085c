"""The PEFT LoRA adapter folder an export writes: file names, ``adapter_config.json`` content,
and the atomic export folder (which keeps the user's own files and refuses foreign folders).

An export owns only what its previous run wrote, as that run's ``merge_report.json`` lists:
its three files and, for ``task="all"``, the task folders named in the report. Anything else in
the folder (a README, the user's own PEFT adapter folder) is kept, and a task whose folder name
is taken by such an entry is refused before anything is computed."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
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
    "previous_export_entries",
    "peft_target_modules",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_REPORT = "merge_report.json"


def export_directory(path: Path, *, folders: Iterable[str] = ()):
    """:func:`molora.atomic.atomic_directory` for an export: refuses a non-empty folder that is
    not a previous export, and task folders named like an entry the previous export did not
    write; checks the adapter files before publishing.

    Args:
        path: the export folder.
        folders: the task folders this export writes (``task="all"``); none: one adapter.

    Raises:
        FileExistsError: ``path`` is foreign, or a task folder would replace a user's entry.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / MERGE_REPORT).exists():
        raise FileExistsError(
            f"export path {path} is a non-empty folder that is not a previous molora export; "
            "choose an empty or new folder"
        )
    owned = previous_export_entries(path)
    folders = list(folders)
    for folder in folders:
        if folder in _FILES or ((path / folder).exists() and folder not in owned):
            raise FileExistsError(
                f"task folder {folder!r} would replace {str(path / folder)!r}, which this export does not own "
                "(not written by the previous export): rename the task (`task_names`), move that entry, "
                "or export to another folder; nothing was written"
            )
    files = [f"{f}/{n}" for f in folders for n in _FILES] if folders else [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    return atomic_directory(path, owned=lambda name: name in owned, expect=[*files, MERGE_REPORT])


_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_REPORT)


def previous_export_entries(path: Path) -> set[str]:
    """The names in ``path`` that the previous export wrote: its files, and the task folders its
    ``merge_report.json`` lists (``{folder: report}`` of a ``task="all"`` export)."""
    try:
        report = json.loads((Path(path) / MERGE_REPORT).read_text())
    except (OSError, ValueError):
        return set(_FILES)
    folders = set()
    if isinstance(report, dict) and "layers" not in report:
        folders = {k for k, v in report.items() if isinstance(v, dict) and "layers" in v and "/" not in k}
    return set(_FILES) | folders


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
