"""Uniform fake quantization with observed ranges (method ``"ste"``).

Post-training quantization uses it with any observer; quantization-aware training (Jacob et
al.) uses the same module in ``train()`` mode, where weight ranges follow the current weights
and activation ranges follow the observer (``ema`` for moving averages). The gradient is the
straight-through estimator, zero where values saturate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from lowbit import observers
from lowbit.config import QuantSpec
from lowbit.numerics import (
    dynamic_qparams,
    fake_quantize,
    fused_fake_quantize,
    qparams_from_range,
)
from lowbit.quantizers.base import QParams, Quantizer, Role
from lowbit.registry import QUANTIZERS

if TYPE_CHECKING:
    from lowbit.observers import Observer


def to_rows(x: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """View ``x`` as ``(rows, values)``: one row per scale the quantizer will hold."""
    if axis is None:
        return x.reshape(1, -1)
    if group_size is not None:
        out, inp = x.shape[0], x.shape[1]
        blocks = x.reshape(out, inp // group_size, group_size, -1)  # (O, I/G, G, rest)
        return blocks.reshape(out * (inp // group_size), -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


@QUANTIZERS.register("ste")
class UniformQuantizer(Quantizer):
    """Observer-driven uniform quantizer: ranges in, scale and zero point out."""

    # One bit has no uniform grid around zero; binary methods own it.
    supported_bits = tuple(range(2, 9))

    observer: Observer
    scale: torch.Tensor
    zero_point: torch.Tensor
    initialized: torch.Tensor
    pinned: torch.Tensor

    def __init__(self, spec: QuantSpec, *, role: Role, axis: int | None) -> None:
        super().__init__(spec, role=role, axis=axis)
        self.observer = observers.build(spec, shared=role != "weight")
        # Shapes are set on the first freeze (they depend on the tensor); see _load_from_state_dict.
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready: bool | None = False  # `initialized` on the host; None: read it
        # Weights whose qparams a post-training algorithm chose (GPTQ, AWQ clipping): their
        # range is never re-derived from the weight, not even after load_state_dict.
        self.register_buffer("pinned", torch.tensor(False))
        self._stale = False
        # (weight, its fake-quantized value) while ``reuse_weight`` holds: see ``reusing_weights``
        self._reused: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reuse_weight = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            scale, zero_point = dynamic_qparams(x)
            return fake_quantize(x, scale, zero_point, self.grid)
        return super().forward(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """QAT: update the range from ``x`` (weights: this value; activations: the observer,
        e.g. ``ema``), then fake-quantize with torch's fused kernel and a straight-through
        gradient that is zero where values saturate."""
        self._track_training(x)
        self._stale = self.role == "weight"  # the optimizer will move the weight
        return fused_fake_quantize(x, self.scale, self.zero_point, self.grid, self.axis,
                                   self.group_size)

    def warm_up(self, x: torch.Tensor) -> None:
        self._track_training(x)  # ranges are ready when quant_delay ends

    @torch.no_grad()
    def _track_training(self, x: torch.Tensor) -> None:
        """``_track``, or, under ``distributed.lag_ranges`` once a range exists, queue this
        batch's range to be reduced and folded in at the next training step."""
        lag = self.observer.lag
        if lag is None or not self.observer.has_data():
            self._track(x)
            return
        rows = to_rows(x.detach().float(), self.axis, self.group_size)
        lag.push(rows.amin(dim=1), rows.amax(dim=1), self._fold_lagged)

    def _fold_lagged(self, lo: torch.Tensor, hi: torch.Tensor, batches: int) -> None:
        self.observer.fold_range(lo, hi, batches)
        self.freeze()

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stale and self.role == "weight":
            self._track(x)  # a trained weight: its range follows its final value
            self._stale = False
        if not self._initialized():
            return x
        reused = self.__dict__.get("_reused")  # (absent from modules pickled before it)
        if reused is not None and reused[0] is x:
            return reused[1]
        y = fake_quantize(x, self.scale, self.zero_point, self.grid, self.axis, self.group_size)
        if self.__dict__.get("reuse_weight"):
            self._reused = (x, y)
        return y

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        if self._stale:
            self._track(weight)  # as eval_forward: a trained weight's range is its final one
            self._stale = False
        return super().quantize_weight(weight)

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        if self.role == "weight":
            self.observer.reset()
        self.observer.update(to_rows(x.detach().float(), self.axis, self.group_size))
        self.freeze()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Feed ``x`` to the observer (weights: their current value only)."""
        self.check_observed(x)
        if self.role == "weight":
            self.observer.reset()
        self.observer.update(to_rows(x.detach().float(), self.axis, self.group_size))

    @torch.no_grad()
    def freeze(self) -> None:
        """Turn the observer's range into scale and zero point."""
        if not self.observer.has_data():
            return
        lo, hi = self.observer.range()
        scale, zero_point = qparams_from_range(lo, hi, self.grid, symmetric=self.spec.symmetric)
        shape = self._param_shape(scale.numel())
        self.scale = scale.reshape(shape).to(self.scale.device)
        self.zero_point = zero_point.reshape(shape).to(self.scale.device)
        self.initialized.fill_(True)
        self._ready = True

    def reset_statistics(self) -> None:
        self.observer.reset()

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> None:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=self.scale.device)
        zero_point = torch.as_tensor(zero_point, device=self.scale.device)
        if not bool((scale > 0).all()):
            raise ValueError(f"`scale` must be > 0, got {scale.tolist()}")
        if zero_point.is_floating_point() and not bool((zero_point == zero_point.round()).all()):
            raise ValueError(f"`zero_point` must hold integers, got {zero_point.tolist()}")
        if not bool(((zero_point >= self.grid.qmin) & (zero_point <= self.grid.qmax)).all()):
            raise ValueError(f"`zero_point` must lie in [{self.grid.qmin}, {self.grid.qmax}], "
                             f"got {zero_point.tolist()}")
        self.scale = scale.clone()
        self.zero_point = zero_point.to(torch.int32).clone()
        self.initialized.fill_(True)
        self._ready = True

    def pin_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """``set_qparams`` for good: the weight's codes were chosen for exactly these qparams
        (GPTQ, AWQ clipping), so no later weight change or load re-derives them."""
        self.set_qparams(scale, zero_point)
        self._stale = False
        self.pinned.fill_(True)

    def weight_changed(self) -> None:
        self._stale = self.role == "weight" and not bool(self.pinned)

    def _param_shape(self, n: int) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        if self.group_size is not None:
            rows_per_out = self._blocks_per_row
            return (n // rows_per_out, rows_per_out)
        return (n,)

    def is_ready(self) -> bool:
        return self.spec.dynamic or self._initialized()

    def _initialized(self) -> bool:
        if self._ready is None:  # after a load: one read, then no device sync per step
            self._ready = bool(self.initialized)
        return self._ready

    def qparams(self) -> QParams:
        if not self.is_ready():
            raise ValueError(
                f"the {self.role} quantizer of layer {self.layer_name!r} has no range yet; "
                "run lowbit.calibrate(model, batches) (or train) before convert"
            )
        return QParams(self.scale.detach().clone(), self.zero_point.detach().clone(),
                       self.grid, self.axis, self.group_size)

    def set_weight_shape(self, shape: torch.Size) -> None:
        """Weights only: remember how many blocks a row holds (per-group granularity)."""
        if self.group_size is not None:
            if shape[1] % self.group_size:
                raise ValueError(
                    f"layer {self.layer_name!r}: `group_size` {self.group_size} does not divide "
                    f"its {shape[1]} input channels"
                )
            self._blocks_per_row = shape[1] // self.group_size

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A saved weight range is one optimizer step behind the saved weight: re-derive it from
        # the loaded weight before eval / convert, as the trained model itself does.
        self._ready = None  # re-read the loaded `initialized`
        pinned = state_dict.get(prefix + "pinned")
        if pinned is None:  # checkpoints of lowbit < 0.3 have no `pinned`
            state_dict[prefix + "pinned"] = torch.tensor(False)
        self.pinned.fill_(bool(state_dict[prefix + "pinned"]))
        self.weight_changed()
        # scale / zero_point take their shape from the tensor they quantize; resize before load.
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]).to(self.scale.device))
        super()._load_from_state_dict(state_dict, prefix, *args)


@contextlib.contextmanager
def reusing_weights(model: torch.nn.Module) -> Iterator[None]:
    """Within: each weight quantizer fake-quantizes its weight once and reuses the result.

    For passes over calibration batches, in which nothing changes a weight or its qparams
    (weight algorithms and bias correction run between passes, never inside one): the weight
    fake quant was a fifth of MiniLM's calibration time. The value is dropped on leaving.
    """
    quantizers = [q for q in model.modules()
                  if isinstance(q, UniformQuantizer) and q.role == "weight"]
    for q in quantizers:
        q.reuse_weight = True
    try:
        yield
    finally:
        for q in quantizers:
            q.reuse_weight, q._reused = False, None
