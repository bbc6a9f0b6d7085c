"""How the facade calls the base model: the signature it advertises, a call's batch size,
and how many rows ``generate`` makes of each input sequence."""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch import nn


def batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a model call, from its first batched input (None if there is none)."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() >= 1 else None


def generation_expansion(base_model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows ``generate`` makes of each input sequence: max(num_beams, num_return_sequences)."""
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returned))


def with_signature(forward, base_model: nn.Module):
    """A copy of ``forward`` whose signature lists the base model's named arguments plus
    ``task_ids``, so signature-inspecting callers (HF Trainer's column pruning) keep them."""
    func = types.FunctionType(
        forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__
    )
    func.__kwdefaults__ = forward.__kwdefaults__
    func.__doc__ = forward.__doc__
    try:
        base_params = inspect.signature(base_model.forward).parameters.values()
    except (TypeError, ValueError):
        return func
    kept = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
        for p in base_params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
    ]
    params += [p for p in kept if p.name != "task_ids"]
    params += [inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None)]
    params += [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    func.__signature__ = inspect.Signature(params)
    return func


def is_trl_fused_head(value: Any, model: nn.Module) -> bool:
    """Whether ``value``, assigned to ``model.forward``, is TRL's fused LM head patch.

    TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...) call ``trl.trainer.utils.add_fused_lm_head``
    on the model they are given, unless it is a ``peft.PeftModel`` (then on its base model). The
    patch replaces the model's ``forward`` with one that, called with ``fused_lm_head=True``, runs
    ``self.base_model`` as the decoder backbone (``.last_hidden_state``) and projects through
    ``self.get_output_embeddings()`` in tiles. On a wrapper whose ``base_model`` is the whole
    causal LM, that fails (``CausalLMOutputWithPast`` has no ``last_hidden_state``) and would
    skip the wrapper's own forward (routing context, router losses).
    """
    func = getattr(value, "__func__", None)
    return (
        getattr(value, "__self__", None) is model
        and func is not None
        and getattr(func, "__code__", None) is not None
        and func.__code__.co_name == "_fused_forward"  # functools.wraps renamed it "forward"
        and str(func.__globals__.get("__name__", "")).split(".")[0] == "trl"
    )
