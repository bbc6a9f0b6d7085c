"""The demo's three models and their task heads.

Every model is ``encoder -> masked mean pooling -> a linear head per task`` on a fresh copy of
MiniLM: MoLoRA with the task router, MoLoRA with top-k token routing, and one shared PEFT LoRA
of rank N * r (the same adapter budget as N experts of rank r). The heads are trained with the
adapter and kept outside the encoder, so that the exported PEFT adapters apply to a plain
MiniLM; :func:`save_heads` / :func:`load_heads` write and read them beside an adapter.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from molora.apps.demo.config import DemoConfig, router_recipe
from molora.apps.demo.data import TaskData

__all__ = [
    "DEMO_MODELS",
    "MODEL_DESCRIPTIONS",
    "RECIPE_MODELS",
    "ROUTER_KINDS",
    "VARIANT_MODELS",
    "MultitaskClassifier",
    "build_model",
    "load_heads",
    "save_heads",
    "save_model",
    "trainable_parameters",
]

DEMO_MODELS: dict[str, str] = {
    "molora-task": "MoLoRA, task router",
    "molora-topk": "MoLoRA, top-k token router",
    "shared-lora": "shared PEFT LoRA (same budget)",
}
"""Model key -> description, in table order."""

VARIANT_MODELS: dict[str, str] = {
    "shared-lora": "shared PEFT LoRA (same budget)",
    "molora-task": "MoLoRA, task router",
    "molora-topk": "MoLoRA, top-k token router",
    "hydra-task": "HydraLoRA (shared A), task router",
    "task-shared1": "task router + 1 shared expert",
    "molora-topp": "MoLoRA, top-p token router",
    "task-dora": "DoRA experts, task router",
    "task-pissa": "PiSSA-initialized experts, task router",
    "topk-pissa": "PiSSA-initialized experts, top-k token router",
}
"""The forms ``molora demo --variants`` compares at the same adapter budget (see :func:`_molora_config`;
DoRA adds its magnitude vectors, one number per output of each adapted layer)."""

RECIPE_MODELS: dict[str, str] = {
    "soft": "molora-soft",
    "topk": "molora-topk",
    "topp": "molora-topp",
    "task": "molora-task",
    "hydra+task": "hydra-task",
}
"""Router kind of the recipe study (``molora bench recipes``) -> the demo model that trains it."""

ROUTER_KINDS: dict[str, str] = {
    "molora-task": "task",
    "molora-topk": "topk",
    "hydra-task": "hydra+task",
    "task-shared1": "task",
    "molora-topp": "topp",
    "molora-soft": "soft",
    "task-dora": "task",
    "task-pissa": "task",
    "topk-pissa": "topk",
}
"""MoLoRA model key -> its router kind in :data:`~molora.apps.demo.config.ROUTER_RECIPES`."""

MODEL_DESCRIPTIONS: dict[str, str] = {
    **DEMO_MODELS,
    **VARIANT_MODELS,
    "molora-soft": "MoLoRA, soft token router (all N)",
}


class MultitaskClassifier(nn.Module):
    """encoder -> masked mean pooling -> the task's linear head.

    Args:
        encoder: a BertModel, or a MoLoRA/PEFT model wrapping one.
        heads: one ``nn.Linear(hidden, num_labels_t)`` per task.
        pass_task_ids: give the encoder ``task_ids`` (MoLoRA models).
    """

    def __init__(self, encoder: nn.Module, heads: nn.ModuleList, *, pass_task_ids: bool):
        super().__init__()
        self.encoder = encoder
        self.heads = heads
        self.pass_task_ids = pass_task_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: int) -> torch.Tensor:
        """Logits (B, C_task) of a batch whose examples all belong to ``task``."""
        kwargs = {}
        if self.pass_task_ids:
            kwargs["task_ids"] = torch.full((input_ids.shape[0],), task, dtype=torch.long)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # (B, L, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        return self.heads[task](pooled)  # (B, C_task)


def build_model(key: str, base: nn.Module, tasks: list[TaskData], cfg: DemoConfig) -> MultitaskClassifier:
    """One of :data:`DEMO_MODELS` on a fresh copy of ``base``, adapters seeded by ``cfg.seed``.

    Args:
        key: a key of :data:`DEMO_MODELS`.
        base: the pretrained encoder (copied, never changed).
        tasks: the tasks (their label counts size the heads).
        cfg: adapter settings and seed.

    Returns:
        The model with new heads (the same init for every key) and a new adapter.

    Raises:
        ValueError: ``key`` is not a demo model (the choices are listed).
    """
    from molora import get_molora_model

    if key not in MODEL_DESCRIPTIONS:
        raise ValueError(f"unknown demo model {key!r}; choices: {sorted(MODEL_DESCRIPTIONS)}")
    encoder = copy.deepcopy(base)
    torch.manual_seed(cfg.seed)  # the same head init for every model
    heads = nn.ModuleList(nn.Linear(base.config.hidden_size, len(t.labels)) for t in tasks)
    torch.manual_seed(cfg.seed + 1)  # the same adapter init stream for every model
    if key == "shared-lora":
        return MultitaskClassifier(_shared_lora(encoder, cfg), heads, pass_task_ids=False)
    molora_config = _molora_config(key, tasks, cfg)
    return MultitaskClassifier(get_molora_model(encoder, molora_config), heads, pass_task_ids=True)


def _shared_lora(encoder: nn.Module, cfg: DemoConfig) -> nn.Module:
    """``encoder`` with one PEFT LoRA of rank N * r (peft's own LoraConfig)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.num_experts * cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(encoder, lora)


def hydra_rank(cfg: DemoConfig) -> int:
    """HydraLoRA's rank at the N experts' budget on square layers: r_h (1 + N) d ~ N r (2 d)."""
    return max(1, round(2 * cfg.num_experts * cfg.r / (cfg.num_experts + 1)))


EXPERT_VARIANTS: dict[str, tuple[str, dict]] = {
    "task-dora": ("molora-task", {"use_dora": True}),
    "task-pissa": ("molora-task", {"init_lora_weights": "pissa"}),
    "topk-pissa": ("molora-topk", {"init_lora_weights": "pissa"}),
}
"""Variant form -> (the plain form it varies, the MoLoRAConfig fields it changes)."""


def _molora_config(key: str, tasks: list[TaskData], cfg: DemoConfig):
    """The MoLoRAConfig of a MoLoRA key of :data:`MODEL_DESCRIPTIONS`, at the adapter budget of N
    experts of rank r: ``hydra-task`` takes rank :func:`hydra_rank`, ``task-shared1`` N - 1
    routed experts and one shared one, ``molora-topp`` top_p = 0.5 (top-2 of 4 at uniform gates),
    ``molora-soft`` all N experts, ``task-dora`` the task router with DoRA experts
    (``use_dora=True``), ``task-pissa`` / ``topk-pissa`` the task / top-k router with
    ``init_lora_weights="pissa"`` (exact SVD: MiniLM's layers are 384 x 384); the balancing
    loss weight is the router kind's (:func:`~molora.apps.demo.config.router_recipe`)."""
    from molora import MoLoRAConfig

    _, aux = router_recipe(ROUTER_KINDS[key], cfg)
    common = {
        "target_modules": list(cfg.target_modules),
        "num_experts": cfg.num_experts,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "router_init_std": cfg.router_init_std,
        "router_aux_loss_coef": aux,
    }
    task = dict(router="task", num_tasks=len(tasks), task_names=[t.name for t in tasks])
    if key in EXPERT_VARIANTS:
        plain, fields = EXPERT_VARIANTS[key]
        return replace(_molora_config(plain, tasks, cfg), **fields)
    if key == "molora-task":
        return MoLoRAConfig(top_k=cfg.task_top_k, **task, **common)
    if key == "hydra-task":
        return MoLoRAConfig(**task, **{**common, "r": hydra_rank(cfg)}, share_lora_A=True)
    if key == "task-shared1":
        return MoLoRAConfig(**task, **{**common, "num_experts": cfg.num_experts - 1}, num_shared_experts=1)
    if key == "molora-topp":
        return MoLoRAConfig(router="topp", top_p=0.5, **common)
    if key == "molora-soft":
        return MoLoRAConfig(router="soft", **common)
    return MoLoRAConfig(router="topk", top_k=cfg.top_k, **common)


def trainable_parameters(model: MultitaskClassifier) -> tuple[int, int]:
    """(adapter + router parameters, head parameters) that train."""
    adapter = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    heads = sum(p.numel() for p in model.heads.parameters())
    return adapter, heads


def save_model(model: MultitaskClassifier, tasks: list[TaskData], folder: Path) -> None:
    """Write the adapter (``save_pretrained``) and ``heads.safetensors`` into ``folder``."""
    model.encoder.save_pretrained(folder)
    save_heads(model.heads, tasks, folder / "heads.safetensors")


def save_heads(heads: nn.ModuleList, tasks: list[TaskData], path: Path) -> None:
    """Write the per-task heads as ``{task}.{weight|bias}`` tensors, label names in the metadata."""
    from safetensors.torch import save_file

    tensors = {
        f"{task.name}.{n}": p.detach().contiguous()
        for task, head in zip(tasks, heads)
        for n, p in head.named_parameters()
    }
    save_file(
        tensors,
        str(path),
        metadata={"labels": json.dumps({t.name: t.labels for t in tasks})},
    )


def load_heads(path: Path, tasks: list[TaskData], hidden: int) -> nn.ModuleList:
    """The per-task heads written by :func:`save_heads`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    heads = nn.ModuleList(nn.Linear(hidden, len(t.labels)) for t in tasks)
    for task, head in zip(tasks, heads):
        head.load_state_dict({n: tensors[f"{task.name}.{n}"] for n, _ in head.named_parameters()})
    return heads
