"""MindSpore Golden Stick's ``SlbQuantAwareTraining``, translated to PyTorch over lowbit.

Same names, config keys, defaults and errors as ``mindspore_gs.quantization.SlbQuantAwareTraining``
(docs/algorithms.md §6); every step is a native lowbit call:

- ``apply(network)`` → ``lowbit.prepare_qat`` with one rule for ``Conv2d`` (Golden Stick quantizes
  Conv2d only): ``QuantSpec(bits=b, method="slb")`` weights and, with ``enable_act_quant``, 8-bit
  unsigned ``ste``/``ema`` input quantizers;
- ``callbacks(model, dataset)`` → one ``lowbit.schedules.Schedule`` (its ``Temperature`` does the
  validation and the formula) shared by trainer-agnostic callback objects;
- ``convert(net_opt, ckpt_path)`` → ``load_state_dict`` of the checkpoint, then ``lowbit.convert``.

Callbacks: call ``on_epoch_begin(epoch)`` before and ``on_epoch_end(epoch)`` after each epoch of
your loop, with ``epoch`` counted from 1 as MindSpore's ``cur_epoch_num`` (a 0-based loop passes
``epoch + 1``); ``has_trained_epoch`` is added inside, as Golden Stick does::

    for epoch in range(1, epochs + 1):
        for cb in cbs: cb.on_epoch_begin(epoch)
        ...  # train one epoch
        for cb in cbs: cb.on_epoch_end(epoch)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.calibrate import default_forward
from lowbit.config import LayerRule, QuantConfig, QuantSpec
from lowbit.schedules import Schedule, Temperature

__all__ = ["BNCalibrationCallback", "QuantDtype", "SlbCallback", "SlbQuantAwareTraining",
           "TemperatureScheduler"]

Forward = Callable[[nn.Module, Any], Any]


class QuantDtype(Enum):
    """Golden Stick's ``QuantDtype`` (the members SLB accepts); ``num_bits`` is the bit width."""

    INT1 = "INT1"
    INT2 = "INT2"
    INT4 = "INT4"
    INT8 = "INT8"

    @property
    def num_bits(self) -> int:
        return int(self.value[3:])


WEIGHT_DTYPES = (QuantDtype.INT1, QuantDtype.INT2, QuantDtype.INT4)
ACT_DTYPES = (QuantDtype.INT8,)
CONFIG_KEYS = ("quant_dtype", "enable_act_quant", "enable_bn_calibration", "epoch_size",
               "has_trained_epoch", "t_start_val", "t_start_time", "t_end_time", "t_factor")


def _check_type(name: str, value: Any, kind: type) -> None:
    """Golden Stick's type checks: exact kinds, and bool is not an int (nor a float)."""
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        article = "an" if kind is int else "a"
        raise TypeError(f"`{name}` must be {article} {kind.__name__}, got "
                        f"{type(value).__name__} {value!r}")


def _check_dtype(name: str, value: Any, allowed: tuple[QuantDtype, ...]) -> QuantDtype:
    if not isinstance(value, QuantDtype):
        raise TypeError(f"`{name}` must be a QuantDtype, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {[str(d) for d in allowed]}, got {value}")
    return value


