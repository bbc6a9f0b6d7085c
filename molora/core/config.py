"""MoLoRAConfig: every knob of a MoLoRA model, validated, with a JSON round trip."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from molora.atomic import atomic_write_text
from molora.core.experts import EXPERT_IMPLS
from routers import ROUTERS

ADAPTER_DTYPES = ("base", "bfloat16", "float16", "float32")


@dataclass
class MoLoRAConfig:
    """Configuration of a Mixture-of-LoRA-experts model (DESIGN §3).

    Args:
        target_modules: which linear layers get experts. A list matches a module whose
            qualified name equals an entry or ends with ``"." + entry`` (PEFT semantics);
            a string is a regular expression that must ``re.fullmatch`` the qualified name.
        num_experts: N, the number of LoRA experts per layer.
        r: rank of every expert.
        lora_alpha: scaling numerator: s = lora_alpha / r (or / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the experts' input (the router sees the clean input).
        router: "soft" (softmax over all experts), "topk" (top-k of the softmax,
            renormalized), or "task" (a learned per-task table of logits).
        top_k: experts per token. "topk": default 2; "task": default None (all experts);
            "soft": must stay None.
        num_tasks: number of task ids; required by the "task" router.
        use_rslora: s = lora_alpha / sqrt(r) (rank-stabilized LoRA).
        router_aux_loss_coef: weight of the load-balancing loss added to ``out.loss``.
        router_z_loss_coef: weight of the router z-loss added to ``out.loss``.
        expert_impl: a name in ``molora.core.experts.EXPERT_IMPLS``: "auto" (chooses by routing
            kind, shapes and device), "eager" (reference loop), "dense", "grouped", "hybrid",
            "grouped_bmm".
        router_jitter_noise: multiplicative input jitter of the top-k router in training.
        router_init_std: std of the router's normal initialization.
        adapter_dtype: storage dtype of expert and router-free parameters: "float32"
            (default, as PEFT: stable AdamW updates under bf16/fp16 bases; compute runs in the
            activation dtype), "base" (the base layer's dtype), "bfloat16", "float16". Router
            weights are always float32.
        modules_to_save: extra modules (same matching rules as ``target_modules``) that stay
            trainable and are saved with the adapter, e.g. a classification head.
        task_names: optional names of the task ids, in id order (used by exports and stats).
        debug: raise on NaN/inf router logits (costs a device sync per layer).
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_experts: int = 8
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    router: str = "topk"
    top_k: int | None = None
    num_tasks: int | None = None
    use_rslora: bool = False
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    expert_impl: str = "auto"
    router_jitter_noise: float = 0.0
    router_init_std: float = 0.02
    adapter_dtype: str = "float32"
    modules_to_save: list[str] | None = None
    task_names: list[str] | None = None
    debug: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.router == "topk" and self.top_k is None:
            self.top_k = 2
        self.validate()

    def validate(self) -> None:
        """Check every field; raise one ValueError listing all problems found."""
        errors: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        tm = self.target_modules
        need(
            (isinstance(tm, str) and tm != "") or (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)),
            f"`target_modules` must be a non-empty list of module names or a regex string, got {tm!r}",
        )
        need(_is_int(self.num_experts) and self.num_experts >= 1, f"`num_experts` must be an int >= 1, got {self.num_experts!r}")
        need(_is_int(self.r) and self.r >= 1, f"`r` must be an int >= 1, got {self.r!r}")
        need(_is_num(self.lora_alpha) and self.lora_alpha > 0, f"`lora_alpha` must be > 0, got {self.lora_alpha!r}")
        need(_is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        need(self.router in ROUTERS, f"`router` must be one of {sorted(ROUTERS)}, got {self.router!r}")
        n = self.num_experts if _is_int(self.num_experts) else None
        if self.top_k is not None:
            need(
                _is_int(self.top_k) and n is not None and 1 <= self.top_k <= n,
                f"`top_k` must be in [1, num_experts={n}], got {self.top_k!r}",
            )
        need(
            not (self.router == "soft" and self.top_k is not None),
            f"`top_k` must be None for router='soft' (it uses all experts), got {self.top_k!r}; use router='topk'",
        )
        if self.router == "task":
            need(
                _is_int(self.num_tasks) and self.num_tasks >= 1,
                f"`num_tasks` must be an int >= 1 for router='task', got {self.num_tasks!r}",
            )
        elif self.num_tasks is not None:
            need(_is_int(self.num_tasks) and self.num_tasks >= 1, f"`num_tasks` must be an int >= 1 or None, got {self.num_tasks!r}")
        if self.task_names is not None:
            need(
                isinstance(self.task_names, list) and all(isinstance(t, str) for t in self.task_names),
                f"`task_names` must be a list of strings, got {self.task_names!r}",
            )
            if self.num_tasks is not None and isinstance(self.task_names, list):
                need(
                    len(self.task_names) == self.num_tasks,
                    f"`task_names` must have num_tasks={self.num_tasks} entries, got {len(self.task_names)}",
                )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            need(_is_num(value) and value >= 0, f"`{name}` must be a number >= 0, got {value!r}")
        need(
            _is_num(self.router_jitter_noise) and 0 <= self.router_jitter_noise < 1,
            f"`router_jitter_noise` must be in [0, 1), got {self.router_jitter_noise!r}",
        )
        need(_is_num(self.router_init_std) and self.router_init_std >= 0, f"`router_init_std` must be >= 0, got {self.router_init_std!r}")
        need(
            self.expert_impl in EXPERT_IMPLS,
            f"`expert_impl` must be one of {sorted(EXPERT_IMPLS)}, got {self.expert_impl!r}",
        )
        need(self.adapter_dtype in ADAPTER_DTYPES, f"`adapter_dtype` must be one of {list(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        mts = self.modules_to_save
        need(
            mts is None or (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)),
            f"`modules_to_save` must be None or a list of module names, got {mts!r}",
        )
        if errors:
            raise ValueError("invalid MoLoRAConfig:\n  - " + "\n  - ".join(errors))

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLoRAConfig:
        """Build from a dict; unknown keys raise (listing the known ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoLoRAConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON (atomically)."""
        atomic_write_text(path, self.to_json_string() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoLoRAConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's scaling s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

    The one place this formula lives: the config, the layer and adapters read from PEFT use it.
    """
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
