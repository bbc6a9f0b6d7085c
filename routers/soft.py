"""SoftRouter: dense softmax gating over all experts (each token uses every expert)."""

from __future__ import annotations

import torch
from torch import nn

from routers.base import RouterOutput, check_finite, float32_logits, route_topk


class SoftRouter(nn.Module):
    """logits = W_g x; weights = softmax(logits) over all N experts (DESIGN §4).

    The gate weight is kept in float32 whatever the model dtype: routing decisions are
    sensitive to rounding, and the gate is tiny (N x in).

    Args:
        in_features: size of the token representation x.
        num_experts: N.
        init_std: std of the normal init of the gate (Mixtral uses the model's
            initializer range, 0.02).
        debug: raise on NaN/inf logits instead of routing silently.
    """

    top_k: int | None = None
    jitter_noise: float = 0.0  # multiplicative input jitter in training (set by the token routers that take it)

    def __init__(self, in_features: int, *, num_experts: int, init_std: float = 0.02, debug: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {num_experts}")
        self.in_features = in_features
        self.num_experts = num_experts
        self.debug = debug
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))  # (N, in)
        nn.init.normal_(self.weight, std=init_std)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) -> (T, N) float32 logits."""
        logits = float32_logits(x, self.weight)  # (T, N) float32, even under autocast
        if self.debug:
            check_finite(logits, type(self).__name__)
        return logits

    def route(self, logits: torch.Tensor) -> RouterOutput:
        """The routing for (T, N) float32 logits (those of :meth:`compute_logits`, or computed by the
        layer in the same GEMM as its experts' down-projection)."""
        return route_topk(logits, None)

    def logits_are_linear(self) -> bool:
        """Whether the logits are exactly ``x @ weight.T`` now (no jitter), so a caller may compute
        them in a fused GEMM and pass them to :meth:`route`."""
        return not (self.training and self.jitter_noise > 0)

    def _set_jitter(self, jitter_noise: float) -> None:
        if not 0.0 <= jitter_noise < 1.0:
            raise ValueError(f"`jitter_noise` must be in [0, 1), got {jitter_noise}")
        self.jitter_noise = jitter_noise

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> RouterOutput:
        if not self.logits_are_linear():  # x * U(1 - eps, 1 + eps) (Switch Transformer §2.4)
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return self.route(self.compute_logits(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}"
