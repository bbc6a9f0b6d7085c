"""Pure math of weighted static merges: dW = s * sum_i w_i B_i A_i as LoRA factors (DESIGN §6).

- ``cat_factors``: exact, rank r * #{i : w_i != 0}, never forms out x in.
- ``svd_factors``: best rank-k approximation (Eckart-Young) from the factors: QR of the stacked
  factors, SVD of the small core; never forms out x in. Reports the relative Frobenius error.
- ``singular_values``: the singular values of dW from the same factored SVD (rank choice).
- ``pad_factors``: zero rows/columns up to a fixed rank (serving stacks want one rank).
- ``dense_delta``: the dense reference (forms out x in; for tests and for folding into W0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

METHODS = ("cat", "svd")


class MergedFactors(NamedTuple):
    """A low-rank factorization dW ~= lora_B @ lora_A of one layer's merged update.

    Attributes:
        lora_A: (rank, in) float32.
        lora_B: (out, rank) float32, with molora's scaling and the gates folded in.
        rel_error: ||dW - lora_B @ lora_A||_F / ||dW||_F (0.0 when dW = 0 or exact).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rel_error: float


def _check_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor) -> None:
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"`lora_A` must be (N, r, in) and `lora_B` (N, out, r), got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    n, r, _ = lora_A.shape
    if lora_B.shape[0] != n or lora_B.shape[2] != r:
        raise ValueError(f"`lora_B` must be (N={n}, out, r={r}), got {tuple(lora_B.shape)}")
    if weights.shape != (n,):
        raise ValueError(f"`weights` must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"`weights` must be finite, got {weights.tolist()}")


def dense_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference dense update dW = s * sum_i w_i B_i A_i (forms out x in; tests and merging).

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s (already including rsLoRA).

    Returns:
        (out, in) float32 tensor.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    scaled_B = lora_B.float() * (scaling * w)[:, None, None]  # (N, out, r)
    return torch.einsum("nor,nri->oi", scaled_B, lora_A.float())  # (out, in)


def cat_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float) -> MergedFactors:
    """Exact rank-(r * #nonzero) factors of dW: stacked A_i, concatenated s * w_i * B_i.

    Experts with w_i == 0 are dropped. All zero weights give rank-0 factors.

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.

    Returns:
        MergedFactors with lora_A (r', in), lora_B (out, r'), rel_error 0.0.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    keep = (w != 0).nonzero().flatten()  # (n',)
    n_keep, r, d_in = keep.numel(), lora_A.shape[1], lora_A.shape[2]
    d_out = lora_B.shape[1]
    cat_A = lora_A[keep].float().reshape(n_keep * r, d_in)  # (n' r, in), row j*r+k = A_j[k]
    scaled_B = lora_B[keep].float() * (scaling * w[keep])[:, None, None]  # (n', out, r)
    cat_B = scaled_B.permute(1, 0, 2).reshape(d_out, n_keep * r)  # (out, n' r), col j*r+k
    return MergedFactors(cat_A.contiguous(), cat_B.contiguous(), 0.0)


def svd_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, rank: int
) -> MergedFactors:
    """Best rank-``rank`` factors of dW (Eckart-Young), without forming out x in.

    With the exact factors dW = Bc Ac (Bc: (out, R), Ac: (R, in), R = r * #nonzero):
    Bc = Qb Rb and Ac^T = Qa Ra (reduced QR), so dW = Qb (Rb Ra^T) Qa^T and the SVD of the
    R x R core U S V^T gives dW = (Qb U) S (Qa V)^T. Keeping the ``rank`` largest singular
    values gives the optimal truncation; sqrt(S) is split between the two factors so that
    they have balanced norms. Computed in float64; returned in float32. Where R < ``rank``
    the factors are zero-padded (still exact), so the result always has rank ``rank`` rows.

    Args:
        lora_A: (N, r, in) stacked expert A.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.
        rank: target rank k >= 1.

    Returns:
        MergedFactors with lora_A (k, in), lora_B (out, k) and the relative Frobenius error
        sqrt(sum_{j>k} S_j^2 / sum_j S_j^2).

    Raises:
        ValueError: ``rank`` is not a positive int.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1 for method='svd', got {rank!r}")
    exact = cat_factors(lora_A, lora_B, weights, scaling)
    cat_A, cat_B = exact.lora_A.double(), exact.lora_B.double()  # (R, in), (out, R)
    d_out, d_in, big_r = cat_B.shape[0], cat_A.shape[1], cat_A.shape[0]
    out_A = torch.zeros(rank, d_in, dtype=torch.float64, device=cat_A.device)  # (k, in)
    out_B = torch.zeros(d_out, rank, dtype=torch.float64, device=cat_A.device)  # (out, k)
    if big_r == 0:
        return MergedFactors(out_A.float(), out_B.float(), 0.0)
    q_b, u, s, vh, q_a = _factored_svd(cat_A, cat_B)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()  # (keep,)
    out_B[:, :keep] = (q_b @ u[:, :keep]) * root  # (out, keep)
    out_A[:keep] = root[:, None] * (vh[:keep] @ q_a.T)  # (keep, in)
    return MergedFactors(out_A.float(), out_B.float(), truncation_error(s, keep))


def _factored_svd(cat_A: torch.Tensor, cat_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """dW = cat_B @ cat_A = (Qb U) diag(S) (Qa V)^T from QR of both factors and the SVD of the core.

    Args:
        cat_A: (R, in) float64; cat_B: (out, R) float64, R >= 1.

    Returns:
        (Qb (out, R'), U (R', m), S (m,) descending, Vh (m, R''), Qa (in, R'')).
    """
    q_b, r_b = torch.linalg.qr(cat_B)  # (out, R'), (R', R) with R' = min(out, R)
    q_a, r_a = torch.linalg.qr(cat_A.T)  # (in, R''), (R'', R)
    core = r_b @ r_a.T  # (R', R'')
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (R', m), (m,), (m, R'')
    return q_b, u, s, vh, q_a


def singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float) -> torch.Tensor:
    """The singular values of dW = s * sum_i w_i B_i A_i, descending, float64, without forming out x in.

    The relative Frobenius error of the best rank-k approximation is
    sqrt(sum_{j>k} S_j^2 / sum_j S_j^2) (Eckart-Young), which is how ``rank="auto"`` compares ranks.

    Returns:
        (m,) float64 with m = min(out, in, r * #nonzero); empty when dW = 0 by construction.
    """
    exact = cat_factors(lora_A, lora_B, weights, scaling)
    if exact.lora_A.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return _factored_svd(exact.lora_A.double(), exact.lora_B.double())[2].cpu()


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of keeping the ``rank`` largest of the singular values ``s``."""
    total = float((s.double() ** 2).sum())
    return 0.0 if total == 0.0 else float((s.double()[rank:] ** 2).sum() / total) ** 0.5


def pad_factors(f: MergedFactors, rank: int) -> MergedFactors:
    """``f`` with zero rows of lora_A and zero columns of lora_B up to ``rank`` (the same dW).

    Raises:
        ValueError: ``f`` already has more than ``rank`` rows.
    """
    have = f.lora_A.shape[0]
    if have > rank:
        raise ValueError(f"cannot pad rank-{have} factors down to rank {rank}")
    lora_A = torch.cat([f.lora_A, f.lora_A.new_zeros(rank - have, f.lora_A.shape[1])])  # (rank, in)
    lora_B = torch.cat([f.lora_B, f.lora_B.new_zeros(f.lora_B.shape[0], rank - have)], dim=1)  # (out, rank)
    return MergedFactors(lora_A, lora_B, f.rel_error)


def merge_factors(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    *,
    method: str = "cat",
    rank: int | None = None,
) -> MergedFactors:
    """Dispatch to :func:`cat_factors` or :func:`svd_factors` by name.

    Raises:
        ValueError: unknown ``method``, or ``rank`` given with method "cat".
    """
    if method == "cat":
        if rank is not None:
            raise ValueError(f"`rank` applies to method='svd' only (cat is exact), got rank={rank}")
        return cat_factors(lora_A, lora_B, weights, scaling)
    if method == "svd":
        return svd_factors(lora_A, lora_B, weights, scaling, lora_A.shape[1] if rank is None else rank)
    raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")
