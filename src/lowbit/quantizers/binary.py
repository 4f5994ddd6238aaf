"""Binary weights and activations: BNN (Courbariaux/Hubara 2016) and XNOR-Net (Rastegari 2016),
method ``"binary"`` (docs/algorithms.md §5).

Forward ``b = +1 if x >= 0 else −1`` (``torch.sign(0)`` would be 0); backward the hardtanh
straight-through estimator ``g·1{|x| <= 1}``, so saturated latent values stop learning. Codes are
±1 on the 1-bit odd grid. ``xnor=True`` (weights only) scales each output filter by its
``α = mean|W|`` (a stop-gradient): ``W ≈ α·sign(W)``; without it the scale is 1.

BinaryNet clips latent weights to ``[−1, 1]`` after every optimizer step: ``constrain_`` does it
(``lowbit.schedules`` calls it). The quantizer holds no state; weights keep a following
BatchNorm (``folds_bn = False``), folded into the dequantization scale at convert.

Where the sign goes. ``sign`` of a ReLU output is +1 everywhere: ±1 activations need a signed
tensor. An activation with ``signed=False`` has codes {0, 1} instead: ``y = s·[x > s/2]`` with
a learned step ``s`` (LSQ's gradient, so the threshold ``s/2`` is learned), exported as an
ordinary uint ``QuantizeLinear``/``DequantizeLinear`` on ``[0, 1]`` (preset ``w1a1-bnn``'s
inputs). As a layer's ``output`` the ±1 quantizer sits on ``BN(conv(x))`` and replaces a fused
ReLU (``splits_at_zero``; BinaryNet's ``sign(BN(conv))``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.config import QuantSpec
from lowbit.numerics import MIN_SCALE, IntRange, broadcast_param, fake_quantize
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.quantizers.lsq import grad_scale, lsq_fake_quantize
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
    """±1 codes with the hardtanh STE; XNOR-Net's per-filter scale with ``xnor=True``;
    {0, 1} codes with a learned threshold for non-negative activations (``signed=False``)."""

    supported_bits = (1,)
    options = ("xnor",)
    folds_bn = False
    odd_grid = True

    scale: nn.Parameter  # signed=False only: the learned step (threshold scale / 2)
    initialized: torch.Tensor

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
        self.unsigned = spec.signed is False
        if self.unsigned and role == "weight":
            raise ValueError("QuantSpec.`signed` must be True or None for 'binary' weights "
                             "(codes are ±1; signed=False gives {0, 1} activations), got "
                             "signed=False")
        # XNOR's filter axis: the output channels (0, or the per_channel axis when given).
        self.filter_axis: int | None = (0 if axis is None else axis) if spec.xnor else None
        self.splits_at_zero = not self.unsigned
        if self.unsigned:
            self.odd_grid = False
            self.grid = IntRange(1, signed=False)  # codes {0, 1}
            self.scale = nn.Parameter(torch.ones(1))  # 1 element: FSDP2 shards no 0-dim
            self.register_buffer("initialized", torch.tensor(False))
            self._ready = False  # mirrors `initialized` once True: no device sync per forward
            self._stats: tuple[torch.Tensor, int] | None = None  # calibration: sum |x|, count

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
        """``sign(x)`` (times ``α`` with xnor) with the hardtanh straight-through gradient;
        unsigned: ``s·clamp(round(x/s), 0, 1)`` with LSQ's gradients (the first batch sets
        ``s`` unless calibrated)."""
        if not self.unsigned:
            return self._value(x)
        if not self.is_ready():
            group = distributed.active_group()  # every rank's batch under torch.distributed
            mean_abs = x.detach().float().abs().mean() if group is None else \
                distributed.global_mean(x.detach().float().abs().sum(), x.numel(), group)
            self._set_scale(2 * mean_abs)
        per_sample = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        scale = grad_scale(self.scale.reshape(()).abs().clamp_min(MIN_SCALE), 1.0 / math.sqrt(per_sample))
        return lsq_fake_quantize(x, scale, 0, 1)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same value as training (no state); equals ``dequantize(quantize_weight(x))``.
        Unsigned: ONNX ``QuantizeLinear``/``DequantizeLinear`` on ``[0, 1]`` with step ``s``."""
        if not self.unsigned:
            return self._value(x)
        if not self.is_ready():
            return x
        qp = self.qparams()
        return fake_quantize(x, qp.scale.to(x.device), qp.zero_point.to(x.device), self.grid)

    # --------------------------------------------------------------- unsigned {0, 1} codes

    @torch.no_grad()
    def _set_scale(self, scale: torch.Tensor) -> None:
        self.scale.copy_(scale.reshape(1).clamp_min(MIN_SCALE).to(self.scale))
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Unsigned: accumulate ``Σ|x|`` for the initial step ``s = 2·mean|x|`` (LSQ's init
        at one level: the threshold starts at the mean)."""
        if self.unsigned:
            total = x.detach().float().abs().sum()
            if self._stats is not None:
                total = total + self._stats[0].to(total.device)
            self._stats = (total, x.numel() + (self._stats[1] if self._stats else 0))

    def freeze(self) -> None:
        if self.unsigned and self._stats is not None:
            total, count = self._stats
            group = distributed.active_group()
            mean_abs = total / max(count, 1) if group is None else \
                distributed.global_mean(total, count, group)
            self._set_scale(2 * mean_abs)
            self._stats = None

    def reset_statistics(self) -> None:
        if self.unsigned:
            self._stats = None

    def is_ready(self) -> bool:
        if self.unsigned and not self._ready:
            self._ready = bool(self.initialized)
        return not self.unsigned or self._ready

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._ready = False  # re-read `initialized` after the load
        key = prefix + "scale"
        if self.unsigned and key in state_dict and state_dict[key].dim() == 0:  # lowbit < 0.4
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def constant_fix(self, lo: float, hi: float) -> str:
        if not self.unsigned and lo >= 0:
            return ("binary ±1 codes need signed inputs, and these are all >= 0 (a ReLU before "
                    "this layer?), so every value is +1. Give this input {0, 1} codes with a "
                    "learned threshold: QuantSpec(bits=1, method='binary', signed=False), as "
                    "preset 'w1a1-bnn' does; or take the sign before the ReLU: QuantSpec(bits=1, "
                    "method='binary') as the *output* of the layer that produces this tensor "
                    "replaces its fused ReLU (sign(BN(conv)))")
        return super().constant_fix(lo, hi)

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
        ``α`` depends on the weight: it comes from ``quantize_weight`` (1 here is a placeholder).
        Unsigned: the learned step ``s``, zero point 0 on the uint grid ``[0, 1]``."""
        if not self.unsigned:
            return QParams(torch.ones(()), torch.zeros((), dtype=torch.int32), self.grid, None)
        if not self.is_ready():
            raise ValueError(
                f"the {self.role} quantizer of layer {self.layer_name!r} ({{0, 1}} codes) has no "
                "threshold yet; run lowbit.calibrate(model, batches) (or train) before convert")
        scale = self.scale.detach().reshape(()).abs().clamp_min(MIN_SCALE).clone()
        return QParams(scale, torch.zeros((), dtype=torch.int32, device=scale.device), self.grid,
                       None)

    @torch.no_grad()
    def constrain_(self, weight: torch.Tensor) -> None:
        """Clip the latent weight to ``[−1, 1]`` in place (BinaryNet, after each step)."""
        weight.clamp_(-1.0, 1.0)

    def extra_repr(self) -> str:
        parts = ["binary", "{0, 1} codes, learned threshold" if self.unsigned
                 else "xnor" if self.spec.xnor else "scale=1"]
        if self.spec.quant_delay:
            parts.append(f"quant_delay={self.spec.quant_delay}")
        return ", ".join(parts)
