"""Differentiable quantizers, one file per algorithm, each registered under its method name."""

from lowbit.quantizers import (  # noqa: F401  (each registers its method)
    binary,
    dorefa,
    lsq,
    pact,
    slb,
    uniform,
)
from lowbit.quantizers.base import ConstantQuantizerWarning, QParams, Quantizer, make_quantizer

__all__ = ["ConstantQuantizerWarning", "QParams", "Quantizer", "make_quantizer"]
