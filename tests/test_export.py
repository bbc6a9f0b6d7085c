"""Tests for molora.export: the merge math, PEFT adapter export, merge_and_unload, gates."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from molora.export import (
    cat_factors,
    dense_delta,
    load_gates,
    merge_factors,
    save_gates,
    svd_factors,
)


def _factors(n=4, r=3, d_in=11, d_out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(n, r, d_in, generator=g)  # (N, r, in)
    lora_B = torch.randn(n, d_out, r, generator=g)  # (N, out, r)
    return lora_A, lora_B


# --------------------------------------------------------------------------- pure math


def test_dense_delta_matches_loop():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.1, 0.0, 0.5, 0.4])
    ref = sum(0.7 * w[i] * lora_B[i] @ lora_A[i] for i in range(4))
    torch.testing.assert_close(dense_delta(lora_A, lora_B, w, 0.7), ref)


def test_cat_is_exact_and_drops_zero_experts():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.1, 0.0, 0.5, 0.0])
    f = cat_factors(lora_A, lora_B, w, 2.0)
    assert f.lora_A.shape == (2 * 3, 11) and f.lora_B.shape == (7, 2 * 3)
    assert f.rel_error == 0.0
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 2.0))
    empty = cat_factors(lora_A, lora_B, torch.zeros(4), 2.0)
    assert empty.lora_A.shape == (0, 11) and empty.lora_B.shape == (7, 0)


def test_svd_full_rank_is_exact():
    lora_A, lora_B = _factors()
    w = torch.tensor([0.25, 0.25, 0.25, 0.25])
    f = svd_factors(lora_A, lora_B, w, 0.5, rank=7)  # rank(dW) <= min(out=7, N r=12)
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 0.5), atol=1e-5, rtol=1e-5)
    assert f.rel_error < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("shape", [(4, 3, 11, 7), (3, 2, 5, 13)])
def test_svd_truncation_is_optimal_and_error_matches(rank, shape):
    n, r, d_in, d_out = shape
    lora_A, lora_B = _factors(n, r, d_in, d_out, seed=rank)
    w = torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(1)), 0)
    delta = dense_delta(lora_A, lora_B, w, 1.3).double()  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young optimum
    f = svd_factors(lora_A, lora_B, w, 1.3, rank=rank)
    assert f.lora_A.shape == (rank, d_in) and f.lora_B.shape == (d_out, rank)
    torch.testing.assert_close((f.lora_B @ f.lora_A).double(), best, atol=1e-5, rtol=1e-4)
    expected_error = float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta))
    assert f.rel_error == pytest.approx(expected_error, rel=1e-5, abs=1e-7)


def test_svd_pads_to_requested_rank():
    lora_A, lora_B = _factors(n=2, r=2, d_in=9, d_out=8)
    w = torch.tensor([1.0, 0.0])  # dW has rank 2
    f = svd_factors(lora_A, lora_B, w, 1.0, rank=5)
    assert f.lora_A.shape == (5, 9) and f.lora_B.shape == (8, 5)
    torch.testing.assert_close(f.lora_B @ f.lora_A, dense_delta(lora_A, lora_B, w, 1.0), atol=1e-5, rtol=1e-5)
    zero = svd_factors(lora_A, lora_B, torch.zeros(2), 1.0, rank=3)
    assert zero.rel_error == 0.0 and not zero.lora_B.any()


def test_merge_factors_errors():
    lora_A, lora_B = _factors()
    w = torch.full((4,), 0.25)
    with pytest.raises(ValueError, match="`method` must be one of"):
        merge_factors(lora_A, lora_B, w, 1.0, method="ties")
    with pytest.raises(ValueError, match="`rank` applies to method='svd'"):
        merge_factors(lora_A, lora_B, w, 1.0, method="cat", rank=4)
    with pytest.raises(ValueError, match="`rank` must be an int >= 1"):
        merge_factors(lora_A, lora_B, w, 1.0, method="svd", rank=0)
    with pytest.raises(ValueError, match=r"`weights` must have shape \(N,\)"):
        merge_factors(lora_A, lora_B, torch.ones(3), 1.0)
    assert merge_factors(lora_A, lora_B, w, 1.0, method="svd").lora_A.shape == (3, 11)  # default r


def test_gates_file_round_trip(tmp_path):
    gates = {"a.q": torch.tensor([0.25, 0.75]), "a.v": torch.tensor([1.0, 0.0])}
    save_gates(gates, tmp_path / "g.json")
    back = load_gates(tmp_path / "g.json")
    assert set(back) == set(gates) and all(torch.equal(back[k], gates[k]) for k in gates)
    by_task = {0: gates, 1: {k: v.flip(0) for k, v in gates.items()}}
    save_gates(by_task, tmp_path / "t.json")
    back = load_gates(tmp_path / "t.json")
    assert set(back) == {0, 1} and torch.equal(back[1]["a.q"], by_task[1]["a.q"])
