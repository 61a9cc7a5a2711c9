"""Block LDLQ for 8-dimensional vector quantizers (QuIP#'s BlockLDLQ) with the E8P codebook.

Objective: choose Ŵ (m × n, every row split into 8-column code blocks) to make the proxy loss
tr((W − Ŵ) H (W − Ŵ)ᵀ) small, H the damped n × n input second moment.

Write the damped H as ``H = U D Uᵀ`` with U unit upper block-triangular (8 × 8 identity blocks on the
diagonal) and D block diagonal. With E = W − Ŵ the loss is Σ_k δ_k D_k δ_kᵀ where
δ_k = W_k + Σ_{j<k} E_j U_{jk} − Ŵ_k (block columns of 8). LDLQ therefore walks the blocks in order and rounds
the *target* ``W_k + Σ_{j<k} E_j U_{jk}`` to the codebook: each block's error is fed forward to the blocks not
yet quantized. The factorisation is done in float64 (a Cholesky of the reversed H), the loop in float32, and
the feedback is applied lazily: inside a 128-column batch immediately, to the columns after it once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .e8p import E8P_DIM, LatticeQuantizedTensor, choose_scales, e8p_round

__all__ = ["damp_hessian", "block_ldl", "feedback_matrix", "ldlq_vector"]


def damp_hessian(H: Tensor, damp: float = 0.01) -> Tensor:
    """``H + damp · mean(diag H) · I`` in float64 (n × n); dead channels (zero diagonal) first get a unit
    diagonal, as in GPTQ."""
    H = H.to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return H


def block_ldl(H: Tensor, block: int = E8P_DIM) -> tuple[Tensor, Tensor]:
    """Block factorisation ``H = U · blockdiag(D) · Uᵀ`` of a symmetric positive-definite H (n × n, n
    divisible by ``block``).

    Returns U (n × n, unit upper block-triangular: identity ``block × block`` diagonal blocks) and D
    (n / block, block, block), both float64. Computed from the Cholesky factor of H with rows and columns
    reversed (reversal turns the lower block-LDL of the flipped matrix into an upper one).
    """
    n = H.shape[0]
    if n % block:
        raise ValueError(f"block LDL needs n divisible by the block size {block}; got n = {n}")
    K = n // block
    C = torch.linalg.cholesky(H.to(torch.float64).flip(0, 1))  # flipped H = C Cᵀ, C lower
    Cblocks = C.reshape(n, K, block).permute(1, 0, 2)  # (K, n, block) block columns
    diag = torch.stack([C[k * block:(k + 1) * block, k * block:(k + 1) * block] for k in range(K)])
    # L = C · blockdiag(C_kk)⁻¹ is unit lower block-triangular; flipped H = L · blockdiag(C_kk C_kkᵀ) · Lᵀ
    L = torch.linalg.solve_triangular(diag, Cblocks, upper=False, left=False).permute(1, 0, 2).reshape(n, n)
    D = diag @ diag.transpose(1, 2)
    return L.flip(0, 1), D.flip(0).flip(1, 2)


def feedback_matrix(H: Tensor, damp: float = 0.01) -> Tensor:
    """The float32 U (n × n) of the damped H's block LDL, which is all block LDLQ needs from H; compute it once
    when the same H quantizes several matrices and pass it to :func:`ldlq_vector` as ``U``."""
    return block_ldl(damp_hessian(H, damp))[0].to(torch.float32)


def ldlq_vector(W: Tensor, H: Tensor | None, *, stages: int = 1, damp: float = 0.01,
                scale: float | Sequence[float] | None = None, scale_bits: int = 16,
                lazy_batch: int = 128, U: Tensor | None = None) -> LatticeQuantizedTensor:
    """Quantize W (m × n, n divisible by 8) to E8P codes with block LDLQ error feedback.

    Args:
        W: weight, out × in (any float dtype; computed in float32).
        H: input second moment X Xᵀ (n × n), symmetric positive semi-definite.
        stages: 1 = e8p (2 bits/weight), 2 = e8p4 (two-stage residual, 4 bits/weight).
        damp: H ← H + damp · mean(diag H) · I before factorising.
        scale: per-matrix scale(s), one per stage; ``None`` chooses them once from W itself with
            :func:`~qlr.quant.e8p.choose_scales` (the MSE-best scale for plain rounding of W, then of the
            stage-1 residual), before any feedback. They stay fixed during the loop.
        scale_bits: storage width of each scale (16 or 32).
        lazy_batch: columns per lazy feedback batch (a multiple of 8).
        U: :func:`feedback_matrix` of (H, damp), computed here when not given (then H may be None).

    Returns:
        A :class:`~qlr.quant.e8p.LatticeQuantizedTensor` (m × n) with ``meta["method"] = "ldlq-e8p"``.
    """
    m, n = W.shape
    if n % E8P_DIM:
        raise ValueError(f"block LDLQ with E8P needs the number of columns to be a multiple of 8; "
                         f"W is {m} × {n}")
    if U is None and H is None:
        raise ValueError("ldlq_vector needs H or its feedback matrix U")
    what, given = ("U", U) if U is not None else ("H", H)
    if given.shape != (n, n):
        raise ValueError(f"{what} must be {n} × {n} to match W's {m} × {n}, got {tuple(given.shape)}")
    if lazy_batch <= 0 or lazy_batch % E8P_DIM:
        raise ValueError(f"lazy_batch must be a positive multiple of 8, got {lazy_batch}")
    W32 = W.to(torch.float32)
    A = (feedback_matrix(H.to(W.device), damp) if U is None else U).to(W.device, torch.float32)
    scales = choose_scales(W32, stages, scale, scale_bits)

    target = W32.clone()  # W_k + Σ_{j<k} E_j U_{jk}, completed block by block
    err = torch.empty_like(W32)  # E = W − Ŵ
    codes = torch.empty(len(scales), m, n // E8P_DIM, dtype=torch.int64, device=W.device)
    for b0 in range(0, n, lazy_batch):
        b1 = min(b0 + lazy_batch, n)
        for k in range(b0, b1, E8P_DIM):
            kk = k + E8P_DIM
            q, c = e8p_round(target[:, k:kk], scales)
            codes[:, :, k // E8P_DIM] = c
            err[:, k:kk] = W32[:, k:kk] - q
            if kk < b1:
                target[:, kk:b1] += err[:, k:kk] @ A[k:kk, kk:b1]
        if b1 < n:
            target[:, b1:] += err[:, b0:b1] @ A[b0:b1, b1:]
    return LatticeQuantizedTensor.from_codes(codes, scales, scale_bits, {"method": "ldlq-e8p", "damp": damp})
