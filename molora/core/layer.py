"""MoLoRALinear: a frozen linear layer plus N stacked LoRA experts and a router.

    y = W0 x + b + s * sum_i G_i(z) * B_i (A_i dropout(x))        (DESIGN §1)

Wraps ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, whose weight is stored (in, out)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from molora.core.config import lora_scaling
from molora.core.dora import dora_output, init_magnitude
from molora.core.experts import dense_up, resolve_impl
from molora.core.fused import fused_route
from molora.core.init import pissa_residual
from molora.core.routing import BlockRouting, RoutingContext
from molora.core.shared import shared_experts
from routers import RouterOutput, fill_padding

try:  # transformers' Conv1D (GPT-2 family); optional so the layer also works on plain torch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an nn.Linear or a transformers Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if Conv1D is not None and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features, True
    raise TypeError(
        f"MoLoRA wraps nn.Linear and transformers' Conv1D, got {type(module).__name__}; "
        "narrow `target_modules` to linear layers"
    )


class MoLoRALinear(nn.Module):
    """A frozen base linear layer with N LoRA experts mixed by a router.

    Attributes:
        base_layer: the original module (frozen).
        lora_A: (N, r, in) expert down-projections, Kaiming-uniform as LoRA; (1, r, in), one
            down-projection shared by all experts, with ``share_lora_A`` (HydraLoRA).
        lora_B: (N, out, r) expert up-projections, zero at init (the layer equals its base).
        lora_A_shared, lora_B_shared: (M, r, in) and (M, out, r), the always-on shared experts
            (gate 1, outside routing); only when ``num_shared_experts`` = M > 0.
        router: a ``routers`` module returning a RouterOutput.
        scaling: s = lora_alpha / r (or / sqrt(r) with rsLoRA).
        last_routing: RouterOutput of the latest forward (None before the first).
        lora_magnitude: (out,) DoRA's magnitude m, only with ``use_dora`` (:mod:`molora.core.dora`).
        pissa_A, pissa_B, pissa_gates: buffers (N, r, in), (N, out, r), (R, N) of the frozen
            PiSSA residual term, only with ``pissa`` (:mod:`molora.core.init`).

    Args:
        base_layer: nn.Linear or transformers Conv1D.
        num_experts: N.
        r: rank of each expert.
        lora_alpha: scaling numerator.
        router: the router module (see ``routers.build_router``).
        lora_dropout: dropout probability on the experts' input.
        use_rslora: s = lora_alpha / sqrt(r).
        expert_impl: name in ``molora.core.experts.EXPERT_IMPLS`` or "auto".
        adapter_dtype: dtype of lora_A / lora_B; None keeps float32.
        routing_context: shared per-model routing inputs (task ids); a private one if None.
        share_lora_A: one A (1, r, in) for all experts; h = A x is computed once per token.
        num_shared_experts: M always-on experts added as s * sum_j B_j A_j x.
        routing_block: with ``router_sharing="block"``, the routing shared by the targeted
            layers of one parent module; None: this layer routes alone.
        owns_router: whether this layer routes (and registers ``router`` as its submodule); a
            block's other layers keep a plain reference to the owner's router and reuse the
            routing the owner stored in ``routing_block`` during the same forward.
        use_dora: DoRA experts (task router only): y = m * (W0 + dW_t) x / ||W0 + dW_t|| + b.
        pissa: allocate the PiSSA residual buffers (filled by ``molora.core.init.init_pissa_``
            or by loading an adapter); the layer then subtracts s * sum_i gbar_i B0_i A0_i x.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        num_experts: int,
        r: int,
        lora_alpha: float,
        router: nn.Module,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        expert_impl: str = "auto",
        adapter_dtype: torch.dtype | None = None,
        routing_context: RoutingContext | None = None,
        share_lora_A: bool = False,
        num_shared_experts: int = 0,
        routing_block: BlockRouting | None = None,
        owns_router: bool = True,
        use_dora: bool = False,
        pissa: bool = False,
    ):
        super().__init__()
        if not owns_router and routing_block is None:
            raise ValueError("a layer that does not own its router needs the `routing_block` it reads")
        in_features, out_features, fan_in_fan_out = linear_shape(base_layer)
        if r < 1 or num_experts < 1 or num_shared_experts < 0:
            raise ValueError(
                f"`r` and `num_experts` must be >= 1 and `num_shared_experts` >= 0, got r={r}, "
                f"num_experts={num_experts}, num_shared_experts={num_shared_experts}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.num_experts, self.r = num_experts, r
        self.share_lora_A, self.num_shared_experts = bool(share_lora_A), num_shared_experts
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.owns_router, self.routing_block = owns_router, routing_block
        if owns_router:
            self.router = router
        else:  # the owner's router, not registered here: its parameters are saved and trained once
            self.__dict__["router"] = router
        self.expert_impl = expert_impl
        resolve_impl(expert_impl, sparse=True)  # fail fast on a bad name
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.routing_context = routing_context if routing_context is not None else RoutingContext()
        self.disabled = False
        self.last_routing: RouterOutput | None = None

        device = base_layer.weight.device
        dtype = adapter_dtype or torch.float32
        num_a = 1 if share_lora_A else num_experts
        self.lora_A = nn.Parameter(torch.empty(num_a, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=dtype))
        if num_shared_experts:
            m = num_shared_experts
            self.lora_A_shared = nn.Parameter(torch.empty(m, r, in_features, device=device, dtype=dtype))
            self.lora_B_shared = nn.Parameter(torch.zeros(m, out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters()
        self.router.to(device)
        self.use_dora = bool(use_dora)
        if use_dora:
            if not hasattr(self.router, "table_weights"):
                raise ValueError(
                    f"`use_dora=True` needs the task router (one norm per task), got {type(self.router).__name__}: "
                    "with token routing the norm of W0 + dW would differ per token; use router='task'"
                )
            self.lora_magnitude = nn.Parameter(init_magnitude(self).to(dtype))  # (out,)
        if not pissa:
            self.pissa_A = self.pissa_B = self.pissa_gates = None
        else:
            if share_lora_A:
                raise ValueError("PiSSA init needs one A per expert, got share_lora_A=True")
            num_rows = getattr(self.router, "num_tasks", 1)  # gbar per task (task router) or one row
            zeros = dict(device=device, dtype=dtype)
            self.register_buffer("pissa_A", torch.zeros(num_experts, r, in_features, **zeros))
            self.register_buffer("pissa_B", torch.zeros(num_experts, out_features, r, **zeros))
            self.register_buffer("pissa_gates", torch.zeros(num_rows, num_experts, **zeros))

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A_i ~ Kaiming-uniform(a=sqrt(5)) over fan_in = in (as nn.Linear and PEFT), B_i = 0.

        The shared experts' factors are initialized the same way.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()
        if self.num_shared_experts:
            self.lora_A_shared.uniform_(-bound, bound)
            self.lora_B_shared.zero_()

    def token_task_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """(T,) task id of every token of x (batch, ..., in), from the model's (batch,) task ids.

        The ids must match the batch exactly: expansions (beams, returned sequences) are done
        by ``MoLoRAModel.generate`` on the ids themselves, never guessed here.
        """
        task_ids = self.routing_context.task_ids
        if task_ids is None:
            return None
        batch = x.shape[0] if x.dim() > 1 else 1
        if task_ids.shape[0] != batch:
            raise ValueError(
                f"`task_ids` has {task_ids.shape[0]} entries but the layer input {tuple(x.shape)} has batch "
                f"size {batch}; pass one task id per sequence"
            )
        tokens_per_sequence = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
        return task_ids.to(x.device).repeat_interleave(tokens_per_sequence)  # (T,)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.in_features)  # (T, in)
        fused = fused_route(self, tokens)  # router and down-projection in one GEMM, where it applies
        routing = fused[0] if fused is not None else self._route(tokens, x)
        self.last_routing = routing
        compute_dtype = _compute_dtype(tokens)
        dropped = self.lora_dropout(tokens).to(compute_dtype)  # (T, in)
        if fused is not None:
            delta = dense_up(fused[1], self.lora_B, routing.weights, self.scaling)  # (T, out)
        else:
            indices = routing.indices  # (T, k); top-p's -1 slots become unused experts with gate 0
            indices = fill_padding(indices, self.num_experts) if routing.padded else indices
            expert_fn = resolve_impl(self.expert_impl, sparse=indices is not None)
            lora_A, lora_B = self.lora_A.to(compute_dtype), self.lora_B.to(compute_dtype)
            delta = expert_fn(dropped, lora_A, lora_B, routing.weights, indices, self.scaling)  # (T, out)
        if self.num_shared_experts:
            shared_A, shared_B = self.lora_A_shared.to(compute_dtype), self.lora_B_shared.to(compute_dtype)
            delta = delta + shared_experts(dropped, shared_A, shared_B, self.scaling)  # (T, out)
        if self.pissa_B is not None:  # the frozen residual, on the clean input (it stands for W0's part)
            delta = delta - pissa_residual(self, tokens.to(compute_dtype), self.token_task_ids(x))  # (T, out)
        delta = delta.view(*x.shape[:-1], self.out_features)
        if self.use_dora:
            return dora_output(self, result, delta, self.routing_context.task_ids)
        return result + delta.to(result.dtype)

    def _route(self, tokens: torch.Tensor, x: torch.Tensor) -> RouterOutput:
        """This layer's routing: its router's, or (block sharing) the owner's of this forward."""
        if self.owns_router:
            routing = self.router(tokens, self.token_task_ids(x))
            if self.routing_block is not None:
                self.routing_block.routing = routing
            return routing
        routing = self.routing_block.routing
        if routing is None or routing.num_tokens != tokens.shape[0]:
            raise RuntimeError(
                f"router_sharing='block': this layer reuses the routing of {self.routing_block.owner!r}, which "
                f"has not run on these {tokens.shape[0]} tokens first; the block's first targeted layer must run "
                "before the others in each forward (use router_sharing='layer' for this model)"
            )
        return routing

    def structure(self) -> dict:
        """This layer's expert structure: {"num_experts", "r", "top_k", "lora_alpha", "scaling",
        "share_lora_A", "num_shared_experts"} (top_k None: every expert)."""
        return {
            "num_experts": self.num_experts,
            "r": self.r,
            "top_k": getattr(self.router, "top_k", None),
            "lora_alpha": self.lora_alpha,
            "scaling": self.scaling,
            "share_lora_A": self.share_lora_A,
            "num_shared_experts": self.num_shared_experts,
        }

    def extra_repr(self) -> str:
        extra = ", share_lora_A=True" if self.share_lora_A else ""
        extra += f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"r={self.r}, scaling={self.scaling:g}, expert_impl={self.expert_impl!r}{extra}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
