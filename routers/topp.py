"""TopPRouter: each token takes the fewest experts whose probabilities sum to >= top_p (MixLoRA)."""

from __future__ import annotations

import torch

from routers.base import RouterOutput, check_top_k, route_topp
from routers.soft import SoftRouter


class TopPRouter(SoftRouter):
    """logits = W_g x; S_t = the fewest experts, in order of probability, whose probabilities
    sum to >= top_p (at least one, at most ``top_k`` when given); gates are the raw
    probabilities (DESIGN §4; dynamic routing of MixLoRA, Li et al. 2024, arXiv 2404.15159).

    The number of experts varies per token, the shapes do not: ``indices`` is (T, k_max) with
    k_max = ``top_k`` or N, padded with -1 (see :func:`routers.route_topp`).

    Args:
        in_features: size of the token representation x.
        num_experts: N.
        top_p: probability mass to cover, in (0, 1].
        top_k: optional cap on the experts per token, in [1, N].
        jitter_noise: multiplicative input jitter in training (as :class:`TopKRouter`).
        init_std: std of the normal init of the gate.
        debug: raise on NaN/inf logits.
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_experts: int,
        top_p: float,
        top_k: int | None = None,
        jitter_noise: float = 0.0,
        init_std: float = 0.02,
        debug: bool = False,
    ):
        super().__init__(in_features, num_experts=num_experts, init_std=init_std, debug=debug)
        check_top_k(top_k, num_experts, allow_none=True)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}")
        self.top_p = float(top_p)
        self.top_k = top_k
        self._set_jitter(jitter_noise)

    def route(self, logits: torch.Tensor) -> RouterOutput:
        return route_topp(logits, self.top_p, self.top_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}, top_k={self.top_k}, jitter_noise={self.jitter_noise}"
