"""The one quantizer interface every algorithm implements.

A quantizer is an ``nn.Module`` that fake-quantizes one tensor: ``forward(x)`` returns a float
tensor whose values lie on the integer grid of its ``QuantSpec``. Its state lives in buffers and
parameters, so ``state_dict`` round-trips; ``qparams()`` hands the frozen scale and zero point to
``convert`` and the exporter.

Modes, the same for every algorithm:
- ``training`` (``module.train()``): update ranges / learned parameters and fake-quantize
  (quantization-aware training);
- ``observing`` (set by ``lowbit.calibrate``): record statistics, pass values through unchanged;
- otherwise (eval): fake-quantize with the frozen parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lowbit.config import QuantSpec
from lowbit.numerics import IntRange
from lowbit.registry import QUANTIZERS

Role = Literal["weight", "input", "output"]


@dataclass(frozen=True)
class QParams:
    """Frozen quantization parameters of one tensor, in ONNX terms.

    ``scale``/``zero_point`` are scalars (per tensor), ``(C,)`` along ``axis`` (per channel) or
    ``(C, K // group_size)`` blocked along ``axis`` (per group).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    grid: IntRange
    axis: int | None
    group_size: int | None = None

    @property
    def granularity(self) -> str:
        if self.group_size is not None:
            return "per_group"
        return "per_tensor" if self.scale.dim() == 0 else "per_channel"

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.grid.bits,
            "signed": self.grid.signed,
            "qmin": self.grid.qmin,
            "qmax": self.grid.qmax,
            "granularity": self.granularity,
            "axis": self.axis,
            "group_size": self.group_size,
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
        }


class Quantizer(nn.Module):
    """Base class: holds the spec, the integer grid, the role and the channel axis.

    ``axis`` is the resolved channel axis (``None`` per tensor); ``layer_name`` is set by the
    owning layer so that errors can name it.
    """

    supported_bits: tuple[int, ...] = tuple(range(1, 9))

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__()
        self.spec = spec
        self.role = role
        self.axis = axis
        self.grid = IntRange(spec.bits, spec.is_signed, spec.narrow_range)
        self.layer_name = ""
        self.observing = False

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size if self.spec.granularity == "per_group" else None

    def qparams(self) -> QParams:  # pragma: no cover - abstract
        raise NotImplementedError

    # Hooks with do-nothing defaults, so callers never probe with hasattr. Algorithms whose
    # parameters are learned rather than observed keep them as they are.

    def set_weight_shape(self, shape: torch.Size) -> None:
        """Weights only: told the weight's shape once, before any data."""

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x``."""

    def freeze(self) -> None:
        """Turn recorded statistics into quantization parameters."""

    def reset_statistics(self) -> None:
        """Forget recorded statistics (a new calibration starts)."""

    def is_ready(self) -> bool:
        """True once the quantizer has parameters to quantize with (calibrated or trained)."""
        return True

    def extra_repr(self) -> str:
        s = self.spec
        kind = "int" if self.grid.signed else "uint"
        gran = s.granularity if s.granularity != "per_group" else f"per_group({s.group_size})"
        parts = [f"{kind}{s.bits}", "symmetric" if s.symmetric else "affine", gran]
        if s.dynamic:
            parts.append("dynamic")
        else:
            parts.append(f"observer={s.observer}")
        parts.append(f"method={s.method}")
        return ", ".join(parts)


def resolve_axis(spec: QuantSpec, role: Role, channel_axis: int) -> int | None:
    """The quantization axis of a tensor: ``None`` per tensor, the channel axis otherwise."""
    if spec.granularity == "per_tensor":
        return None
    if spec.granularity == "per_group":
        if role != "weight":
            raise NotImplementedError(
                "granularity='per_group' is supported for weights only, "
                f"got it for a layer's {role}"
            )
        return 1  # blocks run along the input channels of (out, in, ...) weights
    return channel_axis if spec.axis is None else spec.axis


def make_quantizer(
    spec: QuantSpec | None, *, role: Role, channel_axis: int, layer_name: str = ""
) -> Quantizer | None:
    """Build the registered quantizer for ``spec.method`` (``None`` for a float tensor)."""
    if spec is None:
        return None
    cls = QUANTIZERS.get(spec.method, field="QuantSpec.method")
    quantizer = cls(spec, role=role, axis=resolve_axis(spec, role, channel_axis))
    quantizer.layer_name = layer_name
    return quantizer
