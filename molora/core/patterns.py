"""Per-layer structure: the pattern fields of MoLoRAConfig resolved for each targeted layer.

MoLA (Gao et al. 2024, arXiv 2402.08562) gives higher layers more experts; AdaLoRA-like
budgets give layers different ranks. ``rank_pattern``, ``alpha_pattern``,
``num_experts_pattern`` and ``top_k_pattern`` map a key to the value a matching layer takes
instead of the global ``r``, ``lora_alpha``, ``num_experts`` or ``top_k``.

Keys match as PEFT's ``rank_pattern`` keys do: a key (a regular expression) matches the
qualified module name ``name`` when ``re.match(rf"(.*\\.)?({key})$", name)``, i.e. the name
ends in the key after a dot or is the key; the first matching key (in dict order) wins. The
key is grouped so that an alternation ``"q_proj|v_proj"`` applies to the whole key. A key
that matches no targeted layer is an error (a typo would otherwise silently do nothing).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# pattern field -> the global field it overrides
PATTERN_FIELDS: dict[str, str] = {
    "rank_pattern": "r",
    "alpha_pattern": "lora_alpha",
    "num_experts_pattern": "num_experts",
    "top_k_pattern": "top_k",
}


@dataclass(frozen=True)
class LayerSpec:
    """The structure one targeted layer is built with.

    Attributes:
        num_experts: N of this layer.
        r: rank of each of its experts (and of each shared expert).
        lora_alpha: scaling numerator of this layer.
        top_k: experts per token of its router (None: all, or not applicable).
    """

    num_experts: int
    r: int
    lora_alpha: float
    top_k: int | None


def key_matches(key: str, name: str) -> bool:
    """PEFT's rule: ``name`` is ``key`` or ends in ``"." + key`` (key as a regex)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(patterns: Mapping[str, Any] | None, name: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that matches ``name``, else ``default``."""
    for key, value in (patterns or {}).items():
        if key_matches(key, name):
            return value
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_value(field: str, value: Any) -> str | None:
    """Why ``value`` is not allowed in pattern ``field`` (None when it is)."""
    if field == "alpha_pattern":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return None if ok else "a number > 0"
    return None if _is_int(value) and value >= 1 else "an int >= 1"


def check_patterns(config: Any) -> list[str]:
    """Types and ranges of the pattern fields (the layer names are checked at injection)."""
    errors = []
    for field in PATTERN_FIELDS:
        patterns = getattr(config, field)
        if not isinstance(patterns, dict):
            errors.append(f"`{field}` must be a dict {{module name pattern: value}}, got {patterns!r}")
            continue
        for key, value in patterns.items():
            if not (isinstance(key, str) and key):
                errors.append(f"`{field}` keys must be non-empty strings, got {key!r}")
                continue
            try:
                re.compile(key)
            except re.error as err:
                errors.append(f"`{field}` key {key!r} is not a valid regular expression ({err})")
            need = _bad_value(field, value)
            if need:
                errors.append(f"`{field}[{key!r}]` must be {need}, got {value!r}")
    if config.router == "soft" and config.top_k_pattern:
        errors.append(
            f"`top_k_pattern` must be empty for router='soft' (it uses all experts), got {config.top_k_pattern!r}"
        )
    return errors


def layer_specs(config: Any, names: Sequence[str]) -> dict[str, LayerSpec]:
    """{name: LayerSpec} for the targeted layers ``names`` of a model.

    Raises:
        ValueError: a pattern key that matches none of ``names`` (the message names the field
            and the key and shows some layer names), or a layer whose top_k exceeds its N.
    """
    problems = []
    for field in PATTERN_FIELDS:
        for key in getattr(config, field):
            if not any(key_matches(key, name) for name in names):
                problems.append(
                    f"`{field}` key {key!r} matches no targeted layer; targeted layers are e.g. {list(names)[:4]} "
                    "(a key matches a name that is the key or ends in '.' + key)"
                )
    specs = {}
    for name in names:
        spec = LayerSpec(
            num_experts=pattern_value(config.num_experts_pattern, name, config.num_experts),
            r=pattern_value(config.rank_pattern, name, config.r),
            lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            top_k=pattern_value(config.top_k_pattern, name, config.top_k),
        )
        if spec.top_k is not None and spec.top_k > spec.num_experts:
            problems.append(
                f"layer {name!r}: `top_k`={spec.top_k} must be <= its num_experts={spec.num_experts} "
                "(set `top_k_pattern` or `num_experts_pattern` for it)"
            )
        specs[name] = spec
    if problems:
        raise ValueError("invalid per-layer MoLoRA structure:\n  - " + "\n  - ".join(problems))
    return specs
