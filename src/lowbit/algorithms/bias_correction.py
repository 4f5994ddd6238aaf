"""Bias correction: remove the mean output error that weight rounding adds (Nagel et al. 2019,
DFQ §4.2; docs/algorithms.md §14).

With ``ε = W̃ − W`` (quantized minus float weight) a layer's output shifts on average by
``E[W̃x] − E[Wx] = ε·E[x]`` per output channel; subtracting that from the bias removes it.

- ``"empirical"``: measured on the calibration batches: per output channel, the mean over
  samples (and positions) of ``op(x, W̃) − op(x, W)``, with ``x`` what the layer reads in the
  quantized model (activations in float, upstream weights quantized). Exact for padded convs.
- ``"analytical"``: data-free, from ``E[x]`` per input channel that ``lowbit.equalize``
  derived from the BatchNorm statistics of the producing layer (after a ReLU, the mean of a
  clipped normal: ``μ·Φ(μ/σ) + σ·φ(μ/σ)``). Zero padding is ignored (DFQ does the same).

Runs inside ``lowbit.calibrate`` after the weight algorithms and before activation ranges are
taken, so ranges see the corrected biases. A layer whose weight is already its own dequantized
codes (GPTQ, AdaRound) has ``ε = 0`` and is left as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.algorithms.adaround import layer_op
from lowbit.algorithms.equalize import INPUT_MEANS_ATTR, _is_depthwise
from lowbit.nn import QuantLayer

MODES = ("empirical", "analytical")


def check_mode(mode: object) -> None:
    """``bias_correction`` must be one of ``MODES`` or ``None``."""
    if mode is not None and not isinstance(mode, str):
        raise TypeError(f"`bias_correction` must be a str or None, got {type(mode).__name__} "
                        f"{mode!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"`bias_correction` must be one of {list(MODES)} or None, got {mode!r}")


def _targets(model: nn.Module) -> dict[str, Any]:
    """Quant layers with a quantized weight (and no BatchNorm kept for training)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLayer) and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and m.weight_quant is not None and m.bn is None}


def _channel_dim(layer: Any) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _weight_error(layer: Any) -> torch.Tensor:
    """``ε = W̃ − W`` (eval fake quant of the weight, as the deploy model holds it)."""
    w = layer.weight.detach()
    return (layer.weight_quant(w) - w).float()


def _shift(layer: Any, delta: torch.Tensor) -> None:
    """``b ← b − δ`` (a missing bias is created)."""
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        layer.bias.sub_(delta.to(layer.bias))


def empirical(model: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Measure ``E[op(x, W̃) − op(x, W)]`` per output channel over ``run()`` (which feeds the
    calibration batches) and subtract it from each bias; returns the corrected layers."""
    targets = _targets(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, layer in targets.items():
        error = _weight_error(layer)
        op = layer_op(layer)

        def record(module: nn.Module, args: tuple[Any, ...], name: str = name,
                   error: torch.Tensor = error, op: Any = op) -> None:
            x = module._smooth(args[0]).float()  # type: ignore[operator]
            d = op(x, error) - op(x, torch.zeros_like(error))  # ε·x (bias cancels)
            d = d.movedim(_channel_dim(module), -1).reshape(-1, d.shape[_channel_dim(module)])
            sums[name] = sums.get(name, 0) + d.double().sum(dim=0)
            counts[name] = counts.get(name, 0) + d.shape[0]
        hooks.append(layer.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    group = distributed.active_group()
    if group is not None:  # the mean over every rank's batches
        for name, layer in targets.items():
            mine = sums.get(name)
            if mine is None:
                mine = torch.zeros(layer.weight.shape[0], dtype=torch.float64,
                                   device=layer.weight.device)
            n = torch.full((), float(counts.get(name, 0)), dtype=torch.float64,
                           device=mine.device)
            total, n = distributed.reduce_sum([mine, n], group)
            if int(n):
                sums[name], counts[name] = total, int(n)
    for name, total in sums.items():
        _shift(targets[name], (total / counts[name]).float())
    return sorted(sums)


def analytical(model: nn.Module) -> list[str]:
    """Subtract ``ε·E[x]`` with ``E[x]`` from ``lowbit.equalize``'s BatchNorm statistics;
    returns the corrected layers (the rest are named in a warning)."""
    means = getattr(model, INPUT_MEANS_ATTR, None)
    if means is None:
        raise ValueError(
            "bias_correction='analytical' needs the BatchNorm statistics that lowbit.equalize "
            "records: run `model = lowbit.equalize(model)` on the float model before "
            "lowbit.quantize, or use bias_correction='empirical'"
        )
    done, missing = [], []
    for name, layer in _targets(model).items():
        e = means.get(name)
        if e is None:
            missing.append(name)
            continue
        error = _weight_error(layer)  # (O, I, k...) or (O, I)
        e = e.to(error)
        if layer.input_smoothing is not None:
            e = e * layer.input_smoothing.to(error)
        if _is_depthwise(layer):
            delta = error.reshape(error.shape[0], -1).sum(dim=1) * e
        else:
            delta = error.reshape(error.shape[0], error.shape[1], -1).sum(dim=2) @ e
        _shift(layer, delta)
        done.append(name)
    if missing:
        warnings.warn("analytical bias correction has no BatchNorm statistics for the input of "
                      f"these layers, so they keep their bias: {missing}", stacklevel=3)
    return done


def correct_biases(model: nn.Module, mode: str, run: Callable[[], Any]) -> list[str]:
    """Apply bias correction ``mode`` (``MODES``); ``run()`` feeds the calibration batches."""
    check_mode(mode)
    return empirical(model, run) if mode == "empirical" else analytical(model)
