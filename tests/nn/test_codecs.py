"""qlr.nn.codecs: the codec registry (first match wins, found by name on load) and the dtype names in metadata."""

from __future__ import annotations

import pytest
import torch

import qlr.nn.codecs as codecs
from qlr.nn import QLRLinear
from qlr.nn.codecs import DenseCodec, GridCodec, LatticeCodec, codec_for, dtype_from_name, dtype_name, register_codec
from qlr.quant.e8p import quantize_e8p
from qlr.quant.grid import QuantSpec, quantize_rtn


def test_codec_for_picks_by_object_and_by_name():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert isinstance(codec_for(quantize_rtn(W, QuantSpec(bits=3, group_size=8))), GridCodec)
    assert isinstance(codec_for(quantize_e8p(W)), LatticeCodec)
    assert isinstance(codec_for(W), DenseCodec)
    assert [type(codec_for(name=n)) for n in ("grid", "e8p", "dense")] == [GridCodec, LatticeCodec, DenseCodec]
    with pytest.raises(NotImplementedError, match=r"no codec 'nope'.*qlr\.nn\.codecs"):
        codec_for(name="nope")
    with pytest.raises(NotImplementedError, match="no a codec for int"):
        codec_for(3)


class _Fp32Dense(DenseCodec):
    """A dense codec keeping float32 (a user codec, registered before the built-in ones)."""

    name = "dense32"
    dtype = torch.float32


def test_register_codec_goes_first_and_is_found_on_load(monkeypatch):
    monkeypatch.setattr(codecs, "_CODECS", list(codecs._CODECS))
    register_codec(_Fp32Dense())
    with pytest.raises(ValueError, match="already registered"):
        register_codec(_Fp32Dense())
    W = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    assert isinstance(codec_for(W), _Fp32Dense)
    bufs, meta = codec_for(W).encode(W)
    assert meta == {"codec": "dense32", "shape": [6, 8], "dtype": "float32"} and torch.equal(bufs["dense"], W)
    mod = QLRLinear({"in_features": 8, "out_features": 6, "rank": 0, "q": meta, "l": None, "r": None, "bias": None,
                     "rotation": None}, {f"q_{k}": v for k, v in bufs.items()})
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mod(x), x @ W.T)  # float32 all the way (summation order aside)
    empty = QLRLinear.from_meta(mod.qlr_meta())
    assert empty.q_dense.shape == (6, 8) and empty.q_dense.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
def test_dtype_names_round_trip(dtype):
    assert dtype_from_name(dtype_name(dtype)) is dtype


def test_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float13'"):
        dtype_from_name("float13")
    with pytest.raises(ValueError, match="unknown dtype 'nn'"):
        dtype_from_name("nn")
