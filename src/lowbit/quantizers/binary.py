"""Binary weights and activations: BNN (Courbariaux/Hubara 2016) and XNOR-Net (Rastegari 2016),
method ``"binary"`` (docs/algorithms.md §5).

Forward ``b = +1 if x >= 0 else −1`` (``torch.sign(0)`` would be 0); backward the hardtanh
straight-through estimator ``g·1{|x| <= 1}``, so saturated latent values stop learning. Codes are
±1 on the 1-bit odd grid. ``xnor=True`` (weights only) scales each output filter by its
``α = mean|W|`` (a stop-gradient): ``W ≈ α·sign(W)``; without it the scale is 1.

BinaryNet clips latent weights to ``[−1, 1]`` after every optimizer step: ``constrain_`` does it
(``lowbit.schedules`` calls it). The quantizer holds no state; weights keep a following
BatchNorm (``folds_bn = False``), folded into the dequantization scale at convert.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.config import QuantSpec
from lowbit.numerics import MIN_SCALE, broadcast_param
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.registry import QUANTIZERS


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, ``−1`` elsewhere, in ``x``'s dtype (``torch.sign(0)`` is 0)."""
    return (x >= 0).to(x.dtype) * 2 - 1


class BinarizeSTE(torch.autograd.Function):
    """``sign_pm1(x)`` forward, hardtanh straight-through gradient ``g·1{|x| <= 1}`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign_pm1(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


@QUANTIZERS.register("binary")
class BinaryQuantizer(Quantizer):
    """±1 codes with the hardtanh STE; XNOR-Net's per-filter scale with ``xnor=True``."""

    supported_bits = (1,)
    options = ("xnor",)
    folds_bn = False
    odd_grid = True

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        if spec.xnor and role != "weight":
            raise ValueError(f"QuantSpec.`xnor` applies to weights only (a scale per output "
                             f"filter), got xnor=True for a layer's {role}")
        allowed = ("per_tensor", "per_channel") if spec.xnor else ("per_tensor",)
        if spec.granularity not in allowed:
            why = "XNOR scales each output filter" if spec.xnor else "its scale is 1"
            raise ValueError(f"QuantSpec.`granularity` must be one of {list(allowed)} for method "
                             f"'binary' ({why}), got {spec.granularity!r}")
        if spec.narrow_range:
            raise ValueError("QuantSpec.`narrow_range` must be False for method 'binary' (codes "
                             "are ±1), got narrow_range=True")
        if spec.signed is False:
            raise ValueError("QuantSpec.`signed` must be True or None for method 'binary' "
                             "(codes are ±1), got signed=False")
        # XNOR's filter axis: the output channels (0, or the per_channel axis when given).
        self.filter_axis: int | None = (0 if axis is None else axis) if spec.xnor else None

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        """XNOR's ``mean|W|`` per output filter, shape ``(C,)``, detached, >= MIN_SCALE."""
        assert self.filter_axis is not None
        rows = w.detach().abs().movedim(self.filter_axis, 0).reshape(w.shape[self.filter_axis], -1)
        return rows.mean(dim=1).clamp_min(MIN_SCALE)

    def _value(self, x: torch.Tensor) -> torch.Tensor:
        if self.filter_axis is None:
            return BinarizeSTE.apply(x)
        w = x.float()
        alpha = broadcast_param(self._alpha(w), w, self.filter_axis)
        return (BinarizeSTE.apply(w) * alpha).to(x.dtype)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``sign(x)`` (times ``α`` with xnor) with the hardtanh straight-through gradient."""
        return self._value(x)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same value as training (no state); equals ``dequantize(quantize_weight(x))``."""
        return self._value(x)

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Codes ±1 with scale 1 (per tensor) or, with xnor, ``α`` per filter (axis 0)."""
        w = weight.detach().float()
        if self.filter_axis is None:
            scale = torch.ones((), device=w.device)
        else:
            scale = self._alpha(w)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return sign_pm1(w), QParams(scale, zero_point, self.grid, self.filter_axis)

    def qparams(self) -> QParams:
        """Scale 1, zero point 0 on the 1-bit odd grid, per tensor. With xnor the per-filter
        ``α`` depends on the weight: it comes from ``quantize_weight`` (1 here is a placeholder)."""
        return QParams(torch.ones(()), torch.zeros((), dtype=torch.int32), self.grid, None)

    @torch.no_grad()
    def constrain_(self, weight: torch.Tensor) -> None:
        """Clip the latent weight to ``[−1, 1]`` in place (BinaryNet, after each step)."""
        weight.clamp_(-1.0, 1.0)

    def extra_repr(self) -> str:
        parts = ["binary", "xnor" if self.spec.xnor else "scale=1"]
        if self.spec.quant_delay:
            parts.append(f"quant_delay={self.spec.quant_delay}")
        return ", ".join(parts)
