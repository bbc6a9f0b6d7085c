"""MoLoRAConfig: every knob of a MoLoRA model, validated, with a JSON round trip."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from molora.atomic import atomic_write_text
from molora.core.experts import EXPERT_IMPLS
from molora.core.patterns import LayerSpec, check_patterns, layer_specs
from molora.core.recipes import AUX_LOSS_COEF, default_aux_loss_coef
from routers import ROUTERS

ROUTER_SHARING = ("layer", "block")
ADAPTER_DTYPES = ("base", "bfloat16", "float16", "float32")
# Names a task may not take: "all" selects every task; the rest are files of an export folder.
RESERVED_TASK_NAMES = frozenset({"all", "merge_report.json", "adapter_config.json", "adapter_model.safetensors"})


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
            renormalized), "topp" (the fewest experts whose probabilities sum to >= ``top_p``,
            raw probabilities as gates; MixLoRA) or "task" (a learned per-task table of logits).
        top_k: experts per token. "topk": default 2; "task": default None (all experts);
            "topp": an optional cap (default None: up to N); "soft": must stay None.
        top_p: probability mass of router="topp", in (0, 1]; only for that router.
        router_sharing: "layer" (default): a router per targeted layer. "block" (MixLoRA): one
            router per parent module (e.g. ``self_attn``, ``mlp``); its first targeted layer
            routes in each forward and the others reuse that routing (q/k/v read the same
            input: the logits are computed once; ``down_proj`` reuses the routing of the
            ``mlp``'s input). Its parameters are saved once, under the first layer's name.
            The layers of a block must have the same N and top_k.
        normalize_top_k: renormalize the chosen top-k gates to sum to 1. ``None`` (default):
            yes for k >= 2, no for k == 1, where the gate is the raw probability (Switch
            Transformer; a renormalized single gate is always 1 and gives the router no gradient).
        num_tasks: number of task ids; required by the "task" router.
        use_rslora: s = lora_alpha / sqrt(r) (rank-stabilized LoRA).
        router_aux_loss_coef: weight of the load-balancing loss added to ``out.loss``.
            ``None`` (default): the router kind's default from
            :data:`molora.core.recipes.AUX_LOSS_COEF`: 0 for every router kind (the recipe
            study found no gain from 0.01; set 0.01, Switch Transformer's value, when the
            routing-health monitor warns that a token router collapses).
            The resolved number is what the config holds and saves, so a saved adapter keeps
            its coefficient if the defaults change; an explicit value is kept as given.
        router_z_loss_coef: weight of the router z-loss added to ``out.loss``.
        expert_impl: a name in ``molora.core.experts.EXPERT_IMPLS``: "auto" (chooses by routing
            kind, shapes and device), "eager" (reference loop), "dense", "grouped", "hybrid",
            "grouped_bmm".
        router_jitter_noise: multiplicative input jitter of the top-k router in training.
        router_init_std: std of the router's normal initialization.
        adapter_dtype: storage dtype of expert and router-free parameters: "float32"
            (default, as PEFT: stable AdamW updates under bf16/fp16 bases; compute runs in the
            activation dtype), "base" (the base layer's dtype; a bitsandbytes 4-bit layer's compute
            dtype), "bfloat16", "float16". Router
            weights are always float32.
        modules_to_save: extra modules (same matching rules as ``target_modules``) that stay
            trainable and are saved with the adapter, e.g. a classification head.
        task_names: optional names of the task ids, in id order. ``task_ids`` may then be given
            by name; exports write one folder per name. Unique after :func:`task_folder_name`.
        debug: raise on NaN/inf router logits (costs a device sync per layer).
        share_lora_A: HydraLoRA form (Tian et al. 2024, arXiv 2404.19245): one down-projection
            ``lora_A`` (1, r, in) shared by all experts and N up-projections ``lora_B``
            (N, out, r); h = A x is computed once per token and the router mixes the B heads.
            Every static merge is then exact at rank r (lora_A = A, lora_B = s * sum_i w_i B_i).
        num_shared_experts: M always-on experts with gate 1, outside routing (DeepSeek-MoE
            form): ``lora_A_shared`` (M, r, in), ``lora_B_shared`` (M, out, r), B zero at init;
            the layer adds s * sum_j B_j A_j x, a rank M*r LoRA. The balancing losses ignore
            them; exports include them with weight 1. They keep their own A under
            ``share_lora_A``, so such a merge has rank r + M*r.
        rank_pattern: per-layer ``r``: ``{key: r}``; a key matches a module name as PEFT's
            ``rank_pattern`` keys do (``re.match(rf"(.*\\.)?({key})$", name)``, the first
            matching key wins). A key that matches no targeted layer is an error at injection.
        alpha_pattern: per-layer ``lora_alpha``, matched the same way.
        num_experts_pattern: per-layer N (MoLA: more experts in higher layers).
        top_k_pattern: per-layer ``top_k`` (topk and task routers); must be <= that layer's N.
            The four patterns (see :mod:`molora.core.patterns`) are saved with the adapter, the
            per-layer N and r are recorded in its metadata, and exports handle them (per-module
            ranks go through PEFT's ``rank_pattern``).
        use_dora: DoRA experts (Liu et al. 2024, arXiv 2402.09353; DESIGN §5), task router only:
            y = m * (W0 + dW_t) x / ||W0 + dW_t||_c + b with dW_t = s * sum_i g_{t,i} B_i A_i, the
            row norm detached as in PEFT, one magnitude ``lora_magnitude`` (out,) per layer
            initialized to W0's row norms (:mod:`molora.core.dora`). Token routers refuse it:
            their norm would be one matrix per token.
        init_lora_weights: ``True`` (default: Kaiming A, zero B), ``"pissa"`` (the N experts take
            distinct r-wide segments of W0's top N*r singular components, full SVD) or
            ``"pissa_niter_K"`` (the same from a randomized SVD with K subspace iterations, for
            large layers, as PEFT). The base weights are never changed: the start's offset
            is subtracted as a frozen residual term (:mod:`molora.core.init`), saved with the
            adapter, so adapters and exports apply to the original base.
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_experts: int = 8
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    router: str = "topk"
    top_k: int | None = None
    top_p: float | None = None
    router_sharing: str = "layer"
    normalize_top_k: bool | None = None
    num_tasks: int | None = None
    use_rslora: bool = False
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    expert_impl: str = "auto"
    router_jitter_noise: float = 0.0
    router_init_std: float = 0.02
    adapter_dtype: str = "float32"
    modules_to_save: list[str] | None = None
    task_names: list[str] | None = None
    debug: bool = False
    share_lora_A: bool = False
    num_shared_experts: int = 0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    num_experts_pattern: dict[str, int] = field(default_factory=dict)
    top_k_pattern: dict[str, int] = field(default_factory=dict)
    use_dora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.router == "topk" and self.top_k is None:
            self.top_k = 2
        if self.router_aux_loss_coef is None and self.router in AUX_LOSS_COEF:
            self.router_aux_loss_coef = default_aux_loss_coef(self.router)
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """A field changed after construction is validated again; an invalid change is undone."""
        if not getattr(self, "_validated", False):
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except ValueError as err:
            object.__setattr__(self, name, old)
            raise ValueError(
                f"{err}\n(the change of `{name}` was undone; change several fields together with "
                "dataclasses.replace(config, ...))"
            ) from None

    def validate(self) -> None:
        """Check every field; raise one ValueError listing all problems found."""
        errors: list[str] = []
        for check in (_check_targets, _check_sizes, _check_routing, _check_tasks, _check_options, _check_structure):
            errors += check(self)
        if errors:
            raise ValueError("invalid MoLoRAConfig:\n  - " + "\n  - ".join(errors))

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def layer_specs(self, names: list[str]) -> dict[str, LayerSpec]:
        """The structure (N, r, lora_alpha, top_k) of each targeted layer after the patterns.

        Raises:
            ValueError: a pattern key matches none of ``names``, or a layer's top_k > its N.
        """
        return layer_specs(self, names)

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
    """A real, finite number (bools are not numbers here: ``lora_alpha=True`` is a mistake)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _not_finite(value: Any) -> str:
    return " (numbers must be finite)" if isinstance(value, float) and not math.isfinite(value) else ""


