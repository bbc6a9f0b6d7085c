"""Saving and loading MoLoRA adapters: safetensors + JSON only (no pickle), atomic writes.

A saved adapter is a folder with

- ``molora_config.json``: {"molora_version", "config" (MoLoRAConfig), "base_model_name_or_path",
  "modules": {name: {"in_features", "out_features", "fan_in_fan_out", "num_experts", "r"}},
  "modules_to_save": [...], "tensors": {key: shape}}; "num_experts" and "r" are the layer's
  own (after the config's patterns; adapters saved before they were recorded omit them)
- ``molora_model.safetensors``: ``{name}.lora_A`` (N, r, in) ((1, r, in) with share_lora_A),
  ``{name}.lora_B`` (N, out, r), ``{name}.lora_A_shared`` (M, r, in) and
  ``{name}.lora_B_shared`` (M, out, r) when the layer has M > 0 shared experts,
  ``{name}.lora_magnitude`` (out,) with ``use_dora``, the PiSSA residual buffers
  ``{name}.pissa_A`` (N, r, in), ``{name}.pissa_B`` (N, out, r), ``{name}.pissa_gates`` (R, N)
  with ``init_lora_weights="pissa..."`` (so the adapter applies to the original base weights),
  ``{name}.router.<param>`` for every MoLoRA layer that owns its router (with
  ``router_sharing="block"`` only the first targeted layer of each block), and the parameters of modules_to_save
  under their qualified names.

Loading checks the base model (module names, shapes) and the tensor file (keys, shapes)
against the metadata before the base model is touched, and says exactly what does not fit.
The folder is replaced as one unit (:func:`molora.atomic.atomic_directory`): a kill or an error
at any moment leaves the previous adapter or the new one, never new weights with an old config.
Other files in the folder (a README, a tokenizer) are kept, and so are its modes (a private
0700 adapter stays private). A second process saving to the same folder at the same time is
refused (:class:`molora.atomic.FolderBusyError`); a reader never disturbs a save in progress.
A symlinked folder is saved into its target.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from molora._version import __version__
from molora.atomic import atomic_directory, atomic_save_safetensors, atomic_write_text, recover_directory
from molora.core.config import MoLoRAConfig
from molora.core.layer import linear_shape
from molora.inject import find_modules_to_save, find_target_modules

CONFIG_NAME = "molora_config.json"
WEIGHTS_NAME = "molora_model.safetensors"


def base_model_name(model: torch.nn.Module) -> str | None:
    """The name or path the base model was loaded from, if transformers recorded it.

    A local folder is recorded as an absolute path, so that the adapter (and the ``vllm serve``
    line of an export) finds its base from any directory; a Hub id (no such folder here) is
    kept as it is.
    """
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    local = Path(os.path.expanduser(str(name)))
    return str(local.resolve()) if local.is_dir() else str(name)


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The tensors a MoLoRA adapter consists of, keyed as in ``molora_model.safetensors``."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.molora_layers().items():
        state[f"{name}.lora_A"] = layer.lora_A
        state[f"{name}.lora_B"] = layer.lora_B
        if getattr(layer, "num_shared_experts", 0):
            state[f"{name}.lora_A_shared"] = layer.lora_A_shared
            state[f"{name}.lora_B_shared"] = layer.lora_B_shared
        if getattr(layer, "use_dora", False):
            state[f"{name}.lora_magnitude"] = layer.lora_magnitude
        if getattr(layer, "pissa_B", None) is not None:  # the frozen residual: applies to the original W0
            for key in ("pissa_A", "pissa_B", "pissa_gates"):
                state[f"{name}.{key}"] = getattr(layer, key)
        if getattr(layer, "owns_router", True):  # router_sharing="block": saved once, by the block's first layer
            for pname, param in layer.router.named_parameters():
                state[f"{name}.router.{pname}"] = param
    for name in model.modules_to_save:
        for pname, param in model.base_model.get_submodule(name).named_parameters():
            state[f"{name}.{pname}"] = param
    return state


def save_molora(model: Any, save_directory: str | os.PathLike, *, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter of ``model`` to ``save_directory`` (see module docstring).

    ``state`` replaces :func:`adapter_state_dict` (same keys): a model sharded over processes
    (FSDP2, whose parameters are shards) passes the full tensors it gathered on every rank.
    """
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"`save_directory` {str(directory)!r} exists and is not a folder")
    state = adapter_state_dict(model) if state is None else state
    meta: dict[str, Any] = {
        "molora_version": __version__,
        "config": model.molora_config.to_dict(),
        "base_model_name_or_path": base_model_name(model.base_model),
        "modules": {
            name: _module_entry(l.in_features, l.out_features, l.fan_in_fan_out, l.num_experts, l.r)
            for name, l in model.molora_layers().items()
        },
        "modules_to_save": list(model.modules_to_save),
        "tensors": {k: list(v.shape) for k, v in state.items()},
    }
    owned = (CONFIG_NAME, WEIGHTS_NAME)
    with atomic_directory(directory, owned=lambda name: name in owned, expect=owned) as tmp:
        atomic_save_safetensors(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "library": "molora"})
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")


