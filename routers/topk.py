"""TopKRouter: each token uses its k most probable experts, renormalized (Mixtral-style)."""

from __future__ import annotations

import torch

from routers.base import RouterOutput, check_normalize, check_top_k, route_topk
from routers.soft import SoftRouter


class TopKRouter(SoftRouter):
    """logits = W_g x (+ jitter in training); the top-k of the softmax (DESIGN §4).

    The chosen gates are renormalized for k >= 2 and the raw probabilities for k == 1
    (Switch Transformer), unless ``normalize_top_k`` says otherwise. ``top_k == num_experts``
    gives exactly the SoftRouter's weights.

    Args:
        in_features: size of the token representation x.
        num_experts: N.
        top_k: experts per token, in [1, N].
        jitter_noise: multiplicative input jitter in training, x * U(1 - eps, 1 + eps)
            (Switch Transformer §2.4, as in transformers' Mixtral); 0 disables it.
        init_std: std of the normal init of the gate.
        debug: raise on NaN/inf logits.
        normalize_top_k: renormalize the chosen gates; ``None``: for k >= 2 only.
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_experts: int,
        top_k: int,
        jitter_noise: float = 0.0,
        init_std: float = 0.02,
        debug: bool = False,
        normalize_top_k: bool | None = None,
    ):
        super().__init__(in_features, num_experts=num_experts, init_std=init_std, debug=debug)
        check_top_k(top_k, num_experts, allow_none=False)
        check_normalize(normalize_top_k)
        self.normalize_top_k = normalize_top_k
        self.top_k = top_k
        self._set_jitter(jitter_noise)

    def route(self, logits: torch.Tensor) -> RouterOutput:
        return route_topk(logits, self.top_k, self.normalize_top_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, jitter_noise={self.jitter_noise}"
