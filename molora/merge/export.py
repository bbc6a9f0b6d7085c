"""Weighted static merges of MoLoRA experts: PEFT LoRA adapters, or folded into the base.

With static gates w (N,) per layer the MoLoRA update is one matrix (DESIGN §6):

    dW = s * sum_i w_i B_i A_i        (out x in)

Two factorizations of dW are written as a plain PEFT LoRA adapter:

- ``"cat"``: exact. lora_A = the stacked A_i of the experts with w_i != 0, lora_B = the
  concatenated s * w_i * B_i, rank r' = r * #{i : w_i != 0}. Never forms out x in.
- ``"svd"``: the best rank-k approximation of dW (Eckart-Young), computed from the factors:
  QR of the stacked factors, SVD of the small (r' x r') core. Never forms out x in either.
  The relative Frobenius error per layer is returned and saved in ``merge_report.json``.

Usage::

    gates = molora.measure_gates(model, eval_batches)                 # {layer: (N,)}
    model.export_merged_adapter("out/merged", weights=gates)          # exact ("cat")
    model.export_merged_adapter("out/r16", weights=gates, method="svd", rank=16)
    model.export_merged_adapter("out/tasks", task="all")             # task router: one per task
    peft_model = peft.PeftModel.from_pretrained(base, "out/merged")

Format decisions (documented here because PEFT readers depend on them):

- molora's scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA) and the gates are folded
  into lora_B, and the adapter is written with ``lora_alpha = rank`` and ``use_rslora: false``
  so that PEFT's own scaling is exactly 1. Scaling is never applied twice.
- Ranks that differ between layers (experts with zero weight are dropped per layer by
  "cat") go through PEFT's ``rank_pattern`` / ``alpha_pattern`` keyed by the escaped full
  module name; the most common rank is the config's ``r``. No zero padding for "cat".
  "svd" writes exactly ``rank`` on every layer (zero-padded where dW has a lower rank), so
  the adapter has one uniform rank, as serving stacks (vLLM ``max_lora_rank``) expect.
- A layer whose weights are all 0 (dW = 0, "cat" rank 0) is left out of the adapter: a
  missing LoRA is the same zero update and PEFT cannot hold rank 0.
- ``target_modules`` lists leaf names (``["q_proj", "v_proj"]``) when they select exactly the
  exported modules in the base model, else the full module names.
- The parameters of the MoLoRA model's ``modules_to_save`` (e.g. a classification head,
  trained in place) are written under PEFT's keys ``base_model.model.<module>.<param>``
  with ``modules_to_save`` set in the config.
- ``fan_in_fan_out`` is true when a merged layer wraps transformers' Conv1D (GPT-2); LoRA
  factor shapes are (r, in) and (out, r) either way.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from molora.atomic import atomic_directory
from molora.core.config import task_folder_name
from molora.io import base_model_name
from molora.merge.factors import (
    METHODS,
    MergedFactors,
    cat_factors,
    dense_delta,
    merge_factors,
    svd_factors,
)
from molora.merge.gates import (
    Gates,
    _is_by_task,
    _molora_layers,
    _task_names,
    gates_from_json,
    load_gates,
    measure_gates,
    resolve_weights,
    save_gates,
)
from molora.merge.quantized import dequantize_for_merge

__all__ = [
    "MergedFactors",
    "cat_factors",
    "dense_delta",
    "export_merged_adapter",
    "gates_from_json",
    "load_gates",
    "measure_gates",
    "merge_and_unload",
    "merge_factors",
    "peft_adapter_config",
    "resolve_weights",
    "save_gates",
    "svd_factors",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_REPORT = "merge_report.json"


# --------------------------------------------------------------------------- adapter format


def _atomic_dir(path: Path):
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


def _peft_target_modules(base: nn.Module, names: list[str]) -> list[str]:
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
        "target_modules": _peft_target_modules(base, sorted(ranks)),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _export_one(
    model: nn.Module,
    path: Path,
    gates: Gates,
    *,
    method: str,
    rank: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Compute the factors of every layer and write one adapter folder's files into ``path``."""
    from tqdm.auto import tqdm

    layers = _molora_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    report_layers: dict[str, dict[str, Any]] = {}
    fan_in_fan_out = False
    for name, layer in tqdm(layers.items(), desc=desc, disable=not progress, unit="layer"):
        w = gates[name]  # (N,)
        with torch.no_grad():
            f = merge_factors(layer.lora_A.detach(), layer.lora_B.detach(), w, float(layer.scaling),
                              method=method, rank=rank)
        report_layers[name] = {
            "rank": f.lora_A.shape[0],
            "rel_error": f.rel_error,
            "weights": w.tolist(),
        }
        if f.lora_A.shape[0] == 0:
            continue  # all weights 0: dW = 0, and leaving the module out is the same update
        dtype = layer.lora_A.dtype
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = f.lora_A.to(dtype).cpu().contiguous()  # (k, in)
        tensors[f"{prefix}.lora_B.weight"] = f.lora_B.to(dtype).cpu().contiguous()  # (out, k)
        ranks[name] = f.lora_A.shape[0]
        fan_in_fan_out |= bool(getattr(layer, "fan_in_fan_out", False))
    if not ranks:
        raise ValueError("every layer's weights are all zero: the merged update is zero, nothing to export")
    base = model.base_model
    to_save = list(getattr(model, "modules_to_save", None) or [])
    for name in to_save:  # trained in place in the base model; PEFT keys them without a suffix
        for pname, param in base.get_submodule(name).named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = param.detach().cpu().contiguous()
    config = peft_adapter_config(base, ranks, fan_in_fan_out=fan_in_fan_out, modules_to_save=to_save)
    report = {"method": method, "rank": rank, "layers": report_layers}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    (path / MERGE_REPORT).write_text(json.dumps(report, indent=2))
    return report


