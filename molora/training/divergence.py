"""Whether a training run is still training: the first non-finite loss, gradient norm or weight
stops it with one line naming the step and what to try (nothing NaN is applied, checkpointed or
logged), and an adapter scaling so large that nothing can train is warned about at the start."""

from __future__ import annotations

import torch

from molora.io import non_finite_layers
from molora.model import MoLoRAModel

__all__ = ["MAX_SCALING", "check_step_finite", "check_weights_finite", "raise_diverged", "warn_scaling"]

MAX_SCALING = 1e3  # s = lora_alpha / r far above the usual 1-2: updates swamp the base or overflow


def _any_process(accelerator, bad: torch.Tensor) -> bool:
    """Whether ``bad`` (1,) is nonzero on any process (one host sync)."""
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() > 0)


def check_step_finite(accelerator, train, step: int, loss: torch.Tensor, grad_norm) -> None:
    """Stop at the first non-finite loss or gradient norm, before the optimizer applies it.

    One host sync per optimizer step (never in the forward). Under fp16 the gradient scaler
    skips steps with inf gradients on purpose, so only the loss is checked there.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        train: the ``train`` section (named in the message).
        step: the optimizer step being taken (1-based).
        loss: () this step's loss, summed over its micro-batches.
        grad_norm: the total gradient norm (a tensor, a ``DTensor`` under FSDP2, or a float).

    Raises:
        ValueError: the loss or the gradient norm is NaN or infinite (on any process).
    """
    bad = (~torch.isfinite(loss)).float().reshape(1)
    check_norm = grad_norm is not None and getattr(accelerator, "scaler", None) is None
    norm = None
    if check_norm:
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        norm = torch.as_tensor(grad_norm, device=bad.device).float()
        bad = bad + (~torch.isfinite(norm)).float().reshape(1)
    if _any_process(accelerator, bad):
        raise_diverged(step, float(loss), None if norm is None else float(norm), train, accelerator.mixed_precision)


def check_weights_finite(accelerator, model: MoLoRAModel, train, step: int) -> None:
    """Before a checkpoint: an update that overflowed to NaN/inf weights (on any process's
    shards) is never saved.

    Raises:
        ValueError: a MoLoRA layer has a NaN or inf weight.
    """
    bad = torch.tensor([float(bool(non_finite_layers(model)))], device=accelerator.device)
    if _any_process(accelerator, bad):
        raise_diverged(step, None, None, train, accelerator.mixed_precision)


def raise_diverged(step: int, loss: float | None, grad_norm: float | None, train, mixed_precision: str) -> None:
    """The one-line error of a diverged run: the step, the numbers and what to try.

    Raises:
        ValueError: always.
    """
    numbers = ", ".join(
        f"{what} {value:.4g}" for what, value in (("loss", loss), ("gradient norm", grad_norm)) if value is not None
    )
    precision = f"train.mixed_precision=no (fp32) instead of {mixed_precision}, " if mixed_precision != "no" else ""
    raise ValueError(
        f"training diverged at step {step} ({numbers or 'NaN or inf weights'}): stopped before applying or saving it. "
        f"Try a lower train.lr (now {train.lr:g}), {precision}or clipping with train.max_grad_norm "
        f"(now {train.max_grad_norm}); then continue from the last checkpoint with --resume"
    )


def warn_scaling(accelerator, model: MoLoRAModel) -> None:
    """Warn when a layer's scaling s is so large that training cannot work (``lora_alpha=1e30``:
    under bf16 the gradients overflow at once; the run then stops at its first step)."""
    name, layer = max(model.molora_layers().items(), key=lambda item: abs(float(item[1].scaling)))
    scaling = abs(float(layer.scaling))
    if scaling > MAX_SCALING:
        cfg = model.molora_config
        how = "lora_alpha / sqrt(r)" if cfg.use_rslora else "lora_alpha / r"
        precision = accelerator.mixed_precision
        accelerator.print(
            f"warning: molora.lora_alpha={cfg.lora_alpha:g} gives the adapter of {name!r} a scaling s = {how} = "
            f"{scaling:.3g}, far above the usual 1 to 2 (lora_alpha = r to 2r): the update s * B A x "
            f"{'overflows under ' + precision if precision in ('bf16', 'fp16') else 'swamps the base model'} "
            "and nothing trains; lower molora.lora_alpha"
        )
