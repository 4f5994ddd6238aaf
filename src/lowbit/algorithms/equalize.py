"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, DFQ; docs/algorithms.md
§12), on the float model before ``lowbit.quantize``.

1. Every Conv/Linear → BatchNorm chain is folded (``lowbit.fuse``); the BatchNorm's ``β`` and
   ``|γ|`` are kept as the mean and spread of the layer's pre-activation output.
2. For each producer → consumer link (``_links.find_links``) through ReLU / LeakyReLU /
   identity / pooling / flatten, output channel ``i`` of the producer is divided by
   ``s_i = sqrt(r1_i · r2_i) / r2_i`` and input channel ``i`` of the consumer multiplied by it
   (``r1``, ``r2``: the channel's weight ranges), so both ranges become ``sqrt(r1_i · r2_i)``.
   A depthwise consumer scales its filter ``i``; the next link (depthwise → pointwise) then
   balances it again, which is DFQ's conv → depthwise → conv triple. Links are swept until the
   scales stop moving. The float function is unchanged (ReLU(x/s) = ReLU(x)/s for s > 0).
3. High-bias absorption: through a ReLU, ``c = max(0, β − 3|γ|)`` leaves the producer's bias
   and enters the consumer's as ``W₂·c``; exact wherever the pre-activation is ≥ c (99.87% of
   a normal), and only done where the consumer has no zero padding (its border sums would
   change).

ReLU6 is not positively homogeneous (its clip at 6 would move), so links through ReLU6 are
skipped with a warning; replace ReLU6 by ReLU yourself where the float model allows it.

The BatchNorm statistics also give the expected input of each consumer (the mean of a
clipped normal after a ReLU); they are kept on the model as ``lowbit_input_means`` for
analytical bias correction (``lowbit.calibrate(..., bias_correction="analytical")``).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn

from lowbit.algorithms._links import Link, find_links
from lowbit.fuse import find_chains, fold_bn, set_module

INPUT_MEANS_ATTR = "lowbit_input_means"
_SCALABLE = {"identity", "relu", "leaky_relu", "maxpool", "avgpool", "avgpool_padded", "flatten"}
_ABSORBABLE = {"identity", "relu", "maxpool", "avgpool", "flatten"}  # shift commutes (after ReLU)
_MEAN_KEEPING = {"identity", "avgpool", "avgpool_padded", "flatten"}  # E[out] = E[in] per channel


def equalize(
    model: nn.Module,
    *,
    inplace: bool = False,
    bias_absorption: bool = True,
    iterations: int = 20,
) -> nn.Module:
    """Cross-layer equalization (+ high-bias absorption) of a float model; returns the model.

    ``inplace=False`` (default) works on a deep copy, as ``lowbit.quantize`` does. BatchNorms
    that follow a Conv/Linear are folded into it (``nn.Identity`` takes their place).
    ``iterations`` bounds the sweeps over all links (they stop early once every scale is
    within 1e-6 of 1). Skipped links are named in one warning. Then ``lowbit.quantize`` the
    result as usual; per-tensor weight grids gain most.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("inplace", inplace), ("bias_absorption", bias_absorption)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"`iterations` must be an int, got {type(iterations).__name__} "
                        f"{iterations!r}")
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations}")
    from lowbit.nn import QuantLayer

    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` is already quantized; equalize the float model, then "
                         "lowbit.quantize it")
    model = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        stats = _fold_batchnorms(model)
        links, skipped = _usable_links(model, find_links(model))
        _sweep(model, links, stats, iterations)
        if bias_absorption:
            skipped += _absorb(model, links, stats)
        setattr(model, INPUT_MEANS_ATTR, _input_means(model, links, stats))
    if skipped:
        warnings.warn("equalize left these links alone: " + "; ".join(skipped), stacklevel=2)
    return model


def _get(model: nn.Module, name: str) -> Any:
    return model.get_submodule(name)


# ----------------------------------------------------------------------------- BN folding


def _fold_batchnorms(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold each chain's BatchNorm; ``{layer: (mean, std)}`` of its pre-activation output."""
    stats = {}
    for chain in find_chains(model):
        layer, bn = _get(model, chain[0]), _get(model, chain[1])
        assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d))  # find_chains guarantees it
        gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
        beta = bn.bias.detach() if bn.affine else torch.zeros(bn.num_features)
        fold_bn(layer, bn)  # type: ignore[arg-type]
        set_module(model, chain[1], nn.Identity().train(bn.training))
        stats[chain[0]] = (beta.clone().float(), gamma.abs().clone().float())
    return stats


# ----------------------------------------------------------------------------- links


