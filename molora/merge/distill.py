"""Distilled export: one plain LoRA per layer, trained so that base + LoRA behaves like the routed model.

A static merge (:mod:`molora.merge.factors`) replaces every token's gates by one fixed average,
so for token routers (soft, topk, topp) the best rank-k SVD of that average is not the best
rank-k LoRA for the model's *behaviour*. ``method="distill"`` trains that LoRA:

- **Start**: the SVD of the static merge at the requested rank (measured or given gates), so the
  student starts where ``method="svd"`` ends. Rows that the SVD leaves at zero (a merge whose
  exact rank is below the requested one, or vLLM's padding) get a small random A and a zero B,
  as a fresh LoRA does, so that they can learn; the start is still the SVD merge exactly.
- **Objective**: forward KL(p_routed || p_student) of the output distribution, per real token
  (attention_mask), averaged over tokens (per row for sequence classification). This is the
  quantity the fidelity report measures (``mean_kl``), it is invariant to the logits' shift,
  and it needs no choice of layer or weighting, unlike an MSE on hidden states. A model
  without logits (a bare encoder such as ``BertModel``, whose task heads live outside it) is
  matched on ``last_hidden_state`` instead: the mean squared error per real token, which is
  what any head on top of it reads.
- **Teacher and student share the model**: the teacher is the routed MoLoRA model, run under
  ``torch.no_grad()``; the student is the same model with its experts switched off and a
  forward hook adding x A^T B^T (:func:`molora.merge.fidelity.static_adapter`). The frozen base
  weights are never copied; only the student factors (rank x (in + out) per layer) are new.
- **Early stop**: the last ``holdout`` fraction of the distillation batches is held out; its KL
  is measured at the start and every ``eval_every`` steps, and training stops after
  ``patience`` measurements without a new best. The best factors are returned, so the result is
  never worse than the SVD start on the held-out batches. The fidelity report of an export is
  measured on ``eval_batches``, which distillation never sees.
- The whole model runs in eval mode (no dropout); the student factors are float32 and trained
  with Adam.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molora.merge.factors import MergedFactors
from molora.merge.fidelity import rows_of_task, static_adapter

__all__ = ["DistillConfig", "distill_factors", "factored_rel_error", "kl_to_teacher", "mse_to_teacher"]


@dataclass
class DistillConfig:
    """Settings of ``method="distill"`` (all have defaults that work on the tests' and demo's runs).

    Attributes:
        steps: the most optimizer steps (one distillation batch each, cycling).
        lr: Adam learning rate of the student factors.
        eval_every: steps between two held-out KL measurements.
        patience: measurements without a new best before stopping early.
        holdout: fraction of the distillation batches held out for early stopping (at least
            one batch when there are two or more; with one batch it is also the held-out one).
        init_std: standard deviation of the random A rows that the SVD start leaves at zero
            (their B is zero, so the start is unchanged).
        seed: seed of those random rows.
    """

    steps: int = 300
    lr: float = 1e-3
    eval_every: int = 10
    patience: int = 5
    holdout: float = 0.1
    init_std: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "eval_every", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"`{name}` must be an int >= 1, got {value!r}")
        for name in ("lr", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                problems.append(f"`{name}` must be a finite number > 0, got {value!r}")
        if not isinstance(self.holdout, (int, float)) or not (0 < self.holdout < 1):
            problems.append(f"`holdout` must be in (0, 1), got {self.holdout!r}")
        if problems:
            raise ValueError("invalid DistillConfig: " + "; ".join(problems))


def kl_to_teacher(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of KL(softmax(teacher) || softmax(student)) (nats), differentiable in ``student``.

    Args:
        teacher: (B, L, V) or (B, C) logits of the routed model.
        student: the same shape, the student's logits.
        mask: (B, L) attention mask (1 = real token), or None (all real; ignored for (B, C)).
    """
    log_t, log_s = teacher.float().log_softmax(-1), student.float().log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, L) or (B,)
    if kl.dim() == 1 or mask is None:
        return kl.mean()
    real = mask.to(kl.device, kl.dtype)  # (B, L)
    return (kl * real).sum() / real.sum().clamp(min=1.0)


