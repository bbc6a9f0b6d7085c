"""molora: Mixture-of-LoRA-experts for any Hugging Face transformers model.

Quickstart::

    from molora import MoLoRAConfig, get_molora_model
    model = get_molora_model(base_model, MoLoRAConfig(target_modules=["q_proj", "v_proj"]))

Where things are: ``molora.core`` (config, layer, expert compute, losses), ``molora.inject``,
``molora.io``, ``molora.merge`` (static merges and export), ``molora.model`` (the facade),
``molora.training`` and ``molora.apps`` (command line, demo, benchmarks).
"""

from molora._version import __version__
from molora.core.config import MoLoRAConfig
from molora.core.experts import EXPERT_IMPLS
from molora.core.layer import MoLoRALinear
from molora.core.losses import load_balancing_loss, router_z_loss
from molora.core.param_groups import create_molora_optimizer, get_optimizer_param_groups
from molora.merge.gates import measure_gates
from molora.model import MoLoRAModel, get_molora_model

__all__ = [
    "EXPERT_IMPLS",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRAModel",
    "RoutingHealthCallback",
    "__version__",
    "create_molora_optimizer",
    "get_molora_model",
    "get_optimizer_param_groups",
    "load_balancing_loss",
    "measure_gates",
    "router_z_loss",
]


def __getattr__(name: str):
    # RoutingHealthCallback subclasses transformers' TrainerCallback, whose import pulls in the
    # Trainer machinery: paid on first use, not by every `import molora`.
    if name == "RoutingHealthCallback":
        from molora.training.health import RoutingHealthCallback

        globals()[name] = RoutingHealthCallback
        return RoutingHealthCallback
    raise AttributeError(f"module 'molora' has no attribute {name!r}")
