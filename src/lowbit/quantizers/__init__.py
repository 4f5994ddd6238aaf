"""Differentiable quantizers, one file per algorithm, each registered under its method name."""

from lowbit.quantizers import uniform  # noqa: F401  (registers "ste")
from lowbit.quantizers.base import QParams, Quantizer, make_quantizer

__all__ = ["QParams", "Quantizer", "make_quantizer"]
