"""Block coordinate descent on lattice codes: QuIP#'s "tune" passes after LDLQ (used by CALDERA's Q step).

Objective: for a target W (m × n) and H (n × n, positive definite), lower f(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ) over the
E8P codes of Ŵ with its per-matrix scales fixed. One pass visits the 8-column blocks b in order; with E = W − Ŵ,
the best unconstrained value of block b given all others is

    t_b = Ŵ_b + (E H)_b H_bb⁻¹                       (m × 8)

and each row of Ŵ_b is replaced by the E8P rounding of its row of t_b. Row i of block b contributes
(x − t_i) H_bb (x − t_i)ᵀ + const to f, so a row is only replaced when that quadratic form decreases: every
accepted change lowers f, and the pass is a descent step (QuIP#'s code takes every rounding unconditionally).
Updates of E H are applied exactly inside a batch of ``batch`` columns and to the other columns once per batch
(one GEMM), as in LDLQ's lazy updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.e8p import E8P_DIM, LatticeQuantizedTensor, e8p_round

__all__ = ["refine_lattice"]


def refine_lattice(W: Tensor, q: LatticeQuantizedTensor, H: Tensor, passes: int, batch: int = 128
                   ) -> LatticeQuantizedTensor:
    """Run up to ``passes`` descent passes (module docstring) on the one-stage E8P codes ``q`` of W (m × n) under
    H (n × n, already damped: H_bb must be invertible). Stops early after a pass that changes nothing.
    Returns new codes with the same scales; f never increases."""
    if passes <= 0:
        return q
    if q.stages != 1:
        raise ValueError(f"refine_lattice refines one-stage codes, got {q.stages} stages")
    m, n = W.shape
    W32 = W.float()
    H32 = H.to(W.device, torch.float32)
    scales = [float(s) for s in q.scales]
    Qh = q.dequantize().float().clone()
    codes = _codes_int64(q)
    blocks = H32.reshape(n // E8P_DIM, E8P_DIM, n // E8P_DIM, E8P_DIM).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    inv = torch.linalg.inv(blocks.double()).float()  # (n/8, 8, 8): H_bb⁻¹
    EH = (W32 - Qh) @ H32
    for _ in range(passes):
        changed = False
        for b0 in range(0, n, batch):
            b1 = min(b0 + batch, n)
            old_batch = Qh[:, b0:b1].clone()
            for k in range(b0, b1, E8P_DIM):
                kk = k + E8P_DIM
                j = k // E8P_DIM
                old = Qh[:, k:kk]
                t = old + EH[:, k:kk] @ inv[j]
                new, c = e8p_round(t, scales)
                Hbb = blocks[j]
                d_old, d_new = old - t, new - t
                accept = ((d_new @ Hbb) * d_new).sum(1) < ((d_old @ Hbb) * d_old).sum(1)
                if not bool(accept.any()):
                    continue
                changed = True
                new = torch.where(accept[:, None], new, old)
                delta = old - new  # change of E on these columns
                EH[:, b0:b1] += delta @ H32[k:kk, b0:b1]
                Qh[:, k:kk] = new
                codes[0, :, j] = torch.where(accept, c[0], codes[0, :, j])
            dB = old_batch - Qh[:, b0:b1]
            if b0 > 0:
                EH[:, :b0] += dB @ H32[b0:b1, :b0]
            if b1 < n:
                EH[:, b1:] += dB @ H32[b0:b1, b1:]
        if not changed:
            break
    return LatticeQuantizedTensor.from_codes(codes, scales, q.scale_bits, {**q.meta, "refine_passes": passes})


def _codes_int64(q: LatticeQuantizedTensor) -> Tensor:
    """The codes as int64 in [0, 2^16) (they are stored as int16 bit patterns)."""
    return q.codes.to(torch.int64) & 0xFFFF
