"""Expert structures beyond N independent experts: a shared A (HydraLoRA) and shared experts.

- :func:`shares_A`: whether a layer's ``lora_A`` (1, r, in) is one down-projection shared by
  the N heads of ``lora_B`` (Tian et al. 2024, arXiv 2404.19245); every compute path of
  :mod:`molora.core.experts` reads it.
- :func:`shared_experts`: M always-on experts with gate 1, outside routing (DeepSeek-MoE,
  Dai et al. 2024, arXiv 2401.06066), as one rank M*r LoRA.
"""

from __future__ import annotations

import torch


def shares_A(lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether ``lora_A`` (1, r, in) is one down-projection shared by the N > 1 heads of ``lora_B``."""
    return lora_A.shape[0] == 1 and lora_B.shape[0] > 1


def shared_experts(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Always-on experts (gate 1, DeepSeek-MoE form): s * sum_j B_j A_j x as one rank M*r LoRA.

    Args:
        x: (T, in).
        lora_A: (M, r, in).
        lora_B: (M, out, r).
        scaling: s.

    Returns:
        (T, out).
    """
    num_shared, out_features, rank = lora_B.shape
    h = (x @ lora_A.reshape(num_shared * rank, -1).t()) * scaling  # (T, M*r)
    return h @ lora_B.permute(1, 0, 2).reshape(out_features, num_shared * rank).t()  # (T, out)
