"""What vLLM's LoRA loader accepts, as rules that an export follows and a validator checks.

The rules are those of vLLM 0.34 (:data:`VLLM_VERSION`), read from its own loader code
(``vllm/lora/peft_helper.py``: ``PEFTHelper.from_dict``, ``_validate_features``,
``validate_legal``, ``get_rank_and_scaling``; ``vllm/lora/lora_model.py``:
``from_local_checkpoint``; ``vllm/config/lora.py``: the allowed ``max_lora_rank``). vLLM
serves one PEFT LoRA adapter per request, and its loader:

- needs ``r``, ``lora_alpha`` and ``target_modules``; keeps only the config keys it knows and
  silently drops the rest (so ``layers_to_transform`` / ``layers_pattern`` are ignored: every
  module the tensors name is served);
- applies per-module ``rank_pattern`` / ``alpha_pattern`` as PEFT does (first key matching
  ``(.*\\.)?(key)$`` wins); refuses a rank (``r`` or any ``rank_pattern`` value) above
  ``--max-lora-rank``, which must be one of {1, 8, 16, 32, 64, 128, 256, 320, 512} and
  defaults to 16;
- refuses DoRA (``use_dora``), ``lora_bias``, an adapter ``bias`` other than ``"none"``,
  ``layer_replication``, aLoRA (``alora_invocation_tokens``), BD-LoRA (``use_bdlora``),
  QALoRA (``use_qalora``), and the ``init_lora_weights`` that change the base weights when
  PEFT loads the adapter (``pissa*``, ``olora``, ``corda``, ``loftq``: any string but
  ``gaussian``, ``eva``, ``orthogonal``, ``mica``, ``lora_ga``);
- refuses ``modules_to_save`` other than ``classifier`` / ``score`` (classification heads);
- reads tensors ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
  (out, r) and refuses other keys; a module the served model lacks is not served.

vLLM takes LoRA only for model architectures whose vLLM implementation supports it; that list
lives in vLLM's model code and is **not** checked here. One case is refused: ``fan_in_fan_out``
(GPT-2-style ``Conv1D`` layers), since vLLM's GPT-2 models take no LoRA.

:func:`check_vllm_adapter` applies these rules to any adapter folder and returns the list
of problems (empty: servable); :func:`vllm_rank` is the rank an export pads up to.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "DEFAULT_MAX_LORA_RANK",
    "NOT_CHECKED",
    "VLLM_RANKS",
    "VLLM_VERSION",
    "check_vllm_adapter",
    "check_vllm_config",
    "max_rank",
    "module_rank",
    "serve_command",
    "vllm_rank",
]

VLLM_VERSION = "0.34"  # the vLLM release whose LoRA loader these rules follow
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
DEFAULT_MAX_LORA_RANK = 16
NOT_CHECKED = (
    "whether vLLM supports LoRA for the base model's architecture, and vLLM's own names for its "
    "fused modules; the server's other limits (--max-loras, --max-cpu-loras, --lora-dtype)"
)
_IGNORED_KEYS = ("layers_to_transform", "layers_pattern")
_CLASSIFIER_HEADS = ("classifier", "score")  # the only modules_to_save vLLM loads
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # inits that leave the base as it is
_REFUSED_FEATURES = (  # (config key, what vLLM calls it)
    ("use_dora", "DoRA (use_dora)"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("layer_replication", "layer_replication"),
    ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("use_qalora", "QALoRA (use_qalora)"),
)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<kind>weight|bias)$")
_HEAD_KEY = re.compile(r"^base_model\.model\.(?:.+\.)?(?P<head>classifier|score)\.(?:weight|bias)$")


def vllm_rank(rank: int) -> int:
    """The smallest rank in :data:`VLLM_RANKS` that is >= ``rank`` (factors are zero-padded up to it).

    Raises:
        ValueError: ``rank`` is above vLLM's largest rank, 512.
    """
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(
        f"rank {rank} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}: export with method='svd' and a rank "
        f"from {list(VLLM_RANKS)}, or rank='auto'"
    )


def serve_command(
    adapters: Mapping[str, str | os.PathLike] | str | os.PathLike, rank: int, base: str | None = None
) -> str:
    """The ``vllm serve`` command line serving ``adapters`` ({name: folder}, or one folder) of rank <= ``rank``.

    Local folders (the base, when it is one, and the adapters) are written as absolute paths, so
    that the line runs from any directory; a Hub id is kept as it is.
    """
    if not isinstance(adapters, Mapping):
        adapters = {Path(adapters).resolve().name or "molora": adapters}
    modules = " ".join(f"{name}={Path(path).resolve()}" for name, path in adapters.items())
    if base and Path(os.path.expanduser(base)).is_dir():
        base = str(Path(os.path.expanduser(base)).resolve())
    return (
        f"vllm serve {base or '<BASE_MODEL>'} --enable-lora --max-lora-rank {vllm_rank(rank)} --lora-modules {modules}"
    )


def check_vllm_config(
    config: Mapping[str, Any],
    shapes: Mapping[str, list[int]] | None = None,
    *,
    max_lora_rank: int | None = None,
    base_model: nn.Module | None = None,
) -> list[str]:
    """The problems vLLM's loader would have with an adapter config (and its tensor shapes).

    Args:
        config: the parsed ``adapter_config.json``.
        shapes: ``{tensor key: shape}`` of ``adapter_model.safetensors``, or None to skip
            the tensor checks.
        max_lora_rank: the ``--max-lora-rank`` the server will run with (None: any allowed one).
        base_model: the model that will be served, to check that the target modules exist
            in it with these shapes (None: not checked).

    Returns:
        One line per problem; empty when vLLM loads the adapter as it is.
    """
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"the config lacks {missing}, which vLLM requires")
    problems += _check_ranks(config, max_lora_rank)
    problems += _check_features(config)
    if shapes is not None:
        problems += _check_tensors(config, shapes)
    if base_model is not None:
        problems += _check_base(config, shapes, base_model)
    return problems


def max_rank(config: Mapping[str, Any]) -> int | None:
    """The largest rank of any module (``r`` and the ``rank_pattern`` values), None if ``r`` is invalid."""
    r = config.get("r")
    if not _positive_int(r):
        return None
    pattern = config.get("rank_pattern") or {}
    return max([r, *(v for v in pattern.values() if _positive_int(v))]) if isinstance(pattern, Mapping) else r


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_ranks(config: Mapping[str, Any], max_lora_rank: int | None) -> list[str]:
    """``r`` and ``rank_pattern`` (applied per module by vLLM 0.34) within ``max_lora_rank``."""
    problems = []
    if "r" in config and not _positive_int(config["r"]):
        problems.append(f"r must be an int >= 1, got {config['r']!r}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, Mapping):
        problems.append(f"rank_pattern must be a {{module key: rank}} object, got {_short(pattern)}")
    else:
        bad = {k: v for k, v in pattern.items() if not _positive_int(v)}
        if bad:
            problems.append(f"rank_pattern values must be ints >= 1, got {_short(bad)}")
    top = max_rank(config)
    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        problems.append(f"--max-lora-rank must be one of {list(VLLM_RANKS)}, got {max_lora_rank}")
    if top is None:
        return problems
    which = "r" if top == config["r"] else "the largest rank_pattern rank"
    if top > VLLM_RANKS[-1]:
        problems.append(f"{which}={top} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
    elif max_lora_rank is not None and top > max_lora_rank:
        problems.append(
            f"{which}={top} is greater than max_lora_rank={max_lora_rank}; serve with --max-lora-rank {vllm_rank(top)}"
        )
    return problems


def _check_features(config: Mapping[str, Any]) -> list[str]:
    """PEFT features vLLM refuses, keys it silently drops, and what is not served as trained."""
    problems = []
    for key in _IGNORED_KEYS:
        if config.get(key) not in (None, [], ""):
            problems.append(f"{key} is set ({_short(config[key])}) but vLLM ignores it: every module in the tensors is served")
    to_save = config.get("modules_to_save") or []
    other = [m for m in to_save if m not in _CLASSIFIER_HEADS] if isinstance(to_save, list) else to_save
    if other:
        problems.append(
            f"modules_to_save={_short(to_save)}: vLLM loads none but {list(_CLASSIFIER_HEADS)} (classification heads)"
        )
    for key, name in _REFUSED_FEATURES:
        if config.get(key):
            problems.append(f"{key}={_short(config[key])}: vLLM does not support {name}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r}: vLLM refuses it (PiSSA, OLoRA, CorDA and LoftQ change the base weights when "
            "PEFT loads the adapter); convert it to a plain LoRA adapter with PEFT's "
            "path_initial_model_for_weight_conversion"
        )
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM does not support an adapter bias; use 'none'")
    if config.get("fan_in_fan_out"):
        problems.append(
            "fan_in_fan_out=true: the adapter is for Conv1D layers (GPT-2 style models), and vLLM's GPT-2 models "
            "take no LoRA"
        )
    if not config.get("target_modules") and "target_modules" in config:
        problems.append("target_modules is empty")
    return problems


def module_rank(config: Mapping[str, Any], module: str) -> int | None:
    """The rank vLLM reads ``module`` with: the first ``rank_pattern`` key matching it as PEFT's
    ``get_pattern_key`` does (``(.*\\.)?(key)$``), else ``r``."""
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        for key, rank in pattern.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return rank if _positive_int(rank) else None
            except re.error:
                return None
    r = config.get("r")
    return r if _positive_int(r) else None


def _check_tensors(config: Mapping[str, Any], shapes: Mapping[str, list[int]]) -> list[str]:
    """Tensor keys and shapes: lora_A (r, in) and lora_B (out, r) per module at its own rank,
    the classification heads of ``modules_to_save``, nothing else."""
    problems, modules = [], {}
    heads = set(config.get("modules_to_save") or []) & set(_CLASSIFIER_HEADS)
    for key, shape in sorted(shapes.items()):
        m = _KEY.match(key)
        if m is None:
            head = _HEAD_KEY.match(key)
            if head is None or head["head"] not in heads:
                problems.append(f"tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
            continue
        if m["kind"] == "bias":
            problems.append(f"tensor {key!r} is an adapter bias, which vLLM refuses")
            continue
        modules.setdefault(m["module"], {})[m["ab"]] = list(shape)
        r = module_rank(config, m["module"])
        rows = shape[0] if m["ab"] == "A" else shape[-1]
        if len(shape) != 2 or (r is not None and rows != r):
            problems.append(f"tensor {key!r} has shape {list(shape)}; vLLM reads module {m['module']} with rank {r}")
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
    if not modules:
        problems.append("the adapter holds no LoRA factors")
    return problems


def _check_base(config: Mapping[str, Any], shapes: Mapping[str, list[int]] | None, base: nn.Module) -> list[str]:
    """Target modules and factor shapes against the served model's modules."""
    from molora.core.layer import linear_shape

    problems = []
    modules = dict(base.named_modules())
    leaves = {n.rsplit(".", 1)[-1] for n in modules if n}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in modules if n):
            problems.append(f"target_modules regex {targets!r} matches no module of the model")
    else:
        missing = [t for t in targets if t not in leaves and t not in modules]
        if missing:
            problems.append(
                f"target_modules {missing} are not modules of the model (vLLM would serve the base model "
                f"there); module names look like {sorted(leaves)[:8]}"
            )
    for key, shape in sorted((shapes or {}).items()):
        m = _KEY.match(key)
        if m is None or m["kind"] != "weight":
            continue
        module = modules.get(m["module"])
        if module is None:
            problems.append(f"tensor {key!r}: the model has no module {m['module']!r}")
            continue
        try:  # a model with adapters injected (MoLoRA, PEFT) is checked on the layer they wrap
            d_in, d_out, _ = linear_shape(getattr(module, "base_layer", module))
        except TypeError:
            problems.append(f"tensor {key!r}: {m['module']!r} is a {type(module).__name__}, not a linear layer")
            continue
        want = d_in if m["ab"] == "A" else d_out
        got = shape[-1] if m["ab"] == "A" else shape[0]
        if got != want:
            problems.append(f"tensor {key!r} has shape {list(shape)}, the model's {m['module']} needs {want} there")
    return problems


def check_vllm_adapter(
    path: str | os.PathLike, *, max_lora_rank: int | None = None, base_model: nn.Module | None = None
) -> list[str]:
    """Apply vLLM's LoRA loading rules to the adapter folder ``path`` (see the module docstring).

    Args:
        path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        max_lora_rank: the server's ``--max-lora-rank`` (None: any allowed value).
        base_model: the served model, to check target modules and shapes against.

    Returns:
        The problems found, one line each; an empty list means vLLM loads it as it is.
    """
    from safetensors import safe_open

    path = Path(path)
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file():
        return [f"{config_path} is missing: not a PEFT adapter folder"]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        return [f"{config_path} is not valid JSON ({e})"]
    shapes = None
    if not weights_path.is_file():
        problem = [f"{weights_path} is missing (vLLM reads safetensors; adapter_model.bin is not checked here)"]
    else:
        problem = []
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return problem + check_vllm_config(config, shapes, max_lora_rank=max_lora_rank, base_model=base_model)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