def _channels(layer: Any) -> tuple[int, int]:
    """(input channels, output channels)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _is_depthwise(layer: Any) -> bool:
    return (not isinstance(layer, nn.Linear) and layer.groups > 1
            and layer.groups == layer.in_channels == layer.out_channels)


def _repeat(model: nn.Module, link: Link) -> int:
    """How many consumer input columns each producer channel feeds (flatten: H·W)."""
    n_in, _ = _channels(_get(model, link.consumer))
    _, n_out = _channels(_get(model, link.producer))
    return n_in // n_out if n_out and n_in % n_out == 0 else 0


def _usable_links(model: nn.Module, links: list[Link]) -> tuple[list[Link], list[str]]:
    usable, skipped = [], []
    for link in links:
        consumer = _get(model, link.consumer)
        why = None
        if "relu6" in link.through:
            why = "joined by ReLU6, whose clip at 6 does not commute with scaling"
        elif not set(link.through) <= _SCALABLE:
            why = f"joined by {link.through}"
        elif not isinstance(consumer, nn.Linear) and consumer.groups > 1 \
                and not _is_depthwise(consumer):
            why = "grouped consumer (only depthwise groups are equalized)"
        else:
            rep = _repeat(model, link)
            if rep == 0 or (rep > 1 and "flatten" not in link.through) or \
                    (_is_depthwise(consumer) and rep != 1):
                why = "channel counts do not line up"
        if why is None:
            usable.append(link)
        else:
            skipped.append(f"{link.producer} → {link.consumer}: {why}")
    return usable, skipped


def _out_ranges(layer: Any) -> torch.Tensor:
    w = layer.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)  # (C_out,)


def _in_ranges(layer: Any, channels: int) -> torch.Tensor:
    """Range of the consumer's weight per producer channel, (C,)."""
    w = layer.weight.detach().abs()
    if _is_depthwise(layer):
        return w.reshape(channels, -1).amax(dim=1)
    w = w.transpose(0, 1).reshape(channels, -1)  # flatten: channel c owns columns c·HW..
    return w.amax(dim=1)


def _scale_consumer(layer: Any, s: torch.Tensor) -> None:
    """Multiply the consumer's input channels (repeated for flatten) by ``s``."""
    w = layer.weight
    if _is_depthwise(layer):
        w.mul_(s.reshape(-1, *([1] * (w.dim() - 1))))
        return
    per_col = s.repeat_interleave(w.shape[1] // s.numel())
    w.mul_(per_col.reshape(1, -1, *([1] * (w.dim() - 2))))


def _sweep(model: nn.Module, links: list[Link],
           stats: dict[str, tuple[torch.Tensor, torch.Tensor]], iterations: int) -> None:
    for _ in range(iterations):
        moved = 0.0
        for link in links:
            a, b = _get(model, link.producer), _get(model, link.consumer)
            r1 = _out_ranges(a)
            r2 = _in_ranges(b, r1.numel())
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
            a.weight.div_(s.reshape(-1, *([1] * (a.weight.dim() - 1))))
            if a.bias is not None:
                a.bias.div_(s)
            _scale_consumer(b, s)
            if link.producer in stats:
                mean, std = stats[link.producer]
                stats[link.producer] = (mean / s, std / s)
            moved = max(moved, float((s.log().abs()).max()) if s.numel() else 0.0)
        if moved < 1e-6:
            return


# ----------------------------------------------------------------------------- absorption


def _has_padding(layer: Any) -> bool:
    if isinstance(layer, nn.Linear):
        return False
    pad = layer.padding
    return pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad))


def _absorb(model: nn.Module, links: list[Link],
            stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """High-bias absorption through a ReLU; returns the links skipped and why."""
    skipped = []
    for link in links:
        if "relu" not in link.through or link.producer not in stats:
            continue
        a, b = _get(model, link.producer), _get(model, link.consumer)
        if not set(link.through) <= _ABSORBABLE or link.through.count("relu") != 1 or \
                link.through.index("relu") != _first_non_identity(link.through):
            skipped.append(f"{link.producer} → {link.consumer}: no bias absorption through "
                           f"{link.through}")
            continue
        if _has_padding(b):
            continue  # documented: border sums of a zero-padded consumer would change
        mean, std = stats[link.producer]
        c = (mean - 3 * std).clamp_min(0)  # (C,)
        if not bool((c > 0).any()) or a.bias is None:
            continue
        a.bias.sub_(c.to(a.bias))
        stats[link.producer] = (mean - c, std)
        w = b.weight
        if _is_depthwise(b):
            shift = w.reshape(w.shape[0], -1).sum(dim=1) * c
        else:
            per_col = c.repeat_interleave(w.shape[1] // c.numel())
            shift = w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2) @ per_col.to(w)
        if b.bias is None:
            b.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        b.bias.add_(shift.to(b.bias))
    return skipped


def _first_non_identity(through: tuple[str, ...]) -> int:
    return next((i for i, k in enumerate(through) if k != "identity"), -1)


# ----------------------------------------------------------------------------- input means


def relu_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[max(0, x)]`` for ``x ~ N(mean, std²)``: ``μ·Φ(μ/σ) + σ·φ(μ/σ)`` (DFQ §4.2)."""
    std = std.clamp_min(1e-12)
    z = mean / std
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return mean * cdf + std * pdf


def _input_means(model: nn.Module, links: list[Link],
                 stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Expected input per channel of each consumer whose producer had a BatchNorm."""
    means = {}
    for link in links:
        if link.producer not in stats:
            continue
        kinds = [k for k in link.through if k != "relu"]
        if not set(kinds) <= _MEAN_KEEPING or link.through.count("relu") > 1 or (
                "relu" in link.through and link.through.index("relu")
                != _first_non_identity(link.through)):
            continue
        mean, std = stats[link.producer]
        e = relu_normal_mean(mean, std) if "relu" in link.through else mean
        consumer = _get(model, link.consumer)
        if not _is_depthwise(consumer):
            e = e.repeat_interleave(_channels(consumer)[0] // e.numel())
        means[link.consumer] = e.clone()
    return means
