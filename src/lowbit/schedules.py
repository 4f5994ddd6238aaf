"""Training schedules for quantization-aware training, trainer-agnostic.

``for_model(qm, epochs=E)`` returns a ``Schedule`` with two calls for the user's own loop:
``step_batch()`` after each optimizer step (binary latent weights are clipped to [-1, 1]) and
``step_epoch()`` after each epoch (SLB temperature for the next epoch, optional BatchNorm
re-estimation with the discrete weights). Quant delay and BN freezing count training steps
inside the quant layers themselves (``QuantSpec.quant_delay``, ``prepare_qat(freeze_bn=)``),
so they work with or without a schedule.

The schedule's position lives in the model (buffers ``lowbit_epoch`` and ``lowbit_step``), and every SLB quantizer holds its temperature, so ``qm.state_dict()`` is a complete
checkpoint: a schedule built on a model that loaded it continues where the saved run stopped.

SLB temperature (MindSpore Golden Stick, docs/algorithms.md §6), for the 1-based epoch ``e``
(``has_trained_epoch`` included) of ``E = epochs``: ``start = int(E·t_start_time)``,
``end = int(E·t_end_time)``; ``t = t_start_val``, times ``t_factor^(min(e, end) − start)``
once ``e > start``; from ``e ≥ end`` the training forward uses the argmax weights. For E = 100
and the defaults: t = 1 through epoch 20, 1.2 at 21, 1.2^40 ≈ 1470 from epoch 60.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn import QuantLayer
from lowbit.quantizers import Quantizer

EPOCH_BUFFER = "lowbit_epoch"
STEP_BUFFER = "lowbit_step"


class ScheduleState:
    """The schedule's position: two buffers of the model itself (``lowbit_epoch``: epochs
    completed, ``lowbit_step``: batches completed), so that ``state_dict`` carries them.
    Buffers and not a child module: a child would become a layer of an ``nn.Sequential``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def epoch(self) -> torch.Tensor:
        return self.model.get_buffer(EPOCH_BUFFER)

    @property
    def step(self) -> torch.Tensor:
        return self.model.get_buffer(STEP_BUFFER)


def attach_state(model: nn.Module) -> ScheduleState:
    """The model's schedule state, its buffers created on first use."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for name in (EPOCH_BUFFER, STEP_BUFFER):
        if not isinstance(getattr(model, name, None), torch.Tensor):
            model.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device))
    return ScheduleState(model)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class Temperature:
    """SLB's temperature schedule (Golden Stick's parameters, names and checks)."""

    epoch_size: int
    has_trained_epoch: int = 0
    t_start_val: float = 1.0
    t_start_time: float = 0.2
    t_end_time: float = 0.6
    t_factor: float = 1.2

    def __post_init__(self) -> None:
        if _integer("epoch_size", self.epoch_size) <= 0:
            raise ValueError(f"`epoch_size` must be > 0, got {self.epoch_size}")
        if _integer("has_trained_epoch", self.has_trained_epoch) < 0:
            raise ValueError(f"`has_trained_epoch` must be >= 0, got {self.has_trained_epoch}")
        for name in ("t_start_val", "t_factor"):
            if _number(name, getattr(self, name)) <= 0.0:
                raise ValueError(f"`{name}` must be > 0.0, got {getattr(self, name)}")
        for name in ("t_start_time", "t_end_time"):
            if not 0.0 <= _number(name, getattr(self, name)) <= 1.0:
                raise ValueError(f"`{name}` must be in [0.0, 1.0], got {getattr(self, name)}")
        if self.epoch_size <= self.has_trained_epoch:
            raise ValueError(f"`epoch_size` ({self.epoch_size}) must be greater than "
                             f"`has_trained_epoch` ({self.has_trained_epoch})")
        if self.t_end_time < self.t_start_time:
            raise ValueError(f"`t_end_time` ({self.t_end_time}) must be >= `t_start_time` "
                             f"({self.t_start_time})")

    @property
    def start_epoch(self) -> int:
        return int(self.epoch_size * self.t_start_time)

    @property
    def end_epoch(self) -> int:
        return int(self.epoch_size * self.t_end_time)

    def at(self, epoch: int) -> float:
        """Temperature during the 1-based ``epoch`` (``has_trained_epoch`` included)."""
        t = float(self.t_start_val)
        if epoch > self.start_epoch:
            t *= float(self.t_factor) ** (min(epoch, self.end_epoch) - self.start_epoch)
        return t

    def hard(self, epoch: int) -> bool:
        """From ``end_epoch`` on, SLB trains with its argmax weights: the search is over."""
        return epoch >= self.end_epoch


Forward = Callable[[nn.Module, Any], Any]


class Schedule:
    """Per-batch and per-epoch steps of quantization-aware training (see module docstring).

    ``bn_calibration``: an iterable of batches; after each epoch past the temperature's start
    every BatchNorm's running statistics are re-estimated over it with the discrete (argmax)
    weights (Golden Stick ``enable_bn_calibration``), passing batches as ``forward(model,
    batch)`` (default: as ``lowbit.calibrate`` does). ``bn_calibration_batches`` caps how many
    are used. ``clip_binary_weights`` clips binary latent weights after each step.
    """

    def __init__(
        self,
        model: nn.Module,
        temperature: Temperature,
        *,
        bn_calibration: Iterable[Any] | None = None,
        bn_calibration_batches: int | None = None,
        forward: Forward | None = None,
        clip_binary_weights: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, QuantLayer) for m in model.modules()):
            raise ValueError("`model` has no lowbit quant layers; call lowbit.prepare_qat first")
        if bn_calibration is not None and (isinstance(bn_calibration, (torch.Tensor, str))
                                           or not isinstance(bn_calibration, Iterable)):
            raise TypeError("`bn_calibration` must be an iterable of batches or None, got "
                            f"{type(bn_calibration).__name__}")
        if bn_calibration_batches is not None and (
                _integer("bn_calibration_batches", bn_calibration_batches) < 1):
            raise ValueError(f"`bn_calibration_batches` must be >= 1, got {bn_calibration_batches}")
        if forward is not None and not callable(forward):
            raise TypeError(f"`forward` must be callable, got {type(forward).__name__}")
        if not isinstance(clip_binary_weights, bool):
            raise TypeError(f"`clip_binary_weights` must be a bool, got {clip_binary_weights!r}")
        self.model = model
        self.temperature = temperature
        self.bn_calibration = bn_calibration
        self.bn_calibration_batches = bn_calibration_batches
        self.forward = forward
        self.clip_binary_weights = clip_binary_weights
        self.state = attach_state(model)
        self._weights: list[tuple[Any, Quantizer]] = [
            (m, q) for m in model.modules() if isinstance(m, QuantLayer)
            for q in [getattr(m, "weight_quant", None)] if q is not None]
        self.apply()

    @property
    def epoch(self) -> int:
        """The 1-based epoch being trained (``has_trained_epoch`` included)."""
        return self.temperature.has_trained_epoch + int(self.state.epoch) + 1

    @property
    def step(self) -> int:
        """Batches completed so far."""
        return int(self.state.step)

    def current_temperature(self) -> float:
        return self.temperature.at(self.epoch)

    def apply(self) -> None:
        """Set every SLB quantizer's temperature for the current epoch."""
        from lowbit.quantizers.slb import SLBQuantizer

        t, hard = self.temperature.at(self.epoch), self.temperature.hard(self.epoch)
        for q in self.model.modules():
            if isinstance(q, SLBQuantizer):
                q.set_temperature(t, hard)

    def step_batch(self) -> None:
        """Call after each optimizer step."""
        self.state.step.add_(1)
        if self.clip_binary_weights:
            for layer, quantizer in self._weights:
                quantizer.constrain_(layer.weight)

    def step_epoch(self) -> None:
        """Call after each epoch: BN re-estimation (if asked), then the next temperature."""
        if self.bn_calibration is not None and self.epoch > self.temperature.start_epoch:
            recalibrate_bn(self.model, self.bn_calibration, self.forward,
                           self.bn_calibration_batches)
        self.state.epoch.add_(1)
        self.apply()


