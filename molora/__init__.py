"""molora: Mixture-of-LoRA-experts for any Hugging Face transformers model.

Quickstart::

    from molora import MoLoRAConfig, get_molora_model
    model = get_molora_model(base_model, MoLoRAConfig(target_modules=["q_proj", "v_proj"]))
"""

__version__ = "0.1.0"

from molora.config import MoLoRAConfig
from molora.experts import EXPERT_IMPLS
from molora.layer import MoLoRALinear
from molora.losses import load_balancing_loss, router_z_loss
from molora.model import MoLoRAModel, get_molora_model


def measure_gates(model, batches, by_task: bool = False):
    """Mean router weights per layer over the non-padding tokens of ``batches``.

    See :func:`molora.export.measure_gates`.
    """
    from molora.export import measure_gates as _measure_gates

    return _measure_gates(model, batches, by_task=by_task)


__all__ = [
    "EXPERT_IMPLS",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRAModel",
    "__version__",
    "get_molora_model",
    "load_balancing_loss",
    "measure_gates",
    "router_z_loss",
]
