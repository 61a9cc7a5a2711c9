"""``QLRLinear``: a drop-in replacement for ``nn.Linear`` holding W ≈ Q + L R in compressed form.

For an m × n (out × in) weight the module computes

    y = x Qᵀ + (x Rᵀ) Lᵀ + b                                  (no rotation)
    y = untransform_out( x̃ Q_sᵀ + (x̃ R_sᵀ) L_sᵀ ) + b,  x̃ = transform_in(x)   (incoherence rotation)

without forming L R or a dense float Q (unless fine-tuning asks for one: :meth:`QLRLinear.cache_q`,
:meth:`QLRLinear.train_q_scales`): each factor is multiplied straight from its codes by the
:mod:`qlr.kernels` custom ops (fused decode + GEMV for a few rows of x, decoded tiles + BLAS for many, the fast
Walsh–Hadamard transform for the rotation; a pure-torch reference where no compiled kernel applies). Every tensor
is a registered buffer (so ``state_dict`` and safetensors hold it); everything else (shapes, bits, group sizes,
formats) is plain metadata returned by :meth:`QLRLinear.qlr_meta`, from which
:meth:`QLRLinear.from_meta` rebuilds an empty module with the right buffer shapes.

Each factor (Q, L, R) is stored by a *codec* (:mod:`qlr.nn.codecs`: ``grid``, ``e8p``, ``dense``, or one
added with :func:`~qlr.nn.codecs.register_codec`).

Buffer names: ``q_codes, q_scale, q_zero, q_perm``, ``l_…``/``r_…`` likewise (or ``l_dense``, ``r_dense``),
``bias``, ``signs_out, signs_in`` (the :class:`~qlr.quant.hadamard.Incoherence` sign vectors, bit-packed into
int32 words: bit 1 = +1, bit 0 = −1).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qlr.kernels import cpu, ops
from qlr.nn.codecs import RowDecoder, codec_for, dtype_from_name, dtype_name
from qlr.quant.packing import pack, unpack

if TYPE_CHECKING:
    from qlr.decompose.base import Decomposition

__all__ = ["QLRLinear", "META_VERSION"]

META_VERSION = 1
_FACTORS = ("q", "l", "r")


class QLRLinear(nn.Module):
    """y = x (Q + L R)ᵀ + b for x (…, in_features) → (…, out_features), from compressed buffers.

    Build with :meth:`from_decomposition` (from a compressor) or :meth:`from_meta` (empty, for loading).

    Attributes:
        in_features, out_features, rank: n, m and r.
        meta: per-factor codec metadata (``meta["q"]``, ``meta["l"]``, ``meta["r"]``; ``None`` when absent),
            ``meta["rotation"]`` ({"seed": int} or None) and ``meta["bias"]`` (dtype name or None).
    """

    def __init__(self, meta: Mapping[str, Any], buffers: Mapping[str, Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """From metadata (as :meth:`qlr_meta` returns) and the matching buffers (name → tensor, checked against
        the metadata's shapes and dtypes); with ``buffers=None`` the buffers are left uninitialised on
        ``device``. Prefer :meth:`from_decomposition` / :meth:`from_meta`."""
        super().__init__()
        meta = _validate_meta(meta)
        self.meta = meta
        self.in_features, self.out_features, self.rank = meta["in_features"], meta["out_features"], meta["rank"]
        expected = self._empty_buffers(device if buffers is None else "meta")
        buffers = expected if buffers is None else buffers
        if set(buffers) != set(expected):
            raise ValueError(f"QLRLinear buffers {sorted(buffers)} do not match the metadata {sorted(expected)}")
        for name, t in buffers.items():
            if tuple(t.shape) != tuple(expected[name].shape) or t.dtype != expected[name].dtype:
                raise ValueError(f"buffer {name!r}: got {tuple(t.shape)} {t.dtype}, metadata expects "
                                 f"{tuple(expected[name].shape)} {expected[name].dtype}")
            self.register_buffer(name, t)
        self.register_parameter("l_train", None)  # set by train_factors(): float copies of L and R that the
        self.register_parameter("r_train", None)  # forward uses instead of their codes while fine-tuning
        self.register_parameter("q_scale_train", None)  # set by train_q_scales(): multipliers of Q's scales

    # ---- construction ------------------------------------------------------------------------------------------
    def _empty_buffers(self, device: torch.device | str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for f in _FACTORS:
            if self.meta[f] is not None:
                for k, t in codec_for(name=self.meta[f]["codec"]).empty(self.meta[f], device).items():
                    out[f"{f}_{k}"] = t
        if self.meta["bias"] is not None:
            out["bias"] = torch.empty(self.out_features, dtype=dtype_from_name(self.meta["bias"]), device=device)
        if self.meta["rotation"] is not None:
            for name, k in (("signs_out", self.out_features), ("signs_in", self.in_features)):
                out[name] = torch.empty(-(-k // 32), dtype=torch.int32, device=device)
        return out

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], device: torch.device | str = "meta") -> QLRLinear:
        """An uninitialised module with the buffer shapes and dtypes described by ``meta`` (see :meth:`qlr_meta`);
        fill it with ``load_state_dict(..., assign=True)``."""
        return cls(meta, None, device)

    @classmethod
    def from_decomposition(cls, dec: Decomposition, bias: Tensor | None = None) -> QLRLinear:
        """Build from a :class:`~qlr.decompose.base.Decomposition` (Q codes, stored-domain L_s (m × r) and
        R_s (r × n) or their codes ``lq``/``rq``, optional incoherence ``rotation``) and an optional bias (m,)."""
        m, r = dec.L_s.shape
        n = dec.R_s.shape[1]
        meta: dict[str, Any] = {"version": META_VERSION, "in_features": n, "out_features": m, "rank": r,
                                "bias": None, "rotation": None}
        buffers: dict[str, Tensor] = {}
        sources = {"q": dec.q, "l": dec.lq if dec.lq is not None else dec.L_s,
                   "r": dec.rq if dec.rq is not None else dec.R_s}
        if r == 0:
            sources["l"] = sources["r"] = None
        for f, src in sources.items():
            if src is None:
                meta[f] = None
                continue
            bufs, fmeta = codec_for(src).encode(src)
            want = {"q": [m, n], "l": [m, r], "r": [r, n]}[f]
            if list(fmeta["shape"]) != want:
                raise ValueError(f"factor {f!r} has shape {fmeta['shape']}, expected {want} from L_s/R_s")
            meta[f] = fmeta
            buffers.update({f"{f}_{k}": v.detach().contiguous() for k, v in bufs.items()})
        if bias is not None:
            if tuple(bias.shape) != (m,):
                raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
            meta["bias"] = dtype_name(bias.dtype)
            buffers["bias"] = bias.detach().clone()
        rot = dec.rotation
        if rot is not None:
            if not (hasattr(rot, "signs_out") and hasattr(rot, "signs_in")):
                raise NotImplementedError(f"QLRLinear stores sign-vector incoherence rotations only, got "
                                          f"{type(rot).__name__}")
            meta["rotation"] = {"seed": int(getattr(rot, "seed", 0))}
            for name in ("signs_out", "signs_in"):
                signs = getattr(rot, name).detach().cpu()
                if not bool((signs.abs() == 1).all()):
                    raise ValueError(f"rotation.{name} must hold ±1 entries")
                buffers[name] = pack((signs > 0).to(torch.uint8), 1)
        device = dec.L_s.device
        return cls(meta, {k: v.to(device) for k, v in buffers.items()}, device)

    def qlr_meta(self) -> dict[str, Any]:
        """JSON-able metadata: everything but the tensors (enough for :meth:`from_meta`), plus ``storage_bits``."""
        return {**self.meta, "storage_bits": self.storage_bits()}

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _bufs(self, f: str) -> dict[str, Tensor]:
        p = f + "_"
        return {k[len(p):]: v for k, v in self._buffers.items() if k.startswith(p) and v is not None}

    def _decoder(self, f: str) -> RowDecoder:
        return codec_for(name=self.meta[f]["codec"]).decoder(self._bufs(f), self.meta[f])

    def _dense(self, f: str) -> Tensor:
        """Factor ``f`` fully decoded, float32, stored domain and stored column order."""
        rows = self.meta[f]["shape"][0]
        return self._decoder(f)(0, rows)

    def _decoded(self, f: str) -> Tensor:
        """Factor ``f`` fully decoded by its codec's fastest decoder (float32, stored domain and column order);
        :meth:`_dense` is the reference row decoder."""
        return codec_for(name=self.meta[f]["codec"]).dense(self._bufs(f), self.meta[f])

    def _signs(self) -> tuple[Tensor, Tensor]:
        """The rotation's (signs_out (m,), signs_in (n,)) as ±1 float32, unpacked once and cached until a sign
        buffer is replaced or written in place."""
        def unpacked() -> tuple[Tensor, Tensor]:
            return tuple(unpack(s, 1, k).float() * 2 - 1
                         for s, k in ((self.signs_out, self.out_features), (self.signs_in, self.in_features)))

        if torch.compiler.is_compiling():  # traced into the graph instead of cached
            return unpacked()
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.signs_out, self.signs_in))
        cached = self.__dict__.get("_sign_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_sign_cache"] = (key, unpacked())
        return cached[1]

    def _rotation(self) -> Any:
        if self.meta["rotation"] is None:
            return None
        from qlr.quant.hadamard import Incoherence

        s_out, s_in = self._signs()
        return Incoherence(s_out, s_in, self.meta["rotation"]["seed"])

    def __getstate__(self) -> dict[str, Any]:
        """The module's state without the fused kernel's cached plan (raw pointers: rebuilt on the next forward)
        and without the dense Q of :meth:`cache_q` (derived from the codes), so that ``copy.deepcopy`` and
        pickling work after a forward and stay small."""
        state = dict(super().__getstate__())
        state.pop("_plan_cache", None)
        state.pop("_q_dense", None)
        return state

    def _fused_plan(self) -> tuple[Any, int, Any] | None:
        """The fused CPU kernel's description of this layer (cached until a buffer is replaced or written in
        place), or None when a buffer is off the CPU or a codec has no CPU factor kernel."""
        cached = self.__dict__.get("_plan_cache")
        tensors = [t for t in self._buffers.values() if t is not None]
        if cached is not None and len(cached[0]) == len(tensors) and all(
                a is b and a._version == v and a.data_ptr() == p
                for a, b, (v, p) in zip(cached[0], tensors, cached[1])):
            return cached[2]
        plan = None
        if all(t.device.type == "cpu" for t in self._buffers.values() if t is not None):
            factors = {}
            for f in _FACTORS:
                if self.meta[f] is None or (f != "q" and self.rank == 0):
                    factors[f] = None
                    continue
                codec = codec_for(name=self.meta[f]["codec"])
                fp = getattr(codec, "cpu_factor", lambda b, m: None)(self._bufs(f), self.meta[f])
                if fp is None:
                    break
                factors[f] = fp
            else:
                perm = (codec_for(name=self.meta["q"]["codec"]).column_perm(self._bufs("q"))
                        if self.meta["q"] is not None else None)
                signs = self._signs() if self.meta["rotation"] is not None else None
                plan = cpu.layer_plan(self.out_features, self.in_features, self.rank, factors["q"], factors["l"],
                                      factors["r"], perm, signs, self.bias if self.meta["bias"] is not None else None)
        if plan is not None:  # the call with its pointers resolved once: (C function, &layer, keep-alive)
            plan = (cpu.lib().qlr_layer_forward, ctypes.addressof(plan[0]), plan)
        self.__dict__["_plan_cache"] = (tensors, [(t._version, t.data_ptr()) for t in tensors], plan)
        return plan

    def _matmul(self, f: str, x: Tensor) -> Tensor:
        return codec_for(name=self.meta[f]["codec"]).matmul(x, self._bufs(f), self.meta[f])

    # ---- compute -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x (…, in_features) → (…, out_features) in x's dtype, on x's device (the module's device).

        Runs the :mod:`qlr.kernels` ops: the Hadamard rotation of x (when stored rotated), ``x Qᵀ`` straight from
        Q's codes, ``(x Rᵀ) Lᵀ`` through L's and R's codecs, the rotation back and the bias. Differentiable with
        respect to x (the ops have autograd formulas); the stored codes are constants. After
        :meth:`train_factors`, L and R come from the float parameters ``l_train``/``r_train`` instead (and are
        differentiable too); after :meth:`train_q_scales`, Q is the dense Q₀ ⊙ θ, differentiable in θ."""
        n, m = self.in_features, self.out_features
        if x.shape[-1] != n:
            raise ValueError(f"QLRLinear expects inputs with last dim {n}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"QLRLinear expects a floating-point input, got {x.dtype}")
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, n)
        B = x2.shape[0]
        training_factors = self.l_train is not None
        if (B <= cpu.GEMV_MAX_BATCH and x.device.type == "cpu" and cpu.lib() is not None and not training_factors
                and self.q_scale_train is None
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()):
            plan = self._fused_plan()
            if plan is not None:  # the whole layer in one compiled call (no per-op Python overhead)
                xf = x2 if dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()
                y = torch.empty(B, m, dtype=torch.float32)
                if plan[0](plan[1], xf.data_ptr(), B, y.data_ptr(), torch.get_num_threads()) != 0:
                    raise RuntimeError("qlr_layer_forward rejected its arguments (internal error)")
                return (y if dtype == torch.float32 else y.to(dtype)).view(*lead, m)
        rotated = self.meta["rotation"] is not None
        if rotated:
            s_out, s_in = self._signs()
            x2 = ops.hadamard(x2, s_in, None, False)
        if self.meta["q"] is not None:
            perm = codec_for(name=self.meta["q"]["codec"]).column_perm(self._bufs("q"))
            xq = x2 if perm is None else x2.index_select(-1, perm.to(torch.int64))
            qd = self._cached_q()
            if qd is None and self.q_scale_train is not None:  # the cache was dropped: decode for this call
                qd = self._decoded("q")
            if qd is None:
                y = self._matmul("q", xq)
            else:  # Q decoded once (cache_q): one BLAS call, autocast where it is enabled
                if self.q_scale_train is not None:  # Q's scales in training: Q₀ ⊙ θ, differentiable in θ
                    qd = qd * self._q_multiplier()
                autocast = torch.is_autocast_enabled(xq.device.type)
                y = F.linear(xq, qd if qd.dtype == xq.dtype or autocast else qd.to(xq.dtype))
        else:
            y = torch.zeros(x2.shape[0], m, dtype=dtype, device=x.device)
        if training_factors:  # differentiable in L and R (and x); out of place for autograd
            L, R = self._trained_factors(dtype)
            y = y + (x2 @ R.T) @ L.T
        elif self.rank > 0:  # y + (x Rᵀ) Lᵀ as one GEMM with accumulation; L is small (m × r)
            L = self._decoded("l")
            # under autocast the products may come back in the autocast dtype: the in-place GEMM wants x's
            y = y.to(dtype).addmm_(self._matmul("r", x2).to(dtype), L.to(dtype).T)
        if rotated:
            y = ops.hadamard(y, None, s_out, True)
        if self.meta["bias"] is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*lead, m)

    # ---- fine-tuning the low-rank factors ----------------------------------------------------------------------
    def train_factors(self, dtype: torch.dtype = torch.float32, through_rounding: bool = False
                      ) -> tuple[nn.Parameter, nn.Parameter]:
        """Make L (m × r) and R (r × n) trainable: they are decoded once into float parameters ``l_train`` and
        ``r_train`` (in the stored domain: rotated when the layer is), which :meth:`forward` then uses in place of
        their codes. Q's codes, the rotation signs and the bias stay frozen buffers. Idempotent; returns
        ``(l_train, r_train)``. Raises ValueError for a layer of rank 0.

        ``through_rounding``: the forward uses the factors rounded to their stored formats (per-matrix E8P scales
        kept fixed at their stored values, grid scales recomputed), with a straight-through gradient, so training
        sees exactly what :meth:`store_factors` will store."""
        if self.rank == 0:
            raise ValueError("this QLRLinear has rank 0: no L, R to train")
        if self.l_train is None:
            self.l_train = nn.Parameter(self._dense("l").to(dtype))
            self.r_train = nn.Parameter(self._dense("r").to(dtype))
            self.__dict__["_rounding"] = ({f: self._bufs(f).get("scale") if self.meta[f]["codec"] == "e8p" else None
                                           for f in ("l", "r")} if through_rounding else None)
        return self.l_train, self.r_train

    def cache_q(self, dtype: torch.dtype | None = torch.float32) -> None:
        """Decode Q's frozen codes once into a dense (m × n) tensor of ``dtype``, in stored column order, which
        :meth:`forward` then multiplies with instead of decoding the codes on every call (fine-tuning calls it
        three times a step: the forward, and the backward's ``g Q``). Costs m·n·itemsize bytes until
        ``cache_q(None)`` drops it; the codes are untouched, so the cache is never saved. The product equals the
        codes' own kernels up to the float summation order (and the rounding to ``dtype``)."""
        if dtype is None or self.meta["q"] is None:
            self.__dict__.pop("_q_dense", None)
            return
        self.__dict__["_q_dense"] = (self._q_key(), self._decoded("q").to(dtype).contiguous())

    def _q_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.device) for t in self._bufs("q").values())

    def _cached_q(self) -> Tensor | None:
        """The dense Q of :meth:`cache_q`, decoded again (same dtype) when Q's buffers were replaced, moved or
        written in place since (``.to(device)``, ``load_state_dict``); None when there is no cache."""
        cached = self.__dict__.get("_q_dense")
        if cached is None:
            return None
        if cached[0] != self._q_key():
            self.cache_q(cached[1].dtype)
            cached = self.__dict__["_q_dense"]
        return cached[1]

    def q_scales_untrainable(self) -> str | None:
        """Why Q's scales cannot be trained (None when they can): they can on a grid with fp16/fp32 scales and on
        a one-stage E8P lattice."""
        q = self.meta["q"]
        if q is None:
            return "the layer has no Q"
        if q["codec"] == "grid":
            return "its Q stores power-of-two scales (scale_bits=8)" if q["scale_bits"] == 8 else None
        if q["codec"] == "e8p":
            return None if q["stages"] == 1 else f"its Q is a {q['stages']}-stage E8P lattice (one stage only)"
        return f"its Q is stored as {q['codec']!r}, which has no scales"

    def train_q_scales(self, through_rounding: bool = False, cache: bool = True) -> nn.Parameter:
        """Make Q's scales trainable, its codes staying frozen: a float32 parameter ``q_scale_train`` θ of ones,
        one per stored scale — (m, groups) for a grid (Q's row i, group g becomes θ[i, g]·scale[i, g]·(code −
        zero)), (1,) for a one-stage E8P lattice (Q = θ·scale·decoded codes) — which :meth:`forward` applies as
        Q₀ ⊙ θ (θ repeated over each group's columns) to the dense Q₀. With ``cache``, decodes Q₀ once in float32
        unless :meth:`cache_q` already holds it (m·n·4 bytes for the layer's life in training); without, every
        forward decodes it. Either way a forward in training keeps Q₀ ⊙ θ (m·n·4 bytes) for its backward.
        Idempotent; returns θ.

        ``through_rounding``: the forward uses θ's effect after the new scales' rounding to their stored dtype
        (fp16 or fp32), with a straight-through gradient, so that :meth:`store_q_scales` stores what was trained.

        Raises ValueError when the scales cannot be trained (:meth:`q_scales_untrainable`)."""
        why = self.q_scales_untrainable()
        if why is not None:
            raise ValueError(f"cannot train Q's scales: {why}")
        if self.q_scale_train is None:
            shape = tuple(self.q_scale.shape) if self.meta["q"]["codec"] == "grid" else (1,)
            self.q_scale_train = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=self.q_scale.device))
            self.__dict__["_q_scale_rounding"] = through_rounding
            if cache and "_q_dense" not in self.__dict__:
                self.cache_q(torch.float32)
        return self.q_scale_train

    def _new_q_scale(self, theta: Tensor) -> Tensor:
        """Q's scale buffer multiplied by θ, in the buffer's dtype."""
        s0 = self.q_scale.float()
        return (s0 * (theta if self.meta["q"]["codec"] == "grid" else theta.reshape(()))).to(self.q_scale.dtype)

    def _q_multiplier(self) -> Tensor:
        """θ broadcast over the dense Q (m × n in stored column order for a grid, a scalar for E8P), float32."""
        theta = self.q_scale_train
        if self.__dict__.get("_q_scale_rounding"):  # the ratio the stored (rounded) scales will realise
            with torch.no_grad():
                s0 = self.q_scale.float()
                s1 = self._new_q_scale(theta.detach()).float()
                ratio = torch.where(s0 != 0, s1 / torch.where(s0 != 0, s0, 1), theta.detach().reshape(s0.shape))
            theta = theta + (ratio.reshape(theta.shape) - theta).detach()
        if self.meta["q"]["codec"] != "grid":
            return theta.reshape(())
        n = self.meta["q"]["shape"][1]
        g = self.meta["q"]["group_size"] or n
        return theta.repeat_interleave(g, dim=1)[:, :n]

    @torch.no_grad()
    def store_q_scales(self) -> None:
        """End training Q's scales: write scale·θ into Q's scale buffer (rounded to its dtype; codes and bits/weight
        unchanged), drop θ and the dense Q it used."""
        if self.q_scale_train is None:
            return
        self.q_scale.copy_(self._new_q_scale(self.q_scale_train.detach()))
        self.q_scale_train = None
        self.__dict__.pop("_q_scale_rounding", None)
        self.__dict__.pop("_q_dense", None)

    def trained_tensors(self) -> dict[str, nn.Parameter]:
        """The parameters in training, by kind: ``l``, ``r`` (:meth:`train_factors`), ``q_scale``
        (:meth:`train_q_scales`)."""
        out = {"l": self.l_train, "r": self.r_train, "q_scale": self.q_scale_train}
        return {k: v for k, v in out.items() if v is not None}

    def _rounded(self, f: str, x: Tensor, scales: Tensor | None) -> Tensor:
        """``x`` rounded to factor ``f``'s stored format (float32, no gradient)."""
        codec = codec_for(name=self.meta[f]["codec"])
        with torch.autocast(x.device.type, enabled=False):  # rounding is exact float32 work, also under autocast
            q = codec.quantize_like(x.detach().float(), self.meta[f], scales)
            return q.float() if isinstance(q, Tensor) else q.dequantize().float()

    def _trained_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        L, R = self.l_train, self.r_train
        rounding = self.__dict__.get("_rounding")
        if rounding is not None:  # straight-through: the value of the rounded factor, the gradient of the float one
            L = L + (self._rounded("l", L, rounding["l"]).to(L) - L).detach()
            R = R + (self._rounded("r", R, rounding["r"]).to(R) - R).detach()
        return L.to(dtype), R.to(dtype)

    @torch.no_grad()
    def store_factors(self, storage: str = "requantize") -> None:
        """End fine-tuning: write ``l_train``/``r_train`` back into the buffers and drop the parameters.

        ``storage="requantize"`` rounds them into the formats they were stored in (same codec, bits, group size
        or E8P stages): after training through the rounding, exactly as the forward rounded them; otherwise with
        fresh scales, after balancing each rank-1 term so that ‖L[:, i]‖ = ‖R[i, :]‖ (the product is unchanged).
        ``"fp16"`` keeps them as dense fp16 (the extra bits are counted by :meth:`storage_bits`).
        """
        if storage not in ("requantize", "fp16"):
            raise ValueError(f"storage must be 'requantize' or 'fp16', got {storage!r}")
        if self.l_train is None:
            return
        L, R = self.l_train.detach().float(), self.r_train.detach().float()
        rounding = self.__dict__.pop("_rounding", None)
        if rounding is None or storage == "fp16":
            from qlr.decompose.common import balance_factors

            L, R = balance_factors(L, R)
            rounding = {"l": None, "r": None}
        for f, x in (("l", L), ("r", R)):
            old = self.meta[f]
            codec = codec_for(name="dense") if storage == "fp16" else codec_for(name=old["codec"])
            bufs, fmeta = codec.encode(codec.quantize_like(x, old, rounding[f]))
            for k in [k for k in self._buffers if k.startswith(f + "_")]:
                del self._buffers[k]
            for k, v in bufs.items():
                self.register_buffer(f"{f}_{k}", v.to(self.l_train.device).contiguous())
            self.meta[f] = fmeta
        self.l_train = None
        self.r_train = None

    @torch.no_grad()
    def dequantize_weight(self) -> Tensor:
        """The dense Q + L R (out × in, float32) in the original domain: for tests and evaluation only."""
        m, n = self.out_features, self.in_features
        device = next(iter(self._buffers.values())).device
        W = torch.zeros(m, n, device=device)
        if self.meta["q"] is not None:
            Qs = self._dense("q")
            perm = codec_for(name=self.meta["q"]["codec"]).column_perm(self._bufs("q"))
            if perm is None:
                W = Qs
            else:
                W[:, perm.long()] = Qs  # stored column j is original column perm[j]
        if self.rank > 0:
            W = W + self._dense("l") @ self._dense("r")
        rot = self._rotation()
        return rot.unrotate_weight(W) if rot is not None else W

    def storage_bits(self) -> int:
        """Bits held by the buffers that replace the weight: Q, L, R and the rotation signs (packed words counted
        whole; the act-order permutation at ⌈log2 n⌉ bits per index). The bias is not counted (it is not part of
        W). Equals ``Decomposition.storage_bits()`` up to the tail padding of the packed words."""
        total = 0
        for f in _FACTORS:
            if self.meta[f] is not None:
                total += codec_for(name=self.meta[f]["codec"]).storage_bits(self._bufs(f), self.meta[f])
        if self.meta["rotation"] is not None:
            total += 32 * (self.signs_out.numel() + self.signs_in.numel())
        return total

    @property
    def bits_per_weight(self) -> float:
        """:meth:`storage_bits` over out_features · in_features."""
        return self.storage_bits() / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"rank={self.rank}"]
        for f in _FACTORS:
            fm = self.meta[f]
            if fm is None or (f != "q" and self.rank == 0):
                continue
            parts.append(f"{f}={_describe(fm)}")
        if self.meta["rotation"] is not None:
            parts.append("rotation=hadamard")
        parts.append(f"bias={self.meta['bias'] is not None}")
        return ", ".join(parts)


def _describe(fm: Mapping[str, Any]) -> str:
    if fm["codec"] == "grid":
        kind = "nf" if fm["fmt"] == "nf" else ("sym" if fm["symmetric"] else "asym")
        return f"{kind}{fm['bits']}/g{fm['group_size']}" + ("+perm" if fm["perm"] else "")
    if fm["codec"] == "e8p":
        return ("e8p" if fm["stages"] == 1 else f"e8p{2 * fm['stages']}") + ("/s32" if fm["scale_bits"] == 32 else "")
    if fm["codec"] == "dense":
        return fm["dtype"]
    return str(fm["codec"])


def _validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    required = ("in_features", "out_features", "rank", "q", "l", "r", "bias", "rotation")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"QLRLinear metadata lacks {missing}")
    version = meta.get("version", META_VERSION)
    if version > META_VERSION:
        raise ValueError(f"QLRLinear metadata version {version} is newer than this qlr supports ({META_VERSION})")
    out = {k: meta[k] for k in required}
    out["version"] = version
    return out
