"""Static gates for merges: resolving given weights, measuring them, saving and loading them.

``Gates`` is ``{layer_name: (N,) float32 tensor}``; by-task gates are ``{task: Gates}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from molora.atomic import atomic_write_text

Gates = dict[str, torch.Tensor]  # {layer_name: (N,) float32}

def _molora_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = model.molora_layers()
    if not layers:
        raise ValueError("the model has no MoLoRA layers to export")
    return dict(layers)


def _is_by_task(weights: Any) -> bool:
    return isinstance(weights, Mapping) and bool(weights) and all(
        isinstance(v, Mapping) for v in weights.values()
    )


def _task_names(model: nn.Module) -> list[str] | None:
    names = getattr(getattr(model, "molora_config", None), "task_names", None)
    return list(names) if names else None


def _task_index(model: nn.Module, task: int | str) -> int:
    """A task given by id or by name (``config.task_names``) -> its id."""
    if isinstance(task, bool):
        raise ValueError(f"`task` must be an int id or a task name, got {task!r}")
    if isinstance(task, int):
        return task
    names = _task_names(model)
    if names and task in names:
        return names.index(task)
    if isinstance(task, str) and task.lstrip("-").isdigit():
        return int(task)
    raise ValueError(f"`task` {task!r} is neither an int id nor one of the task names {names}")


def resolve_weights(
    model: nn.Module,
    weights: str | torch.Tensor | Mapping | None = None,
    task: int | str | None = None,
) -> Gates:
    """Static gates (N,) for every MoLoRA layer of ``model`` (DESIGN §6).

    Args:
        model: a MoLoRAModel.
        weights: ``None`` or ``"uniform"`` (1/N each, unless ``task`` is given), one (N,)
            tensor for every layer, ``{layer_name: (N,)}`` covering every layer, or the
            by-task output of ``measure_gates(..., by_task=True)`` (needs ``task``).
        task: a task id or name. With ``weights=None`` the gates are the task router's
            ``task_weights(task)`` (exact); with by-task measured gates, that task's entry.

    Returns:
        ``{layer_name: (N,) float32 CPU tensor}``.

    Raises:
        ValueError: shapes, layer names or tasks that do not fit the model.
    """
    layers = _molora_layers(model)
    if _is_by_task(weights):
        return resolve_weights(model, _pick_task_gates(model, weights, task), None)
    if task is not None:
        if weights is not None:
            raise ValueError(
                "pass either `task` (the task router's gates) or `weights`, not both, unless "
                "`weights` is per-task measured gates"
            )
        return _task_router_gates(layers, task, _task_index(model, task))
    if weights is None or (isinstance(weights, str) and weights == "uniform"):
        return {n: torch.full((l.num_experts,), 1.0 / l.num_experts) for n, l in layers.items()}
    return _given_gates(layers, weights)


def _pick_task_gates(model: nn.Module, weights: Mapping, task: int | str | None) -> Any:
    """The entry of per-task measured gates ``{task: {layer: (N,)}}`` for ``task`` (id or name)."""
    if task is None:
        raise ValueError(
            "`weights` holds per-task gates ({task: {layer: (N,)}}); pass `task` to pick one, "
            f"available: {sorted(map(str, weights))}"
        )
    if task in weights:
        return weights[task]
    tid = _task_index(model, task)
    key = tid if tid in weights else str(tid)
    if key not in weights:
        raise ValueError(f"`task` {task!r} has no measured gates; available: {sorted(map(str, weights))}")
    return weights[key]


def _task_router_gates(layers: Mapping[str, nn.Module], task: int | str, tid: int) -> Gates:
    """Each layer's task-router gates for task id ``tid`` (exact: they do not depend on the token)."""
    out = {}
    for name, layer in layers.items():
        if not hasattr(layer.router, "task_weights"):
            raise ValueError(
                f"`task={task!r}` needs the task router (config.router='task'); layer {name} "
                f"has {type(layer.router).__name__}. Measure gates per task with "
                "measure_gates(model, batches, by_task=True) and pass them as `weights`."
            )
        out[name] = layer.router.task_weights(tid).detach().float().cpu()
    return out


