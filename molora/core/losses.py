"""Router losses as pure functions of router outputs (DESIGN §5).

For one layer, over the non-padding tokens t = 1..T, with p_t = softmax(logits_t) and S_t the
chosen experts (for dense routing S_t = {argmax p_t}, k = 1):

    f_i = (1 / (T k)) * #{t : i in S_t}        P_i = (1 / T) * sum_t p_{t,i}
    L_balance = N * sum_i f_i * P_i            (Switch Transformer, Fedus et al. 2021, eq. 4)
    L_z       = (1 / T) * sum_t (logsumexp_i logits_{t,i})^2   (ST-MoE, Zoph et al. 2022, eq. 5)

Gradients flow through P and the logits, never through the counts f.
"""

from __future__ import annotations

import torch


def _select(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return tensor
    mask = mask.reshape(-1).to(tensor.device).bool()
    if mask.shape[0] != tensor.shape[0]:
        raise ValueError(f"`mask` has {mask.shape[0]} entries for {tensor.shape[0]} tokens")
    return tensor[mask]


def load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer; 1.0 when perfectly balanced.

    Args:
        logits: (T, N) router logits.
        indices: (T, k) chosen experts, or None for dense routing (then S_t = argmax).
        mask: (T,) 1 for real tokens, 0 for padding; None counts every token.

    Returns:
        scalar float32 tensor (0 when there is no real token).
    """
    logits = _select(logits.float(), mask)  # (T, N)
    num_experts = logits.shape[-1]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    chosen = logits.argmax(-1, keepdim=True) if indices is None else _select(indices, mask)  # (T, k)
    probs = torch.softmax(logits, dim=-1)  # (T, N)
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()  # (N,)
    fraction = counts / chosen.numel()  # f_i, no gradient
    mean_prob = probs.mean(0)  # P_i
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss of one layer: mean over real tokens of logsumexp(logits)^2.

    Args:
        logits: (T, N) router logits.
        mask: (T,) 1 for real tokens, 0 for padding; None counts every token.
    """
    logits = _select(logits.float(), mask)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()
