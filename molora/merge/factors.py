"""Pure math of weighted static merges: dW = s * sum_i w_i B_i A_i as LoRA factors (DESIGN §6).

- ``cat_factors``: exact, rank r * #{i : w_i != 0}, never forms out x in.
- ``svd_factors``: best rank-k approximation (Eckart-Young) from the factors: QR of the stacked
  factors, SVD of the small core; never forms out x in. Reports the relative Frobenius error.
- ``singular_values``: the singular values of dW from the same factored SVD (rank choice).
- ``pad_factors``: zero rows/columns up to a fixed rank (serving stacks want one rank).
- ``dense_delta``: the dense reference (forms out x in; for tests and for folding into W0).
- ``merge_layer`` / ``exact_rank``: the same for a MoLoRA layer, its structure included.

Structures (DESIGN §6): with a shared A (``lora_A`` (1, r, in), HydraLoRA) every merge is
exact at rank r: lora_A = A, lora_B = s * sum_i w_i B_i, and "cat" gives that rank-r form
rather than r * #nonzero. Shared experts (``shared`` = (A_sh (M, r, in), B_sh (M, out, r)))
are part of every merge with weight 1: "cat" appends their M*r rows (stacked A_sh, s * B_sh);
they keep their own A, so a shared-A merge with M shared experts has rank r + M*r.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from molora.core.shared import shares_A

METHODS = ("cat", "svd")
Shared = tuple[torch.Tensor, torch.Tensor] | None  # (A_sh (M, r, in), B_sh (M, out, r)) or None

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
            f"`lora_A` must be (N, r, in) and `lora_B` (N, out, r), got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    n, r = lora_B.shape[0], lora_A.shape[1]
    if lora_A.shape[0] not in (1, n) or lora_B.shape[2] != r:
        raise ValueError(
            f"`lora_A` must be (N, r, in) or shared (1, r, in) and `lora_B` (N, out, r={r}), got "
            f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if weights.shape != (n,):
        raise ValueError(f"`weights` must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"`weights` must be finite, got {weights.tolist()}")


def dense_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, shared: Shared = None
) -> torch.Tensor:
    """Reference dense update dW = s * sum_i w_i B_i A_i (+ s * sum_j B_sh_j A_sh_j) (forms out x in).

    Args:
        lora_A: (N, r, in) stacked expert A, or (1, r, in) shared.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s (already including rsLoRA).
        shared: the shared experts (A_sh (M, r, in), B_sh (M, out, r)) with weight 1, or None.

    Returns:
        (out, in) float32 tensor.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    scaled_B = lora_B.float() * (scaling * w)[:, None, None]  # (N, out, r)
    delta = torch.einsum("nor,nri->oi", scaled_B, lora_A.float().expand(lora_B.shape[0], -1, -1))  # (out, in)
    if shared is not None:
        delta = delta + scaling * torch.einsum("mor,mri->oi", shared[1].float(), shared[0].float())
    return delta


def cat_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, shared: Shared = None
) -> MergedFactors:
    """Exact rank-(r * #nonzero) factors of dW: stacked A_i, concatenated s * w_i * B_i.

    Experts with w_i == 0 are dropped. All zero weights give rank-0 factors. With a shared A
    (1, r, in) the factors are A and s * sum_i w_i B_i: rank r (0 when every w_i is 0). Shared
    experts add their M*r rows (A_sh stacked, s * B_sh concatenated) after the routed ones.

    Args:
        lora_A: (N, r, in) stacked expert A, or (1, r, in) shared.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.
        shared: the shared experts (A_sh (M, r, in), B_sh (M, out, r)), or None.

    Returns:
        MergedFactors with lora_A (r', in), lora_B (out, r'), rel_error 0.0.
    """
    _check_factors(lora_A, lora_B, weights)
    w = weights.to(device=lora_A.device, dtype=torch.float32)
    if shares_A(lora_A, lora_B):
        routed = _shared_A_factors(lora_A, lora_B, w, scaling)
    else:
        routed = _cat_routed(lora_A, lora_B, w, scaling)
    if shared is None or shared[0].shape[0] == 0:
        return routed
    tail = _cat_routed(shared[0], shared[1], torch.ones(shared[0].shape[0], device=w.device), scaling)
    cat_A = torch.cat([routed.lora_A, tail.lora_A.to(routed.lora_A.device)])  # (r' + M r, in)
    cat_B = torch.cat([routed.lora_B, tail.lora_B.to(routed.lora_B.device)], dim=1)  # (out, r' + M r)
    return MergedFactors(cat_A, cat_B, 0.0)


