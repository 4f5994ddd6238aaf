"""Learned step size quantization (method ``"lsq"``; Esser et al., ICLR 2020; docs/algorithms.md §2).

The step ``scale`` is an ``nn.Parameter`` trained with the task loss:
``v̂ = round(clamp(v/s, -Qn, Qp)) · s`` with ``∂v̂/∂s = round(v/s) - v/s`` inside the range,
``-Qn`` / ``Qp`` at the ends, and the step's gradient scaled by ``g = 1/sqrt(N·Qp)``. Affine
specs (``symmetric=False``) also learn a float zero point in code units (LSQ+ offsets), rounded
to an integer in every forward, so training, eval and the deploy model share one grid.

torch's fused ``_fake_quantize_learnable_per_{tensor,channel}_affine`` are not used: they round
before clamping, so for ``v/s`` up to half a step beyond either end they pass the gradient to
``v`` and give ``s`` ``round(v/s) - v/s`` instead of ``-Qn`` / ``Qp`` (checked in the tests).

Initialization (an ``initialized`` buffer records it):
- weights: ``observe(weight)`` + ``freeze()`` (the layer calls both at quantize time) set
  ``s = 2·mean|w|/sqrt(Qp)`` (per channel if per channel); affine weights take scale and zero
  point from their min / max instead;
- activations: ``lowbit.calibrate`` feeds the spec's observer and ``freeze()`` takes scale and
  zero point from the observed range; without it the first quantized training batch sets
  ``s = 2·mean|x|/sqrt(Qp)`` (affine: that batch's min / max). Per-channel activations get their
  ``(C,)`` shape only then: calibrate or run one training forward before building the optimizer
  (the Parameter object is kept, so an optimizer that has not stepped yet also works).
- ``warm_up`` (training forwards during ``quant_delay``): weights re-initialize from the current
  weight, so the learned step starts from the weight quantization begins with; activations do
  nothing and initialize on the first quantized batch (from the network after its warm-up).

Keep ``scale`` (and the zero point) out of weight decay. Every forward steps by
``|scale|`` clamped to ``MIN_SCALE`` (``qparams`` hands out the same value): an optimizer step
that overshoots zero (easy with Adam, which undoes ``g``) flips the sign and keeps learning,
where a plain clamp would freeze the step at its floor with a zero gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit import distributed, observers
from lowbit.config import QuantSpec
from lowbit.numerics import (
    MIN_SCALE,
    broadcast_param,
    fake_quantize,
    qparams_from_range,
    round_ste,
)
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.quantizers.uniform import to_rows
from lowbit.registry import QUANTIZERS

if TYPE_CHECKING:
    from lowbit.observers import Observer

Bound = int | torch.Tensor


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``g`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` with its gradient multiplied by ``g``; unlike ``(x - x*g).detach() + x*g`` the
    forward value is exactly ``x``, so training and eval quantize with the same step."""
    return _ScaleGrad.apply(x, g)


