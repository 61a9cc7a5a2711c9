"""The result type of every decomposition, the method registry, and the public ``decompose`` entry point.

A method is a pure function ``fn(W, H, config, mean_abs) -> Decomposition`` plus a frozen config dataclass; it is
registered with :func:`register`. Adding a method is one file in ``qlr/decompose/algorithms/``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..quant.grid import QuantSpec

__all__ = ["Quantized", "Decomposition", "MethodConfig", "register", "methods", "get_method", "decompose",
           "validate_inputs", "validate_weight", "validate_hessian", "resolve_rank", "PSD_TOL"]


class Quantized(Protocol):
    """What every quantizer's output offers (scalar grids, lattice codebooks)."""

    def dequantize(self) -> Tensor: ...

    def storage_bits(self) -> int: ...

    def mean_scale(self) -> float: ...


@dataclass(frozen=True)
class MethodConfig:
    """Options every method shares.

    Attributes:
        bits: code width of Q.
        rank: rank r of L (m × r) and R (r × n); 0 means Q only.
        group_size: input columns per quantization group of Q (0 = whole row).
        symmetric: symmetric integer grid for Q.
        lr_bits: storage precision of L and R: 16 (fp16), or 8/4/3/2 (group-quantized, see ``lr_group_size``).
        lr_group_size: group size used when L and R are quantized.
        damp: Hessian damping, as a fraction of mean(diag H), added before any factorisation.
        seed: seed for every random choice the method makes.

    A config prices itself: :meth:`storage_bits` predicts what :meth:`Decomposition.storage_bits` will count for
    an m × n weight at a given rank, and :meth:`budget_rank` spends a bits-per-weight budget with it. Methods
    override :meth:`q_storage_bits`, :meth:`lr_storage_bits`, :meth:`extra_storage_bits`, :meth:`for_shape` and
    :attr:`rank_multiple` when their storage is not the scalar grid of :meth:`quant_spec` plus fp16/RTN factors.
    """

    q_format: ClassVar[str] = "int"
    """Q's scalar format: "int" (uniform grid) or "nf" (NormalFloat, absmax scale, no zero point)."""

    bits: int = 2
    rank: int = 0
    group_size: int = 64
    symmetric: bool = False
    lr_bits: int = 16
    lr_group_size: int = 64
    damp: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.lr_bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"lr_bits must be one of 2, 3, 4, 8, 16; got {self.lr_bits}")
        if not (0 <= self.damp < 1):
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- what Q, L and R are coded with ----------------------------------------------------------------------
    def quant_spec(self, clip_search: bool | None = None) -> QuantSpec:
        """Q's scalar grid (``clip_search`` taken from the config when it has the option)."""
        clip = getattr(self, "clip_search", False) if clip_search is None else clip_search
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, fmt=self.q_format,
                         clip_search=clip)

    def lr_quant_spec(self) -> QuantSpec | None:
        """The grid of L and R (asymmetric, min-max with clipping search), or None for fp16 factors."""
        if self.lr_bits >= 16:
            return None
        return QuantSpec(bits=self.lr_bits, group_size=self.lr_group_size, symmetric=False, clip_search=True)

    # ---- storage cost: one price list for decompose, the budget planner and QLRLinear ------------------------
    @property
    def has_low_rank(self) -> bool:
        """Whether the method has an L R part at all: Q-only methods (``rtn``, ``gptq``) default to rank 0."""
        return type(self).__dataclass_fields__["rank"].default > 0

    @property
    def rank_multiple(self) -> int:
        """Ranks this config can code must be multiples of this (8 for lattice-coded factors)."""
        return 1

    def for_shape(self, m: int, n: int) -> MethodConfig:
        """This config as it will run on an m × n weight (e.g. "auto" quantizers made concrete)."""
        return self

    def q_storage_bits(self, m: int, n: int) -> int:
        """Bits of Q for an m × n weight: codes plus per-group scales (and zero points where the grid has them)."""
        return self.quant_spec().storage_bits(m, n)

    def lr_storage_bits(self, m: int, n: int, rank: int) -> int:
        """Bits of L (m × rank) and R (rank × n): fp16, or group-wise codes with scales and zero points."""
        spec = self.lr_quant_spec()
        if spec is None or rank == 0:
            return 16 * rank * (m + n)
        return spec.storage_bits(m, rank) + spec.storage_bits(rank, n)

    def extra_storage_bits(self, m: int, n: int) -> int:
        """Anything else stored per weight (e.g. rotation sign vectors); 0 here."""
        return 0

    def storage_bits(self, m: int, n: int, rank: int | None = None) -> int:
        """Predicted all-in storage of an m × n weight at ``rank`` (default: the config's rank), equal to what
        :meth:`Decomposition.storage_bits` counts for the result."""
        cfg = self.for_shape(m, n)
        r = cfg.rank if rank is None else rank
        return cfg.q_storage_bits(m, n) + cfg.lr_storage_bits(m, n, r) + cfg.extra_storage_bits(m, n)

    def budget_rank(self, m: int, n: int, budget: float) -> int:
        """The largest rank r ≤ min(m, n) (a multiple of :attr:`rank_multiple`) whose all-in storage fits in
        ``budget`` bits per weight for an m × n weight; 0 when none does or the method has no L R."""
        if not self.has_low_rank:
            return 0
        cfg = self.for_shape(m, n)
        step, cap = cfg.rank_multiple, budget * m * n
        lo, hi = 0, min(m, n) // step  # in units of step; storage grows with the rank
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cfg.storage_bits(m, n, mid * step) <= cap:
                lo = mid
            else:
                hi = mid - 1
        return lo * step


