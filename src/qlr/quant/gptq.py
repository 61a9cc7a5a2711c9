"""GPTQ / LDLQ: Hessian-aware rounding with error feedback.

Objective: choose grid codes for W (m × n) to minimise tr((W − Ŵ) H (W − Ŵ)ᵀ), H = X Xᵀ (n × n). Columns are
quantized in order; column j's rounding error e_j is pushed onto the not-yet-quantized columns through row j of
the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U): W[:, j+1:] −= e_j U[j, j+1:] / U[j, j]. This is LDLQ with the LDL
of H (Frantar et al. 2022; Chee et al. 2023). Updates are applied lazily in blocks of ``block_size`` columns; the
codes do not depend on the block size (a group that runs past a block is fitted on its up-to-date columns).

Written as E = W − Ŵ = Err·U with Err_j = δ_j / U_jj (δ_j the rounding error of column j's feedback-updated
target), the objective is tr(E H Eᵀ) = ‖Err‖² = Σ_j D_j ‖δ_j‖², D_j = 1/U_jj² the LDL pivots. The range search of a
group's grid (``QuantSpec.clip_search``) therefore weighs each column's squared error by D_j: plain min-max groups,
or a search on the unweighted error, lose to RTN on outlier-heavy layers (tests/quant/test_gptq.py).

The Hessian is damped (H + damp·mean(diag H)·I) and factorised once; :class:`HessianFactor` can be reused across
calls with the same H (the joint methods call GPTQ many times per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .grid import QuantizedTensor, QuantSpec, dequantize_with, fit_params, quantize_with

__all__ = ["HessianFactor", "prepare_hessian", "gptq_quantize", "fit_group", "damped"]


def damped(H: Tensor, damp: float) -> Tensor:
    """H + damp·mean(diag H)·I in float64 (dead channels, diag = 0, get a unit diagonal first)."""
    H = H.to(torch.float64).clone()
    d = torch.diagonal(H)
    dead = d <= 0
    if dead.any():
        H[dead, :] = 0
        H[:, dead] = 0
        d[dead] = 1.0
    mean = d.mean()
    d += damp * mean if damp > 0 else 0.0
    return H


@dataclass(frozen=True)
class HessianFactor:
    """Upper Cholesky factor of the damped H⁻¹ in quantization order.

    Attributes:
        U: (n, n) float32 upper-triangular, H⁻¹ = Uᵀ U (H permuted by ``perm`` when act-order is on).
        perm: (n,) column order (act-order: decreasing diag H), or None for the natural order.
        dead: (n,) bool mask of input channels that never fire (diag H = 0); their weights are zeroed.
    """

    U: Tensor
    perm: Tensor | None
    dead: Tensor


def prepare_hessian(H: Tensor, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Damp and factorise H (n × n) for GPTQ. If Cholesky fails (H indefinite by rounding), the damping is
    raised tenfold until it succeeds, so a singular H still works."""
    diag = torch.diagonal(H).to(torch.float64)
    dead = diag <= 0
    perm = torch.argsort(diag, descending=True) if act_order else None
    lam = damp
    for _ in range(8):
        Hd = damped(H, max(lam, 1e-10))
        if perm is not None:
            Hd = Hd[perm][:, perm]
        C, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(C)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all():
                return HessianFactor(U.to(torch.float32), perm, dead)
        lam = max(lam, 1e-6) * 10
    raise ValueError("H could not be factorised even with heavy damping; it is probably all zeros or not PSD")


def fit_group(w: Tensor, spec: QuantSpec, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Grid parameters (scale, zero), each (m,), for one group ``w`` (m × g). Without ``spec.clip_search``: the
    min-max fit of :func:`~qlr.quant.grid.fit_params`. With it, and a per-column ``weight`` (g,): the range shrink
    in [0.5, 1] (21 steps, per row) minimising Σ_j weight_j (ŵ_j − w_j)², the group's share of tr(E H Eᵀ) when
    ``weight`` holds the LDL pivots of H; without ``weight`` the plain squared error (``fit_params``)."""
    if not spec.clip_search or weight is None:
        return fit_params(w, spec)
    plain = replace(spec, clip_search=False)
    w = w.float()
    best = scale = zero = None
    for shrink in torch.linspace(1.0, 0.5, 21).tolist():
        s, z = fit_params(w * shrink, plain)  # the min-max grid of the shrunk range, scale at storage precision
        err = (dequantize_with(quantize_with(w, s, z, spec), s, z, spec) - w).pow(2) @ weight
        if best is None:
            best, scale, zero = err, s, z
            continue
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def gptq_quantize(W: Tensor, H: Tensor | HessianFactor, spec: QuantSpec, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, static_groups: bool = False,
                  weighted_clip: bool = True) -> QuantizedTensor:
    """Quantize W (m × n) on ``spec``'s grid with GPTQ/LDLQ error feedback under H (n × n).

    Group parameters are fitted when the quantizer reaches a group's first column, on the columns as updated by
    the feedback so far (so later groups see the error pushed onto them), or, with ``static_groups``, all up front
    on W itself (the grid RTN would use; feedback then only changes codes). With ``spec.clip_search`` and
    ``weighted_clip`` the range search minimises the group's share of the objective, Σ_j D_j (ŵ_j − w_j)² with
    D_j = 1/U_jj² the LDL pivots (tr(E H Eᵀ) = Σ_j D_j ‖δ_j‖² for the feedback-updated targets), instead of the
    plain squared error. With act-order the codes are stored in the permuted column order and ``perm`` is
    recorded. ``block_size`` only batches the feedback: the codes do not depend on it.

    Returns:
        QuantizedTensor whose ``dequantize()`` is the quantized W in the original column order.
    """
    fac = H if isinstance(H, HessianFactor) else prepare_hessian(H, damp, act_order)
    W = W.to(torch.float32).clone()
    m, n = W.shape
    U = fac.U.to(W.device)
    if fac.dead.any():
        W[:, fac.dead.to(W.device)] = 0
    if fac.perm is not None:
        W = W[:, fac.perm.to(W.device)]
    weight = torch.diagonal(U).pow(-2) if spec.clip_search and weighted_clip else None
    g = spec.group_len(n)
    codes = torch.empty(m, n, dtype=torch.uint8, device=W.device)
    ngroups = spec.groups(n)
    scales = torch.empty(m, ngroups, device=W.device)
    zeros = torch.empty(m, ngroups, device=W.device)

    def fit(k: int, cols: Tensor) -> None:
        wk = None if weight is None else weight[k * g:k * g + cols.shape[1]]
        scales[:, k], zeros[:, k] = fit_group(cols, spec, wk)

    if static_groups:
        for k in range(ngroups):
            fit(k, W[:, k * g:(k + 1) * g])
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0 and not static_groups:
                ge = min(col + g, n)
                if ge <= i2:
                    fit(col // g, W1[:, i:i + ge - col])
                else:  # the group runs past this block: bring its later columns up to date first
                    rest = W[:, i2:ge] - Err1[:, :i] @ U[i1:col, i2:ge]
                    fit(col // g, torch.cat([W1[:, i:], rest], 1))
            s, z = scales[:, col // g], zeros[:, col // g]
            w = W1[:, i]
            c = quantize_with(w, s, z, spec)
            codes[:, col] = c
            err = (w - dequantize_with(c, s, z, spec)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return QuantizedTensor(codes, scales, zeros, spec, perm=fac.perm.to(W.device) if fac.perm is not None else None)
