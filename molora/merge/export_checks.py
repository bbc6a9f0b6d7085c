"""Argument checks of :func:`molora.merge.export.export_merged_adapter` and ``merge_and_unload``:
methods and ranks, the serving target, finite weights, the task whose rows and residual an export
uses. Each raises ``ValueError`` naming the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from molora.io import non_finite_layers
from molora.merge.factors import METHODS, exact_rank
from molora.merge.gates import _molora_layers, _task_index

EXPORT_METHODS = (*METHODS, "distill")
TARGETS = ("peft", "vllm")


def _check_finite(model: nn.Module) -> None:
    """Refuse a model with NaN or inf adapter weights (a diverged run): the merge would be NaN."""
    bad = non_finite_layers(model)
    if bad:
        raise ValueError(
            f"the MoLoRA model has NaN or inf weights in layer {bad[0]!r}"
            f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: nothing was exported; "
            "use an adapter from before the training diverged (an earlier checkpoint)"
        )


def _check_target(model: nn.Module, target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}")
    to_save = list(getattr(model, "modules_to_save", None) or [])
    if target == "vllm" and getattr(getattr(model, "molora_config", None), "use_dora", False):
        raise ValueError(
            "target='vllm': the model uses DoRA (use_dora=True), and vLLM does not serve DoRA adapters; "
            "export with target='peft' (PEFT loads DoRA), or merge it into the base with merge_and_unload(task=...)"
        )
    if target == "vllm" and to_save:
        raise ValueError(
            f"target='vllm': the model trains modules_to_save={to_save}, which vLLM's LoRA loader refuses "
            "(its adapters hold LoRA factors only); export with target='peft', or train without modules_to_save"
        )


def _fidelity_task(model: nn.Module, task: Any) -> int | None:
    """The task id whose rows a per-task export is measured on (None: all rows; a by-task
    gates key that names no task of the model cannot be matched to rows)."""
    if task is None:
        return None
    try:
        return _task_index(model, task)
    except ValueError:
        return None


def _expert_rank(layers: Mapping[str, nn.Module]) -> int:
    """The default export rank: the largest expert rank r of any layer."""
    return max(int(layer.r) for layer in layers.values())


def _check_svd_rank(model: nn.Module, rank: Any) -> None:
    """An SVD rank above every layer's exact rank would only add zero padding: refuse it."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        return
    layers = _molora_layers(model).values()
    exact = max(exact_rank(l) for l in layers)
    if rank > exact:
        raise ValueError(
            f"`rank`={rank} is above the largest exact rank of any layer ({exact} = min(num_experts * r, in, out), "
            "r for the experts with share_lora_A, plus M * r of M shared experts); "
            f"an SVD export above it only adds zero padding. Use rank <= {exact}, or method='cat' (exact)."
        )


def _check_method_and_rank(model: nn.Module, method: Any, rank: Any, distill_batches: Any) -> None:
    if method not in EXPORT_METHODS:
        raise ValueError(f"`method` must be one of {sorted(EXPORT_METHODS)}, got {method!r}")
    if method == "distill":  # a distilled LoRA may use a rank above the static merge's exact one
        if getattr(getattr(model, "molora_config", None), "use_dora", False):
            raise ValueError(
                "method='distill' writes a plain LoRA; this model uses DoRA with the task router, whose "
                "per-task exports are exact: use method='cat' with task=..."
            )
        _check_distill(rank, distill_batches)
        return
    if method == "cat" and rank is not None and rank != "auto":
        raise ValueError(f"`rank` applies to method='svd' only (cat is exact), got rank={rank}")
    if isinstance(rank, str) and rank != "auto":
        raise ValueError(f"`rank` must be an int, 'auto' or None, got {rank!r}")
    _check_svd_rank(model, rank)


def _check_distill(rank: Any, batches: Any) -> None:
    if rank == "auto":
        raise ValueError("`rank='auto'` picks a static merge within a tolerance; method='distill' takes an int rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"`rank` must be an int >= 1 for method='distill', got {rank!r}")
    if batches is None:
        raise ValueError(
            "method='distill' needs `distill_batches`: model input dicts (the training data) to match the routed "
            "model on; `molora export RUN --method distill` reads them from the run"
        )
