"""The result type of every decomposition, the method registry, and the public ``decompose`` entry point.

A method is a pure function ``fn(W, H, config, mean_abs) -> Decomposition`` plus a frozen config dataclass; it is
registered with :func:`register`. Adding a method is one file in ``qlr/decompose/algorithms/``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Quantized", "Decomposition", "MethodConfig", "register", "methods", "get_method", "decompose",
           "validate_inputs"]


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
    """

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


@dataclass
class Decomposition:
    """W ≈ Q + L R for one m × n weight.

    ``q`` holds Q's codes in the *stored domain*; ``L_s`` (m × r) and ``R_s`` (r × n) are the stored-domain factors
    (already dequantized when ``lq``/``rq`` hold their codes). With an incoherence ``rotation`` the stored domain is
    U W Vᵀ; the properties ``Q``, ``L`` and ``R`` always return the original domain, so that
    ``reconstruct() = Q + L @ R`` approximates the original W.

    ``history`` is the activation-aware error tr(E H Eᵀ)/tr(W H Wᵀ) after every iteration (iterative methods)
    or of the final result (one-shot methods); ``diagnostics`` holds per-iteration role ratios and similar.
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
        return {"method": self.method, "shape": list(self.shape), "rank": self.rank,
                "bits_per_weight": self.bits_per_weight,
                "act_err": self.history[-1] if self.history else math.nan,
                "best_act_err": min(self.history) if self.history else math.nan}


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
def validate_inputs(W: Tensor, H: Tensor, rank: int, mean_abs: Tensor | None = None, name: str = "") -> None:
    """Raise a ValueError naming the problem (and the layer, when ``name`` is given) for unusable inputs."""
    where = f" in layer {name!r}" if name else ""
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor (out × in){where}, got {getattr(W, 'shape', type(W))}")
    m, n = W.shape
    if not isinstance(H, Tensor) or H.shape != (n, n):
        raise ValueError(f"H must be n × n = {n} × {n} to match W's {m} × {n} (in features){where}, "
                         f"got {tuple(getattr(H, 'shape', ()))}")
    if not torch.isfinite(W).all():
        raise ValueError(f"W contains NaN or Inf{where}; check the checkpoint or the dequantization")
    if not torch.isfinite(H).all():
        raise ValueError(f"H contains NaN or Inf{where}; the calibration activations overflowed (use float32 "
                         "inputs or fewer/shorter samples)")
    scale = H.abs().max().clamp_min(1e-30)
    if (H - H.T).abs().max() > 1e-6 * scale:
        raise ValueError(f"H is not symmetric{where}; pass H = X Xᵀ (or (H + Hᵀ)/2)")
    if rank > min(m, n):
        raise ValueError(f"rank={rank} is larger than min(m, n) = {min(m, n)} for a {m} × {n} weight{where}; "
                         "use a smaller rank or a fractional rank")
    if mean_abs is not None and mean_abs.shape != (n,):
        raise ValueError(f"mean_abs must have shape ({n},){where}, got {tuple(mean_abs.shape)}")


def decompose(W: Tensor, H: Tensor, method: str = "odlri", bits: int = 2, rank: int | None = None, *,
              mean_abs: Tensor | None = None, name: str = "", **options: Any) -> Decomposition:
    """Split W (m × n) into a quantized Q plus a rank-``rank`` product L R.

    Args:
        W: weight, out × in.
        H: calibration second moment X Xᵀ (n × n), ideally accumulated in float64 and averaged over tokens.
        method: one of :func:`methods`.
        bits: code width of Q.
        rank: rank of L R (0 = Q only, where the method allows it); None takes the method's default
            (0 for ``rtn``/``gptq``, 64 otherwise).
        mean_abs: optional per-input-channel mean |x| (n,), used by ``lqer``; when absent it falls back to
            sqrt(diag H) (the RMS of each channel), documented per method.
        name: layer name, used in error messages.
        **options: method-specific options (see each method's config class).

    Returns:
        A :class:`Decomposition`; ``dec.history`` holds the activation-aware error per iteration.
    """
    cls, fn = get_method(method)
    if rank is not None:
        options["rank"] = rank
    config = make_config(method, bits=bits, **options)
    validate_inputs(W, H, config.rank, mean_abs, name)
    dec = fn(W, H, config, mean_abs)
    dec.shape = tuple(W.shape)
    return dec