def _check_targets(c: MoLoRAConfig) -> list[str]:
    errors = []
    tm = c.target_modules
    if isinstance(tm, str):
        if not tm:
            errors.append("`target_modules` must be a non-empty list of module names or a regex string, got ''")
        else:
            try:
                re.compile(tm)
            except re.error as err:
                errors.append(f"`target_modules` is not a valid regular expression: {tm!r} ({err})")
    elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
        errors.append(f"`target_modules` must be a non-empty list of module names or a regex string, got {tm!r}")
    mts = c.modules_to_save
    if not (mts is None or (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts))):
        errors.append(f"`modules_to_save` must be None or a list of module names, got {mts!r}")
    return errors


def _check_sizes(c: MoLoRAConfig) -> list[str]:
    errors = []
    if not (_is_int(c.num_experts) and c.num_experts >= 1):
        errors.append(f"`num_experts` must be an int >= 1, got {c.num_experts!r}")
    if not (_is_int(c.r) and c.r >= 1):
        errors.append(f"`r` must be an int >= 1, got {c.r!r}")
    if not (_is_num(c.lora_alpha) and c.lora_alpha > 0):
        errors.append(f"`lora_alpha` must be > 0, got {c.lora_alpha!r}{_not_finite(c.lora_alpha)}")
    if not (_is_num(c.lora_dropout) and 0 <= c.lora_dropout < 1):
        errors.append(f"`lora_dropout` must be in [0, 1), got {c.lora_dropout!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(c, name)
        if value is None and name == "router_aux_loss_coef" and c.router not in ROUTERS:
            continue  # left unresolved by an unknown router, which is reported on its own
        if not (_is_num(value) and value >= 0):
            errors.append(f"`{name}` must be a number >= 0, got {value!r}{_not_finite(value)}")
    if not (_is_num(c.router_jitter_noise) and 0 <= c.router_jitter_noise < 1):
        errors.append(f"`router_jitter_noise` must be in [0, 1), got {c.router_jitter_noise!r}")
    if not (_is_num(c.router_init_std) and c.router_init_std >= 0):
        errors.append(f"`router_init_std` must be >= 0, got {c.router_init_std!r}{_not_finite(c.router_init_std)}")
    return errors


def _check_routing(c: MoLoRAConfig) -> list[str]:
    errors = []
    if c.router not in ROUTERS:
        errors.append(f"`router` must be one of {sorted(ROUTERS)}, got {c.router!r}")
    n = c.num_experts if _is_int(c.num_experts) else None
    if c.top_k is not None and not (_is_int(c.top_k) and n is not None and 1 <= c.top_k <= n):
        errors.append(f"`top_k` must be in [1, num_experts={n}], got {c.top_k!r}")
    if c.router == "soft" and c.top_k is not None:
        errors.append(
            f"`top_k` must be None for router='soft' (it uses all experts), got {c.top_k!r}; use router='topk'"
        )
    errors += _check_top_p(c)
    if c.router_sharing not in ROUTER_SHARING:
        errors.append(f"`router_sharing` must be one of {list(ROUTER_SHARING)}, got {c.router_sharing!r}")
    if c.normalize_top_k is not None and not isinstance(c.normalize_top_k, bool):
        errors.append(f"`normalize_top_k` must be None, True or False, got {c.normalize_top_k!r}")
    if c.expert_impl not in EXPERT_IMPLS:
        errors.append(f"`expert_impl` must be one of {sorted(EXPERT_IMPLS)}, got {c.expert_impl!r}")
    if c.adapter_dtype not in ADAPTER_DTYPES:
        errors.append(f"`adapter_dtype` must be one of {list(ADAPTER_DTYPES)}, got {c.adapter_dtype!r}")
    return errors


def _check_top_p(c: MoLoRAConfig) -> list[str]:
    if c.router != "topp":
        return [] if c.top_p is None else [f"`top_p` is only used by router='topp', got top_p={c.top_p!r}"]
    if not (_is_num(c.top_p) and 0 < c.top_p <= 1):
        return [f"`top_p` must be in (0, 1] for router='topp', got {c.top_p!r}"]
    return []


def _check_tasks(c: MoLoRAConfig) -> list[str]:
    errors = []
    if c.router == "task" and not (_is_int(c.num_tasks) and c.num_tasks >= 1):
        errors.append(f"`num_tasks` must be an int >= 1 for router='task', got {c.num_tasks!r}")
    elif c.num_tasks is not None and not (_is_int(c.num_tasks) and c.num_tasks >= 1):
        errors.append(f"`num_tasks` must be an int >= 1 or None, got {c.num_tasks!r}")
    names = c.task_names
    if names is None:
        return errors
    if not (isinstance(names, list) and all(isinstance(t, str) for t in names)):
        return errors + [f"`task_names` must be a list of strings, got {names!r}"]
    if c.num_tasks is not None and len(names) != c.num_tasks:
        errors.append(f"`task_names` must have num_tasks={c.num_tasks} entries, got {len(names)}")
    folders: dict[str, str] = {}
    for name in names:
        folder = task_folder_name(name)
        if not folder or name.isdigit() or folder.lower() in RESERVED_TASK_NAMES:
            errors.append(
                f"`task_names` entry {name!r} is not allowed: a task name needs a letter, must not be all "
                f"digits (ids are ints) and must not be one of {sorted(RESERVED_TASK_NAMES)}"
            )
        elif folder in folders:
            errors.append(
                f"`task_names` entries {folders[folder]!r} and {name!r} collide: both export to the folder "
                f"{folder!r} (names are unique after replacing characters outside [A-Za-z0-9._-] by '_')"
            )
        folders.setdefault(folder, name)
    return errors


def _check_options(c: MoLoRAConfig) -> list[str]:
    return [
        f"`{name}` must be True or False, got {getattr(c, name)!r} ({type(getattr(c, name)).__name__})"
        for name in ("use_rslora", "debug", "share_lora_A", "use_dora")
        if not isinstance(getattr(c, name), bool)
    ]


def _check_structure(c: MoLoRAConfig) -> list[str]:
    errors = []
    if not (_is_int(c.num_shared_experts) and c.num_shared_experts >= 0):
        errors.append(f"`num_shared_experts` must be an int >= 0, got {c.num_shared_experts!r}")
    return errors + check_patterns(c) + _check_variants(c)


def _check_variants(c: MoLoRAConfig) -> list[str]:
    """DoRA (task router only) and the PiSSA init (no shared A; not with DoRA)."""
    errors = []
    if c.use_dora is True and c.router != "task":
        errors.append(
            f"`use_dora=True` needs router='task', got router={c.router!r}: DoRA divides by the row norm of "
            "W0 + dW, and with a token router dW depends on each token's gates (one norm matrix per token); "
            "the task router has one dW per task. Use router='task' (with num_tasks), or use_dora=False"
        )
    init = c.init_lora_weights
    if not (init is True or init == "pissa" or pissa_niter(init) is not None):
        errors.append(f"`init_lora_weights` must be True, 'pissa' or 'pissa_niter_K' (K an int >= 1), got {init!r}")
    elif init is not True:
        if c.share_lora_A:
            errors.append(
                f"`init_lora_weights`={init!r} needs one A per expert (each takes its own singular "
                "components), got share_lora_A=True"
            )
        if c.use_dora is True:
            errors.append(f"`init_lora_weights`={init!r} cannot be combined with use_dora=True (not supported)")
    return errors


def pissa_niter(init: Any) -> int | None:
    """K of ``init_lora_weights="pissa_niter_K"`` (None for any other value; 0 is not allowed)."""
    match = re.fullmatch(r"pissa_niter_([0-9]+)", init) if isinstance(init, str) else None
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def task_folder_name(name: str) -> str:
    """The folder a task's export is written to: characters outside [A-Za-z0-9._-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
