"""Router losses as pure functions of router outputs (DESIGN §5).

For one layer, over the non-padding tokens t = 1..T, with p_t = softmax(logits_t) and S_t the
chosen experts (for dense routing S_t = {argmax p_t}; |S_t| = k for top-k, varying for top-p,
whose -1 padding slots are not in S_t):

    f_i = #{t : i in S_t} / sum_t |S_t|        P_i = (1 / T) * sum_t p_{t,i}
    L_balance = N * sum_i f_i * P_i            (Switch Transformer, Fedus et al. 2021, eq. 4)
    L_z       = (1 / T) * sum_t (logsumexp_i logits_{t,i})^2   (ST-MoE, Zoph et al. 2022, eq. 5)

Gradients flow through P and the logits, never through the counts f. Padding is masked by
multiplying (static shapes, no host-device sync): the losses trace into one compiled graph.
"""

from __future__ import annotations

import torch


def _token_weights(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(T,) float32 weight of each token: 1 for real tokens, 0 for padding (all 1 without a mask).

    Padding is excluded by multiplying, never by boolean indexing: the shapes stay static, so
    the losses run without a host-device sync and trace into one graph (DESIGN §8).
    """
    if mask is None:
        return logits.new_ones(logits.shape[0], dtype=torch.float32)
    mask = mask.reshape(-1)
    if mask.shape[0] != logits.shape[0]:
        raise ValueError(f"`mask` has {mask.shape[0]} entries for {logits.shape[0]} tokens")
    return mask.to(device=logits.device).ne(0).float()


def load_balancing_loss(
    logits: torch.Tensor, indices: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer; 1.0 when perfectly balanced.

    Args:
        logits: (T, N) router logits.
        indices: (T, k) chosen experts, -1 in unused (top-p padding) slots, or None for dense
            routing (then S_t = argmax).
        mask: (T,) 1 for real tokens, 0 for padding; None counts every token.

    Returns:
        scalar float32 tensor (0 when there is no real token).
    """
    logits = logits.float()  # (T, N)
    num_experts = logits.shape[-1]
    real = _token_weights(logits, mask)  # (T,)
    num_real = real.sum().clamp(min=1)  # T (0 real tokens: every sum below is 0, and so is the loss)
    chosen = logits.argmax(-1, keepdim=True) if indices is None else indices.to(logits.device)  # (T, k)
    in_set = (chosen >= 0).float() * real[:, None]  # (T, k): 1 for a real token's real slot
    # counts by scatter_add into a fixed (N,) buffer: static shape, no sync (not bincount)
    counts = logits.new_zeros(num_experts).scatter_add_(0, chosen.clamp(min=0).reshape(-1), in_set.reshape(-1))  # (N,)
    fraction = counts / in_set.sum().clamp(min=1)  # f_i = #{t : i in S_t} / sum_t |S_t|, no gradient
    probs = torch.softmax(logits, dim=-1) * real[:, None]  # (T, N), zero on padding
    mean_prob = probs.sum(0) / num_real  # P_i
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss of one layer: mean over real tokens of logsumexp(logits)^2.

    Args:
        logits: (T, N) router logits.
        mask: (T,) 1 for real tokens, 0 for padding; None counts every token.

    Returns:
        scalar float32 tensor (0 when there is no real token).
    """
    logits = logits.float()
    real = _token_weights(logits, mask)  # (T,)
    z = torch.logsumexp(logits, dim=-1).square() * real  # (T,)
    return z.sum() / real.sum().clamp(min=1)
