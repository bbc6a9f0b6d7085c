"""Settings of ``molora demo``: :class:`DemoConfig`, its quick overrides, and how a run's
command-line values are applied to it (``configs/demo.yaml`` holds the same defaults; a test
keeps them equal)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from molora.core.recipes import AUX_LOSS_COEF, ROUTER_LR_RATIO

__all__ = ["QUICK_OVERRIDES", "ROUTER_RECIPES", "DemoConfig", "resolve_config", "router_recipe"]

ROUTER_RECIPES: dict[str, dict[str, float]] = {
    kind: {"router_lr_ratio": ROUTER_LR_RATIO[kind], "router_aux_loss_coef": AUX_LOSS_COEF[kind]}
    for kind in ROUTER_LR_RATIO
}
ROUTER_RECIPES["hydra+task"] = dict(ROUTER_RECIPES["task"])  # a task router over a shared A
"""Router kind -> the router lr ratio (router lr / adapters' lr) and balancing-loss weight the
demo's MoLoRA models train with when :class:`DemoConfig` leaves them None: the library's
defaults (:mod:`molora.core.recipes`), which the recipe study chose (``molora bench recipes``,
benchmarks/RESULTS.md "Recipe study")."""


@dataclass
class DemoConfig:
    """Settings of ``molora demo`` (``configs/demo.yaml`` mirrors these defaults).

    Args:
        seed: seeds the data split, head and adapter init, data order and dropout.
        max_train_per_task: cap on training examples per task (class-balanced).
        max_test_per_task: cap on test examples per task (class-balanced).
        max_length: tokens per text (special tokens included); longer texts are cut.
        target_modules: MiniLM linear layers that get adapters (PEFT name matching).
        num_experts: N experts per layer for both MoLoRA models.
        r: rank of each expert; the shared LoRA has rank ``num_experts * r``.
        lora_alpha: the same alpha for every model: MoLoRA experts get s = lora_alpha / r,
            the shared LoRA lora_alpha / (N r). Since the gates of a token sum to 1, a
            MoLoRA layer with uniform gates (1/N each) is then exactly a LoRA of rank N r
            with the shared LoRA's scaling: the task router starts as the baseline (same
            function-space step size under Adam) and can only add task-specific gates.
        top_k: experts per token of the top-k router.
        task_top_k: experts per task of the task router (None: a softmax over all N).
        router_init_std: std of the routers' normal init.
        router_lr_ratio: the routers' learning rate as a multiple of ``lr`` (every MoLoRA
            model); None takes the router kind's recipe default (:data:`ROUTER_RECIPES`, from
            ``molora bench recipes``).
        router_aux_loss_coef: load-balancing loss weight (every MoLoRA model); None takes the
            router kind's recipe default (:data:`ROUTER_RECIPES`).
        steps: optimizer steps per model (one task's batch per step, tasks in turn).
        batch_size: examples per training batch.
        eval_batch_size: examples per evaluation batch.
        lr: peak AdamW learning rate of adapters and heads (all models).
        warmup_ratio: fraction of steps of linear warm-up (then linear decay to 0).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm.
    """

    seed: int = 0
    max_train_per_task: int = 1200
    max_test_per_task: int = 400
    max_length: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    num_experts: int = 4
    r: int = 4
    lora_alpha: float = 32.0
    top_k: int = 2
    task_top_k: int | None = None
    router_init_std: float = 0.02
    router_lr_ratio: float | None = None
    router_aux_loss_coef: float | None = None
    steps: int = 150
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 5e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        problems = []
        for name in (
            "max_train_per_task",
            "max_test_per_task",
            "max_length",
            "num_experts",
            "r",
            "top_k",
            "steps",
            "batch_size",
            "eval_batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"`{name}` must be an int >= 1, got {value!r}")
        if isinstance(self.top_k, int) and isinstance(self.num_experts, int) and self.top_k > self.num_experts:
            problems.append(f"`top_k` must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.task_top_k is not None and not (1 <= self.task_top_k <= self.num_experts):
            problems.append(
                f"`task_top_k` must be None or in [1, num_experts={self.num_experts}], got {self.task_top_k}"
            )
        for name in ("lora_alpha", "lr"):
            if not getattr(self, name) > 0:
                problems.append(f"`{name}` must be > 0, got {getattr(self, name)!r}")
        if self.router_lr_ratio is not None and not self.router_lr_ratio > 0:
            problems.append(f"`router_lr_ratio` must be None or > 0, got {self.router_lr_ratio!r}")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            problems.append(f"`router_aux_loss_coef` must be None or >= 0, got {self.router_aux_loss_coef!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}")
        if problems:
            raise ValueError("invalid DemoConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, quick: bool = False) -> DemoConfig:
        """Build from a mapping like ``configs/demo.yaml``: ``kind: demo``, the fields, and an
        optional ``quick:`` mapping of overrides applied when ``quick`` is true.

        Raises:
            ValueError: ``kind`` is not "demo", or a key is unknown (the known ones are listed).
        """
        data = dict(data)
        kind = data.pop("kind", "demo")
        if kind != "demo":
            raise ValueError(f"`kind` must be 'demo' for a demo config, got {kind!r}")
        quick_overrides = data.pop("quick", None) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted((set(data) | set(quick_overrides)) - known)
        if unknown:
            raise ValueError(f"unknown demo config keys {unknown}; known keys: {sorted(known)}")
        if quick:
            data.update(quick_overrides)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, quick: bool = False) -> DemoConfig:
        """Read a demo YAML config (see :meth:`from_dict`)."""
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, quick=quick)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (as written to ``results.json``)."""
        return asdict(self)


def router_recipe(kind: str, cfg: DemoConfig) -> tuple[float, float]:
    """(router lr ratio, aux coefficient) of a router kind of :data:`ROUTER_RECIPES` under
    ``cfg``: the config's value where set, else the kind's recipe default."""
    if kind not in ROUTER_RECIPES:
        raise ValueError(f"unknown router kind {kind!r}; choices: {sorted(ROUTER_RECIPES)}")
    recipe = ROUTER_RECIPES[kind]
    ratio = cfg.router_lr_ratio if cfg.router_lr_ratio is not None else recipe["router_lr_ratio"]
    aux = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else recipe["router_aux_loss_coef"]
    return float(ratio), float(aux)


QUICK_OVERRIDES: dict[str, Any] = {
    "max_train_per_task": 48,
    "max_test_per_task": 24,
    "max_length": 16,
    "steps": 6,
    "batch_size": 8,
    "eval_batch_size": 32,
}
"""What ``quick=True`` changes: a tiny run for tests and examples (seconds, not minutes)."""


def resolve_config(
    config: DemoConfig | None, *, quick: bool = False, steps: int | None = None, seed: int | None = None
) -> DemoConfig:
    """The run's settings: ``config`` (default :class:`DemoConfig` ()), then the quick
    overrides, then ``steps`` and ``seed`` where given.

    Args:
        config: base settings; None for the defaults.
        quick: apply :data:`QUICK_OVERRIDES`.
        steps: optimizer steps per model, overriding the config's.
        seed: seed, overriding the config's.

    Returns:
        A new :class:`DemoConfig` (``config`` is not changed).
    """
    cfg = config or DemoConfig()
    if quick:
        cfg = replace(cfg, **QUICK_OVERRIDES)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if seed is not None:
        cfg = replace(cfg, seed=seed)
    return cfg