@dataclass
class Decomposition:
    """W ≈ Q + L R for one m × n weight.

    ``q`` holds Q's codes in the *stored domain*; ``L_s`` (m × r) and ``R_s`` (r × n) are the stored-domain factors
    (already dequantized when ``lq``/``rq`` hold their codes). With an incoherence ``rotation`` the stored domain is
    U W Vᵀ; the properties ``Q``, ``L`` and ``R`` always return the original domain, so that
    ``reconstruct() = Q + L @ R`` approximates the original W.

    ``act_err`` is the activation-aware error tr(E H Eᵀ)/tr(W H Wᵀ), E = W − reconstruct(), of the returned
    decomposition (on the caller's H). ``history`` is the same error after every iteration, in order (iterative
    methods; the joint methods return the best iterate, LoftQ the last one) or one entry for one-shot methods;
    ``diagnostics`` holds per-iteration role ratios and similar.
    """

    method: str
    config: Any
    q: Quantized | None
    L_s: Tensor
    R_s: Tensor
    lq: Quantized | None = None
    rq: Quantized | None = None
    rotation: Any = None
    history: list[float] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    act_err: float = math.nan

    # ---- original-domain views -------------------------------------------------------------------------------
    @property
    def Q(self) -> Tensor:
        m, n = self.shape
        Qs = self.q.dequantize() if self.q is not None else torch.zeros(m, n, device=self.L_s.device)
        return self.rotation.unrotate_weight(Qs) if self.rotation is not None else Qs

    @property
    def L(self) -> Tensor:
        return self.rotation.unrotate_left(self.L_s) if self.rotation is not None else self.L_s

    @property
    def R(self) -> Tensor:
        return self.rotation.unrotate_right(self.R_s) if self.rotation is not None else self.R_s

    @property
    def rank(self) -> int:
        return int(self.L_s.shape[1])

    def reconstruct(self) -> Tensor:
        """Q + L R (m × n, float32), in the original domain."""
        return self.Q + self.L @ self.R

    # ---- storage ---------------------------------------------------------------------------------------------
    def storage_bits(self) -> int:
        """Exact storage: Q's codes/scales/zeros, L and R at their precision, incoherence sign vectors."""
        total = self.q.storage_bits() if self.q is not None else 0
        for codes, dense in ((self.lq, self.L_s), (self.rq, self.R_s)):
            total += codes.storage_bits() if codes is not None else dense.numel() * 16
        if self.rotation is not None:
            total += self.rotation.storage_bits()
        return total

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per weight: :meth:`storage_bits` over m·n."""
        m, n = self.shape
        return self.storage_bits() / (m * n)

    def summary(self) -> dict[str, Any]:
        """Method, shape, rank, all-in bits/weight, the returned ``act_err`` and the per-iteration ``history``."""
        return {"method": self.method, "shape": list(self.shape), "rank": self.rank,
                "bits_per_weight": self.bits_per_weight, "act_err": self.act_err, "history": list(self.history)}


# ---- registry -------------------------------------------------------------------------------------------------
DecomposeFn = Callable[[Tensor, Tensor, Any, "Tensor | None"], Decomposition]
_REGISTRY: dict[str, tuple[type, DecomposeFn]] = {}


def register(name: str, config_cls: type) -> Callable[[DecomposeFn], DecomposeFn]:
    """Register ``fn(W, H, config, mean_abs) -> Decomposition`` under ``name`` with its config class."""

    def deco(fn: DecomposeFn) -> DecomposeFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = (config_cls, fn)
        return fn

    return deco


def methods() -> list[str]:
    """Names of every registered method."""
    from . import algorithms  # noqa: F401  (importing registers the built-in methods)

    return sorted(_REGISTRY)


def get_method(name: str) -> tuple[type, DecomposeFn]:
    names = methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(names)}")
    return _REGISTRY[name]


def make_config(method: str, **options: Any) -> Any:
    """Build and validate the config of ``method`` from keyword options (unknown keys are an error)."""
    cls, _ = get_method(method)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; valid options: {sorted(valid)}")
    return cls(**options)


# ---- validation -----------------------------------------------------------------------------------------------
PSD_TOL = 1e-6
"""Relative tolerance of the positive-semidefiniteness test of H (see :func:`validate_hessian`)."""


def _where(name: str) -> str:
    return f" in layer {name!r}" if name else ""


def resolve_rank(rank: object, m: int, n: int, name: str = "") -> int:
    """An integer rank from ``rank`` for an m × n weight.

    Accepted: an integer >= 0 (Python or NumPy int, not a bool), taken as is; a float strictly between 0 and 1,
    taken as that fraction of min(m, n) (rounded, at least 1). Anything else raises ValueError: a negative int,
    a float outside (0, 1) (an integral float such as 8.0 is refused as ambiguous: pass 8, or 0.5 for half of
    min(m, n)), a bool, a string. Whether the rank fits the weight (<= min(m, n)) is checked by
    :func:`validate_inputs`.
    """
    where = _where(name)
    if isinstance(rank, bool) or not isinstance(rank, (numbers.Integral, numbers.Real)):
        raise ValueError(f"rank must be an integer (e.g. 64) or a fraction of min(m, n) in (0, 1) (e.g. 0.05)"
                         f"{where}; got {rank!r} of type {type(rank).__name__}")
    if isinstance(rank, numbers.Integral):
        if rank < 0:
            raise ValueError(f"rank must be >= 0{where}, got {rank}")
        return int(rank)
    value = float(rank)
    if not 0 < value < 1:
        hint = f"pass the integer {int(value)}" if value.is_integer() and value >= 0 else "pass an integer"
        raise ValueError(f"a fractional rank must be in (0, 1) (a fraction of min(m, n)){where}, got {rank}; "
                         f"for an absolute rank {hint}")
    return max(1, round(value * min(m, n)))


def validate_weight(W: object, name: str = "") -> None:
    """Raise a ValueError (naming the layer when ``name`` is given) unless W is a usable weight: a 2-D tensor,
    not on the meta device, with at least one row and column, only finite values, and not all zeros (an all-zero
    W has zero activation energy tr(W H Wᵀ), so the relative error every method reports is undefined)."""
    where = _where(name)
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor (out × in){where}, got {getattr(W, 'shape', type(W))}")
    if W.is_meta:
        raise ValueError(f"W is on the meta device{where}: its values were never loaded (a model loaded with "
                         "device_map= or low_cpu_mem_usage= can leave offloaded weights there); load the weights "
                         "onto a real device first")
    m, n = W.shape
    if W.numel() == 0:
        raise ValueError(f"W is empty ({m} × {n}){where}: there is nothing to compress; exclude this layer")
    if not torch.isfinite(W).all():
        raise ValueError(f"W contains NaN or Inf{where}; check the checkpoint or the dequantization")
    if not W.any():
        raise ValueError(f"W is all zeros{where}: there is nothing to compress and the relative error is "
                         "undefined; exclude this layer (e.g. with layers=/--layers)")


def validate_hessian(H: object, n: int, name: str = "", m: int | None = None) -> None:
    """Raise a ValueError (naming the layer when ``name`` is given) unless H is a usable n × n second moment.

    Checked, in this order: a tensor of shape n × n, not on the meta device; finite; symmetric to 1e-6 of its
    largest entry; not all zero (no calibration signal: every objective is 0); positive semidefinite up to
    rounding. The last test, with ν = ‖H‖∞ (the largest absolute row sum, an upper bound on every |eigenvalue|)
    and τ = :data:`PSD_TOL` = 1e-6: no diagonal entry below −τν (O(n), catches −H at once), and
    H + τν·I must have a Cholesky factor in float64 (one O(n³/3) factorisation, cheaper than the
    eigendecomposition and the GPTQ factorisations the methods do anyway); together this rejects every H with an
    eigenvalue below −τν, while singular H and H whose float32 accumulation left eigenvalues of about −1e-8·ν
    (measured on rank-deficient calibration sets) pass.
    """
    where = _where(name)
    shape = f" to match W's {m} × {n} (in features)" if m is not None else ""
    if not isinstance(H, Tensor) or H.shape != (n, n):
        raise ValueError(f"H must be n × n = {n} × {n}{shape}{where}, got {tuple(getattr(H, 'shape', ()))}")
    if H.is_meta:
        raise ValueError(f"H is on the meta device{where}; pass the computed second moment X Xᵀ / N")
    if not torch.isfinite(H).all():
        raise ValueError(f"H contains NaN or Inf{where}; the calibration activations overflowed (use float32 "
                         "inputs or fewer/shorter samples)")
    scale = H.abs().max()
    if (H - H.T).abs().max() > 1e-6 * scale.clamp_min(1e-30):
        raise ValueError(f"H is not symmetric{where}; pass H = X Xᵀ (or (H + Hᵀ)/2)")
    if not bool(scale > 0):
        raise ValueError(f"H is all zeros{where}: no calibration signal reached this layer's inputs, so every "
                         "activation-aware objective is zero; use more or other calibration text, or exclude this "
                         "layer")
    nu = float(H.abs().sum(dim=1, dtype=torch.float64).max())
    tol = PSD_TOL * nu
    diag = torch.diagonal(H).to(torch.float64)
    worst = int(torch.argmin(diag))
    if float(diag[worst]) < -tol:
        raise ValueError(f"H has a negative diagonal entry{where} (H[{worst}, {worst}] = {float(diag[worst]):.4g}): "
                         "a second moment X Xᵀ / N is positive semidefinite, so channel energies cannot be negative; "
                         "pass H = X Xᵀ / N (not −H)")
    shifted = H.to(torch.float64, copy=True)  # never shift the caller's H in place
    shifted.diagonal().add_(tol)
    _, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        raise ValueError(f"H is not positive semidefinite{where}: it has an eigenvalue below −{PSD_TOL:g}·‖H‖∞ "
                         f"(‖H‖∞ = {nu:.4g}), far beyond rounding; pass H = X Xᵀ / N of the layer's inputs")


def validate_inputs(W: Tensor, H: Tensor, rank: int, mean_abs: Tensor | None = None, name: str = "") -> None:
    """Raise a ValueError naming the problem (and the layer, when ``name`` is given) for unusable inputs.

    W: see :func:`validate_weight`; H: see :func:`validate_hessian`; ``rank`` an integer in [0, min(m, n)];
    ``mean_abs`` of shape (n,) and finite; and W not confined to input channels that never fire (diag H = 0), where
    tr(W H Wᵀ), which every method reports the error relative to, would be zero. That last test is O(m·n); the
    rarer way to a zero tr(W H Wᵀ), rows of W in the null space of an H without dead channels, would need an
    m·n² product and is not checked.
    """
    where = _where(name)
    validate_weight(W, name)
    m, n = W.shape
    validate_hessian(H, n, name, m)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0{where}, got {rank!r}")
    if rank > min(m, n):
        raise ValueError(f"rank={rank} is larger than min(m, n) = {min(m, n)} for a {m} × {n} weight{where}; "
                         "use a smaller rank or a fractional rank")
    if mean_abs is not None:
        if mean_abs.shape != (n,):
            raise ValueError(f"mean_abs must have shape ({n},){where}, got {tuple(mean_abs.shape)}")
        if not torch.isfinite(mean_abs).all():
            raise ValueError(f"mean_abs contains NaN or Inf{where}")
    live = torch.diagonal(H).to(W.device) > 0
    if not W[:, live].any():
        raise ValueError(f"tr(W H Wᵀ) is zero{where}: W is nonzero only on input channels that never fire in the "
                         "calibration data (diag H = 0 there), so the relative error is undefined; use other "
                         "calibration text or exclude this layer")


def decompose(W: Tensor, H: Tensor, method: str = "odlri", bits: int = 2, rank: int | float | None = None, *,
              mean_abs: Tensor | None = None, name: str = "", **options: Any) -> Decomposition:
    """Split W (m × n) into a quantized Q plus a rank-``rank`` product L R.

    Args:
        W: weight, out × in.
        H: calibration second moment X Xᵀ (n × n), ideally accumulated in float64 and averaged over tokens.
        method: one of :func:`methods`.
        bits: code width of Q.
        rank: rank of L R: an integer (0 = Q only, where the method allows it) or a float in (0, 1), a fraction of
            min(m, n) (see :func:`resolve_rank`); None takes the method's default (0 for ``rtn``/``gptq``, 64
            otherwise).
        mean_abs: optional per-input-channel mean |x| (n,), used by ``lqer``; when absent it falls back to
            sqrt(diag H) (the RMS of each channel), documented per method.
        name: layer name, used in error messages.
        **options: method-specific options (see each method's config class).

    Returns:
        A :class:`Decomposition`; ``dec.act_err`` is its activation-aware error, ``dec.history`` that error per
        iteration.

    Raises:
        ValueError: before any work, for an unknown method or option, an unsupported ``bits``, a rank that is not
            an integer in [0, min(m, n)] or a fraction in (0, 1), and for unusable W or H (see
            :func:`validate_inputs`: meta/empty/all-zero/non-finite W; all-zero, non-finite, asymmetric or
            indefinite H).
    """
    cls, fn = get_method(method)
    validate_weight(W, name)  # the shape is needed to resolve a fractional rank
    if rank is not None:
        options["rank"] = resolve_rank(rank, *W.shape, name=name)
    config = make_config(method, bits=bits, **options)
    validate_inputs(W, H, config.rank, mean_abs, name)
    dec = fn(W, H, config, mean_abs)
    dec.shape = tuple(W.shape)
    return dec