def _folder_name(model: nn.Module, tid: Any) -> str:
    """The task's name (``config.task_names``, or a by-task gates key that is a name), else task_<id>."""
    names = _task_names(model)
    name = names[tid] if names and isinstance(tid, int) and 0 <= tid < len(names) else tid
    safe = task_folder_name(name) if isinstance(name, str) else ""
    return safe or f"task_{tid}"


def _all_tasks(model: nn.Module, weights: Any) -> list[Any]:
    if _is_by_task(weights):
        return sorted(weights, key=str)
    if weights is not None:
        raise ValueError("`task='all'` takes `weights=None` (task router) or per-task measured gates")
    layers = _molora_layers(model)
    router = next(iter(layers.values())).router
    if not hasattr(router, "num_tasks"):
        raise ValueError(
            f"`task='all'` needs the task router or per-task measured gates; the model has "
            f"{type(router).__name__}. Use measure_gates(model, batches, by_task=True)."
        )
    return list(range(router.num_tasks))


def export_merged_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights: str | torch.Tensor | Mapping | None = None,
    task: int | str | None = None,
    method: str = "cat",
    rank: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the static merge s * sum_i w_i B_i A_i of every layer as a PEFT LoRA adapter.

    The folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_{A,B}.weight``) and ``merge_report.json`` (per-layer
    rank, relative Frobenius error and weights). ``peft.PeftModel.from_pretrained(base, path)``
    loads it. The folder is written atomically.

    Args:
        model: a MoLoRAModel.
        path: output folder. With ``task="all"``, one sub-folder per task (the task's name
            from ``config.task_names`` when set, else ``task_<id>``) and a combined report.
        weights: see :func:`resolve_weights`.
        task: a task id or name, ``"all"``, or ``None``.
        method: ``"cat"`` (exact) or ``"svd"`` (best rank-``rank`` approximation).
        rank: target rank for ``"svd"``; default the model's expert rank r.
        progress: show a tqdm bar over layers.

    Returns:
        The report: ``{"method", "rank", "layers": {name: {"rank", "rel_error", "weights"}}}``;
        with ``task="all"``, ``{folder_name: report}``.

    Raises:
        ValueError: bad ``method``/``rank``/``weights``/``task``, or an all-zero merge.
        FileExistsError: ``path`` is a non-empty folder that is not a previous export.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")
    if method == "cat" and rank is not None:
        raise ValueError(f"`rank` applies to method='svd' only (cat is exact), got rank={rank}")
    path = Path(path)
    if task == "all":
        tasks = _all_tasks(model, weights)
        with _atomic_dir(path) as tmp:
            reports = {}
            for tid in tasks:
                folder = _folder_name(model, tid)
                gates = resolve_weights(model, weights, tid)
                (tmp / folder).mkdir()
                reports[folder] = _export_one(
                    model, tmp / folder, gates, method=method, rank=rank, progress=progress, desc=folder
                )
                reports[folder]["task"] = tid
            (tmp / MERGE_REPORT).write_text(json.dumps(reports, indent=2))
        return reports
    gates = resolve_weights(model, weights, task)
    with _atomic_dir(path) as tmp:
        report = _export_one(model, tmp, gates, method=method, rank=rank, progress=progress, desc="export")
        report["task"] = task
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def merge_and_unload(
    model: nn.Module,
    *,
    weights: str | torch.Tensor | Mapping | None = None,
    task: int | str | None = None,
    progress: bool = False,
) -> nn.Module:
    """Fold dW = s * sum_i w_i B_i A_i into every base weight and return the plain base model.

    The MoLoRA modules are removed (``model.unload()``); the returned model is the original
    transformers model with merged weights. ``model`` must not be used afterwards. A
    bitsandbytes 4-bit / 8-bit (QLoRA) base is dequantized first and comes back unquantized,
    in its ``model.dtype``, with a warning (:mod:`molora.merge.quantized`).

    Args:
        model: a MoLoRAModel.
        weights: see :func:`resolve_weights`.
        task: see :func:`resolve_weights`.
        progress: show a tqdm bar over layers.

    Returns:
        The base transformers model.
    """
    from tqdm.auto import tqdm

    if task == "all":
        raise ValueError("`task='all'` is for export_merged_adapter; merge_and_unload takes one task")
    gates = resolve_weights(model, weights, task)
    layers = _molora_layers(model)
    dequantize_for_merge(model.get_base_model(), {name: layer.base_layer for name, layer in layers.items()})
    for name, layer in tqdm(layers.items(), desc="merge", disable=not progress, unit="layer"):
        f = cat_factors(layer.lora_A.detach(), layer.lora_B.detach(), gates[name], float(layer.scaling))
        delta = f.lora_B @ f.lora_A  # (out, in)
        weight = layer.base_layer.weight  # (out, in), or (in, out) for Conv1D
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T  # (in, out)
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model.unload()
