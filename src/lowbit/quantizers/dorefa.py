"""DoReFa-Net weight and activation quantization (Zhou et al., 2016), method ``"dorefa"``.

Follows tensorpack's ``examples/DoReFa-Net/dorefa.py`` (docs/algorithms.md §4). With ``n = 2**k - 1``
and ``quantize_k(r) = round(n·r) / n`` (straight-through rounding):

- weights, ``k > 1``: ``w_q = 2·quantize_k(tanh(w) / (2·max|tanh(w)|) + 1/2) − 1``, the max over
  the whole tensor; gradients flow through ``tanh`` and the max as in the reference. Values
  ``{−1, …, −1/n, 1/n, …, 1}``: odd codes ``2·round(n·r) − n`` with scale ``1/n``;
- weights, ``k = 1``: ``w_q = E|w|·sign(w)`` with ``sign(0) = +1``, ``E|w|`` a stop-gradient and an
  identity gradient (tensorpack's BWN): codes ±1, scale ``mean|w|``;
- activations: ``a_q = quantize_k(clip(x, 0, 1))``: the unsigned grid ``[0, n]`` with scale
  ``1/n`` and zero point 0; gradient 1 inside ``[0, 1]``, 0 outside.

The quantizer holds no state, so training and eval compute the same values. Forward values are
computed as ``codes · scale`` so that ``dequantize(*quantize_weight(w))`` equals
``eval_forward(w)`` bit for bit. Weights keep a following BatchNorm (``folds_bn = False``).
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.config import QuantSpec
from lowbit.numerics import (
    MIN_SCALE,
    IntRange,
    fake_quantize,
    fused_fake_quantize,
    round_ste,
)
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.quantizers.binary import sign_pm1
from lowbit.registry import QUANTIZERS


class _ScaledSign(torch.autograd.Function):
    """``sign(w)·scale`` forward, identity gradient to ``w`` (tensorpack's BWN custom gradient)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return sign_pm1(w) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@QUANTIZERS.register("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa: ``tanh``-normalised weights on an odd grid, clipped activations on ``[0, 1]``."""

    folds_bn = False
    odd_grid = True  # weights; activations switch to the plain unsigned grid in __init__

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        if spec.granularity != "per_tensor":
            raise ValueError(
                f"QuantSpec.`granularity` must be 'per_tensor' for method 'dorefa' (one fixed "
                f"scale per tensor), got {spec.granularity!r}"
            )
        if spec.dynamic:
            raise ValueError("QuantSpec.`dynamic` must be False for method 'dorefa' (its grid "
                             "is fixed, not measured at run time), got dynamic=True")
        if spec.narrow_range:
            raise ValueError("QuantSpec.`narrow_range` must be False for method 'dorefa' (its "
                             "grids are fixed), got narrow_range=True")
        if role == "weight":
            if spec.bits == 8:
                raise ValueError("QuantSpec.`bits` must be in 1..7 for 'dorefa' weights (8-bit "
                                 "odd codes ±255 do not fit int8 storage), got bits=8")
            if spec.signed is False:
                raise ValueError("QuantSpec.`signed` must be True or None for 'dorefa' weights "
                                 "(values in [-1, 1] on an odd signed grid), got signed=False")
        else:
            if spec.signed:
                raise ValueError(f"QuantSpec.`signed` must be False or None for 'dorefa' "
                                 f"activations (values in [0, 1]), got signed={spec.signed!r}")
            self.odd_grid = False
            self.grid = IntRange(spec.bits, signed=False)
        self.levels = 2**spec.bits - 1  # n: the largest code of quantize_k

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed step ``1/n`` as a float32 scalar on ``x``'s device."""
        return torch.full((), 1.0 / self.levels, dtype=torch.float32, device=x.device)

    @staticmethod
    def _mean_abs(w: torch.Tensor) -> torch.Tensor:
        """``E|w|`` (a stop-gradient), kept >= MIN_SCALE so that deploy never sees scale 0."""
        return w.detach().abs().mean().clamp_min(MIN_SCALE)

    def _weight_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Odd codes ``2·round(n·r) − n`` of a float32 weight, ``k > 1``; gradient through
        ``tanh`` and the max, straight through the rounding."""
        t = torch.tanh(w)
        r = t / (2 * t.abs().max().clamp_min(MIN_SCALE)) + 0.5
        return 2 * round_ste(self.levels * r) - self.levels

    def _weight_value(self, w: torch.Tensor) -> torch.Tensor:
        if self.spec.bits == 1:
            return _ScaledSign.apply(w, self._mean_abs(w))
        return self._weight_codes(w) * self._scale(w)

    def _activation_value(self, x: torch.Tensor, *, fused: bool) -> torch.Tensor:
        # Clip first: the gradient is then exactly 1{0 <= x <= 1}; the value is unchanged.
        y = torch.clamp(x, 0.0, 1.0)
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        quant = fused_fake_quantize if fused else fake_quantize
        return quant(y, self._scale(x), zero_point, self.grid)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """QAT value with DoReFa's gradients; activations use torch's fused kernel (which may
        differ from eval by one code on an exact rounding tie, as for ``"ste"``)."""
        if self.role == "weight":
            return self._weight_value(x.float()).to(x.dtype)
        return self._activation_value(x, fused=True)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deploy value: weights equal ``dequantize(quantize_weight(x))``, activations
        ONNX ``QuantizeLinear``/``DequantizeLinear`` with scale ``1/n``."""
        if self.role == "weight":
            return self._weight_value(x.float()).to(x.dtype)
        return self._activation_value(x, fused=False)

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Odd codes and per-tensor scale: ``1/n`` for ``k > 1``, ``mean|w|`` for ``k = 1``."""
        w = weight.detach().float()
        if self.spec.bits == 1:
            codes, scale = sign_pm1(w), self._mean_abs(w)
        else:
            codes, scale = self._weight_codes(w), self._scale(w)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return codes, QParams(scale, zero_point, self.grid, None)

    def qparams(self) -> QParams:
        """Activations: scale ``1/n``, zero point 0 on ``[0, n]``. Weights: the odd grid with the
        fixed scale ``1/n`` (``k > 1``) or a unit placeholder (``k = 1``, whose scale ``mean|w|``
        depends on the weight); a weight's codes and exact scale come from ``quantize_weight``."""
        scale = torch.tensor(1.0 if self.grid.odd and self.spec.bits == 1 else 1.0 / self.levels)
        return QParams(scale, torch.zeros((), dtype=torch.int32), self.grid, None)

    def extra_repr(self) -> str:
        kind = "odd" if self.grid.odd else "uint"
        parts = [f"{kind}{self.spec.bits}", "method=dorefa"]
        if self.spec.quant_delay:
            parts.append(f"quant_delay={self.spec.quant_delay}")
        return ", ".join(parts)
