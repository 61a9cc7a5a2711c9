"""The joint alternation shared by ``caldera`` and ``odlri`` (W ≈ Q + L R, all parts low precision).

Objective: minimise f(Q, L, R) = tr((W − Q − LR) H (W − Q − LR)ᵀ) over Q on the grid and L, R at ``lr_bits``,
for W (m × n) and H (n × n).

    start  L0R0 = 0 ("zero": Q first),  the activation-aware rank-r fit of W ("svd": LR first, CALDERA's own
           update order), or ODLRI's fit of W on its k most activation-heavy input channels ("odlri")
    repeat Q_t     = LDLQ(W − L_{t−1}R_{t−1})        (GPTQ/LDLQ under H, or RTN; E8P codes then get descent passes)
           L_tR_t  = LPLR(W − Q_t)                   (exact activation-aware fit, then quantized-factor rounds)
    keep the iterate with the lowest f.

Neither step is an exact minimiser on a grid, so an iterate can be worse than the one before (the greedy LDLQ
of a new target can lose to the old Q; the quantized LR step is not a minimiser). Two safeguards, both cheap:
the LPLR rounds inside an LR step keep their best pair, and the outer loop keeps the best iterate and stops after
``patience`` outer iterations without a new best. A strictly monotone variant that accepts a step only when it
lowers f was tried and rejected as the default (benchmarks/README.md): an uphill Q step is usually repaid by the
next LR step. ``history`` records f/tr(WHWᵀ) of every outer iterate; ``diagnostics`` records ‖QX‖/‖WX‖,
‖LRX‖/‖WX‖, Q's mean group scale and the index of the best iterate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..quant.gptq import damped, prepare_hessian
from ..quant.hadamard import Incoherence, is_supported
from .base import Decomposition, MethodConfig
from .common import package, quantize_q
from .lowrank import Whitener, quantized_lowrank
from .metrics import role_ratio, weighted_energy

__all__ = ["JointConfig", "joint_decompose", "odlri_init"]


@dataclass(frozen=True)
class JointConfig(MethodConfig):
    """Options of the CALDERA/ODLRI alternation.

    Attributes:
        outer_iters: Q/LR alternations (ODLRI paper's CALDERA baseline: 15).
        inner_iters: LPLR rounds inside each LR step (paper: 10).
        inner_tol: stop the LPLR rounds early once one improves the error by less than this fraction.
        init: "auto" (default: "svd" when L and R are fp16, "zero" when they are quantized; see
            benchmarks/README.md), "zero" (L0R0 = 0, Q first), "svd" (LR first: the activation-aware rank-r fit
            of W, the update order of CALDERA's code), "odlri".
        odlri_k: ODLRI's number of outlier input channels k (≤ rank); None (default) = max(1, rank // 16), the
            ratio of the paper's best setting (k = 16 at r = 256); benchmarks/README.md compares other k.
        odlri_domain: where ODLRI ranks the input channels by diag(H) when incoherence is on: "rotated"
            (default: the channels of the rotated W and H that the quantizers see) or "input" (the model's own
            channels, where the activation outliers live; L0R0 is then rotated). Without incoherence both are the
            same (benchmarks/README.md compares the two).
        q_quantizer: "auto" (default: "e8p" at 2 bits where the weight's shape allows it, else "gptq"), "gptq"
            (LDLQ feedback on the scalar grid), "rtn", or "e8p" (block LDLQ on QuIP#'s E8P lattice, 2 bits/weight,
            one scale per matrix; ``bits`` must be 2). See :meth:`resolve`.
        lr_quantizer: "auto" (default: "e8p4" when Q is E8P, ``lr_bits`` is 4 and the rank a multiple of 8, else
            "uniform"), "uniform" (group-wise scalar grid at ``lr_bits``, or fp16 when ``lr_bits`` = 16) or "e8p4"
            (two-stage E8P lattice, 4 bits/weight; ``lr_bits`` must be 4, rank a multiple of 8).
        incoherence: random-sign Hadamard rotation of W and H on both sides before decomposing (QuIP#/CALDERA);
            None = on exactly when a lattice quantizer is used. Dimensions must be 2^a·b for the supported b.
        act_order: GPTQ column order by decreasing diag H.
        clip_search: per-group range search for Q's grid.
        patience: stop after this many outer iterations without a new best error (0 = never stop early).
        hessian_downdate: CALDERA's option (from QuIP#): quantize Q under H with the directions that the current
            L R spans removed, H − M V Vᵀ Mᵀ (H = M Mᵀ, V the top-r right singular vectors of L R M), re-regularised;
            errors there are the ones the next LR step can absorb.
        q_tune_iters: descent passes of block coordinate descent on Q's E8P codes after each LDLQ, under the
            same (downdated) H (QuIP#'s ``quip_tune_iters``, 10 in CALDERA's code; see ``refine.py``; passes stop
            once one changes nothing). Only the lattice Q step has them; 0 = plain LDLQ.
    """

    bits: int = 2
    rank: int = 64
    lr_bits: int = 4
    outer_iters: int = 15
    inner_iters: int = 10
    inner_tol: float = 1e-3
    init: str = "auto"
    odlri_k: int | None = None
    odlri_domain: str = "rotated"
    q_quantizer: str = "auto"
    lr_quantizer: str = "auto"
    incoherence: bool | None = None
    act_order: bool = False
    clip_search: bool = True
    patience: int = 3
    hessian_downdate: bool = True
    q_tune_iters: int = 3

    def resolve(self, m: int, n: int) -> JointConfig:
        """This config with "auto" quantizers made concrete for an m × n weight (out × in).

        Q: the E8P lattice at 2 bits when the lattice can run on this shape (n a multiple of 8, both dimensions
        of a Hadamard-supported size, incoherence not switched off), else the scalar grid with the GPTQ/LDLQ step.
        L/R: two-stage E8P (4 bits) when Q is E8P, ``lr_bits`` is 4 and the rank a multiple of 8, else the scalar
        grid. ``init="auto"``: "svd" for fp16 L/R, else "zero"."""
        q, lr, init = self.q_quantizer, self.lr_quantizer, self.init
        if init == "auto":
            init = "svd" if self.lr_bits >= 16 else "zero"
        if q == "auto":
            fits = n % 8 == 0 and is_supported(m) and is_supported(n) and self.incoherence is not False
            q = "e8p" if self.bits == 2 and fits else "gptq"
        if lr == "auto":
            lr = "e8p4" if q == "e8p" and self.lr_bits == 4 and self.rank % 8 == 0 and n % 8 == 0 else "uniform"
        same = (q, lr, init) == (self.q_quantizer, self.lr_quantizer, self.init)
        return self if same else replace(self, q_quantizer=q, lr_quantizer=lr, init=init)

    def for_shape(self, m: int, n: int) -> JointConfig:
        return self.resolve(m, n)

    @property
    def rank_multiple(self) -> int:
        return 8 if self.lr_quantizer == "e8p4" else 1

    def q_storage_bits(self, m: int, n: int) -> int:
        """E8P: 16 bits per 8 weights plus one fp16 scale; a scalar grid: codes, scales and zero points."""
        if self.q_quantizer == "e8p":
            return m * (n // 8) * 16 + 16
        return super().q_storage_bits(m, n)

    def lr_storage_bits(self, m: int, n: int, rank: int) -> int:
        """Two-stage E8P (e8p4): per factor 2 × 16 bits per 8 entries plus two fp16 scales; else as the base."""
        if self.lr_quantizer == "e8p4" and rank:
            return 2 * (m * (rank // 8) * 16 + 16) + 2 * (rank * (n // 8) * 16 + 16)
        return super().lr_storage_bits(m, n, rank)

    def extra_storage_bits(self, m: int, n: int) -> int:
        """The incoherence rotation's sign vectors, one bit each (m + n), when the rotation is on."""
        return m + n if self.use_incoherence else 0

    @property
    def use_incoherence(self) -> bool:
        if self.incoherence is None:
            return self.q_quantizer == "e8p" or self.lr_quantizer == "e8p4"
        return self.incoherence

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q_quantizer != "e8p":
            self.quant_spec()
        if self.init not in ("auto", "zero", "svd", "odlri"):
            raise ValueError(f"init must be 'auto', 'zero', 'svd' or 'odlri', got {self.init!r}")
        if self.q_quantizer not in ("auto", "gptq", "rtn", "e8p"):
            raise ValueError(f"q_quantizer must be 'auto', 'gptq', 'rtn' or 'e8p', got {self.q_quantizer!r}")
        if self.q_quantizer == "e8p" and self.bits != 2:
            raise ValueError(f"q_quantizer='e8p' codes 2 bits/weight; got bits={self.bits}")
        if self.lr_quantizer not in ("auto", "uniform", "e8p4"):
            raise ValueError(f"lr_quantizer must be 'auto', 'uniform' or 'e8p4', got {self.lr_quantizer!r}")
        if self.lr_quantizer == "e8p4" and self.lr_bits != 4:
            raise ValueError(f"lr_quantizer='e8p4' codes 4 bits/weight; pass lr_bits=4 (got {self.lr_bits})")
        if self.lr_quantizer == "e8p4" and self.rank % 8:
            raise ValueError(f"lr_quantizer='e8p4' needs a rank that is a multiple of 8, got {self.rank}")
        if self.q_tune_iters < 0:
            raise ValueError(f"q_tune_iters must be >= 0, got {self.q_tune_iters}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.outer_iters < 1 or self.inner_iters < 1:
            raise ValueError("outer_iters and inner_iters must be >= 1")
        if self.odlri_domain not in ("input", "rotated"):
            raise ValueError(f"odlri_domain must be 'input' or 'rotated', got {self.odlri_domain!r}")
        if self.odlri_k is not None and self.odlri_k < 1:
            raise ValueError(f"odlri_k must be >= 1, got {self.odlri_k}")


def odlri_init(W: Tensor, H: Tensor, rank: int, k: int, damp: float) -> tuple[Tensor, Tensor, Tensor]:
    """ODLRI's start: L0 (m × r), R0 (r × n) minimising ‖(W − L R) P H_o^{1/2}‖_F, where P selects the k input
    channels with the largest diag(H) and H_o = Pᵀ H P (k × k, damped, whitened only on that block).

    R0 is zero outside the chosen columns; with k ≤ r the fit reproduces W's outlier columns exactly.
    Returns (L0, R0, chosen channel indices)."""
    m, n = W.shape
    k = min(k, rank, n)
    idx = torch.topk(torch.diagonal(H).to(torch.float64), k).indices.sort().values.to(W.device)
    Ho = H.to(W.device, torch.float64)[idx][:, idx]
    wh = Whitener.from_hessian(Ho, damp)
    Wo = W.float()[:, idx] @ wh.S
    U, sig, Vh = torch.linalg.svd(Wo, full_matrices=False)
    kk = min(k, sig.numel())
    root = sig[:kk].sqrt()
    L0 = W.new_zeros(m, rank, dtype=torch.float32)
    R0 = W.new_zeros(rank, n, dtype=torch.float32)
    L0[:, :kk] = U[:, :kk] * root
    R0[:kk, idx] = (root[:, None] * Vh[:kk]) @ wh.S_inv
    return L0, R0, idx


def downdated_hessian(H: Tensor, LR: Tensor, rank: int, damp: float, chol: Tensor | None = None) -> Tensor:
    """H − M V Vᵀ Mᵀ for H = M Mᵀ (damped, n × n) and V (n × r') the top right singular vectors of LR M (m × n),
    damped again (float64). r' ≤ r counts only the directions LR actually spans (singular values above 1e-6 of the
    largest): a rank-k ODLRI start must not remove r − k arbitrary null-space directions from H. In exact
    arithmetic the result is PSD (V Vᵀ ⪯ I), so no eigendecomposition is needed: the renewed damping keeps it
    positive definite, and the GPTQ/LDLQ factorisation raises the damping further should rounding ever make it
    fail. ``chol`` is M when the caller already has it (it depends on H only)."""
    Hd = damped(H, damp)
    M = torch.linalg.cholesky(Hd) if chol is None else chol
    _, sig, Vh = torch.linalg.svd(LR.to(torch.float64) @ M, full_matrices=False)
    keep = min(rank, int((sig > sig[0] * 1e-6).sum())) if sig.numel() and sig[0] > 0 else 0
    MV = M @ Vh[:keep].T
    Hq = Hd - MV @ MV.T
    Hq = (Hq + Hq.T) / 2
    return Hq + damp * float(torch.diagonal(Hd).mean()) * torch.eye(Hq.shape[0], dtype=Hq.dtype, device=Hq.device)


def joint_decompose(name: str, W: Tensor, H: Tensor, cfg: JointConfig) -> Decomposition:
    """Run the alternation from ``cfg.init`` and return the best iterate (see module docstring)."""
    W0 = W.float()
    dev = W0.device
    m, n = W0.shape
    cfg = cfg.resolve(m, n)
    H0 = H.to(dev)
    rotation = None
    if cfg.use_incoherence:
        if cfg.q_quantizer == "e8p" and n % 8:
            raise ValueError(f"q_quantizer='e8p' needs in_features to be a multiple of 8, got {n}")
        rotation = Incoherence.random(m, n, seed=cfg.seed, device=dev)
        W = rotation.rotate_weight(W0)
        Hd = rotation.rotate_hessian(H0.to(torch.float64))
        Hd = (Hd + Hd.T) / 2
    else:
        W, Hd = W0, H0
    wh = Whitener.from_hessian(Hd, cfg.damp)
    hfac = Hd if cfg.q_quantizer == "e8p" else prepare_hessian(Hd, cfg.damp, cfg.act_order)
    lattice_lr = cfg.lr_quantizer == "e8p4"
    # GPTQ factor of H in natural order for the scalar-grid R step (lattice L/R factorise H themselves)
    needs_own = not lattice_lr and (cfg.act_order or cfg.q_quantizer == "e8p")
    hfac_lr = prepare_hessian(Hd, cfg.damp) if needs_own else (None if lattice_lr else hfac)
    lspec = cfg.lr_quant_spec()
    total = weighted_energy(W, Hd, fast=True)

    def f(Qd: Tensor, LR: Tensor) -> float:
        return weighted_energy(W - Qd - LR, Hd, fast=True) / total

    def lr_step(D: Tensor):
        return quantized_lowrank(D, wh, cfg.rank, lspec, iters=cfg.inner_iters, hfac=hfac_lr, damp=cfg.damp,
                                 lattice=lattice_lr, tol=cfg.inner_tol, seed=cfg.seed)

    diag: dict[str, Any] = {"q_ratio": [], "lr_ratio": [], "q_scale": []}
    lr = None  # current stored LR (a LowRankResult); None before the first LR step
    LR = W.new_zeros(m, n)
    if cfg.rank == 0:  # nothing to alternate with (e.g. a budget that leaves no room for L R): Q step only
        q = quantize_q(W, hfac, cfg, cfg.q_quantizer)
        return package(name, cfg, W0, H0, q, W.new_zeros(m, 0), W.new_zeros(0, n), rotation=rotation,
                       diagnostics={"q_scale": [q.mean_scale()], "final_q_scale": q.mean_scale()})
    k = cfg.odlri_k if cfg.odlri_k is not None else max(1, cfg.rank // 16)
    if cfg.init == "svd":
        lr = lr_step(W)
        LR = lr.L @ lr.R
    elif cfg.init == "odlri":
        # "rotated": the channels the quantizers see; "input": the model's own (a rotation spreads their
        # outliers), with L0R0 rotated afterwards. Without a rotation the two are the same.
        in_rotated = rotation is None or cfg.odlri_domain == "rotated"
        Wk, Hk = (W, Hd) if in_rotated else (W0, H0)
        L0, R0, idx = odlri_init(Wk, Hk, cfg.rank, k, cfg.damp)
        LR = L0 @ R0
        diag["init_lr_ratio"] = role_ratio(LR, Wk, Hk)
        diag["odlri_channels"] = idx.tolist()
        if not in_rotated:
            LR = rotation.rotate_weight(LR)
    history: list[float] = []
    best: tuple[float, Any, Any] | None = None
    since_best = 0
    chol: Tensor | None = None  # Cholesky factor of the damped H for the downdate, computed once
    for _ in range(cfg.outer_iters):
        qH = hfac
        if cfg.hessian_downdate and bool(LR.any()):
            if chol is None:
                chol = torch.linalg.cholesky(damped(Hd, cfg.damp))
            Hq = downdated_hessian(Hd, LR, cfg.rank, cfg.damp, chol)
            qH = Hq if cfg.q_quantizer == "e8p" else prepare_hessian(Hq, cfg.damp, cfg.act_order)
        q = quantize_q(W - LR, qH, cfg, cfg.q_quantizer)  # Q step
        Qd = q.dequantize()
        lr = lr_step(W - Qd)  # LR step
        LR = lr.L @ lr.R
        err = f(Qd, LR)
        history.append(err)
        diag["q_ratio"].append(role_ratio(Qd, W, Hd, total=total, fast=True))
        diag["lr_ratio"].append(role_ratio(LR, W, Hd, total=total, fast=True))
        diag["q_scale"].append(q.mean_scale())
        if best is None or err < best[0]:
            best, since_best = (err, q, lr), 0
        else:
            since_best += 1
            if cfg.patience and since_best >= cfg.patience:
                break
    assert best is not None
    err, q, lr = best
    diag["best_iter"] = history.index(err)
    diag["final_q_scale"] = q.mean_scale()
    return package(name, cfg, W0, H0, q, lr.L, lr.R, lr.lq, lr.rq, history=history, diagnostics=diag,
                   rotation=rotation)
