"""Build a MoLoRA model whose experts are existing PEFT LoRA adapters (expert i = adapter i).

The reverse of :mod:`molora.merge.export`: a user who already has several LoRA adapters of one
base model can mix them with a router and train only the router.

Each adapter i contributes s_i B_i A_i at a module, with its own PEFT scaling
s_i = alpha_i / r_i (or alpha_i / sqrt(r_i) with rsLoRA; ``rank_pattern`` /
``alpha_pattern`` per module). molora applies one scaling s (from the MoLoRA config) to every
expert, so s_i / s is folded into B_i:

    lora_A[i, :r_i] = A_i          lora_B[i, :, :r_i] = (s_i / s) B_i
    lora_B[i, :, r_i:] = 0         lora_A[i, r_i:] keeps its random init

so that s * B'_i A'_i = s_i B_i A_i exactly. Adapters of smaller rank than ``config.r`` are
padded that way: the zero columns of B keep the padded slots inert but trainable (their A
rows are random, not zero, so gradients can reach them if the experts are unfrozen).

With ``router="task"`` and one adapter per task (``num_tasks == len(paths)``), task i starts
on adapter i: row i of every layer's task table is ``log(g (N - 1) / (1 - g))`` at column i
and 0 elsewhere, so that task i's gate of expert i is ``g = identity_gate`` (default
``1 - 1e-6``) and the other experts share ``1 - g``. The routed model then equals adapter i
to float32 precision at step 0 (the other experts contribute 1e-6 of their update), while
the router keeps a (small) gradient and can still learn to mix; a lower ``identity_gate``
(e.g. 0.9) starts a softer mix that moves faster. Exactly one-hot gates would need an
infinite logit gap, and a router that can never learn again.

Shared experts (``num_shared_experts``) start as zero updates and stay trainable even with
``freeze_experts`` (a residual adapter beside the frozen ones). ``share_lora_A`` and
``num_experts_pattern`` are refused: independent adapters have their own A's and one expert each.

Only safetensors adapters are read (no pickle). Adapters are checked against the base model
(module names, shapes, and the recorded base model name) before any weight is assigned.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from molora.core.config import lora_scaling
from molora.core.layer import linear_shape
from molora.core.patterns import pattern_value
from molora.io import base_model_name

__all__ = ["IDENTITY_GATE", "LoraAdapter", "freeze_experts", "from_lora_adapters", "read_lora_adapter"]

# task i's gate of adapter i at step 0 when the task router is built from one adapter per task
IDENTITY_GATE = 1.0 - 1e-6

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter read from disk.

    Attributes:
        path: the adapter folder.
        config: the raw ``adapter_config.json``.
        factors: ``{module_name: (A (r_i, in), B (out, r_i))}``, names as in the base model.
        scalings: ``{module_name: s_i}``, PEFT's scaling of that module.
    """

    path: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's documented per-module override: a key matches a module name ending in it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder (``adapter_config.json`` + safetensors).

    Args:
        path: folder written by ``PeftModel.save_pretrained`` (or molora's export).

    Returns:
        The :class:`LoraAdapter`.

    Raises:
        FileNotFoundError: no config, or no ``adapter_model.safetensors``.
        ValueError: not a plain LoRA adapter (other peft_type, DoRA, LoRA bias, extra keys
            such as modules_to_save or embedding LoRA), or A/B ranks that do not agree.
    """
    path = Path(path)
    config = _read_lora_config(path)
    parts = _split_ab(path, load_file(str(path / "adapter_model.safetensors")))
    factors, scalings = {}, {}
    use_rslora = bool(config.get("use_rslora", False))
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {path}: module {module} has only lora_{''.join(ab)}, needs both A and B")
        lora_A, lora_B = ab["A"], ab["B"]  # (r_i, in), (out, r_i)
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(
                f"adapter {path}: module {module} needs lora_A (r, in) and lora_B (out, r), got "
                f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
            )
        rank = lora_A.shape[0]
        expected = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        if expected != rank:
            raise ValueError(f"adapter {path}: module {module} has rank {rank} but its config says r={expected}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        factors[module] = (lora_A, lora_B)
        scalings[module] = lora_scaling(float(alpha), rank, use_rslora)
    if not factors:
        raise ValueError(f"adapter {path} has no LoRA weights")
    return LoraAdapter(path=path, config=config, factors=factors, scalings=scalings)


def _read_lora_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA adapter whose weights are in safetensors."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder: no adapter_config.json")
    if not weights_file.is_file():
        hint = " (only adapter_model.bin: pickle is not loaded; re-save with safe_serialization)" if (
            path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors{hint}")
    config = json.loads(config_file.read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"`peft_type` must be 'LORA', got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        problems.append("`use_dora` must be false (DoRA magnitudes have no MoLoRA equivalent)")
    if config.get("lora_bias"):
        problems.append("`lora_bias` must be false")
    if config.get("modules_to_save"):
        problems.append(f"`modules_to_save` must be empty, got {config['modules_to_save']!r}")
    if problems:
        raise ValueError(f"adapter {path} cannot become a MoLoRA expert:\n  - " + "\n  - ".join(problems))
    return config


def _split_ab(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": lora_A, "B": lora_B}} from PEFT's state-dict keys; other keys are an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            unsupported.append(key)
            continue
        parts.setdefault(match["module"], {})[match["ab"]] = value
    if unsupported:
        raise ValueError(
            f"adapter {path} holds weights that are not lora_A/lora_B of linear layers "
            f"(e.g. embedding LoRA, modules_to_save): {sorted(unsupported)[:5]}"
        )
    return parts


def _same_base(recorded: str, name: str) -> bool:
    """The same base model: equal names, or paths to the same folder (relative or absolute, ``~``)."""
    if recorded == name:
        return True
    a, b = Path(os.path.expanduser(recorded)), Path(os.path.expanduser(name))
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _check_against_base(adapters: Sequence[LoraAdapter], base: nn.Module, check_base_name: bool) -> None:
    """Module names and shapes of every adapter against the (not yet injected) base model."""
    base_name = base_model_name(base)
    modules = dict(base.named_modules())
    for i, adapter in enumerate(adapters):
        recorded = adapter.base_model_name_or_path
        if check_base_name and recorded and base_name and not _same_base(recorded, base_name):
            raise ValueError(
                f"adapter {i} ({adapter.path}) was trained on base model {recorded!r}, but the base model is "
                f"{base_name!r}; pass check_base_name=False if they are the same weights"
            )
        for name, (lora_A, lora_B) in adapter.factors.items():
            if name not in modules:
                raise ValueError(
                    f"adapter {i} ({adapter.path}) targets module {name!r}, which the base model does not have "
                    f"(adapter of another base model?); base modules look like {list(modules)[1:4]}"
                )
            try:
                d_in, d_out, _ = linear_shape(modules[name])
            except TypeError as err:
                raise ValueError(f"adapter {i} ({adapter.path}): module {name!r}: {err}") from None
            if lora_A.shape[1] != d_in or lora_B.shape[0] != d_out:
                raise ValueError(
                    f"adapter {i} ({adapter.path}): module {name!r} is ({d_in} -> {d_out}) in the base model "
                    f"but the adapter has lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} "
                    "(adapter of another base model?)"
                )


def from_lora_adapters(
    build: Callable[[nn.Module, Any], Any],
    base: nn.Module,
    paths: Sequence[str | os.PathLike],
    config: Any,
    *,
    freeze_experts: bool = True,
    identity_gate: float | None = IDENTITY_GATE,
    check_base_name: bool = True,
) -> Any:
    """A MoLoRA model over ``base`` whose expert i is the LoRA adapter at ``paths[i]``.

    ``config.target_modules`` must select exactly the modules the adapters target (every
    adapter must target the same set), ``config.num_experts`` must equal ``len(paths)`` and
    ``config.r`` must be at least the largest adapter rank (smaller adapters are padded, see
    the module docstring). Each adapter's own scaling (alpha / r, rsLoRA, rank_pattern,
    alpha_pattern) is folded into its B so that expert i alone reproduces adapter i. The
    router keeps its fresh initialization, except with ``router="task"`` and
    ``num_tasks == len(paths)``: task i then starts routed to adapter i (``identity_gate``,
    see the module docstring). Like ``get_molora_model``, this injects into
    ``base`` in place; on a mismatch found after injection the base is restored first.

    Args:
        build: ``build(base, config) -> MoLoRAModel`` (the model class, or ``get_molora_model``);
            taken as an argument so that this module never imports the facade above it.
        base: the transformers model the adapters were trained on.
        paths: adapter folders, one per expert.
        config: the MoLoRAConfig.
        freeze_experts: True (default): the experts' lora_A / lora_B get
            ``requires_grad=False``, so that only the router (and shared experts,
            modules_to_save) trains: the adapters are kept as they are and mixed (LoraHub,
            MoLE). False: the experts train too, starting from the adapters.
        identity_gate: with the task router and one adapter per task, task i's starting gate
            of adapter i, in (1/N, 1); None keeps the router's random init.
        check_base_name: compare each adapter's ``base_model_name_or_path`` with the base's
            name (when both are set).

    Returns:
        The MoLoRAModel.

    Raises:
        ValueError: wrong number of adapters, rank above ``config.r`` (or above a layer's
            ``rank_pattern`` rank), adapters of another base model, target modules that differ
            from the config's or between adapters, or a structure that independent adapters
            cannot fill: ``share_lora_A`` (one A for all experts) or ``num_experts_pattern``.
    """
    _check_structure(config)
    _check_identity_gate(identity_gate, config.num_experts)
    adapters = _read_adapters(paths, config)
    _check_against_base(adapters, base, check_base_name)
    model = build(base, config)
    layers = model.molora_layers()
    targeted = set(adapters[0].factors)
    if set(layers) != targeted:
        only_config = sorted(set(layers) - targeted)
        only_adapter = sorted(targeted - set(layers))
        model.unload()
        raise ValueError(
            f"`target_modules`={config.target_modules!r} selects other modules than the adapters target: "
            f"only in the config {only_config[:4]}, only in the adapters {only_adapter[:4]}"
        )
    _copy_experts(layers, adapters)
    if identity_gate is not None and config.router == "task" and config.num_tasks == len(adapters):
        _route_task_i_to_expert_i(layers, identity_gate)
    if freeze_experts:
        _freeze(model)
    return model


def _freeze(model: Any) -> None:
    """``requires_grad=False`` on every layer's lora_A / lora_B (shared experts, routers and
    modules_to_save stay as they are)."""
    for layer in model.molora_layers().values():
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)


freeze_experts = _freeze  # public name (the keyword argument of from_lora_adapters shadows it there)


def _check_identity_gate(gate: float | None, num_experts: int) -> None:
    if gate is None or num_experts < 2:  # one expert: its gate is 1 whatever the table
        return
    ok = isinstance(gate, (int, float)) and not isinstance(gate, bool) and 1.0 / num_experts < gate < 1.0
    if not ok:
        raise ValueError(f"`identity_gate` must be None or in (1/num_experts, 1) = (1/{num_experts}, 1), got {gate!r}")


@torch.no_grad()
def _route_task_i_to_expert_i(layers: Mapping[str, nn.Module], gate: float) -> None:
    """Task table rows: logit ``log(g (N-1) / (1-g))`` at expert i for task i, 0 elsewhere, so
    that softmax gives task i the gate g on expert i (block-shared routers are set once)."""
    for layer in layers.values():
        if not getattr(layer, "owns_router", True):
            continue
        table = layer.router.table  # (tasks, N), tasks == N here
        n = table.shape[1]
        gap = math.log(gate * (n - 1) / (1.0 - gate)) if n > 1 else 0.0
        table.zero_()
        table.diagonal().fill_(gap)


def _check_structure(config: Any) -> None:
    if getattr(config, "share_lora_A", False):
        raise ValueError(
            "`share_lora_A=True` cannot be built from LoRA adapters: each adapter has its own A, and the shared-A "
            "form has one A for all experts; use share_lora_A=False (the default) with from_lora_adapters"
        )
    init = getattr(config, "init_lora_weights", True)
    if init is not True:
        raise ValueError(
            f"`init_lora_weights`={init!r} cannot be used with from_lora_adapters: the adapters are the experts' "
            "initial weights (PiSSA would replace them); use init_lora_weights=True"
        )
    if getattr(config, "num_experts_pattern", None):
        raise ValueError(
            f"`num_experts_pattern`={config.num_experts_pattern!r} cannot be used with from_lora_adapters: every "
            f"layer has one expert per adapter (num_experts={config.num_experts})"
        )


def _read_adapters(paths: Sequence[str | os.PathLike], config: Any) -> list[LoraAdapter]:
    """Read every adapter and check them against the config and against each other."""
    paths = list(paths)
    if len(paths) != config.num_experts:
        raise ValueError(
            f"`num_experts` must equal the number of adapters: got num_experts={config.num_experts} "
            f"and {len(paths)} adapter paths"
        )
    adapters = [read_lora_adapter(p) for p in paths]
    rank_pattern = getattr(config, "rank_pattern", None)
    max_rank = max(a.shape[0] for ad in adapters for a, _ in ad.factors.values())
    if max_rank > config.r and not rank_pattern:
        raise ValueError(f"`r` must be >= the largest adapter rank {max_rank}, got r={config.r}")
    for module in adapters[0].factors:
        layer_r = pattern_value(rank_pattern, module, config.r)
        rank = max(ad.factors[module][0].shape[0] for ad in adapters if module in ad.factors)
        if rank > layer_r:
            raise ValueError(f"`r` of {module} (r or rank_pattern) must be >= its largest adapter rank {rank}, got {layer_r}")
    first = set(adapters[0].factors)
    for i, adapter in enumerate(adapters[1:], start=1):
        if set(adapter.factors) != first:
            diff = sorted(set(adapter.factors) ^ first)
            raise ValueError(
                f"adapters 0 and {i} target different modules (e.g. {diff[:4]}); every expert needs the same "
                "target modules"
            )
    return adapters


@torch.no_grad()
def _copy_experts(layers: Mapping[str, nn.Module], adapters: Sequence[LoraAdapter]) -> None:
    """Expert i of every layer := adapter i, zero-padded to rank r, its scaling folded into B."""
    for name, layer in layers.items():
        for i, adapter in enumerate(adapters):
            lora_A, lora_B = adapter.factors[name]  # (r_i, in), (out, r_i)
            rank = lora_A.shape[0]
            ratio = adapter.scalings[name] / float(layer.scaling)
            layer.lora_A[i, :rank].copy_(lora_A)
            layer.lora_B[i].zero_()
            layer.lora_B[i, :, :rank].copy_(lora_B.double() * ratio)
