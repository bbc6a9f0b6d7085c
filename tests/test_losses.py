"""Losses against an independent, loop-by-loop computation of the DESIGN §5 formulas."""

import math

import pytest
import torch

from molora.core.losses import load_balancing_loss, router_z_loss


def balance_by_hand(logits, chosen, mask):
    """N * sum_i f_i P_i over the real tokens, written out with Python loops."""
    T_real = [t for t in range(logits.shape[0]) if mask[t]]
    N = logits.shape[1]
    k = len(chosen[0])
    total = 0.0
    for i in range(N):
        f = sum(1 for t in T_real if i in chosen[t]) / (len(T_real) * k)
        P = sum(math.exp(logits[t, i]) / sum(math.exp(v) for v in logits[t].tolist()) for t in T_real) / len(T_real)
        total += f * P
    return N * total


def z_by_hand(logits, mask):
    vals = [math.log(sum(math.exp(v) for v in logits[t].tolist())) ** 2 for t in range(logits.shape[0]) if mask[t]]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("k", [None, 1, 2])
def test_balance_loss_matches_formula_with_padding(k):
    torch.manual_seed(k or 0)
    logits = torch.randn(11, 5, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1])
    if k is None:
        indices = None
        chosen = [[int(logits[t].argmax())] for t in range(11)]
    else:
        indices = logits.topk(k, -1).indices
        chosen = indices.tolist()
    got = load_balancing_loss(logits, indices, mask)
    assert got.item() == pytest.approx(balance_by_hand(logits, chosen, mask.tolist()), rel=1e-5)
    # padding matters: the unmasked loss differs
    assert load_balancing_loss(logits, indices, None).item() != pytest.approx(got.item(), rel=1e-6)


def test_balance_loss_is_one_when_balanced_and_n_when_collapsed():
    logits = torch.zeros(8, 4)
    indices = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(logits, indices).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(8, 1)
    assert load_balancing_loss(collapsed, None).item() == pytest.approx(4.0, rel=1e-3)


def test_z_loss_matches_formula_with_padding():
    torch.manual_seed(0)
    logits = 3 * torch.randn(9, 6, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1])
    assert router_z_loss(logits, mask).item() == pytest.approx(z_by_hand(logits, mask.tolist()), rel=1e-6)


def test_gradient_flows_through_probs_not_counts():
    logits = torch.randn(6, 3, requires_grad=True)
    indices = logits.detach().topk(1, -1).indices
    load_balancing_loss(logits, indices).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # f is a constant: the gradient equals N * f_i * dP_i/dlogits
    f = torch.bincount(indices.reshape(-1), minlength=3).float() / 6
    logits2 = logits.detach().clone().requires_grad_(True)
    (3 * (f * torch.softmax(logits2, -1).mean(0)).sum()).backward()
    torch.testing.assert_close(logits.grad, logits2.grad)


def test_all_padding_gives_zero_and_mask_length_is_checked():
    logits = torch.randn(4, 3)
    assert load_balancing_loss(logits, None, torch.zeros(4)).item() == 0.0
    assert router_z_loss(logits, torch.zeros(4)).item() == 0.0
    with pytest.raises(ValueError, match="`mask` has 3 entries for 4 tokens"):
        router_z_loss(logits, torch.ones(3))
