"""The one quantizer interface every algorithm implements.

A quantizer is an ``nn.Module`` that fake-quantizes one tensor: ``forward(x)`` returns a float
tensor whose values lie on the integer grid of its ``QuantSpec``. Its state lives in buffers and
parameters, so ``state_dict`` round-trips; ``qparams()`` hands the frozen scale and zero point to
``convert`` and the exporter.

Modes, the same for every algorithm (``forward`` dispatches; subclasses fill the parts):
- ``observing`` (set by ``lowbit.calibrate``): record statistics, pass values through unchanged;
- ``training`` (``module.train()``): ``train_forward`` updates ranges / learned parameters and
  fake-quantizes with a gradient (quantization-aware training). For the first
  ``spec.quant_delay`` training forwards the value passes through and ``warm_up`` may record
  statistics;
- otherwise (eval): ``eval_forward`` fake-quantizes with frozen parameters, giving exactly what
  the deploy model computes.

Adding an algorithm is one file: subclass ``Quantizer``, fill ``train_forward``,
``eval_forward`` and ``qparams`` (or ``quantize_weight`` for value sets that are not a scaled
integer grid), and register it with ``@QUANTIZERS.register("name")``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lowbit.config import QuantSpec
from lowbit.numerics import IntRange, all_finite, quantize
from lowbit.quantizers import scope
from lowbit.registry import QUANTIZERS

Role = Literal["weight", "input", "output"]


class ConstantQuantizerWarning(UserWarning):
    """An activation quantizer maps every value of a non-constant tensor to one code, so the
    layer behind it sees a constant (e.g. binary codes after a ReLU: all +1)."""


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
            "odd": self.grid.odd,
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

    Class attributes describe the algorithm to the config and the layers: ``supported_bits``,
    ``roles`` (``"weight"`` and/or ``"activation"``), ``options`` (the QuantSpec fields only
    this algorithm reads) and ``folds_bn``: whether a following BatchNorm is folded into the
    weight *before* quantization while training (scaled grids: ste, lsq), or stays a BatchNorm
    after the layer and is folded into the per-channel dequantization scale at convert
    (fixed value sets that carry no scale of their own: dorefa, binary, slb).
    """

    supported_bits: tuple[int, ...] = tuple(range(1, 9))
    roles: tuple[str, ...] = ("weight", "activation")
    options: tuple[str, ...] = ()
    folds_bn: bool = True
    odd_grid: bool = False  # codes are the odd integers of IntRange(odd=True)
    # Codes change exactly at 0 (sign). As a layer's output: a ReLU before it would make it
    # constant, so it replaces a fused ReLU (BinaryNet's sign(BN(conv)); lowbit.quantize drops
    # it), and the layer's int32-grid bias sits half a step off the grid, so that no integer
    # sum lands on the threshold where float accumulation order would decide the sign.
    splits_at_zero: bool = False

    train_steps: torch.Tensor

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__()
        self.spec = spec
        self.role = role
        self.axis = axis
        self.grid = IntRange(spec.bits, spec.is_signed or self.odd_grid, spec.narrow_range,
                             odd=self.odd_grid)
        self.layer_name = ""
        self.observing = False
        # Constant-output check (ConstantQuantizerWarning): the raw range seen while observing,
        # the mode ("train"/"eval") of the last data check, and whether it already warned.
        self._seen_range: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_checked: str | None = None
        self._warned_constant = False
        self._train_steps_host: int | None = None  # `train_steps` mirrored on the host
        if spec.quant_delay:
            # Training forwards seen (a buffer: a resumed run continues the count).
            self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))

    @property
    def group_size(self) -> int | None:
        return self.spec.group_size if self.spec.granularity == "per_group" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.observing or self.training):
            return self._forward(x)  # eval changes no state: a second reader just recomputes
        # A tensor this quantizer already handled in this model call (a second reader of a
        # shared quantizer): the same result, observed and counted once (quantizers/scope.py).
        y = scope.recall(self, x)
        if y is None:
            y = self._forward(x)
            scope.remember(self, x, y)
        return y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            self._note_range(x)
            return x
        if self.training:
            if self.spec.quant_delay:
                self.train_steps += 1
                # Counted on the host too (read once after a load): no device sync per step.
                seen = self._train_steps_host
                seen = int(self.train_steps) if seen is None else seen + 1
                self._train_steps_host = seen
                if seen <= self.spec.quant_delay:
                    self.warm_up(x)
                    return x
            y = self.train_forward(x)
            if self._last_checked != "train":  # the first quantized batch of a training phase
                self._check_constant(x, y, "train")
            return y
        y = self.eval_forward(x)
        if self._last_checked != "eval":  # the first batch after training or calibration
            self._check_constant(x, y, "eval")
        return y

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._train_steps_host = None  # re-read the loaded step count
        super()._load_from_state_dict(state_dict, prefix, *args)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Fake-quantize with a gradient, updating ranges / learned state."""
        raise NotImplementedError

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Fake-quantize with frozen state: exactly what the deploy model computes."""
        raise NotImplementedError

    def qparams(self) -> QParams:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """Integer codes (as a float tensor of integers) and qparams of a weight, for convert.

        ``dequantize(codes, qparams)`` equals ``eval_forward(weight)``. The default quantizes
        with ``qparams()``; value sets that are not a scaled grid of the weight override it.
        """
        qp = self.qparams()
        return quantize(weight.detach().float(), qp.scale, qp.zero_point, qp.grid, qp.axis,
                        qp.group_size), qp

    def set_qparams(self, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> None:
        """Fix this quantizer's scale and zero point from outside (e.g. MindSpore's export
        ``mean``/``std_dev`` for a network input). Training may still move them."""
        raise NotImplementedError(f"method {self.spec.method!r} does not take fixed qparams")

    def weight_changed(self) -> None:
        """The layer's weight was replaced outside training (loaded, edited): re-derive
        whatever follows it before the next eval forward or convert."""

    def loss(self) -> torch.Tensor | None:
        """This quantizer's term of ``lowbit.quant_loss`` (e.g. PACT's alpha²), or None."""
        return None

    @torch.no_grad()
    def constrain_(self, weight: torch.Tensor) -> None:
        """Weights only: keep the latent float weight valid after an optimizer step, in place
        (called by ``lowbit.schedules``; binary weights clip to [-1, 1])."""

    # Hooks with do-nothing defaults, so callers never probe with hasattr. Algorithms whose
    # parameters are learned rather than observed keep them as they are.

    def warm_up(self, x: torch.Tensor) -> None:
        """Training forward during ``quant_delay``: may record statistics, returns nothing."""

    def set_weight_shape(self, shape: torch.Size) -> None:
        """Weights only: told the weight's shape once, before any data."""

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x``."""

    def check_observed(self, x: torch.Tensor) -> None:
        """Refuse a calibration tensor holding NaN or inf, naming the layer (one sum, see
        ``numerics.all_finite``): every observer would take it for a range."""
        if not all_finite(x):
            where = f"layer {self.layer_name!r}" if self.layer_name else "a layer"
            raise ValueError(f"the {self.role} of {where} holds NaN or Inf values; "
                             "check the calibration data and the model's float output")

    def freeze(self) -> None:
        """Turn recorded statistics into quantization parameters."""

    def reset_statistics(self) -> None:
        """Forget recorded statistics (a new calibration starts)."""

    def is_ready(self) -> bool:
        """True once the quantizer has parameters to quantize with (calibrated or trained)."""
        return True

    # ------------------------------------------------------------------ constant quantizers

    def constant_fix(self, lo: float, hi: float) -> str:
        """How to fix a quantizer that maps inputs in ``[lo, hi]`` to one code (for the
        warning); algorithms with a better-known cause override it."""
        if not self.grid.signed and hi <= 0:
            return ("a grid that starts at 0 cannot hold these inputs, all <= 0: use an affine "
                    "or signed grid (QuantSpec(symmetric=False) with method 'ste' or 'lsq', or "
                    "signed=True), or quantize a tensor whose values are positive")
        return ("its range is narrower than one step of the grid: calibrate with representative "
                "data (every layer reached), or keep this tensor in float")

    @torch.no_grad()
    def _note_range(self, x: torch.Tensor) -> None:
        """Observing: keep the raw min / max on the device (no host sync per batch)."""
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if self._seen_range is not None:
            lo = torch.minimum(lo, self._seen_range[0].to(lo.device))
            hi = torch.maximum(hi, self._seen_range[1].to(hi.device))
        self._seen_range = (lo, hi)

    @torch.no_grad()
    def check_calibrated_range(self) -> None:
        """After calibration froze the ranges: warn if the whole observed range ``[lo, hi]``
        maps to one code. Quantization is monotone, so the two ends decide it exactly (per
        tensor); per-channel quantizers are checked on the next eval batch instead."""
        seen, self._seen_range = self._seen_range, None
        self._last_checked = None
        if seen is None or self.axis is not None or not self.is_ready():
            return
        probe = torch.stack(seen)  # (2,): the smallest and largest value seen
        self._check_constant(probe, self.eval_forward(probe), "eval")

    @torch.no_grad()
    def _check_constant(self, x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
        """Warn once if ``y`` (the quantized ``x``) holds one value where ``x`` holds several.
        One host sync, on the first batch of each train/eval phase only."""
        self._last_checked = mode
        if (self._warned_constant or self.role == "weight" or self.spec.dynamic
                or x.numel() < 2 or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return
        x, y = x.detach(), y.detach()
        y_lo, y_hi, lo, hi = torch.stack([y.amin(), y.amax(), x.amin(), x.amax()]).float().tolist()
        if y_lo != y_hi or not lo < hi:
            return
        self._warned_constant = True
        where = f"layer {self.layer_name!r}" if self.layer_name else "a layer"
        warnings.warn(
            f"the {self.role} quantizer of {where} (method {self.spec.method!r}, "
            f"{'int' if self.grid.signed else 'uint'}{self.spec.bits}) maps every value to one "
            f"code: its inputs lie in [{lo:.4g}, {hi:.4g}] and all quantize to {y_lo:.4g}, so "
            f"the layer sees a constant. Fix: {self.constant_fix(lo, hi)}",
            ConstantQuantizerWarning, stacklevel=3)

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
        if s.quant_delay:
            parts.append(f"quant_delay={s.quant_delay}")
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