class SlbQuantAwareTraining:
    """SLB quantization-aware training (Golden Stick's class; ``config`` keys as its setters).

    ``config``: a dict with any of ``quant_dtype`` (a QuantDtype, copied to both, or a
    list/tuple ``(activation, weight)``; default ``(INT8, INT1)``), ``enable_act_quant``
    (False), ``enable_bn_calibration`` (False), ``epoch_size``, ``has_trained_epoch`` (both
    unset: required by ``callbacks``), ``t_start_val`` (1.0), ``t_start_time`` (0.2),
    ``t_end_time`` (0.6), ``t_factor`` (1.2). Each key is passed to its setter.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.weight_quant_dtype = QuantDtype.INT1
        self.act_quant_dtype = QuantDtype.INT8
        self.enable_act_quant = False
        self.enable_bn_calibration = False
        self.epoch_size: int | None = None
        self.has_trained_epoch: int | None = None
        self.t_start_val = 1.0
        self.t_start_time = 0.2
        self.t_end_time = 0.6
        self.t_factor = 1.2
        if config is None:
            return
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict or None, got {type(config).__name__}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown `config` key(s) {unknown}; allowed: {list(CONFIG_KEYS)}")
        for key, value in config.items():
            if key == "quant_dtype":
                self._set_quant_dtype(value)
            else:
                getattr(self, f"set_{key}")(value)

    # ------------------------------------------------------------------------------ setters

    def _set_quant_dtype(self, quant_dtype: Any) -> None:
        """One QuantDtype is copied to both (so only a pair can pass); a pair is (act, weight)."""
        if isinstance(quant_dtype, QuantDtype):
            pair: list[Any] | tuple[Any, ...] = [quant_dtype, quant_dtype]
        elif isinstance(quant_dtype, (list, tuple)):
            pair = quant_dtype
        else:
            raise TypeError("`quant_dtype` must be a QuantDtype or a list/tuple of two, got "
                            f"{type(quant_dtype).__name__} {quant_dtype!r}")
        for item in pair:
            if not isinstance(item, QuantDtype):
                raise TypeError("`quant_dtype` must hold QuantDtype elements, got "
                                f"{type(item).__name__} {item!r}")
        if len(pair) != 2:
            raise ValueError("`quant_dtype` must hold exactly two QuantDtype (activation, "
                             f"weight), got {len(pair)}: {list(pair)}")
        self.set_act_quant_dtype(pair[0])
        self.set_weight_quant_dtype(pair[1])

    def set_weight_quant_dtype(self, weight_quant_dtype: QuantDtype = QuantDtype.INT1) -> None:
        """Weight bits: INT1, INT2 or INT4 (``QuantSpec(bits=..., method="slb")``)."""
        self.weight_quant_dtype = _check_dtype("weight_quant_dtype", weight_quant_dtype,
                                               WEIGHT_DTYPES)

    def set_act_quant_dtype(self, act_quant_dtype: QuantDtype = QuantDtype.INT8) -> None:
        """Activation bits: INT8 only."""
        self.act_quant_dtype = _check_dtype("act_quant_dtype", act_quant_dtype, ACT_DTYPES)

    def set_enable_act_quant(self, enable_act_quant: bool = False) -> None:
        """Quantize the inputs of the quantized Conv2d layers to 8 bits while training."""
        _check_type("enable_act_quant", enable_act_quant, bool)
        self.enable_act_quant = enable_act_quant

    def set_enable_bn_calibration(self, enable_bn_calibration: bool = False) -> None:
        """Re-estimate BatchNorm statistics with the argmax weights after each epoch past
        ``t_start_time`` (``lowbit.schedules.recalibrate_bn`` through the schedule)."""
        _check_type("enable_bn_calibration", enable_bn_calibration, bool)
        self.enable_bn_calibration = enable_bn_calibration

    def set_epoch_size(self, epoch_size: int) -> None:
        """Total number of training epochs (``Temperature.epoch_size``)."""
        _check_type("epoch_size", epoch_size, int)
        if epoch_size <= 0:
            raise ValueError(f"`epoch_size` must be > 0, got {epoch_size}")
        self.epoch_size = epoch_size

    def set_has_trained_epoch(self, has_trained_epoch: int) -> None:
        """Epochs already trained (``Temperature.has_trained_epoch``)."""
        _check_type("has_trained_epoch", has_trained_epoch, int)
        if has_trained_epoch < 0:
            raise ValueError(f"`has_trained_epoch` must be >= 0, got {has_trained_epoch}")
        self.has_trained_epoch = has_trained_epoch

    def set_t_start_val(self, t_start_val: float = 1.0) -> None:
        """Initial temperature."""
        _check_type("t_start_val", t_start_val, float)
        if t_start_val <= 0.0:
            raise ValueError(f"`t_start_val` must be > 0.0, got {t_start_val}")
        self.t_start_val = t_start_val

    def set_t_start_time(self, t_start_time: float = 0.2) -> None:
        """Share of ``epoch_size`` after which the temperature starts to grow."""
        self.t_start_time = self._time("t_start_time", t_start_time)

    def set_t_end_time(self, t_end_time: float = 0.6) -> None:
        """Share of ``epoch_size`` at which the temperature stops growing (search over)."""
        self.t_end_time = self._time("t_end_time", t_end_time)

    def set_t_factor(self, t_factor: float = 1.2) -> None:
        """Factor the temperature is multiplied by per epoch between start and end."""
        _check_type("t_factor", t_factor, float)
        if t_factor <= 0.0:
            raise ValueError(f"`t_factor` must be > 0.0, got {t_factor}")
        self.t_factor = t_factor

    @staticmethod
    def _time(name: str, value: Any) -> float:
        _check_type(name, value, float)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be in [0.0, 1.0], got {value}")
        return float(value)

    # -------------------------------------------------------------------------------- verbs

    def quant_config(self) -> QuantConfig:
        """The native config ``apply`` uses: one rule for every ``Conv2d``."""
        weight = QuantSpec(bits=self.weight_quant_dtype.num_bits, method="slb")
        act = QuantSpec(bits=self.act_quant_dtype.num_bits, symmetric=False, observer="ema",
                        method="ste") if self.enable_act_quant else None
        return QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=weight, input=act)])

    def apply(self, network: nn.Module) -> nn.Module:
        """A QAT copy of ``network`` (``lowbit.prepare_qat``): SLB weights on every Conv2d, its
        BatchNorm kept inside the quant layer; other layers stay float (lowbit warns).

        Golden Stick's four steps are prepare_qat's: find Conv→BN chains, resolve the rule per
        layer, share one input quantizer per tensor, swap layers for Quant wrappers."""
        if not isinstance(network, nn.Module):
            raise TypeError("`network` must be a torch.nn.Module (Golden Stick: Cell), got "
                            f"{type(network).__name__}")
        return lowbit.prepare_qat(network, self.quant_config())

    def callbacks(self, model: nn.Module, dataset: Iterable[Any], *,
                  forward: Forward | None = None) -> list[SlbCallback]:
        """``[TemperatureScheduler]`` (+ ``BNCalibrationCallback`` with enable_bn_calibration).

        ``model``: the network ``apply`` returned (Golden Stick: a ``Model`` around it);
        ``dataset``: a re-iterable of batches, used for BN calibration. A batch is a tensor or a
        tuple/list whose first element is the network's input (Golden Stick's data column);
        ``forward(model, batch)`` (a lowbit extension) handles other layouts.
        """
        if self.epoch_size is None:
            raise RuntimeError("`epoch_size` is not initialised: call set_epoch_size() or pass "
                               "config={'epoch_size': ...}")
        if self.has_trained_epoch is None:
            raise RuntimeError("`has_trained_epoch` is not initialised: call "
                               "set_has_trained_epoch() or pass config={'has_trained_epoch': ...}")
        temperature = Temperature(  # checks epoch_size > has_trained_epoch, t_end >= t_start
            epoch_size=self.epoch_size, has_trained_epoch=self.has_trained_epoch,
            t_start_val=self.t_start_val, t_start_time=self.t_start_time,
            t_end_time=self.t_end_time, t_factor=self.t_factor)
        if not isinstance(model, nn.Module):
            raise TypeError("`model` must be a torch.nn.Module (the network apply() returned; "
                            f"Golden Stick: mindspore.train.Model), got {type(model).__name__}")
        _check_dataset(dataset)
        if forward is not None and not callable(forward):
            raise TypeError(f"`forward` must be callable or None, got {type(forward).__name__}")
        calibration = dataset if self.enable_bn_calibration else None
        schedule = Schedule(model, temperature, bn_calibration=calibration,
                            forward=forward or _first_column, clip_binary_weights=False)
        cbs: list[SlbCallback] = [TemperatureScheduler(schedule)]
        if self.enable_bn_calibration:
            cbs.append(BNCalibrationCallback(schedule))
        return cbs

    def convert(self, net_opt: nn.Module, ckpt_path: str = "") -> nn.Module:
        """The deploy model (``lowbit.convert``), after loading ``ckpt_path`` into ``net_opt``
        if given (a state dict: ``torch.save`` file or ``.safetensors``)."""
        if not isinstance(net_opt, nn.Module):
            raise TypeError("`net_opt` must be a torch.nn.Module (Golden Stick: Cell), got "
                            f"{type(net_opt).__name__}")
        if not isinstance(ckpt_path, str):
            raise TypeError(f"`ckpt_path` must be a str, got {type(ckpt_path).__name__}")
        if ckpt_path:
            if not os.path.isfile(ckpt_path):
                raise ValueError(f"`ckpt_path` {ckpt_path!r} is not a file")
            _load_checkpoint(net_opt, ckpt_path)
        return lowbit.convert(net_opt)


def _check_dataset(dataset: Any) -> None:
    if isinstance(dataset, (torch.Tensor, str, bytes)) or not isinstance(dataset, Iterable):
        raise TypeError("`dataset` must be an iterable of batches (a DataLoader, a list; Golden "
                        f"Stick: mindspore.dataset.Dataset), got {type(dataset).__name__}")
    if isinstance(dataset, Iterator):  # not iter(): a DataLoader would start its workers
        raise TypeError(f"`dataset` must be re-iterable (a DataLoader, a list), got the one-shot "
                        f"{type(dataset).__name__}: it would be used up after one epoch")


def _first_column(model: nn.Module, batch: Any) -> Any:
    """Golden Stick feeds a dataset's first column to the network: ``(x, label)`` → ``x``."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return default_forward(model, batch)


