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
- ``target="vllm"`` (:mod:`molora.merge.vllm`): one rank from vLLM's set on every module
  (the factors zero-padded up), so no ``rank_pattern``; no ``modules_to_save`` (an error
  names them); the written folder is checked with vLLM's rules before it replaces anything,
  and the report names the ``--max-lora-rank`` to serve it with (``"max_lora_rank"``,
  ``"serve"``).
- ``rank="auto"`` (:mod:`molora.merge.rank`): the smallest rank whose relative Frobenius
  error is <= ``tolerance`` on every layer, "cat" when that is exact and not larger; the
  rank-versus-error table is in the report (``"auto"``).
- ``eval_batches`` (:mod:`molora.merge.fidelity`): the routed model against the exported
  adapter, saved under ``"fidelity"`` (per task where the batches carry task ids).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from molora.core.config import task_folder_name
from molora.merge.factors import (
    MergedFactors,
    cat_factors,
    dense_delta,
    merge_factors,
    merge_layer,
    pad_factors,
    svd_factors,
)
from molora.merge.distill import DistillConfig, distilled_layer_factors
from molora.merge.export_checks import (
    _check_finite,
    _check_method_and_rank,
    _check_target,
    _expert_rank,
    _fidelity_task,
)
from molora.merge.fidelity import measure_fidelity
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
from molora.merge.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_REPORT,
    export_directory,
    peft_adapter_config,
)
from molora.merge.quantized import base_quantization, dequantize_for_merge, merge_note
from molora.merge.rank import choose_rank
from molora.merge.vllm import check_vllm_config, serve_command, vllm_rank

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


def _layer_factors(
    layers: Mapping[str, nn.Module],
    gates: Gates,
    *,
    method: str,
    rank: int | None,
    progress: bool,
    desc: str,
    task: int | None = None,
) -> dict[str, MergedFactors]:
    """{layer: its merged factors} (float32), computed layer by layer (PiSSA's residual of ``task``)."""
    from tqdm.auto import tqdm

    out = {}
    for name, layer in tqdm(layers.items(), desc=desc, disable=not progress, unit="layer"):
        with torch.no_grad():
            out[name] = merge_layer(layer, gates[name], method=method, rank=rank, task=task)  # shared experts included
    return out


def _compute_factors(
    model: nn.Module, layers: Mapping[str, nn.Module], gates: Gates, opts: dict[str, Any], tid: int | None, folder
) -> tuple:
    """``(method, rank, auto, factors, static, distill_report)`` of one export: the static merge
    (``cat``/``svd``, ``rank="auto"`` resolved), or the distilled LoRA with its SVD start."""
    desc = folder or "export"
    method, rank, target, auto = opts["method"], opts["rank"], opts["target"], None
    if method == "distill":
        rank = rank or _expert_rank(layers)
        rank = vllm_rank(rank) if target == "vllm" else rank  # distill at the served rank: no dead padding
        factors, static, distill_report = distilled_layer_factors(
            model, layers, gates, rank=rank, batches=opts["distill_batches"], task=tid,
            config=opts["distill_config"], progress=opts["progress"], desc=f"distill {desc}",
        )  # fmt: skip
        return method, rank, auto, factors, static, distill_report
    if rank == "auto":
        method, rank, auto = choose_rank(layers, gates, tolerance=opts["tolerance"], target=target, task=tid)
    factors = _layer_factors(layers, gates, method=method, rank=rank, progress=opts["progress"], desc=desc, task=tid)
    return method, rank, auto, factors, None, None