def for_model(model: nn.Module, epochs: int, **options: Any) -> Schedule:
    """The schedule of a ``prepare_qat`` model trained for ``epochs`` epochs in all.

    Options: the ``Temperature`` fields (``has_trained_epoch``, ``t_start_val``,
    ``t_start_time``, ``t_end_time``, ``t_factor``) and the ``Schedule`` keywords
    (``bn_calibration``, ``bn_calibration_batches``, ``forward``, ``clip_binary_weights``).
    """
    temperature_keys = {"has_trained_epoch", "t_start_val", "t_start_time", "t_end_time",
                        "t_factor"}
    schedule_keys = {"bn_calibration", "bn_calibration_batches", "forward", "clip_binary_weights"}
    unknown = sorted(set(options) - temperature_keys - schedule_keys)
    if unknown:
        raise TypeError(f"for_model() got unknown option(s) {unknown}; allowed: "
                        f"{sorted(temperature_keys | schedule_keys)}")
    temperature = Temperature(epoch_size=epochs,
                              **{k: v for k, v in options.items() if k in temperature_keys})
    return Schedule(model, temperature, **{k: v for k, v in options.items() if k in schedule_keys})


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Any], forward: Forward | None = None,
                   max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics with the quantized (eval) weights.

    Running statistics are reset and averaged over the batches (``momentum=None``) with the
    BatchNorms in training mode and every quantizer in eval mode (SLB: argmax weights; input
    ranges untouched); every flag, momentum and step counter is restored afterwards, BatchNorms
    back to using running statistics. A BatchNorm folded into a scaled grid (ste, lsq) is
    measured on the layer's float weight, since the weight it quantizes, ``W·γ/σ``, depends on
    the statistics being measured; observer-driven weight ranges then follow the new fold at the
    next eval or convert (learned steps are kept). Returns the number of batches used.
    """
    from lowbit.calibrate import default_forward

    forward = forward or default_forward
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    flags = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    layers: list[Any] = [m for m in model.modules() if isinstance(m, QuantLayer)]
    counters = {m: m.bn_steps.clone() for m in layers if m.bn is not None}
    saved = {bn: {k: v.clone() for k, v in nn.Module.state_dict(bn).items()} for bn in norms}
    count = 0
    folded = [m for m in layers if m.bn is not None]
    try:
        model.train()
        for q in model.modules():
            if isinstance(q, Quantizer):
                q.eval()
        for m in folded:
            m._reestimating_bn = True
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
        for batch in batches:
            forward(model, batch)
            count += 1
            if max_batches is not None and count >= max_batches:
                break
    except BaseException:
        for bn, state in saved.items():  # a failed re-estimation leaves the model as it was
            nn.Module.load_state_dict(bn, state)
        raise
    finally:
        for m, flag in flags.items():
            m.training = flag
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, steps in counters.items():
            m.bn_steps.copy_(steps)
            m._bn_steps_host = None  # re-read on the next training step
        for m in folded:
            m._reestimating_bn = False
            w_q = m.weight_quant
            if count and w_q is not None and w_q.folds_bn and not any(True for _ in w_q.parameters()):
                m.refresh_weight_range()  # W·γ/σ changed with σ
    if count == 0:
        for bn, state in saved.items():
            nn.Module.load_state_dict(bn, state)
        raise ValueError("`batches` is empty: BatchNorm re-estimation needs at least one batch")
    return count
