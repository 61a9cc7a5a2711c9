"""Modules that run compressed weights: :class:`QLRLinear` (W ≈ Q + L R) and its storage codecs."""

from qlr.nn.qlinear import Codec, DenseCodec, GridCodec, LatticeCodec, QLRLinear, codec_for, register_codec

__all__ = ["QLRLinear", "Codec", "GridCodec", "LatticeCodec", "DenseCodec", "register_codec", "codec_for"]
