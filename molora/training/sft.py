"""TRL's ``SFTTrainer`` for a :class:`~molora.MoLoRAModel`: the router losses in the loss it
optimizes, and a collator that keeps the ``task_ids`` column. Needs ``pip install 'molora[trl]'``.

A plain ``trl.SFTTrainer`` trains a MoLoRAModel too (molora runs TRL's fused LM head on the base
model, inside its own forward: task ids route, :meth:`MoLoRAModel.forward` adds the router losses
to ``out.loss``), but SFTTrainer computes its loss from the per-token log-probabilities and never
reads ``out.loss``. :class:`MoLoRASFTTrainer` adds ``router_aux_loss_coef * aux +
router_z_loss_coef * z`` of each micro-batch, divided by the accumulation steps when Trainer
weights the cross-entropy over the whole accumulation window (as TRL does for a MoE model's
load-balancing loss), so the router terms keep their configured weight per optimizer step.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from molora.model import MoLoRAModel
from molora.training.data import TASK_IDS_COLUMN, MultitaskCollator
from molora.training.objective import router_loss

__all__ = ["MoLoRASFTTrainer"]


class MoLoRASFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss includes the MoLoRA router losses.

    Takes SFTTrainer's arguments. The ``task_ids`` column of the dataset is kept (SFTTrainer
    keeps only the columns it knows). ``data_collator`` defaults to
    :class:`~molora.training.data.MultitaskCollator` (padding with the tokenizer's pad token,
    keeping ``task_ids``: TRL's own collator drops every column it does not know). For a router
    learning rate, pass ``optimizers=(AdamW(param_groups(...)), None)``
    (:func:`molora.training.optim.param_groups`).
    """

    def __init__(self, model: MoLoRAModel, *args: Any, data_collator: Any = None, processing_class: Any = None, **kwargs: Any):
        if not isinstance(model, MoLoRAModel):
            raise TypeError(f"`model` must be a MoLoRAModel, got {type(model).__name__}")
        if data_collator is None and processing_class is not None:
            data_collator = MultitaskCollator.from_tokenizer(processing_class, padding_side="right")
        model.__dict__["_trainer_adds_router_loss"] = True  # compute_loss adds them (no warning from the model)
        super().__init__(model, *args, data_collator=data_collator, processing_class=processing_class, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # SFTTrainer keeps a fixed list of columns (input_ids, labels, seq_lengths) and drops the rest
        super()._set_signature_columns_if_needed()
        if TASK_IDS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, TASK_IDS_COLUMN]

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Any = None):
        """SFTTrainer's loss plus the router losses of this forward (see the module docstring)."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        inner = self.accelerator.unwrap_model(model)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        router = router_loss(inner)
        loss = loss + router.to(loss.dtype) / steps
        mode = "train" if inner.training else "eval"
        self._metrics[mode]["router_loss"].append(float(router.detach()))
        return (loss, outputs) if return_outputs else loss