def _shared_A_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, w: torch.Tensor, scaling: float) -> MergedFactors:
    """HydraLoRA's exact rank-r merge: lora_A = A (r, in), lora_B = s * sum_i w_i B_i (out, r)."""
    if not bool((w != 0).any()):
        return MergedFactors(lora_A.new_zeros(0, lora_A.shape[2]).float(), lora_B.new_zeros(lora_B.shape[1], 0).float(), 0.0)
    merged_B = torch.einsum("n,nor->or", scaling * w, lora_B.float())  # (out, r)
    return MergedFactors(lora_A[0].float().contiguous(), merged_B.contiguous(), 0.0)


def _cat_routed(lora_A: torch.Tensor, lora_B: torch.Tensor, w: torch.Tensor, scaling: float) -> MergedFactors:
    """Stacked A_i and concatenated s * w_i * B_i of the experts with w_i != 0."""
    keep = (w != 0).nonzero().flatten()  # (n',)
    n_keep, r, d_in = keep.numel(), lora_A.shape[1], lora_A.shape[2]
    d_out = lora_B.shape[1]
    cat_A = lora_A[keep].float().reshape(n_keep * r, d_in)  # (n' r, in), row j*r+k = A_j[k]
    scaled_B = lora_B[keep].float() * (scaling * w[keep])[:, None, None]  # (n', out, r)
    cat_B = scaled_B.permute(1, 0, 2).reshape(d_out, n_keep * r)  # (out, n' r), col j*r+k
    return MergedFactors(cat_A.contiguous(), cat_B.contiguous(), 0.0)


