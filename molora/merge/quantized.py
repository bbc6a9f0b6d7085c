"""Merging into a quantized (bitsandbytes 4-bit / 8-bit, QLoRA) base: dequantize first.

A 4-bit or 8-bit weight cannot take a LoRA update in place: NF4 packs two weights per byte
and int8 rows carry their own scales, and an update the size of a LoRA step is mostly below
the quantization step, so re-quantizing would round most of it away. ``merge_and_unload``
therefore dequantizes the whole base (transformers' ``model.dequantize()``) and merges into
the dequantized weights, which are exactly the weights the adapter was trained against. The
merged model comes back unquantized, in the base model's dtype (``model.dtype``: the
``dtype=`` it was loaded with), with the memory of a full-precision model; a warning says so.

The CPU path needs a private bitsandbytes function (see :func:`_unpack_cpu_4bit`), so the
merge guards itself: before dequantizing, each quantized target layer's own output on a probe
input is recorded, and after, the dequantized weight must reproduce it (a bitsandbytes whose
layout changed gives wrong weights: an error, never a silently wrong merge). The supported
versions are bounded in the ``qlora`` extra (:data:`BNB_SUPPORTED`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["BNB_SUPPORTED", "base_quantization", "dequantize_for_merge", "merge_note", "quantized_kind"]

BNB_SUPPORTED = ">=0.45,<0.51"  # the qlora extra's bound: the CPU unpacking below is written for 0.48-0.50
PROBE_TOLERANCE = 0.05  # relative error of a dequantized layer's output vs the layer's own (8-bit also quantizes x)
_PROBE_LAYERS = 8  # layers probed per merge (each a (4, in) matmul)


def quantized_kind(layer: nn.Module) -> str | None:
    """``"4-bit"`` or ``"8-bit"`` for a bitsandbytes-quantized linear layer, else None."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dtype.is_floating_point:
        return None
    return "4-bit" if hasattr(weight, "quant_state") or type(layer).__name__ == "Linear4bit" else "8-bit"


def base_quantization(base_layers: dict[str, nn.Module]) -> str | None:
    """``"4-bit"``, ``"8-bit"`` (or both, ``"4-bit/8-bit"``) when any of ``base_layers`` is
    bitsandbytes-quantized, else None."""
    kinds = {kind for layer in base_layers.values() if (kind := quantized_kind(layer))}
    return "/".join(sorted(kinds)) or None


def merge_note(kind: str) -> str:
    """How to merge an adapter exported over a ``kind`` (bitsandbytes) base into weights correctly.

    PEFT's ``merge_and_unload()`` on the quantized base adds the update to the dequantized
    weights and quantizes them again: the layers stay 4-bit / 8-bit and most of the update is
    rounded away, so the merged model's logits are not the adapter's.
    """
    return (
        f"the base is bitsandbytes {kind}: PeftModel.from_pretrained(base, adapter) serves this adapter on it, but "
        f"PEFT's merge_and_unload() on the {kind} base keeps the layers {kind} and rounds the update away (wrong "
        "logits). To merge into weights: `molora export RUN --task T --merge-into-base --out DIR`, or "
        "MoLoRAModel.merge_and_unload(task=T), which dequantize first; with PEFT, call base.dequantize() before "
        "PeftModel.from_pretrained(base, adapter).merge_and_unload()"
    )