def _module_entry(in_features: int, out_features: int, fan_in_fan_out: bool, num_experts: int, r: int) -> dict:
    return {
        "in_features": in_features,
        "out_features": out_features,
        "fan_in_fan_out": fan_in_fan_out,
        "num_experts": num_experts,
        "r": r,
    }


def _base_modules(config: MoLoRAConfig, base_model: torch.nn.Module, saved: dict[str, Any]) -> dict[str, dict]:
    """What the metadata's "modules" should say for ``base_model``: shapes and per-layer N and r.

    Raises:
        ValueError: the config's pattern keys do not fit the base's target layers.
    """
    names = find_target_modules(base_model, config.target_modules)
    specs = config.layer_specs(names)
    legacy = not any(isinstance(v, dict) and "r" in v for v in saved.values())  # saved before N, r were recorded
    found = {}
    for name in names:
        entry = _module_entry(*linear_shape(base_model.get_submodule(name)), specs[name].num_experts, specs[name].r)
        if legacy:
            del entry["num_experts"], entry["r"]
        found[name] = entry
    return found


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``molora_config.json`` of a saved adapter folder."""
    recover_directory(path)  # a save killed between its two renames left the previous folder aside
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no MoLoRA adapter at {str(path)!r}: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(meta).__name__}; the checkpoint is corrupt")
    for key in ("config", "modules", "tensors"):
        if key not in meta:
            raise ValueError(f"{config_path} has no {key!r} entry; the checkpoint is corrupt or not a MoLoRA adapter")
        if not isinstance(meta[key], dict):
            raise ValueError(
                f"{config_path}: {key!r} must be a JSON object, got {json.dumps(meta[key])[:60]}; the checkpoint is corrupt"
            )
    return meta


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names


def _file_header(weights_path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """``({key: shape}, {key: dtype})`` of a safetensors file, from its header only."""
    try:
        with safe_open(weights_path, framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: list(s.get_shape()) for k, s in slices.items()}, {k: s.get_dtype() for k, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights_path} is not a readable safetensors file ({e}); the checkpoint is corrupt") from e


def _config_shapes(config: MoLoRAConfig, base_model: torch.nn.Module, names: list[str]) -> dict[str, list[int]]:
    """The expert tensors' shapes that ``config`` builds on ``base_model``'s layers ``names``
    (lora_A (N or 1, r, in), lora_B (N, out, r), shared (M, r, in) / (M, out, r)); routers
    and modules_to_save are left to the shape check after building."""
    specs, shapes = config.layer_specs(names), {}
    for name in names:
        d_in, d_out, _ = linear_shape(base_model.get_submodule(name))
        n, r, m = specs[name].num_experts, specs[name].r, config.num_shared_experts
        shapes[f"{name}.lora_A"] = [1 if config.share_lora_A else n, r, d_in]
        shapes[f"{name}.lora_B"] = [n, d_out, r]
        if m:
            shapes[f"{name}.lora_A_shared"], shapes[f"{name}.lora_B_shared"] = [m, r, d_in], [m, d_out, r]
    return shapes


def non_finite_layers(model: Any) -> list[str]:
    """The MoLoRA layers of ``model`` with a NaN or inf weight (experts, shared experts, router);
    of a model sharded with FSDP2, in this process's shards."""
    bad = []
    with torch.no_grad():
        for name, layer in model.molora_layers().items():
            local = [p.to_local() if hasattr(p, "to_local") else p for p in layer.parameters()]  # FSDP2: this rank's shard
            if not all(bool(torch.isfinite(p).all()) for p in local if p.is_floating_point()):
                bad.append(name)
    return bad