def svd_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, rank: int, shared: Shared = None
) -> MergedFactors:
    """Best rank-``rank`` factors of dW (Eckart-Young), without forming out x in.

    With the exact factors dW = Bc Ac (Bc: (out, R), Ac: (R, in), R = r * #nonzero):
    Bc = Qb Rb and Ac^T = Qa Ra (reduced QR), so dW = Qb (Rb Ra^T) Qa^T and the SVD of the
    R x R core U S V^T gives dW = (Qb U) S (Qa V)^T. Keeping the ``rank`` largest singular
    values gives the optimal truncation; sqrt(S) is split between the two factors so that
    they have balanced norms. Computed in float64; returned in float32. Where R < ``rank``
    the factors are zero-padded (still exact), so the result always has rank ``rank`` rows.

    Args:
        lora_A: (N, r, in) stacked expert A, or (1, r, in) shared.
        lora_B: (N, out, r) stacked expert B.
        weights: (N,) static gates.
        scaling: molora's s.
        rank: target rank k >= 1.
        shared: the shared experts, or None (see :func:`cat_factors`).

    Returns:
        MergedFactors with lora_A (k, in), lora_B (out, k) and the relative Frobenius error
        sqrt(sum_{j>k} S_j^2 / sum_j S_j^2).

    Raises:
        ValueError: ``rank`` is not a positive int.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank` must be an int >= 1 for method='svd', got {rank!r}")
    exact = cat_factors(lora_A, lora_B, weights, scaling, shared)
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


def singular_values(
    lora_A: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, shared: Shared = None
) -> torch.Tensor:
    """The singular values of dW (shared experts included), descending, float64, without forming out x in.

    The relative Frobenius error of the best rank-k approximation is
    sqrt(sum_{j>k} S_j^2 / sum_j S_j^2) (Eckart-Young), which is how ``rank="auto"`` compares ranks.

    Returns:
        (m,) float64 with m = min(out, in, exact rank); empty when dW = 0 by construction.
    """
    exact = cat_factors(lora_A, lora_B, weights, scaling, shared)
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
    shared: Shared = None,
) -> MergedFactors:
    """Dispatch to :func:`cat_factors` or :func:`svd_factors` by name.

    Raises:
        ValueError: unknown ``method``, or ``rank`` given with method "cat".
    """
    if method == "cat":
        if rank is not None:
            raise ValueError(f"`rank` applies to method='svd' only (cat is exact), got rank={rank}")
        return cat_factors(lora_A, lora_B, weights, scaling, shared)
    if method == "svd":
        return svd_factors(lora_A, lora_B, weights, scaling, lora_A.shape[1] if rank is None else rank, shared)
    raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}")


def layer_shared(layer: Any, task: int | None = None) -> Shared:
    """A MoLoRA layer's always-on terms (A_sh, B_sh) with weight 1, detached, or None: its shared
    experts, and with PiSSA init the frozen residual -s * sum_i gbar_i B0_i A0_i (experts with
    gbar_i = 0 left out; gbar of ``task`` for the task router, see :mod:`molora.core.init`).

    Raises:
        ValueError: a PiSSA task-router layer without ``task`` (its residual is per task).
    """
    parts = []
    if getattr(layer, "num_shared_experts", 0):
        parts.append((layer.lora_A_shared.detach(), layer.lora_B_shared.detach()))
    if getattr(layer, "pissa_B", None) is not None:
        gates = layer.pissa_gates
        if gates.shape[0] > 1 and task is None:
            raise ValueError(
                "a PiSSA-initialized task-router model merges per task (each task has its own frozen residual): "
                "pass task=<id or name> (or task='all' to export every task)"
            )
        gbar = gates[0 if gates.shape[0] == 1 else int(task)].float()  # (N,)
        keep = (gbar != 0).nonzero().flatten()
        parts.append((layer.pissa_A.detach()[keep], -layer.pissa_B.detach()[keep] * gbar[keep, None, None]))
    if not parts:
        return None
    return torch.cat([a.float() for a, _ in parts]), torch.cat([b.float() for _, b in parts])


def merge_layer(
    layer: Any, weights: torch.Tensor, *, method: str = "cat", rank: int | None = None, task: int | None = None
) -> MergedFactors:
    """:func:`merge_factors` of a MoLoRA layer: its experts, shared A and shared experts, PiSSA's
    residual (of ``task`` for the task router), its scaling."""
    return merge_factors(
        layer.lora_A.detach(), layer.lora_B.detach(), weights, float(layer.scaling),
        method=method, rank=rank, shared=layer_shared(layer, task),
    )  # fmt: skip


def exact_rank(layer: Any) -> int:
    """The rank of a layer's exact ("cat") merge at most: N*r (r with a shared A) + M*r (+ N*r of
    PiSSA's residual), capped by in, out."""
    routed = layer.r if shares_A(layer.lora_A, layer.lora_B) else layer.num_experts * layer.r
    total = routed + getattr(layer, "num_shared_experts", 0) * layer.r
    if getattr(layer, "pissa_B", None) is not None:
        total += layer.num_experts * layer.r
    return min(total, layer.in_features, layer.out_features)


def layer_singular_values(layer: Any, weights: torch.Tensor, task: int | None = None) -> torch.Tensor:
    """:func:`singular_values` of a MoLoRA layer's merge (shared A, shared experts, PiSSA residual)."""
    return singular_values(
        layer.lora_A.detach(), layer.lora_B.detach(), weights, float(layer.scaling), layer_shared(layer, task)
    )
