"""Mixture-of-experts blocks: split transformers' fused expert weights into one set of linears per expert.

transformers (5.x) stores a block's experts as 3-D parameters in one ``*Experts`` module: ``gate_up_proj``
(E, 2I, H) — gate rows then up rows (``is_concatenated``) or interleaved — or ``up_proj`` (E, I, H) for ungated
experts, and ``down_proj`` (E, H, I); (E, in, out) when ``is_transposed``; optional ``*_bias`` (E, out). That
module has no ``nn.Linear`` for qlr to compress. :func:`unfuse_experts` replaces it by :class:`UnfusedExperts`,
whose children ``"0"``, ``"1"``, ... hold each expert's ``gate_proj / up_proj / down_proj`` as ``nn.Linear``
and which computes the same function (checked numerically on random routing when the weights are real).
Calibration then sees each expert's linears called on exactly the tokens routed to it, so each expert gets its
own H.

Saved checkpoints record the unfused paths; loading unfuses the freshly built (meta) model the same way before
the compressed layers are swapped in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["ExpertMLP", "UnfusedExperts", "find_fused_experts", "unfuse_experts"]

_FORWARD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``, or ``down_proj(act(up_proj(x)))`` ungated."""

    def __init__(self, hidden: int, inter: int, gated: bool, bias: bool, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, **kw) if gated else None
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)


class UnfusedExperts(nn.Module):
    """Per-expert linears with the forward of a transformers ``*Experts`` module.

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``: for every expert hit,
    its MLP on the tokens routed to it, weighted by the routing weight and summed per token (transformers' eager
    experts loop)."""

    def __init__(self, experts: list[ExpertMLP], act_fn: Callable[[Tensor], Tensor],
                 post_expert_norm: nn.Module | None = None) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for e, mlp in enumerate(experts):  # children "0", "1", ...: paths read "mlp.experts.3.gate_proj"
            self.add_module(str(e), mlp)
        self._act = (act_fn,)  # not a child: the activation has no weights and is shared with nothing saved
        self.post_expert_norm = post_expert_norm

    def expert(self, e: int) -> ExpertMLP:
        """Expert ``e``'s MLP."""
        return self.get_submodule(str(e))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # expert-parallel sentinels
                continue
            token_idx, pos = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            expert, act = self.expert(e), self._act[0]
            if expert.gate_proj is not None:
                h = act(expert.gate_proj(x)) * expert.up_proj(x)
            else:
                h = act(expert.up_proj(x))
            h = expert.down_proj(h)
            if self.post_expert_norm is not None:
                h = self.post_expert_norm(h)
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def _param(module: nn.Module, name: str) -> Tensor | None:
    p = getattr(module, name, None)
    return p if isinstance(p, Tensor) and p.dim() == 3 else None


def find_fused_experts(model: nn.Module) -> list[str]:
    """Paths of modules holding fused 3-D expert weights (``gate_up_proj`` or ``up_proj``, and ``down_proj``)."""
    return [name for name, mod in model.named_modules()
            if not isinstance(mod, UnfusedExperts) and _param(mod, "down_proj") is not None
            and (_param(mod, "gate_up_proj") is not None or _param(mod, "up_proj") is not None)]


def _unfuse(path: str, fused: nn.Module) -> UnfusedExperts:
    cls = type(fused).__name__
    names = tuple(inspect.signature(type(fused).forward).parameters)[1:4]
    if names != _FORWARD_ARGS:
        raise ValueError(f"{path} ({cls}): its forward takes {names}, not {_FORWARD_ARGS}; qlr cannot split these "
                         "experts into linears")
    gate_fn = getattr(type(fused), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        raise ValueError(f"{path} ({cls}): the experts use a custom gating function; qlr cannot split them into "
                         "linears (exclude them with --layers, or compress another architecture)")
    gated = _param(fused, "gate_up_proj") is not None
    up_all = _param(fused, "gate_up_proj" if gated else "up_proj")
    down_all = _param(fused, "down_proj")
    assert up_all is not None and down_all is not None
    if getattr(fused, "is_transposed", False):
        up_all, down_all = up_all.transpose(1, 2), down_all.transpose(1, 2)
    n_exp, up_rows, hidden = up_all.shape
    inter = up_rows // 2 if gated else up_rows
    if down_all.shape != (n_exp, hidden, inter):
        raise ValueError(f"{path} ({cls}): down_proj has shape {tuple(down_all.shape)}, expected "
                         f"{(n_exp, hidden, inter)}; qlr cannot split these experts into linears")
    up_bias = getattr(fused, "gate_up_proj_bias" if gated else "up_proj_bias", None)
    down_bias = getattr(fused, "down_proj_bias", None)
    has_bias = isinstance(up_bias, Tensor) and isinstance(down_bias, Tensor)
    interleaved = gated and not getattr(fused, "is_concatenated", True)
    gate_rows = slice(0, None, 2) if interleaved else slice(0, inter)
    up_rows_sel = slice(1, None, 2) if interleaved else slice(inter, 2 * inter)
    real = up_all.device.type != "meta"
    experts = []
    for e in range(n_exp):
        mlp = ExpertMLP(hidden, inter, gated, has_bias, up_all.device, up_all.dtype)
        if real:
            parts = ((mlp.gate_proj, gate_rows), (mlp.up_proj, up_rows_sel)) if gated else ((mlp.up_proj, slice(None)),)
            with torch.no_grad():
                for linear, rows in (*parts, (mlp.down_proj, slice(None))):
                    full, bias = (down_all, down_bias) if linear is mlp.down_proj else (up_all, up_bias)
                    linear.weight.copy_(full[e, rows])
                    if has_bias:
                        linear.bias.copy_(bias[e, rows])
        experts.append(mlp)
    norm = getattr(fused, "post_expert_norm", None) if getattr(fused, "has_post_expert_norm", False) else None
    return UnfusedExperts(experts, fused.act_fn, norm)


@torch.no_grad()
def _check_same(path: str, fused: nn.Module, unfused: UnfusedExperts) -> None:
    """Raise ValueError unless both modules compute the same function on random tokens and routing."""
    p = unfused.expert(0).up_proj.weight
    gen = torch.Generator().manual_seed(0)
    tokens, k = 16, min(2, unfused.num_experts)
    x = torch.randn(tokens, p.shape[1], generator=gen).to(p)
    idx = torch.stack([torch.randperm(unfused.num_experts, generator=gen)[:k] for _ in range(tokens)]).to(p.device)
    w = torch.rand(tokens, k, generator=gen).to(p)
    ref, got = fused(x, idx, w), unfused(x, idx, w)
    err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    if not err <= 1e-3:
        raise ValueError(f"{path} ({type(fused).__name__}): the split experts differ from the fused ones "
                         f"(relative error {err:.2g}); qlr does not understand this expert layout")


def unfuse_experts(model: nn.Module, paths: Iterable[str] | None = None, *, check: bool = True) -> list[str]:
    """Replace fused expert modules by :class:`UnfusedExperts` in place; returns the replaced paths.

    Args:
        model: the model (real or meta weights).
        paths: which modules (default: every one :func:`find_fused_experts` finds).
        check: compare old and new forward on random routing (real weights only).

    Raises ValueError naming the module when its layout is not understood."""
    paths = find_fused_experts(model) if paths is None else list(paths)
    for path in paths:
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fused = getattr(parent, attr)
        if isinstance(fused, UnfusedExperts):
            continue
        new = _unfuse(path, fused)
        if check and new.expert(0).up_proj.weight.device.type != "meta":
            _check_same(path, fused, new)
        setattr(parent, attr, new)
    return paths