def _diff(expected: dict[str, Any], found: dict[str, Any], what: str) -> list[str]:
    problems = []
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{what} missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        problems.append(f"{what} unexpected: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    for key in sorted(set(expected) & set(found)):
        if expected[key] != found[key]:
            problems.append(f"{what} {key!r}: saved {expected[key]}, found {found[key]}")
    return problems


def load_molora(cls, base_model: torch.nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> Any:
    """Validate a saved adapter against ``base_model``, then inject and load it."""
    path = Path(path)
    meta = read_metadata(path)
    config = MoLoRAConfig.from_dict(meta["config"])
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"no MoLoRA weights at {str(path)!r}: {WEIGHTS_NAME} is missing")

    # 1. the base model must have the same target layers with the same shapes (and N, r per layer)
    found = _base_modules(config, base_model, meta["modules"])
    problems = _diff(meta["modules"], found, "base model layer")
    to_save = find_modules_to_save(base_model, config.modules_to_save)
    if sorted(to_save) != sorted(meta.get("modules_to_save", [])):
        problems.append(f"modules_to_save: saved {meta.get('modules_to_save')}, found {to_save}")
    # 2. the tensor file must hold exactly the recorded tensors, float, of the shapes the
    # config builds (checked from the header, before anything is allocated)
    file_shapes, file_dtypes = _file_header(weights_path)
    not_float = {k: d for k, d in file_dtypes.items() if d not in _FLOAT_DTYPES}
    if not_float:
        key = sorted(not_float)[0]
        raise ValueError(
            f"{weights_path} holds non-float tensors ({len(not_float)}), e.g. {key!r} of dtype {not_float[key]}: "
            f"adapter weights must be one of {list(_FLOAT_DTYPES)}; the file is damaged or not a MoLoRA adapter"
        )
    if not problems:  # a hostile num_experts or r fails here, before the model allocates it
        wanted = _config_shapes(config, base_model, list(found))
        problems += _diff(wanted, {k: v for k, v in file_shapes.items() if k in wanted}, "tensor (as the config builds it)")
    problems += _diff(meta["tensors"], file_shapes, "tensor")
    for name in to_save:
        for pname, param in base_model.get_submodule(name).named_parameters():
            key = f"{name}.{pname}"
            if key in file_shapes and file_shapes[key] != list(param.shape):
                problems.append(f"modules_to_save tensor {key!r}: saved {file_shapes[key]}, base model has {list(param.shape)}")
    if problems:
        raise ValueError(
            f"the MoLoRA adapter at {str(path)!r} does not fit this {type(base_model).__name__} "
            "(nothing was loaded):\n  - " + "\n  - ".join(problems)
        )

    # 3. build and assign
    model = cls(base_model, config, init_weights=False)  # the file holds the factors (and PiSSA's buffers)
    state = adapter_state_dict(model)
    problems = _diff({k: list(v.shape) for k, v in state.items()}, file_shapes, "tensor")
    if problems:  # the config builds a different adapter than the one saved
        model.unload()
        raise ValueError(f"the MoLoRA adapter at {str(path)!r} does not match its config:\n  - " + "\n  - ".join(problems))
    with safe_open(weights_path, framework="pt") as f, torch.no_grad():
        for key, param in state.items():
            param.copy_(f.get_tensor(key))
    bad = non_finite_layers(model)
    if bad:
        warnings.warn(
            f"the MoLoRA adapter at {str(path)!r} has NaN or inf weights in {len(bad)} layer(s), e.g. {bad[0]!r}: "
            "its outputs will be NaN there (the run that wrote it diverged?); an export refuses it",
            stacklevel=3,
        )
    if not is_trainable:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return model