def mse_to_teacher(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of the mean squared difference of hidden states (B, L, H)."""
    err = (student.float() - teacher.float()).pow(2).mean(-1)  # (B, L)
    if mask is None:
        return err.mean()
    real = mask.to(err.device, err.dtype)  # (B, L)
    return (err * real).sum() / real.sum().clamp(min=1.0)


def _output(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The tensor distillation matches: ``logits``, else ``last_hidden_state``."""
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _loss(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None, hidden: bool) -> torch.Tensor:
    return mse_to_teacher(teacher, student, mask) if hidden else kl_to_teacher(teacher, student, mask)


def factored_rel_error(ref: MergedFactors | tuple, new: tuple[torch.Tensor, torch.Tensor]) -> float:
    """||B_ref A_ref - B A||_F / ||B_ref A_ref||_F from the factors (out x in never formed).

    ||Bc Ac||_F^2 = tr((Bc^T Bc)(Ac Ac^T)) with Bc = [B_ref, -B], Ac = [A_ref; A].
    """
    a_ref, b_ref = ref[0].double(), ref[1].double()
    a_new, b_new = (t.double().to(a_ref.device) for t in new)

    def sq_norm(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0))

    ref_sq = sq_norm(a_ref, b_ref)
    diff = sq_norm(torch.cat([a_ref, a_new]), torch.cat([b_ref, -b_new], dim=1))
    return math.sqrt(diff / ref_sq) if ref_sq > 0 else (0.0 if diff == 0 else math.inf)


