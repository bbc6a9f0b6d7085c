"""MoLoRAModel: the wrapper users hold (forward/generate with task ids, losses, stats, I/O)."""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from molora.calls import batch_size, generation_expansion, is_trl_fused_head, with_signature
from molora.core.config import MoLoRAConfig
from molora.core.layer import MoLoRALinear
from molora.core.routing import RoutingContext, checkpointable_blocks, replay_routing, validate_task_ids
from molora.inject import inject_molora, unload_molora
from molora.io import load_molora, save_molora
from molora.merge import export, from_peft
from molora.routing_stats import RoutingStatsMixin


class MoLoRAModel(RoutingStatsMixin, nn.Module):
    """A transformers (or any torch) model whose target linear layers carry LoRA experts.

    Build it with :func:`get_molora_model`. Like PEFT, building injects into the given model
    in place (its target layers are replaced, its parameters frozen); :meth:`unload` gives the
    original model back. Attributes the wrapper does not define (``config``,
    ``generation_config``, ``device``, ...) are looked up on the base model, so the wrapper
    drops into ``transformers.Trainer`` and ``generate`` code; the MoLoRA configuration is
    ``molora_config``.

    Args:
        base_model: the model to wrap.
        config: a :class:`MoLoRAConfig`.
        init_weights: initialize the experts as the config says; ``False`` skips the PiSSA
            SVDs when the weights are loaded right after (``from_pretrained``).
    """

    def __init__(self, base_model: nn.Module, config: MoLoRAConfig, *, init_weights: bool = True):
        super().__init__()
        if not isinstance(config, MoLoRAConfig):
            raise TypeError(f"`config` must be a MoLoRAConfig, got {type(config).__name__}")
        requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        self.routing_context = RoutingContext()
        layers, to_save = inject_molora(base_model, config, self.routing_context, init_weights=init_weights)
        self.base_model = base_model
        self.molora_config = config
        self.modules_to_save = to_save
        self._layer_names = list(layers)
        self._checkpoint_blocks = checkpointable_blocks(base_model)  # a plain list: not submodules
        self._original_requires_grad = requires_grad
        self._token_mask: torch.Tensor | None = None
        self.track_routing_stats = True
        self.reset_routing_stats()
        self.forward = types.MethodType(with_signature(type(self).forward, base_model), self)

    # ------------------------------------------------------------------ access
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL patches the forward of the model it trains with a fused LM head (as it patches a
        # PEFT model's base): keep molora's forward outside and run the patch on the base model,
        # where ``self.base_model`` is the decoder backbone it expects (see forward).
        if name == "forward" and is_trl_fused_head(value, self):
            self.__dict__["_fused_head"] = value.__func__
            return
        super().__setattr__(name, value)

    def molora_layers(self) -> dict[str, MoLoRALinear]:
        """{qualified name inside ``base_model``: MoLoRALinear}, in model order."""
        return {name: self.base_model.get_submodule(name) for name in self._layer_names}

    def layer_summary(self) -> dict[str, dict[str, Any]]:
        """{layer name: {"num_experts", "r", "top_k", "lora_alpha", "scaling", "share_lora_A",
        "num_shared_experts"}}: each layer's structure after the config's patterns."""
        return {name: layer.structure() for name, layer in self.molora_layers().items()}

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ running
    def _set_routing(self, task_ids: Any, batch_size: int | None) -> None:
        """Validate ``task_ids`` once for this call (host side) and publish them to the layers."""
        cfg = self.molora_config
        ids = validate_task_ids(task_ids, batch_size=batch_size, num_tasks=cfg.num_tasks, task_names=cfg.task_names)
        if cfg.router == "task" and ids is None:
            raise ValueError("this model routes by task (router='task'): pass `task_ids` of shape (batch,)")
        device = getattr(self.base_model, "device", None)
        self.routing_context.task_ids = ids if ids is None or device is None else ids.to(device)
        if self.training:  # checkpointing may have been enabled on the base model directly
            replay_routing(self._checkpoint_blocks, self.routing_context)

    def forward(self, *args, labels: torch.Tensor | None = None, task_ids: Any = None, **kwargs):
        """Run the base model with MoLoRA routing.

        Args:
            *args, **kwargs: the base model's arguments (input_ids, attention_mask, ...).
            labels: passed to the base model when given. Named here so that
                ``transformers.Trainer`` finds the label column (eval_loss, predict's labels).
            task_ids: (batch,) task id (int, or name from ``config.task_names``) of each
                sequence; required by the task router, recorded for statistics otherwise.

        Returns:
            The base model's output; when it holds a ``loss``, ``router_aux_loss_coef * aux +
            router_z_loss_coef * z`` has been added to it (as Mixtral does). Under
            ``num_items_in_batch`` (HF Trainer's loss over a whole gradient-accumulation
            window), the router terms are weighted by this micro-batch's share of the window's
            label tokens, so that they keep their configured weight per optimizer step.
            With ``fused_lm_head=True`` (TRL's trainers), TRL's ``FusedCausalLMOutput``.
        """
        if labels is not None:
            kwargs["labels"] = labels
        fused = kwargs.pop("fused_lm_head", False)
        self._set_routing(task_ids, batch_size(args, kwargs))
        self._token_mask = kwargs.get("attention_mask")
        if fused:  # TRL's fused LM head (per-token log-probs), bound to the base model
            head = self.__dict__.get("_fused_head")
            if head is None:
                raise ValueError("`fused_lm_head=True` needs TRL's add_fused_lm_head(model) first")
            out = head(self.base_model, *args, fused_lm_head=True, **kwargs)
            self._warn_router_loss_outside_trl()
        else:
            out = self.base_model(*args, **kwargs)
        if self.track_routing_stats:
            self._update_routing_stats()
        loss = getattr(out, "loss", None) if not isinstance(out, tuple) else None
        if loss is not None and self._router_loss_on():
            out.loss = loss + self._router_loss(kwargs).to(loss.dtype)
        return out

    def _warn_router_loss_outside_trl(self) -> None:
        """TRL's trainers compute their loss from per-token log-probs, never from ``out.loss``."""
        if self._router_loss_on() and self.training and not self.__dict__.get("_trainer_adds_router_loss"):
            if not self.__dict__.get("_warned_trl_router_loss"):
                self.__dict__["_warned_trl_router_loss"] = True
                warnings.warn(
                    "TRL computes its loss from per-token log-probabilities and does not read out.loss, so the "
                    "router losses (router_aux_loss_coef, router_z_loss_coef) are not trained: use "
                    "molora.training.sft.MoLoRASFTTrainer for SFT, or set both coefficients to 0",
                    stacklevel=3,
                )

    def _router_loss_on(self) -> bool:
        cfg = self.molora_config
        return cfg.router_aux_loss_coef > 0 or cfg.router_z_loss_coef > 0

    def _router_loss(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """coef_aux * aux + coef_z * z of the last forward, scaled to this micro-batch's share."""
        cfg = self.molora_config
        self._check_router_grads()
        loss = 0.0
        if cfg.router_aux_loss_coef > 0:
            loss = loss + cfg.router_aux_loss_coef * self.aux_loss()
        if cfg.router_z_loss_coef > 0:
            loss = loss + cfg.router_z_loss_coef * self.z_loss()
        num_items = kwargs.get("num_items_in_batch")
        labels = kwargs.get("shift_labels", kwargs.get("labels"))
        if num_items is not None and labels is not None:
            # Trainer sums the CE over the window's num_items label tokens (no division by the
            # accumulation steps); the router terms follow with this micro-batch's token share.
            share = labels.ne(-100).sum().to(loss.device, torch.float32) / torch.as_tensor(num_items).to(loss.device)
            loss = loss * share
        return loss

    def _check_router_grads(self) -> None:
        """Refuse to train the router losses when their gradient is silently lost.

        Reentrant gradient checkpointing runs the forward under ``no_grad``: the routing of
        the first pass carries no graph, so a loss built from it gives the routers nothing.
        """
        if not (self.training and torch.is_grad_enabled()):
            return
        for name, layer in self.molora_layers().items():
            routing = layer.last_routing
            wants_grad = any(p.requires_grad for p in layer.router.parameters())
            if routing is not None and wants_grad and not routing.logits.requires_grad:
                raise RuntimeError(
                    f"layer {name}: the router logits carry no gradient, so router_aux_loss_coef / "
                    "router_z_loss_coef would train nothing. The base model runs reentrant gradient "
                    "checkpointing (use_reentrant=True); enable it with model.gradient_checkpointing_enable() "
                    "(non-reentrant by default) or gradient_checkpointing_kwargs={'use_reentrant': False}, "
                    "or set both router loss coefficients to 0."
                )

    @torch.no_grad()
    def generate(self, *args, task_ids: Any = None, **kwargs):
        """``base_model.generate`` with the given (batch,) task ids, KV cache included.

        The ids are expanded here as generate expands the batch: each sequence's id is repeated
        ``max(num_beams, num_return_sequences)`` times, consecutively.
        """
        batch = batch_size(args, kwargs)
        expand = generation_expansion(self.base_model, kwargs)
        self._set_routing(task_ids, batch)
        if self.routing_context.task_ids is not None and expand > 1:
            self.routing_context.task_ids = self.routing_context.task_ids.repeat_interleave(expand)
        self._token_mask = None
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self._token_mask = None

    @contextmanager
    def disable_adapters(self):
        """Run the plain base model inside this context (experts and routers bypassed)."""
        layers = list(self.molora_layers().values())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Enable the base model's gradient checkpointing, non-reentrant unless asked otherwise.

        Non-reentrant checkpointing keeps the router losses' gradients and is the default on
        every transformers version. Reentrant checkpointing (``gradient_checkpointing_kwargs=
        {"use_reentrant": True}``) drops them, so it is refused while a router loss
        coefficient is > 0. Inputs require grad so that checkpointed blocks behind frozen
        embeddings still reach the experts. Each block's recomputation replays the task ids of
        its own forward (:func:`molora.core.routing.replay_routing`).
        """
        ckpt_kwargs = dict(kwargs.pop("gradient_checkpointing_kwargs", None) or {"use_reentrant": False})
        ckpt_kwargs.setdefault("use_reentrant", False)
        if ckpt_kwargs["use_reentrant"] and self._router_loss_on():
            raise ValueError(
                "reentrant gradient checkpointing (use_reentrant=True) drops the gradient of the router "
                f"losses (router_aux_loss_coef={self.molora_config.router_aux_loss_coef}, router_z_loss_coef="
                f"{self.molora_config.router_z_loss_coef}); use use_reentrant=False or set both coefficients to 0"
            )
        # transformers >= 5.x renamed it; the old name still works but warns
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is None:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        else:
            enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()
        replay_routing(self._checkpoint_blocks, self.routing_context)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def unload(self) -> nn.Module:
        """Remove the MoLoRA layers and return the base model as it was before injection."""
        model = unload_molora(self.base_model)
        for name, param in model.named_parameters():
            param.requires_grad_(self._original_requires_grad.get(name, param.requires_grad))
        self._layer_names = []
        return model

    # ------------------------------------------------------------------ I/O and export
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``molora_config.json`` and ``molora_model.safetensors`` (atomically)."""
        save_molora(self, save_directory, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload MoLoRA adapter",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the adapter folder (config + weights, a few MB) to the Hugging Face Hub.

        Only the adapter is uploaded, never the base model (which ``base_model.push_to_hub``
        would upload whole): the folder written by :meth:`save_pretrained`, through
        ``huggingface_hub.HfApi.upload_folder``.

        Returns:
            What ``upload_folder`` returns (the commit info).
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision, create_pr=create_pr
            )

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False
    ) -> MoLoRAModel:
        """Rebuild a saved MoLoRA model on ``base_model``, after checking that they fit.

        Args:
            base_model: the same architecture the adapter was trained on.
            path: a folder written by :meth:`save_pretrained`.
            is_trainable: keep the adapter trainable; otherwise the model is put in eval
                mode with every parameter frozen (as PEFT).
        """
        return load_molora(cls, base_model, path, is_trainable=is_trainable)

    def export_merged_adapter(self, path: str | os.PathLike, **kwargs) -> dict:
        """Collapse the experts into one PEFT LoRA adapter (see :mod:`molora.merge.export`)."""
        return export.export_merged_adapter(self, path, **kwargs)

    def merge_and_unload(
        self,
        *,
        task: int | str | None = None,
        weights: str | torch.Tensor | Mapping | None = None,
        progress: bool = False,
    ) -> nn.Module:
        """Fold dW = s * sum_i w_i B_i A_i into every base weight; return the plain base model.

        The static gates w come from one task (``task=``: the task router's gates of that task,
        exact for it) or are given (``weights=``: ``"uniform"``, a ``(N,)`` tensor, ``{layer:
        (N,)}``, or :func:`molora.measure_gates` output; with per-task measured gates, ``task``
        picks one). A bitsandbytes 4-bit / 8-bit (QLoRA) base is dequantized first and comes back
        unquantized in ``model.dtype`` (a warning says so): the correct merge of a quantized
        base, which PEFT's ``merge_and_unload()`` on the quantized base is not. The MoLoRA model
        must not be used afterwards.

            merged = model.merge_and_unload(task="code")                 # task router: exact
            merged = model.merge_and_unload(weights=measure_gates(model, batches))   # token routers

        Args:
            task: a task id or name (not ``"all"``: one model holds one merge).
            weights: static gates, see :func:`molora.merge.gates.resolve_weights`; None with
                ``task`` takes the task router's gates, None without it is uniform.
            progress: show a tqdm bar over layers.

        Returns:
            The base transformers model with merged weights.

        Raises:
            ValueError: bad ``task`` / ``weights``, or a quantized base that cannot be dequantized.
        """
        return export.merge_and_unload(self, weights=weights, task=task, progress=progress)

    @classmethod
    def from_lora_adapters(
        cls,
        base_model: nn.Module,
        paths: list[str | os.PathLike],
        config: MoLoRAConfig,
        *,
        freeze_experts: bool = True,
        identity_gate: float | None = from_peft.IDENTITY_GATE,
        check_base_name: bool = True,
    ) -> MoLoRAModel:
        """Build a MoLoRA model whose expert i starts as the PEFT LoRA adapter ``paths[i]``
        (see :func:`molora.merge.from_peft.from_lora_adapters`).

        Args:
            base_model: the transformers model the adapters were trained on (injected in place).
            paths: adapter folders, one per expert (``config.num_experts`` of them).
            config: the MoLoRAConfig (``r`` >= the largest adapter rank).
            freeze_experts: True (default): the experts keep the adapters' weights
                (``requires_grad=False``) and only the router trains; False: they train too.
            identity_gate: with ``router="task"`` and one adapter per task, task i starts with
                gate ``identity_gate`` (default 1 - 1e-6) on adapter i, so that the routed model
                equals ``PeftModel`` with adapter i at step 0; None keeps a random table.
            check_base_name: compare each adapter's recorded base model name with the base's.
        """
        return from_peft.from_lora_adapters(
            cls,
            base_model,
            paths,
            config,
            freeze_experts=freeze_experts,
            identity_gate=identity_gate,
            check_base_name=check_base_name,
        )


def get_molora_model(model: nn.Module, config: MoLoRAConfig) -> MoLoRAModel:
    """Wrap ``model`` into a MoLoRAModel (injects in place, as PEFT's get_peft_model)."""
    return MoLoRAModel(model, config)