class _LSQFakeQuantize(torch.autograd.Function):
    """``clamp(round(x / s), lo, hi) · s`` in four tensor ops, with LSQ's gradients written out
    (half the time of the same math through autograd on the ResNet-style benchmark).

    ``s``, ``lo``, ``hi`` broadcast against ``x``; their gradients are summed back to their own
    shapes. Inside ``(lo, hi)``: ``dx = g``, ``ds = g·(round(v) − v)``; at or beyond an end:
    ``dx = 0``, ``ds = g·end``, and the end itself gets ``g·s`` (a learned zero point moves the
    ends: ``lo = qmin − z``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor) -> torch.Tensor:
        v = x / s
        q = torch.minimum(torch.maximum(torch.round(v), lo), hi)
        ctx.save_for_backward(v, q, s, lo, hi)
        return q * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v, q, s, lo, hi = ctx.saved_tensors
        below, above = v <= lo, v >= hi
        inside = ~(below | above)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = (grad * torch.where(inside, q - v, q)).sum_to_size(s.shape) \
            if ctx.needs_input_grad[1] else None
        grad_lo = (grad * s * below).sum_to_size(lo.shape) if ctx.needs_input_grad[2] else None
        grad_hi = (grad * s * above).sum_to_size(hi.shape) if ctx.needs_input_grad[3] else None
        return grad_x, grad_s, grad_lo, grad_hi


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, lo: Bound, hi: Bound, axis: int | None = None
) -> torch.Tensor:
    """``round(clamp(x / scale, lo, hi)) · scale`` with the LSQ paper's gradients.

    ``lo``/``hi`` are the grid ends relative to the zero point (``qmin - z``, ``qmax - z``):
    ints, or tensors shaped like ``scale`` (a learned zero point then gets ``-scale`` where
    values saturate, 0 inside). A value exactly on an end counts as saturated, as in the
    paper. The forward value equals ``numerics.fake_quantize`` with the same scale and zero
    point bit for bit.
    """
    s = broadcast_param(scale, x, axis)
    lo_t = broadcast_param(lo, x, axis) if isinstance(lo, torch.Tensor) else \
        torch.tensor(float(lo), device=x.device)
    hi_t = broadcast_param(hi, x, axis) if isinstance(hi, torch.Tensor) else \
        torch.tensor(float(hi), device=x.device)
    return _LSQFakeQuantize.apply(x, s, lo_t, hi_t)


@QUANTIZERS.register("lsq")
class LSQQuantizer(Quantizer):
    """Uniform quantizer whose step (and, for affine specs, zero point) is learned."""

    supported_bits = tuple(range(2, 9))
    roles = ("weight", "activation")
    folds_bn = True

    observer: Observer
    scale: nn.Parameter
    zero_point: torch.Tensor  # nn.Parameter for affine specs, a fixed buffer for symmetric ones
    initialized: torch.Tensor

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        if spec.granularity == "per_group":
            raise NotImplementedError(
                "method 'lsq' learns one step per tensor or per channel; granularity="
                "'per_group' is not supported, use 'per_tensor' or 'per_channel'")
        if spec.dynamic:
            raise ValueError("method 'lsq' learns its step, so QuantSpec.`dynamic` must be False, "
                             "got True; use method='ste' for dynamic quantization")
        self.observer = observers.build(spec, shared=role != "weight")
        self.mid = 0 if self.grid.signed else 2 ** (spec.bits - 1)
        # Qp of the paper: positive levels of a symmetric grid, all levels of an affine one.
        self.levels = self.grid.qmax - (self.mid if spec.symmetric else self.grid.qmin)
        # One element per tensor (FSDP2 shards no 0-dim parameters), one per channel once the
        # channel count is known; see set_weight_shape and _load_from_state_dict.
        self.scale = nn.Parameter(torch.ones(1))
        if spec.symmetric:
            self.register_buffer("zero_point", torch.full((1,), float(self.mid)))
        else:
            self.zero_point = nn.Parameter(torch.zeros(1))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirrors `initialized` once True: no device sync per forward
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reinit = False  # set by weight_changed()

    def grad_factor(self, x: torch.Tensor) -> float:
        """``g = 1/sqrt(N·Qp)``; N = elements per step (activations: per sample)."""
        n = x.numel()
        if self.role != "weight" and x.dim() > 1:
            n //= x.shape[0]
        if self.axis is not None:
            n //= x.shape[self.axis]
        return 1.0 / math.sqrt(max(n, 1) * self.levels)

    def set_qparams(self, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> None:
        """Start the learned step (and zero point) from given values."""
        scale = torch.as_tensor(scale, dtype=torch.float32)
        zero_point = torch.as_tensor(zero_point, dtype=torch.float32)
        if not bool((scale > 0).all()):
            raise ValueError(f"`scale` must be > 0, got {scale.tolist()}")
        if not bool(((zero_point >= self.grid.qmin) & (zero_point <= self.grid.qmax)).all()):
            raise ValueError(f"`zero_point` must lie in [{self.grid.qmin}, {self.grid.qmax}], "
                             f"got {zero_point.tolist()}")
        self._set(scale, zero_point.round())

    def weight_changed(self) -> None:
        """A replaced weight restarts its step from the paper's init on the next forward."""
        if self.role == "weight":
            self._reinit = True

    @torch.no_grad()
    def set_weight_shape(self, shape: torch.Size) -> None:
        """Per-channel weights: one step per output channel from the start, so the parameters
        keep their shape from ``quantize`` on (DDP and FSDP register them when wrapping)."""
        if self.role == "weight" and self.axis is not None and self.scale.numel() == 1:
            n = shape[self.axis]
            self.scale.data = self.scale.new_ones(n)
            self.zero_point.data = self.zero_point.new_full((n,), float(self.zero_point[0]))

    def _maybe_reinit(self, x: torch.Tensor) -> None:
        if self._reinit:
            self._set(*self.initial_qparams(x))
            self._reinit = False

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ fake quantization; the first batch initializes an uncalibrated quantizer."""
        self._maybe_reinit(x)
        if not self.is_ready():
            self._set(*self.initial_qparams(x))
        self._check_channels(x)
        g = self.grad_factor(x)
        scale = grad_scale(self._shaped(self.scale).abs().clamp_min(MIN_SCALE), g)
        if self.spec.symmetric:
            return lsq_fake_quantize(x, scale, self.grid.qmin - self.mid,
                                     self.grid.qmax - self.mid, self.axis)
        z = round_ste(grad_scale(self._shaped(self.zero_point), g)).clamp(self.grid.qmin, self.grid.qmax)
        return lsq_fake_quantize(x, scale, self.grid.qmin - z, self.grid.qmax - z, self.axis)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._maybe_reinit(x)
        if not self.is_ready():
            return x
        self._check_channels(x)
        scale, zero_point = self._frozen()
        return fake_quantize(x, scale, zero_point, self.grid, self.axis)

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        self._maybe_reinit(weight.detach())
        return super().quantize_weight(weight)

    def warm_up(self, x: torch.Tensor) -> None:
        """Weights follow their current value until quantization starts; activations wait."""
        if self.role == "weight":
            self._set(*self.initial_qparams(x))

    @torch.no_grad()
    def initial_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's init ``s = 2·mean|x|/sqrt(Qp)`` per step (affine: from min / max)."""
        rows = to_rows(x.detach().float(), self.axis, None)
        group = self.observer.group()  # activations under torch.distributed: every rank's batch
        if not self.spec.symmetric:
            return qparams_from_range(*self.observer.batch_range(rows), self.grid,
                                      symmetric=False)
        mean_abs = rows.abs().mean(dim=1) if group is None else \
            distributed.global_mean(rows.abs().sum(dim=1), rows.shape[1], group)
        scale = (2 * mean_abs / math.sqrt(self.levels)).clamp_min(MIN_SCALE)
        return scale, torch.full_like(scale, self.mid)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Weights: compute the paper's init for ``freeze``; activations: feed the observer."""
        self.check_observed(x)
        if self.role == "weight":
            self._pending = self.initial_qparams(x)
        else:
            self.observer.update(to_rows(x.detach().float(), self.axis, None))

    @torch.no_grad()
    def freeze(self) -> None:
        """Set scale and zero point from ``observe``: the weight's init or the observed range."""
        if self._pending is not None:
            self._set(*self._pending)
            self._pending = None
        elif self.observer.has_data():
            lo, hi = self.observer.range()
            self._set(*qparams_from_range(lo, hi, self.grid, symmetric=self.spec.symmetric))

    def reset_statistics(self) -> None:
        self.observer.reset()

    def is_ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def qparams(self) -> QParams:
        if not self.is_ready():
            raise ValueError(
                f"the {self.role} quantizer of layer {self.layer_name!r} has no step yet; "
                "run lowbit.calibrate(model, batches) (or train) before convert"
            )
        scale, zero_point = self._frozen()
        return QParams(scale.clone(), zero_point.to(torch.int32), self.grid, self.axis)

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        """A per-tensor step / zero point as the 0-dim value the math and qparams use."""
        return t.reshape(()) if self.axis is None else t

    def _frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and integer zero point (as float) that eval and deploy use."""
        scale = self._shaped(self.scale.detach()).abs().clamp_min(MIN_SCALE)
        zero_point = torch.round(self._shaped(self.zero_point.detach())).clamp(self.grid.qmin, self.grid.qmax)
        return scale, zero_point

    @torch.no_grad()
    def _set(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Write new values in place, resizing per-channel tensors (same Parameter objects)."""
        shape = (1,) if self.axis is None else (scale.numel(),)
        for name, value in (("scale", scale), ("zero_point", zero_point.float())):
            current = getattr(self, name)
            value = value.reshape(shape).to(current.device, current.dtype)
            if current.shape == value.shape:
                current.copy_(value)
            else:
                current.data = value.clone()
        self.initialized.fill_(True)
        self._ready = True

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.axis is not None and self.scale.numel() > 1 and \
                self.scale.shape[0] != x.shape[self.axis]:
            raise ValueError(
                f"the {self.role} quantizer of layer {self.layer_name!r} holds "
                f"{self.scale.shape[0]} per-channel steps, got a tensor with "
                f"{x.shape[self.axis]} channels along axis {self.axis}"
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # scale / zero_point take their shape from the tensor they quantize; resize before load.
        for name in ("scale", "zero_point"):
            key, current = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].dim() == 0:  # lowbit < 0.4: 0-dim steps
                state_dict[key] = state_dict[key].reshape(1)
            if key in state_dict and state_dict[key].shape != current.shape:
                current.data = torch.empty_like(state_dict[key], dtype=current.dtype,
                                                device=current.device)
        self._ready = False  # re-read `initialized` after the load
        super()._load_from_state_dict(state_dict, prefix, *args)