def _given_gates(layers: Mapping[str, nn.Module], weights: Any) -> Gates:
    """User-given gates: one (N,) tensor for every layer, or ``{layer_name: (N,)}`` for all of them."""
    if isinstance(weights, str):
        raise ValueError(f"`weights` string must be 'uniform', got {weights!r}")
    if isinstance(weights, torch.Tensor):
        per_layer = {n: weights for n in layers}
    elif isinstance(weights, Mapping):
        missing = sorted(set(layers) - set(weights))
        unknown = sorted(set(weights) - set(layers))
        if missing or unknown:
            raise ValueError(
                f"`weights` mapping must have exactly the model's MoLoRA layers; missing "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unknown "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        per_layer = dict(weights)
    else:
        raise ValueError(
            "`weights` must be None, 'uniform', a (N,) tensor or a {layer_name: (N,)} mapping, "
            f"got {type(weights).__name__}"
        )
    out = {}
    for name, layer in layers.items():
        w = torch.as_tensor(per_layer[name]).detach().float().cpu()
        if w.shape != (layer.num_experts,):
            raise ValueError(
                f"`weights` for layer {name} must have shape (N,) = ({layer.num_experts},), got {tuple(w.shape)}"
            )
        out[name] = w
    return out


@torch.no_grad()
def measure_gates(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], by_task: bool = False
) -> Gates | dict[int, Gates]:
    """Mean router weights per layer over the non-padding tokens of ``batches``.

    Each batch is passed as ``model(**batch)`` in eval mode (the train/eval mode is restored
    afterwards). A token counts where ``attention_mask == 1``; a layer that sees another
    number of tokens than batch x seq (e.g. a decoder of an encoder-decoder) averages all its
    tokens.

    Args:
        model: a MoLoRAModel.
        batches: iterable of model input dicts (``input_ids``, ``attention_mask``, and
            ``task_ids`` (batch,) when ``by_task`` or for the task router).
        by_task: group the means by the sequence's task id.

    Returns:
        ``{layer_name: (N,) float32}``, or ``{task_id: {layer_name: (N,)}}`` with
        ``by_task=True`` (only tasks that occur).

    Raises:
        ValueError: ``by_task`` without ``task_ids`` in a batch, or no tokens at all.
    """
    layers = _molora_layers(model)
    sums: dict[Any, dict[str, torch.Tensor]] = {}  # {task or None: {layer: (N,) sum of gates}}
    counts: dict[Any, dict[str, float]] = {}  # {task or None: {layer: number of real tokens}}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
            if by_task and batch.get("task_ids") is None:
                raise ValueError("`by_task=True` needs `task_ids` (batch,) in every batch")
            for name, layer in layers.items():
                if layer.last_routing is None:
                    raise RuntimeError(f"layer {name} recorded no routing in the forward pass")
                gates = layer.last_routing.weights.detach().double().cpu()  # (T, N)
                for key, m in _token_groups(name, gates.shape[0], batch, by_task):
                    acc, cnt = sums.setdefault(key, {}), counts.setdefault(key, {})
                    acc[name] = acc.get(name, 0) + m @ gates  # (N,)
                    cnt[name] = cnt.get(name, 0.0) + float(m.sum())
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError("`batches` was empty: no gates measured")
    result = {}
    for key, acc in sums.items():
        if any(counts[key][n] == 0 for n in acc):
            raise ValueError(f"no non-padding tokens for task {key}" if by_task else "no non-padding tokens")
        result[key] = {n: (acc[n] / counts[key][n]).float() for n in layers}
    return result if by_task else result[None]


def _token_groups(name: str, num_tokens: int, batch: Mapping[str, torch.Tensor], by_task: bool) -> list:
    """[(task id or None, (T,) float64 weight of each token)]: the real tokens, split by task."""
    mask = batch.get("attention_mask")
    tok_mask = torch.ones(num_tokens, dtype=torch.float64)  # (T,)
    if mask is not None and mask.numel() == num_tokens:
        tok_mask = mask.reshape(-1).double().cpu()
    if not by_task:
        return [(None, tok_mask)]
    ids = batch["task_ids"].reshape(-1).cpu()  # (batch,)
    if num_tokens % ids.numel():
        raise ValueError(f"layer {name}: {num_tokens} tokens do not split over {ids.numel()} sequences")
    tok_task = ids.repeat_interleave(num_tokens // ids.numel())  # (T,)
    return [(int(t), tok_mask * (tok_task == t)) for t in tok_task.unique().tolist()]


def save_gates(gates: Gates | Mapping[Any, Gates], path: str | os.PathLike) -> None:
    """Write gates (plain or by task) as JSON lists, atomically."""
    def to_json(g: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
        return {n: torch.as_tensor(w).float().tolist() for n, w in g.items()}

    data = {str(t): to_json(g) for t, g in gates.items()} if _is_by_task(gates) else to_json(gates)
    atomic_write_text(Path(path), json.dumps({"molora_gates": data}, indent=1))


def load_gates(path: str | os.PathLike) -> Gates | dict[int | str, Gates]:
    """Read gates written by :func:`save_gates` (JSON), or a safetensors file of (N,) tensors.

    JSON may be ``{layer: [w...]}``, ``{task: {layer: [w...]}}``, either under the key
    ``"molora_gates"``, and a layer's entry may also be ``{"gates": [w...], ...}`` (the form
    of ``routing_stats()`` and of the training loop's eval ``routing``); digit task keys
    become ints. Safetensors keys are layer names, or
    ``"<task>/<layer>"`` for by-task gates.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        flat = load_file(str(path))
        if all("/" in k for k in flat):
            out: dict = {}
            for key, w in flat.items():
                task, layer = key.split("/", 1)
                out.setdefault(int(task) if task.isdigit() else task, {})[layer] = w.float()
            return out
        return {k: w.float() for k, w in flat.items()}
    return gates_from_json(json.loads(path.read_text()))


def _is_stats(g: Any) -> bool:
    return isinstance(g, Mapping) and bool(g) and all(
        isinstance(v, Mapping) and isinstance(v.get("gates"), list) for v in g.values()
    )


def gates_from_json(data: Mapping[str, Any]) -> Gates | dict[int | str, Gates]:
    """Gates from parsed JSON in any form :func:`load_gates` reads (see there)."""
    data = data.get("molora_gates", data)

    def layer_gates(g: Mapping[str, Any]) -> Gates:
        if _is_stats(g):  # routing_stats() / train metrics: {layer: {"gates": [...], "load": ...}}
            g = {n: v["gates"] for n, v in g.items()}
        return {n: torch.tensor(w, dtype=torch.float32) for n, w in g.items()}

    if _is_by_task(data) and not _is_stats(data):
        return {(int(t) if str(t).isdigit() else t): layer_gates(g) for t, g in data.items()}
    return layer_gates(data)
