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

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from molora.io import base_model_name

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

METHODS = ("cat", "svd")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_REPORT = "merge_report.json"

Gates = dict[str, torch.Tensor]  # {layer_name: (N,) float32}


class MergedFactors(NamedTuple):
    """A low-rank factorization dW ~= lora_B @ lora_A of one layer's merged update.

    Attributes:
        lora_A: (rank, in) float32.
        lora_B: (out, rank) float32, with molora's scaling and the gates folded in.
        rel_error: ||dW - lora_B @ lora_A||_F / ||dW||_F (0.0 when dW = 0 or exact).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rel_error: float


# --------------------------------------------------------------------------- pure math


def _check_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor) -> None:
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"`lora_A` must be (N, r, in) and `lora_B` (N, out, r), got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    n, r, _ = lora_A.shape
    if lora_B.shape[0] != n or lora_B.shape[2] != r:
        raise ValueError(f"`lora_B` must be (N={n}, out, r={r}), got {tuple(lora_B.shape)}")
    if weights.shape != (n,):
        raise ValueError(f"`weights` must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"`weights` must be finite, got {weights.tolist()}")


def dense_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Reference dense update dW = s * sum_i w_i B_i A_i (forms out x in; tests and merging).

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s (already including rsLoRA).

    Returns:
        (out, in) float32 tensor.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    scaled_B = lora_B.float() * (scaling * w)[:, None, None]  # (N, out, r)
    return torch.einsum("nor,nri->oi", scaled_B, lora_A.float())  # (out, in)


def cat_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float
) -> MergedFactors:
    """Exact rank-(r * #nonzero) factors of dW: stacked A_i, concatenated s * w_i * B_i.

    Experts with w_i == 0 are dropped. All zero weights give rank-0 factors.

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.

    Returns:
        MergedFactors with lora_A (r', in), lora_B (out, r'), rel_error 0.0.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    keep = (w != 0).nonzero().flatten()  # (n',)
    n_keep, r, d_in = keep.numel(), lora_A.shape[1], lora_A.shape[2]
    d_out = lora_B.shape[1]
    cat_A = lora_A[keep].float().reshape(n_keep * r, d_in)  # (n' r, in), row j*r+k = A_j[k]
    scaled_B = lora_B[keep].float() * (scaling * w[keep])[:, None, None]  # (n', out, r)
    cat_B = scaled_B.permute(1, 0, 2).reshape(d_out, n_keep * r)  # (out, n' r), col j*r+k
    return MergedFactors(cat_A.contiguous(), cat_B.contiguous(), 0.0)


def svd_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, rank: int
) -> MergedFactors:
    """Best rank-``rank`` factors of dW (Eckart-Young), without forming out x in.

    With the exact factors dW = Bc Ac (Bc: (out, R), Ac: (R, in), R = r * #nonzero):
    Bc = Qb Rb and Ac^T = Qa Ra (reduced QR), so dW = Qb (Rb Ra^T) Qa^T and the SVD of the
    R x R core U S V^T gives dW = (Qb U) S (Qa V)^T. Keeping the ``rank`` largest singular
    values gives the optimal truncation; sqrt(S) is split between the two factors so that
    they have balanced norms. Computed in float64; returned in float32. Where R < ``rank``
    the factors are zero-padded (still exact), so the result always has rank ``rank`` rows.

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.
        rank: target rank k >= 1.

    Returns:
        MergedFactors with lora_A (k, in), lora_B (out, k) and the relative Frobenius error
        sqrt(sum_{j>k} S_j^2 / sum_j S_j^2).

    Raises:
        ValueError: ``rank`` is not a positive int.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1 for method='svd', got {rank!r}")
    exact = cat_factors(lora_A, lora_B, weights, scaling)
    cat_A, cat_B = exact.lora_A.double(), exact.lora_B.double()  # (R, in), (out, R)
    d_out, d_in, big_r = cat_B.shape[0], cat_A.shape[1], cat_A.shape[0]
    out_A = torch.zeros(rank, d_in, dtype=torch.float64, device=cat_A.device)  # (k, in)
    out_B = torch.zeros(d_out, rank, dtype=torch.float64, device=cat_A.device)  # (out, k)
    if big_r == 0:
        return MergedFactors(out_A.float(), out_B.float(), 0.0)
    q_b, r_b = torch.linalg.qr(cat_B)  # (out, R'), (R', R) with R' = min(out, R)
    q_a, r_a = torch.linalg.qr(cat_A.T)  # (in, R''), (R'', R)
    core = r_b @ r_a.T  # (R', R'')
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (R', m), (m,), (m, R'')
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()  # (keep,)
    out_B[:, :keep] = (q_b @ u[:, :keep]) * root  # (out, keep)
    out_A[:keep] = root[:, None] * (vh[:keep] @ q_a.T)  # (keep, in)
    total = float((s**2).sum())
    rel_error = 0.0 if total == 0.0 else float((s[keep:] ** 2).sum() / total) ** 0.5
    return MergedFactors(out_A.float(), out_B.float(), rel_error)


def merge_factors(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    *,
    method: str = "cat",
    rank: int | None = None,
) -> MergedFactors:
    """Dispatch to :func:`cat_factors` or :func:`svd_factors` by name.

    Raises:
        ValueError: unknown ``method``, or ``rank`` given with method "cat".
    """
    if method == "cat":
        if rank is not None:
            raise ValueError(f"`rank` applies to method='svd' only (cat is exact), got rank={rank}")
        return cat_factors(lora_A, lora_B, weights, scaling)
    if method == "svd":
        return svd_factors(lora_A, lora_B, weights, scaling, lora_A.shape[1] if rank is None else rank)
    raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")


# --------------------------------------------------------------------------- gates


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
        if task is None:
            raise ValueError(
                "`weights` holds per-task gates ({task: {layer: (N,)}}); pass `task` to pick one, "
                f"available: {sorted(map(str, weights))}"
            )
        if task in weights:
            key = task
        else:
            tid = _task_index(model, task)
            key = tid if tid in weights else str(tid)
        if key not in weights:
            raise ValueError(f"`task` {task!r} has no measured gates; available: {sorted(map(str, weights))}")
        return resolve_weights(model, weights[key], None)
    if task is not None:
        if weights is not None:
            raise ValueError(
                "pass either `task` (the task router's gates) or `weights`, not both, unless "
                "`weights` is per-task measured gates"
            )
        tid = _task_index(model, task)
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
    if weights is None or (isinstance(weights, str) and weights == "uniform"):
        return {n: torch.full((l.num_experts,), 1.0 / l.num_experts) for n, l in layers.items()}
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
    sums: dict[Any, dict[str, torch.Tensor]] = {}
    counts: dict[Any, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
            mask = batch.get("attention_mask")
            task_ids = batch.get("task_ids")
            if by_task and task_ids is None:
                raise ValueError("`by_task=True` needs `task_ids` (batch,) in every batch")
            for name, layer in layers.items():
                routing = layer.last_routing
                if routing is None:
                    raise RuntimeError(f"layer {name} recorded no routing in the forward pass")
                gates = routing.weights.detach().double().cpu()  # (T, N)
                n_tok = gates.shape[0]
                tok_mask = torch.ones(n_tok, dtype=torch.float64)  # (T,)
                if mask is not None and mask.numel() == n_tok:
                    tok_mask = mask.reshape(-1).double().cpu()
                if by_task:
                    ids = task_ids.reshape(-1).cpu()  # (batch,)
                    if n_tok % ids.numel():
                        raise ValueError(f"layer {name}: {n_tok} tokens do not split over {ids.numel()} sequences")
                    tok_task = ids.repeat_interleave(n_tok // ids.numel())  # (T,)
                    groups = [(int(t), tok_mask * (tok_task == t)) for t in tok_task.unique().tolist()]
                else:
                    groups = [(None, tok_mask)]
                for key, m in groups:
                    acc = sums.setdefault(key, {})
                    cnt = counts.setdefault(key, {})
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


def save_gates(gates: Gates | Mapping[Any, Gates], path: str | os.PathLike) -> None:
    """Write gates (plain or by task) as JSON lists, atomically."""
    def to_json(g: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
        return {n: torch.as_tensor(w).float().tolist() for n, w in g.items()}

    data = {str(t): to_json(g) for t, g in gates.items()} if _is_by_task(gates) else to_json(gates)
    _atomic_write_text(Path(path), json.dumps({"molora_gates": data}, indent=1))


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


# --------------------------------------------------------------------------- adapter format


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``path``; on success it replaces ``path``, else it is removed.

    An existing ``path`` is replaced only if empty or a previous export (has merge_report.json),
    so that an unrelated folder is never deleted.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"export path {path} exists and is not a directory")
        if any(path.iterdir()) and not (path / MERGE_REPORT).exists():
            raise FileExistsError(
                f"export path {path} is a non-empty folder that is not a previous molora export; "
                "choose an empty or new folder"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") if isinstance(name, str) else ""
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
    transformers model with merged weights. ``model`` must not be used afterwards.

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
    for name, layer in tqdm(_molora_layers(model).items(), desc="merge", disable=not progress, unit="layer"):
        f = cat_factors(layer.lora_A.detach(), layer.lora_B.detach(), gates[name], float(layer.scaling))
        delta = f.lora_B @ f.lora_A  # (out, in)
        weight = layer.base_layer.weight  # (out, in), or (in, out) for Conv1D
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T  # (in, out)
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model.unload()