def _export_one(
    model: nn.Module, path: Path, gates: Gates, opts: dict[str, Any], *, task: Any, folder: str | None = None
) -> dict:
    """Compute the factors of every layer and write one adapter folder's files into ``path``.

    ``opts``: method, rank, tolerance, target, eval_batches, progress (as export_merged_adapter)
    and the final ``path`` of the export (``path`` here is its temporary folder); ``folder``:
    the task's sub-folder with ``task="all"``.
    """
    layers = _molora_layers(model)
    target, tid = opts["target"], _fidelity_task(model, task)  # PiSSA's residual of a task router is this task's
    method, rank, auto, factors, static, distill_report = _compute_factors(model, layers, gates, opts, tid, folder)
    serve_rank = None
    if target == "vllm":  # one rank from vLLM's set on every module: zero-pad up
        serve_rank = vllm_rank(max(1, max(f.lora_A.shape[0] for f in factors.values())))
        factors = {n: pad_factors(f, serve_rank) if f.lora_A.shape[0] else f for n, f in factors.items()}
    report_layers = {
        name: {"rank": f.lora_A.shape[0], "rel_error": f.rel_error, "weights": gates[name].tolist()}
        for name, f in factors.items()
    }
    dora = {n for n, layer in layers.items() if getattr(layer, "use_dora", False)}
    kept = {n: f for n, f in factors.items() if f.lora_A.shape[0] or n in dora}  # dW = 0: left out (not DoRA)
    if not kept:
        raise ValueError("every layer's weights are all zero: the merged update is zero, nothing to export")
    tensors: dict[str, torch.Tensor] = {}
    written: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, f in kept.items():
        dtype, prefix = layers[name].lora_A.dtype, f"base_model.model.{name}"
        written[name] = (f.lora_A.to(dtype).cpu().contiguous(), f.lora_B.to(dtype).cpu().contiguous())
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = written[name]  # (k, in), (out, k)
        if name in dora:  # PEFT's key for DoRA's magnitude (out,)
            magnitude = layers[name].lora_magnitude.detach().to(dtype).cpu().contiguous()
            tensors[f"{prefix}.lora_magnitude_vector"] = magnitude
            written[name] = (*written[name], magnitude)
    base = model.base_model
    to_save = list(getattr(model, "modules_to_save", None) or [])
    for name in to_save:  # trained in place in the base model; PEFT keys them without a suffix
        for pname, param in base.get_submodule(name).named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = param.detach().cpu().contiguous()
    fan_in_fan_out = any(bool(getattr(layers[n], "fan_in_fan_out", False)) for n in kept)
    config = peft_adapter_config(
        base, {n: f.lora_A.shape[0] for n, f in kept.items()}, fan_in_fan_out=fan_in_fan_out, modules_to_save=to_save
    )
    config["use_dora"] = bool(dora)
    report: dict[str, Any] = {"method": method, "rank": rank, "target": target, "layers": report_layers}
    if kind := base_quantization({n: layer.base_layer for n, layer in layers.items()}):
        report["quantized_base"] = {"kind": kind, "merge": merge_note(kind)}
    if auto is not None:
        report["auto"] = auto
    if target == "vllm":
        problems = check_vllm_config(config, {k: list(v.shape) for k, v in tensors.items()}, base_model=base)
        if problems:
            raise ValueError("the vLLM export breaks vLLM's rules:\n  - " + "\n  - ".join(problems))
        report["max_lora_rank"] = serve_rank
        report["base_model"] = config.get("base_model_name_or_path")
        report["serve"] = serve_command(
            {folder or opts["path"].name: opts["path"] / folder if folder else opts["path"]},
            serve_rank,
            report["base_model"],
        )
    if distill_report is not None:
        report["distill"] = distill_report
    if opts["eval_batches"] is not None:
        report["fidelity"] = measure_fidelity(
            model, written, opts["eval_batches"], task=tid, task_names=_task_names(model)
        )
        if static is not None:  # the SVD static merge at the same rank, for comparison
            start = {n: (f.lora_A, f.lora_B) for n, f in static.items() if f.lora_A.shape[0]}
            report["fidelity_static"] = measure_fidelity(
                model, start, opts["eval_batches"], task=tid, task_names=_task_names(model)
            )
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
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


