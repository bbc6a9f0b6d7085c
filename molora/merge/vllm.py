"""What vLLM's LoRA loader accepts, as rules that an export follows and a validator checks.

vLLM serves one PEFT LoRA adapter per request (``vllm/lora/peft_helper.py`` and
``vllm/lora/models.py``). Its loader:

- keeps only the config keys it knows (``r``, ``lora_alpha``, ``target_modules``, ``bias``,
  ``modules_to_save``, ``use_rslora``, ``use_dora``, ...) and silently drops the rest, so
  ``rank_pattern`` / ``alpha_pattern`` (and ``layers_to_transform`` / ``layers_pattern``)
  are ignored: every module is read with the one ``r`` and scaled with ``lora_alpha / r``;
- refuses ``r > max_lora_rank``; ``--max-lora-rank`` must be one of {8, 16, 32, 64, 128,
  256, 320, 512} and defaults to 16 (older versions cap it at 64);
- refuses ``modules_to_save`` and DoRA (``use_dora``);
- refuses an adapter bias unless bias support is enabled (``bias`` must be ``"none"``);
- reads tensors ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
  (out, r) and refuses keys of other modules; a module the served model lacks is not
  served, so an adapter that targets none of its modules serves the base model unchanged.

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
    "VLLM_RANKS",
    "check_vllm_adapter",
    "check_vllm_config",
    "serve_command",
    "vllm_rank",
]

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
DEFAULT_MAX_LORA_RANK = 16
_IGNORED_KEYS = ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<kind>weight|bias)$")


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
    """The ``vllm serve`` command line serving ``adapters`` ({name: folder}, or one folder) of rank <= ``rank``."""
    if not isinstance(adapters, Mapping):
        adapters = {Path(adapters).name or "molora": adapters}
    modules = " ".join(f"{name}={path}" for name, path in adapters.items())
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
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r must be an int >= 1, got {r!r}")
        r = None
    elif r > VLLM_RANKS[-1]:
        problems.append(f"r={r} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
    elif max_lora_rank is not None and r > max_lora_rank:
        problems.append(
            f"r={r} is greater than max_lora_rank={max_lora_rank}; serve with --max-lora-rank {vllm_rank(r)}"
        )
    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        problems.append(f"max_lora_rank must be one of {list(VLLM_RANKS)}, got {max_lora_rank}")
    for key in _IGNORED_KEYS:
        if config.get(key):
            problems.append(f"{key} is set ({_short(config[key])}) but vLLM ignores it: every module must have r={r}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} is not supported by vLLM (it must be null)")
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not support DoRA")
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r}: vLLM loads an adapter bias only with bias support enabled; use 'none'"
        )
    if not config.get("target_modules"):
        problems.append("target_modules is empty")
    if shapes is not None:
        problems += _check_tensors(shapes, r, config.get("bias", "none") != "none")
    if base_model is not None:
        problems += _check_base(config, shapes, base_model)
    return problems


def _check_tensors(shapes: Mapping[str, list[int]], r: int | None, bias: bool) -> list[str]:
    """Tensor keys and shapes: lora_A (r, in) and lora_B (out, r) per module, nothing else."""
    problems, modules = [], {}
    for key, shape in sorted(shapes.items()):
        m = _KEY.match(key)
        if m is None:
            problems.append(f"tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A/B.weight)")
            continue
        if m["kind"] == "bias":
            if not bias:
                problems.append(f"tensor {key!r} is an adapter bias, which vLLM refuses while bias='none'")
            continue
        modules.setdefault(m["module"], {})[m["ab"]] = list(shape)
        rows = shape[0] if m["ab"] == "A" else shape[-1]
        if len(shape) != 2 or (r is not None and rows != r):
            problems.append(f"tensor {key!r} has shape {list(shape)}; vLLM reads every module with rank r={r}")
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
