"""Argument checks shared by the pure-function modules (``gptq``, ``awq``): each error names
the argument, the value and what is allowed."""

from __future__ import annotations

import torch


def require_tensor(name: str, value: object) -> torch.Tensor:
    """A finite floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or Inf")
    return value


def require_int(name: str, value: object, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value