def _export_all_tasks(model: nn.Module, path: Path, weights: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """One adapter folder per task under ``path`` and the combined report (``task="all"``)."""
    tasks = _all_tasks(model, weights)
    folders = {tid: _folder_name(model, tid) for tid in tasks}
    with export_directory(path, folders=folders.values()) as tmp:
        reports = {}
        for tid in tasks:
            folder = folders[tid]
            (tmp / folder).mkdir()
            gates = resolve_weights(model, weights, tid)
            reports[folder] = {**_export_one(model, tmp / folder, gates, opts, task=tid, folder=folder), "task": tid}
            (tmp / folder / MERGE_REPORT).write_text(json.dumps(reports[folder], indent=2))
        (tmp / MERGE_REPORT).write_text(json.dumps(reports, indent=2))
    return reports


def export_merged_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights: str | torch.Tensor | Mapping | None = None,
    task: int | str | None = None,
    method: str = "cat",
    rank: int | str | None = None,
    tolerance: float = 1e-3,
    target: str = "peft",
    eval_batches: Iterable[Mapping[str, Any]] | None = None,
    progress: bool = False,
    distill_batches: Iterable[Mapping[str, Any]] | None = None,
    distill_config: DistillConfig | None = None,
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
        method: ``"cat"`` (exact), ``"svd"`` (best rank-``rank`` approximation of the static
            merge) or ``"distill"``: a rank-``rank`` LoRA trained, from that SVD, to match the
            routed model's outputs on ``distill_batches`` (:mod:`molora.merge.distill`).
        rank: target rank for ``"svd"`` (default the model's expert rank r), or ``"auto"``:
            the smallest rank within ``tolerance`` (see :mod:`molora.merge.rank`).
        tolerance: with ``rank="auto"``, the largest relative Frobenius error allowed on any layer.
        target: ``"peft"``, or ``"vllm"``: what vLLM's LoRA loader serves (one rank from
            {1, 8, 16, 32, 64, 128, 256, 320, 512} on every module, no modules_to_save).
        eval_batches: model input dicts (a list: it is read once per exported task) on which
            the routed model is compared with the exported adapter (report ``"fidelity"``).
        progress: show a tqdm bar over layers (over steps for ``"distill"``).
        distill_batches: ``method="distill"`` only: the model input dicts (training data, not
            ``eval_batches``) that the student is trained on; the last tenth is held out for
            early stopping.
        distill_config: ``method="distill"`` only: steps, lr, patience... (defaults when None).

    Returns:
        The report: ``{"method", "rank", "target", "layers": {name: {"rank", "rel_error",
        "weights"}}, "task"}``, plus ``"auto"``, ``"max_lora_rank"`` and ``"serve"``
        (vLLM), ``"fidelity"``, and ``"quantized_base"`` (a 4-bit / 8-bit base: ``{"kind",
        "merge"}``, how to merge the adapter into weights correctly) where they apply;
        ``"distill"`` (its steps and held-out KL) and ``"fidelity_static"`` (the SVD static merge
        at the same rank) for ``"distill"``; with ``task="all"``, ``{folder_name: report}``.

    Raises:
        ValueError: bad ``method``/``rank``/``weights``/``task``/``target``, an all-zero merge,
            ``target="vllm"`` with modules_to_save, or NaN/inf adapter weights (naming the layer).
        FileExistsError: ``path`` is a non-empty folder that is not a previous export.
    """
    _check_method_and_rank(model, method, rank, distill_batches)
    _check_target(model, target)
    _check_finite(model)
    batches = list(eval_batches) if eval_batches is not None else None
    path = Path(path)
    opts = {
        "method": method,
        "rank": rank,
        "tolerance": tolerance,
        "target": target,
        "eval_batches": batches,
        "progress": progress,
        "path": path,
        "distill_batches": list(distill_batches) if distill_batches is not None else None,
        "distill_config": distill_config,
    }
    if task == "all":
        return _export_all_tasks(model, path, weights, opts)
    gates = resolve_weights(model, weights, task)
    with export_directory(path) as tmp:
        report = {**_export_one(model, tmp, gates, opts, task=task), "task": task}
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

    With DoRA each row becomes m * (W0 + dW) / ||W0 + dW||; with PiSSA init the frozen residual
    (of ``task`` for the task router) is part of dW, so the result is relative to the original W0.

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
    _check_finite(model)
    gates = resolve_weights(model, weights, task)
    tid = _fidelity_task(model, task)
    layers = _molora_layers(model)
    dequantize_for_merge(model.get_base_model(), {name: layer.base_layer for name, layer in layers.items()})
    for name, layer in tqdm(layers.items(), desc="merge", disable=not progress, unit="layer"):
        f = merge_layer(layer, gates[name], task=tid)  # exact ("cat"), shared experts and PiSSA's residual included
        weight = layer.base_layer.weight  # (out, in), or (in, out) for Conv1D
        delta = f.lora_B @ f.lora_A  # (out, in)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T  # (in, out)
        merged = weight.detach().float() + delta.to(weight.device)
        if getattr(layer, "use_dora", False):  # DoRA: W = m * (W0 + dW) / ||W0 + dW|| per output row
            dim = 0 if getattr(layer, "fan_in_fan_out", False) else 1
            scale = layer.lora_magnitude.detach().float().to(weight.device) / torch.linalg.norm(merged, dim=dim)
            merged = merged * (scale[None] if dim == 0 else scale[:, None])
        weight.copy_(merged.to(weight.dtype))
    return model.unload()