def _student_params(
    factors: Mapping[str, MergedFactors], cfg: DistillConfig, device_of: Mapping[str, torch.device]
) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Trainable float32 copies of the start factors; all-zero A rows get a small random start."""
    gen = torch.Generator().manual_seed(cfg.seed)
    params = {}
    for name, f in factors.items():
        a, b = f.lora_A.detach().float().clone(), f.lora_B.detach().float().clone()  # (k, in), (out, k)
        dead = (a.abs().sum(1) == 0) & (b.abs().sum(0) == 0)  # (k,) rows the SVD left empty
        if dead.any():
            noise = torch.randn(a.shape, generator=gen, dtype=a.dtype) * cfg.init_std
            a[dead] = noise[dead]
        dev = device_of[name]
        params[name] = (nn.Parameter(a.to(dev)), nn.Parameter(b.to(dev)))
    return params


def _split(batches: Sequence[Mapping[str, Any]], holdout: float) -> tuple[list, list]:
    if len(batches) == 1:
        return list(batches), list(batches)
    n_hold = min(len(batches) - 1, max(1, round(len(batches) * holdout)))
    return list(batches[:-n_hold]), list(batches[-n_hold:])


def _holdout_loss(model: nn.Module, student: Mapping[str, tuple], teachers: list, inputs: list, hidden: bool) -> float:
    total, count = 0.0, 0
    with torch.no_grad(), static_adapter(model, student):
        for t_out, x in zip(teachers, inputs):
            total += float(_loss(t_out, _output(model, x), x.get("attention_mask"), hidden)) * len(t_out)
            count += len(t_out)
    return total / max(count, 1)


def distill_factors(
    model: nn.Module,
    factors: Mapping[str, MergedFactors],
    batches: Sequence[Mapping[str, Any]],
    *,
    task: int | None = None,
    config: DistillConfig | None = None,
    progress: bool = False,
    desc: str = "distill",
) -> tuple[dict[str, MergedFactors], dict[str, Any]]:
    """Train the LoRA ``factors`` so that base + LoRA matches the routed ``model`` (module docstring).

    Args:
        model: a MoLoRAModel (the teacher, frozen; its mode is restored).
        factors: ``{layer: MergedFactors}``, the start (the SVD of the static merge).
        batches: model input dicts (``input_ids``, ``attention_mask``, ``task_ids``...); ``labels``
            are ignored. The last ``config.holdout`` of them is held out for early stopping.
        task: train and measure only the rows of this task id (a per-task export).
        config: :class:`DistillConfig` (defaults when None).
        progress: show a tqdm bar over steps with the held-out KL.
        desc: the bar's label.

    Returns:
        ``(factors, report)``: the best factors (float32; ``rel_error`` copied from the start) and
        ``{"steps", "best_step", "holdout_start", "holdout_best", "history": [[step, held-out
        loss], ...], "stopped_early", "train_batches", "holdout_batches", "objective", "config"}``;
        the held-out loss is the KL (``"kl_logits"``) or the hidden-state MSE (``"mse_hidden"``).

    Raises:
        ValueError: no batch holds a row of ``task``.
    """
    cfg = config or DistillConfig()
    rows = [rows_of_task(b, task) for b in batches]
    selected = [{k: v for k, v in x.items() if k != "labels"} for x in rows if x is not None]
    if not selected:
        raise ValueError(
            "method='distill' needs `distill_batches` with rows to train on" + (f" for task {task}" if task is not None else "")
        )
    train, hold = _split(selected, cfg.holdout)
    layers = model.molora_layers()
    student = _student_params(factors, cfg, {n: layers[n].base_layer.weight.device for n in factors})
    was_training, tracked = model.training, getattr(model, "track_routing_stats", False)
    model.eval()
    try:
        best_state, report = _train(model, student, train, hold, cfg, progress=progress, desc=desc)
    finally:
        model.train(was_training)
        model.track_routing_stats = tracked
    out = {n: MergedFactors(a, b, factors[n].rel_error) for n, (a, b) in best_state.items()}
    report.update(train_batches=len(train), holdout_batches=len(hold), config=copy.deepcopy(vars(cfg)))
    return out, report


def _train(
    model: nn.Module, student: dict, train: list, hold: list, cfg: DistillConfig, *, progress: bool, desc: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Adam on the student factors with held-out early stopping; the best factors and the report."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam([p for pair in student.values() for p in pair], lr=cfg.lr)
    with torch.no_grad():
        hidden = getattr(model(**hold[0]), "logits", None) is None  # a bare encoder: match its hidden states
        teacher_hold = [_output(model, x).detach() for x in hold]
    best = start = _holdout_loss(model, student, teacher_hold, hold, hidden)
    best_step, best_state, history, stale, step = 0, _snapshot(student), [[0, best]], 0, 0
    bar = tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, unit="step")
    for step in bar:
        x = train[(step - 1) % len(train)]
        with torch.no_grad():
            teacher = _output(model, x)
        with static_adapter(model, student):
            loss = _loss(teacher, _output(model, x), x.get("attention_mask"), hidden)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every and step != cfg.steps:
            continue
        held = _holdout_loss(model, student, teacher_hold, hold, hidden)
        history.append([step, held])
        bar.set_postfix(holdout=f"{held:.3e}", best=f"{min(held, best):.3e}")
        if held < best:
            best, best_step, best_state, stale = held, step, _snapshot(student), 0
        elif (stale := stale + 1) >= cfg.patience:
            break
    bar.close()
    report = {
        "steps": step,
        "best_step": best_step,
        "holdout_start": start,
        "holdout_best": best,
        "history": history,
        "stopped_early": step < cfg.steps,
        "objective": "mse_hidden" if hidden else "kl_logits",
    }
    return best_state, report


def _snapshot(student: Mapping[str, tuple[nn.Parameter, nn.Parameter]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in student.items()}


def distilled_layer_factors(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    gates: Mapping[str, torch.Tensor],
    *,
    rank: int,
    batches: Sequence[Mapping[str, Any]],
    task: int | None,
    config: DistillConfig | None,
    progress: bool,
    desc: str,
) -> tuple[dict[str, MergedFactors], dict[str, MergedFactors], dict[str, Any]]:
    """The SVD start at ``rank`` and the distilled factors of every layer, for an export.

    Returns:
        ``(distilled, svd_start, report)``; ``svd_start`` is what ``method="svd"`` would write
        at the same rank, so the export can report both side by side. The ``rel_error`` of a
        distilled layer is its relative Frobenius distance to the exact static merge (it is not
        trying to be 0: the student fits the routed model, not the average).
    """
    from molora.merge.factors import merge_layer

    with torch.no_grad():
        start = {n: merge_layer(layer, gates[n], method="svd", rank=rank, task=task) for n, layer in layers.items()}
    distilled, report = distill_factors(model, start, batches, task=task, config=config, progress=progress, desc=desc)
    with torch.no_grad():  # rel_error: the distilled update's distance to the exact static merge
        for n, layer in layers.items():
            exact = merge_layer(layer, gates[n], method="cat", task=task)
            f = distilled[n]
            distilled[n] = MergedFactors(f.lora_A, f.lora_B, factored_rel_error(exact, (f.lora_A, f.lora_B)))
    report["svd_rel_error"] = max((f.rel_error for f in start.values()), default=0.0)  # the start's truncation
    return distilled, start, report
