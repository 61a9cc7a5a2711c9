"""Modules that run compressed weights: :class:`QLRLinear` (W ≈ Q + L R) and its storage codecs."""

from qlr.nn.qlinear import Codec, DenseCodec, GridCodec, QLRLinear, codec_for, register_codec

__all__ = ["QLRLinear", "Codec", "GridCodec", "DenseCodec", "register_codec", "codec_for"]
