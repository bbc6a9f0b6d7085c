"""Finding target layers (PEFT's ``target_modules`` semantics), wrapping them, and unwrapping."""

from __future__ import annotations

import re

import torch
from torch import nn

from molora.core.config import MoLoRAConfig
from molora.core.init import init_pissa_
from molora.core.layer import Conv1D, MoLoRALinear, linear_shape
from molora.core.patterns import LayerSpec
from molora.core.routing import BlockRouting, RoutingContext
from routers import build_router

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT semantics: a list matches the exact name or a ``.suffix``; a str must re.fullmatch."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear(module)]


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Qualified names of the linear layers that ``target_modules`` selects, in model order.

    Raises:
        ValueError: nothing matches (the message lists linear layer names that exist), or
            the model already holds MoLoRA layers.
        TypeError: a matched module is not nn.Linear / Conv1D.
    """
    if any(isinstance(m, MoLoRALinear) for m in model.modules()):
        raise ValueError("the model already contains MoLoRA layers; call `unload()` first or build from a fresh base")
    found = []
    for name, module in model.named_modules():
        if not name or not matches(name, target_modules):
            continue
        if not _is_linear(module):
            raise TypeError(
                f"`target_modules` matched {name!r}, a {type(module).__name__}; MoLoRA wraps nn.Linear and "
                "transformers' Conv1D only: use a more precise name or regex"
            )
        found.append(name)
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
        raise ValueError(
            f"`target_modules`={target_modules!r} matched no module. Linear layers in this model end in: "
            f"{suffixes[:30]} (e.g. {_linear_names(model)[:3]})"
        )
    return found


def find_modules_to_save(model: nn.Module, patterns: list[str] | None) -> list[str]:
    if not patterns:
        return []
    found = [name for name, _ in model.named_modules() if name and matches(name, patterns)]
    if not found:
        raise ValueError(f"`modules_to_save`={patterns!r} matched no module of {type(model).__name__}")
    return found


def router_kwargs(config: MoLoRAConfig, spec: LayerSpec | None = None) -> dict:
    """Constructor keyword arguments of the configured router class (of one layer, given its ``spec``)."""
    num_experts, top_k = (config.num_experts, config.top_k) if spec is None else (spec.num_experts, spec.top_k)
    kwargs = {"num_experts": num_experts, "init_std": config.router_init_std, "debug": config.debug}
    if config.router == "topk":
        kwargs.update(top_k=top_k, jitter_noise=config.router_jitter_noise, normalize_top_k=config.normalize_top_k)
    elif config.router == "topp":
        kwargs.update(top_p=config.top_p, top_k=top_k, jitter_noise=config.router_jitter_noise)
    elif config.router == "task":
        kwargs.update(num_tasks=config.num_tasks, top_k=top_k, normalize_top_k=config.normalize_top_k)
    return kwargs


def _adapter_dtype(config: MoLoRAConfig, base_layer: nn.Module) -> torch.dtype:
    if config.adapter_dtype == "base":
        dtype = base_layer.weight.dtype
        if dtype.is_floating_point:
            return dtype
        # quantized storage (bitsandbytes 4-bit packs into uint8): the layer's compute dtype
        compute = getattr(base_layer, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32
    return _DTYPES[config.adapter_dtype]


def inject_molora(
    model: nn.Module, config: MoLoRAConfig, routing_context: RoutingContext, *, init_weights: bool = True
) -> tuple[dict[str, MoLoRALinear], list[str]]:
    """Replace every target layer of ``model`` in place by a MoLoRALinear; freeze the rest.

    Each layer takes its N, r, lora_alpha and top_k from the config's patterns
    (:mod:`molora.core.patterns`), checked before the model is touched. ``init_weights=False``
    skips the PiSSA SVDs (a saved adapter is about to overwrite the factors and buffers).

    Returns:
        ({qualified name: MoLoRALinear}, names of modules_to_save kept trainable).
    """
    names = find_target_modules(model, config.target_modules)
    specs = config.layer_specs(names)
    to_save = find_modules_to_save(model, config.modules_to_save)
    for param in model.parameters():
        param.requires_grad_(False)
    layers: dict[str, MoLoRALinear] = {}
    blocks = router_blocks(names, specs) if config.router_sharing == "block" else {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child)
        in_features, _, _ = linear_shape(base_layer)
        spec = specs[name]
        block = blocks.get(parent_name)
        owner = layers.get(block.owner) if block is not None else None
        if owner is not None:
            router = owner.router
        else:
            router = build_router(config.router, in_features, **router_kwargs(config, spec))
        layer = MoLoRALinear(
            base_layer,
            num_experts=spec.num_experts,
            r=spec.r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            expert_impl=config.expert_impl,
            router=router,
            adapter_dtype=_adapter_dtype(config, base_layer),
            routing_context=routing_context,
            share_lora_A=config.share_lora_A,
            num_shared_experts=config.num_shared_experts,
            routing_block=block,
            owns_router=owner is None,
            use_dora=config.use_dora,
            pissa=config.init_lora_weights is not True,
        )
        if init_weights and config.init_lora_weights is not True:
            init_pissa_(layer, config.init_lora_weights)
        setattr(parent, child, layer)
        layers[name] = layer
    for name in to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return layers, to_save


def router_blocks(names: list[str], specs: dict[str, LayerSpec]) -> dict[str, BlockRouting]:
    """``router_sharing="block"``: {parent module name: its BlockRouting}, owned by the parent's
    first targeted layer (model order).

    Raises:
        ValueError: the layers of a block differ in N or top_k (one router routes them all).
    """
    blocks: dict[str, BlockRouting] = {}
    for name in names:
        parent = name.rpartition(".")[0]
        block = blocks.setdefault(parent, BlockRouting(name))
        first, spec = specs[block.owner], specs[name]
        if (spec.num_experts, spec.top_k) != (first.num_experts, first.top_k):
            raise ValueError(
                f"router_sharing='block': {name!r} and {block.owner!r} share one router but have "
                f"num_experts/top_k {spec.num_experts}/{spec.top_k} and {first.num_experts}/{first.top_k}; "
                "give the layers of a block the same patterns or use router_sharing='layer'"
            )
    return blocks


def unload_molora(model: nn.Module) -> nn.Module:
    """Put every MoLoRALinear's ``base_layer`` back in its place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoLoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
    return model