def dequantize_for_merge(base_model: nn.Module, base_layers: dict[str, nn.Module]) -> None:
    """Dequantize ``base_model`` in place when any of ``base_layers`` is quantized.

    Args:
        base_model: the transformers model under the MoLoRA layers.
        base_layers: {MoLoRA layer name: its base layer}.

    Raises:
        ValueError: quantized base layers on a model that transformers cannot dequantize (not
            loaded with a ``quantization_config``); the message names 4-bit / 8-bit.
    """
    kinds = {name: kind for name, layer in base_layers.items() if (kind := quantized_kind(layer))}
    if not kinds:
        return
    kind = "/".join(sorted(set(kinds.values())))
    if getattr(base_model, "hf_quantizer", None) is None or not hasattr(base_model, "dequantize"):
        raise ValueError(
            f"merge_and_unload: {len(kinds)} target layers (e.g. {next(iter(kinds))!r}) have bitsandbytes {kind} "
            "weights, which cannot take the update in place, and the base is not a transformers model loaded "
            "with a quantization_config, so it cannot be dequantized here. Load the base in full precision "
            "(or bf16), rebuild the adapter on it (MoLoRAModel.from_pretrained) and merge there."
        )
    warnings.warn(
        f"merge_and_unload on a {kind} (bitsandbytes) base: the base is dequantized and the merged model is "
        f"returned unquantized in {base_model.dtype} (the dtype the base was loaded with), with the memory of a "
        f"full-precision model. The merged weights are the dequantized {kind} weights plus the update.",
        stacklevel=4,
    )
    probes = _probe(base_model, {name: base_layers[name] for name in list(kinds)[:_PROBE_LAYERS]})
    _unpack_cpu_4bit(base_model)
    base_model.dequantize()
    _check_probes(base_model, probes, kind)


def _unpack_cpu_4bit(model: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of 4-bit weights before dequantizing them.

    On CPUs with AVX512-BF16, bitsandbytes (0.48+) repacks a Linear4bit weight in place at its
    first inference forward; transformers' ``dequantize()`` (5.x) reads the repacked bytes as
    plain NF4 and returns wrong weights. bitsandbytes undoes the repacking itself before saving
    or moving the weight, with the function used here. The block scales were rounded to bfloat16
    by the repacking (bitsandbytes' own inference forwards use those rounded scales too).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _convert_weight_packed_for_cpu_inverse = _cpu_unpacker()
            nested = getattr(state, "original_nested", False)
            weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if not nested and state.absmax.dim() == 2:
                # bitsandbytes 0.50 restores nested scales only: the plain ones stay (in / blocksize,
                # out), transposed by the repacking; dequantization reads them flat in (out, in) order
                state.absmax = state.absmax.T.reshape(-1).float()
            weight.quant_state = state
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state


def _bnb_version() -> str:
    try:
        import bitsandbytes

        return str(getattr(bitsandbytes, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def _cpu_unpacker():
    """bitsandbytes' private inverse of its CPU 4-bit repacking.

    Raises:
        ImportError: this bitsandbytes has no such function (names the version and the supported range).
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as err:
        raise ImportError(
            f"merging into a 4-bit base on CPU needs bitsandbytes' _convert_weight_packed_for_cpu_inverse, which "
            f"bitsandbytes {_bnb_version()} lacks: install a supported version (pip install 'bitsandbytes{BNB_SUPPORTED}'), "
            "or load the base in full precision and merge there"
        ) from err
    return _convert_weight_packed_for_cpu_inverse


def _probe(base_model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """{name: (module path, x (4, in), the layer's own output (4, out) float32)} of quantized layers."""
    paths = {id(module): path for path, module in base_model.named_modules()}
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.weight
            dtype = getattr(layer, "compute_dtype", None) or torch.float32
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(4, layer.in_features, generator=gen).to(device=weight.device, dtype=dtype)  # (4, in)
            out[name] = (paths[id(layer)], x, layer(x).float())
    return out


def _check_probes(base_model: nn.Module, probes: dict[str, tuple[str, torch.Tensor, torch.Tensor]], kind: str) -> None:
    """The dequantized layers reproduce the quantized layers' own outputs on the probes.

    Raises:
        ValueError: a layer's relative output error is above :data:`PROBE_TOLERANCE`.
    """
    with torch.no_grad():
        for name, (path, x, want) in probes.items():
            layer = base_model.get_submodule(path)
            got = layer(x.to(layer.weight.dtype)).float()  # (4, out)
            error = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if not error <= PROBE_TOLERANCE:
                raise ValueError(
                    f"merge_and_unload: the dequantized {kind} weight of {name!r} does not reproduce the layer's own "
                    f"output (relative error {error:.3g} > {PROBE_TOLERANCE}): bitsandbytes {_bnb_version()} stores "
                    f"its weights in a layout molora does not know; the base is now dequantized but nothing was merged. "
                    f"Install a supported bitsandbytes ('bitsandbytes{BNB_SUPPORTED}'), or load the base in full "
                    "precision and merge there"
                )