def _load_checkpoint(net_opt: nn.Module, path: str) -> None:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
        net_opt.load_state_dict(state)
    except Exception as err:
        raise RuntimeError(f"failed to load `ckpt_path` {path!r} into `net_opt`: {err}") from err


class SlbCallback:
    """A trainer-agnostic callback sharing one ``lowbit.schedules.Schedule`` (``schedule``)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def on_epoch_begin(self, epoch: int) -> None:
        """Before epoch ``epoch`` (from 1, as MindSpore's ``cur_epoch_num``)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After epoch ``epoch`` (from 1, as MindSpore's ``cur_epoch_num``)."""

    def _seek(self, epoch: Any) -> None:
        """Move the schedule (the model's ``lowbit_epoch`` buffer) to 1-based ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"`epoch` must be an int, got {type(epoch).__name__} {epoch!r}")
        if epoch < 1:
            raise ValueError(f"`epoch` counts from 1 (MindSpore's cur_epoch_num), got {epoch}; "
                             "a 0-based loop passes epoch + 1")
        self.schedule.state.epoch.fill_(epoch - 1)


class TemperatureScheduler(SlbCallback):
    """Sets every SLB quantizer's temperature (and the argmax switch) at each epoch's start."""

    def on_epoch_begin(self, epoch: int) -> None:
        self._seek(epoch)
        self.schedule.apply()


class BNCalibrationCallback(SlbCallback):
    """After each epoch past ``t_start_time``, re-estimates BatchNorm statistics over the
    dataset with the argmax weights (``Schedule.step_epoch``)."""

    def on_epoch_end(self, epoch: int) -> None:
        self._seek(epoch)
        self.schedule.step_epoch()
