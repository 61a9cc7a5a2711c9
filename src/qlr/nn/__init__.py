"""Modules that run compressed weights: :class:`QLRLinear` (W ≈ Q + L R) and its storage codecs."""

from qlr.nn.codecs import Codec, DenseCodec, GridCodec, LatticeCodec, codec_for, register_codec
from qlr.nn.qlinear import QLRLinear

__all__ = ["QLRLinear", "Codec", "GridCodec", "LatticeCodec", "DenseCodec", "register_codec", "codec_for"]
