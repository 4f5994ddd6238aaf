"""AWQ weight-only post-training quantization (Lin et al., 2023; docs/algorithms.md §11).

Tensor functions, independent of modules. :func:`activation_mean_abs` accumulates the mean
``|x|`` of each input channel; :func:`awq_search_scales` picks per-input-channel scales ``s``
that protect the channels with large activations (quantize ``W·diag(s)``, divide the input by
``s``); :func:`awq_search_clip` then picks, per weight group, how far to shrink the min/max range
(llm-awq's ``auto_scale`` and ``auto_clip``). :func:`clipped_qparams` turns the clip ratios into
the per-group ``QParams`` that the exporter stores. :func:`hessian_search_clip` is the same
clip search scored with GPTQ's Hessian. ``AWQ`` (``QuantSpec(algorithm="awq")``) applies them
to quant layers during ``lowbit.calibrate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lowbit.algorithms.base import Group, WeightAlgorithm
from lowbit.checks import require_int, require_tensor
from lowbit.numerics import IntRange, dequantize, fake_quantize, qparams_from_range, quantize
from lowbit.quantizers.base import QParams
from lowbit.quantizers.uniform import to_rows
from lowbit.registry import WEIGHT_ALGORITHMS

# Smallest scale candidate before normalisation (llm-awq): a silent channel keeps a usable scale.
_MIN_SCALE = 1e-4
# Output rows per step of the clip search: bounds its (rows, groups, samples) error tensor.
_ROW_CHUNK = 256


def _require_weight(weight: object) -> torch.Tensor:
    weight = require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be a 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    return weight.detach().float()


def _require_rows(x: object, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in_features) as float32 rows (n, in_features) on the weight's device."""
    x = require_tensor("x", x)
    in_features = weight.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"`x` must have shape (..., {in_features}) to match the weight's "
                         f"in_features, got {tuple(x.shape)}")
    rows = x.detach().reshape(-1, in_features).to(device=weight.device, dtype=torch.float32)
    if rows.shape[0] == 0:
        raise ValueError("`x` must hold at least one row of inputs, got none")
    return rows


def _require_grid(grid: object, symmetric: object) -> IntRange:
    if not isinstance(grid, IntRange):
        raise TypeError(f"`grid` must be a lowbit IntRange, got {type(grid).__name__}")
    if grid.odd:
        raise ValueError("`grid` must be an ordinary integer grid, got odd=True "
                         "(odd value sets are not a rounded scaled grid)")
    if not isinstance(symmetric, bool):
        raise TypeError(f"`symmetric` must be a bool, got {type(symmetric).__name__}")
    if symmetric and grid.bits < 2:
        raise ValueError(f"`grid` must have bits >= 2 with symmetric=True, got bits={grid.bits}")
    return grid


def _require_group_size(group_size: object, in_features: int) -> int:
    group_size = require_int("group_size", group_size, 1)
    if in_features % group_size:
        raise ValueError(f"`group_size` {group_size} must divide in_features {in_features}")
    return group_size


def activation_mean_abs(
    stat: torch.Tensor | None, x: torch.Tensor, count: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch into the running mean of ``|x|`` per input channel (the last dim).

    ``count`` is the number of rows already in ``stat`` (0 with ``stat=None``). Returns the new
    mean (a new tensor, float32 or float64 like its inputs) and row count.
    """
    x = require_tensor("x", x)
    count = require_int("count", count, 0)
    if x.dim() == 0:
        raise ValueError("`x` must have at least 1 dimension (..., in_features), got a scalar")
    cols = x.shape[-1]
    if stat is None:
        if count != 0:
            raise ValueError(f"`count` must be 0 when `stat` is None, got {count}")
        stat = torch.zeros(cols, dtype=x.dtype, device=x.device)
    else:
        stat = require_tensor("stat", stat)
        if stat.shape != (cols,):
            raise ValueError(f"`stat` must have shape ({cols},) to match x's last dim {cols}, "
                             f"got {tuple(stat.shape)}")
    dtype = torch.float64 if torch.float64 in (stat.dtype, x.dtype) else torch.float32
    rows = x.detach().reshape(-1, cols).to(dtype)
    if rows.shape[0] == 0:
        return stat.to(dtype), count
    total = count + rows.shape[0]
    return stat.to(dtype) * (count / total) + rows.abs().sum(0) / total, total


def _group_qparams(
    w: torch.Tensor, ratios: torch.Tensor | float, group_size: int, grid: IntRange,
    symmetric: bool,
) -> QParams:
    groups = w.reshape(w.shape[0], -1, group_size)
    lo, hi = groups.amin(-1) * ratios, groups.amax(-1) * ratios
    scale, zero_point = qparams_from_range(lo, hi, grid, symmetric=symmetric)
    return QParams(scale, zero_point, grid, axis=1, group_size=group_size)


def _fake_quant(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    codes = quantize(w, qp.scale, qp.zero_point, qp.grid, qp.axis, qp.group_size)
    return dequantize(codes, qp.scale, qp.zero_point, qp.axis, qp.group_size)


def clipped_qparams(
    weight: torch.Tensor, ratios: torch.Tensor, group_size: int, grid: IntRange, symmetric: bool
) -> QParams:
    """Per-group ``QParams`` (axis 1) covering each group's shrunk range ``[r·min, r·max]``.

    ``ratios`` (out, in // group_size) come from :func:`awq_search_clip`; all ones is plain
    min/max. Quantizing with the result saturates the weights outside the shrunk range.
    """
    w = _require_weight(weight)
    group_size = _require_group_size(group_size, w.shape[1])
    grid = _require_grid(grid, symmetric)
    ratios = require_tensor("ratios", ratios)
    expected = (w.shape[0], w.shape[1] // group_size)
    if ratios.shape != expected:
        raise ValueError(f"`ratios` must have shape {expected} (out, in // group_size), "
                         f"got {tuple(ratios.shape)}")
    if not bool(((ratios > 0) & (ratios <= 1)).all()):
        raise ValueError("`ratios` must lie in (0, 1]")
    return _group_qparams(w, ratios.detach().to(w.device, torch.float32), group_size, grid,
                          symmetric)


def group_fake_quant(
    group_size: int, grid: IntRange, symmetric: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A min/max per-group fake quantizer of (out, in) weights, for :func:`awq_search_scales`.

    Each call derives its qparams from the tensor it is given, as AWQ's search requires: the
    scaled weight ``W·diag(s)`` gets its own ranges.
    """
    group_size = require_int("group_size", group_size, 1)
    grid = _require_grid(grid, symmetric)

    def fake_quant(weight: torch.Tensor) -> torch.Tensor:
        w = _require_weight(weight)
        _require_group_size(group_size, w.shape[1])
        return _fake_quant(w, _group_qparams(w, 1.0, group_size, grid, symmetric))

    return fake_quant


def awq_search_scales(
    weight: torch.Tensor,
    x: torch.Tensor,
    mean_abs: torch.Tensor,
    fake_quant: Callable[[torch.Tensor], torch.Tensor],
    *,
    grid: int = 20,
) -> tuple[torch.Tensor, float]:
    """Per-input-channel AWQ scales ``s`` (in,) and the exponent ``α`` they were made with.

    For ``α`` in ``{0, 1/grid, ..., (grid−1)/grid}``: ``s = max(mean_abs^α, 1e-4)``, normalised
    as ``s / sqrt(max s · min s)`` (llm-awq), scored by the mean squared error of
    ``(fake_quant(W·diag(s))·diag(s)⁻¹) xᵀ`` against ``W xᵀ`` on the sample ``x`` (..., in)
    (docs/algorithms.md §11). Ties keep the smaller ``α``; ``α = 0`` gives ``s = 1``, plain
    round to nearest, so the result is never worse than that on ``x``. To apply: quantize
    ``W·diag(s)`` and divide the layer's input (or fold ``1/s`` into the op before) by ``s``.
    """
    w = _require_weight(weight)
    rows = _require_rows(x, w)
    mean_abs = require_tensor("mean_abs", mean_abs)
    if mean_abs.shape != (w.shape[1],):
        raise ValueError(f"`mean_abs` must have shape ({w.shape[1]},) (in_features), "
                         f"got {tuple(mean_abs.shape)}")
    if bool((mean_abs < 0).any()):
        raise ValueError("`mean_abs` must be >= 0 (a mean of |x|)")
    if not callable(fake_quant):
        raise TypeError(f"`fake_quant` must be callable, got {type(fake_quant).__name__}")
    grid = require_int("grid", grid, 1)

    stat = mean_abs.detach().to(w.device, torch.float32)
    best_loss, best_scales, best_alpha = math.inf, torch.ones_like(stat), 0.0
    with torch.no_grad():
        reference = rows @ w.T
        for k in range(grid):
            alpha = k / grid
            scales = stat.pow(alpha).clamp_min(_MIN_SCALE)
            scales = scales / (scales.max() * scales.min()).sqrt()
            wq = fake_quant(w * scales)
            if not isinstance(wq, torch.Tensor) or wq.shape != w.shape:
                raise ValueError(f"`fake_quant` must return a tensor of the weight's shape "
                                 f"{tuple(w.shape)}, got {getattr(wq, 'shape', type(wq))}")
            loss = float((rows @ (wq / scales).T - reference).pow(2).mean())
            if not math.isfinite(loss):
                raise ValueError(f"`fake_quant` gave a non-finite output error at alpha={alpha}")
            if loss < best_loss:
                best_loss, best_scales, best_alpha = loss, scales, alpha
    return best_scales, best_alpha


def _group_output_error(diff: torch.Tensor, x_groups: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of x of each group's squared partial-output error: (out, groups).

    ``diff`` (out, groups, group_size) is ``Ŵ − W``; ``x_groups`` is (n, groups, group_size).
    """
    return torch.cat([torch.einsum("ogk,ngk->ogn", d, x_groups).pow(2).mean(-1)
                      for d in diff.split(_ROW_CHUNK)])


def awq_search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    grid: IntRange,
    symmetric: bool,
    *,
    steps: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per-group clip ratios (out, in // group_size) that minimise each group's output error.

    Candidates are ``r = 1 − k/steps`` for ``k = 0 .. int(max_shrink·steps) − 1`` (llm-awq's
    ``auto_clip``: 1, 0.95, ..., 0.55 by default); a group's weights are quantized on the range
    ``[r·min, r·max]`` (:func:`clipped_qparams`) and scored by the mean squared error of the
    group's share of the output, ``x_g (Ŵ_g − W_g)ᵀ``, over the sample ``x`` (..., in)
    (docs/algorithms.md §11). Ties keep the larger ratio, so no group does worse than min/max.
    """
    w = _require_weight(weight)
    rows = _require_rows(x, w)
    group_size = _require_group_size(group_size, w.shape[1])
    x_groups = rows.reshape(-1, w.shape[1] // group_size, group_size)
    return _search_clip(w, lambda diff: _group_output_error(diff, x_groups), group_size, grid,
                        symmetric, steps, max_shrink)


def hessian_search_clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    grid: IntRange,
    symmetric: bool,
    *,
    steps: int = 100,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """:func:`awq_search_clip` scored with the input Hessian instead of a row sample.

    A group's output error over the calibration rows is ``d_g H_gg d_gᵀ / 2`` (``d = Ŵ − W``,
    ``H_gg`` the group's diagonal block of GPTQ's ``H = 2/n · Σ xᵀx``), so every row seen
    counts, not a sample. GPTQ runs this before rounding (docs/algorithms.md §10): on MiniLM at
    4 bits, g128, it moved the mean cosine from 0.979 to 0.982. Finer default steps (0.01).
    """
    w = _require_weight(weight)
    hessian = require_tensor("hessian", hessian)
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"`hessian` must have shape ({cols}, {cols}) for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(hessian.shape)}")
    group_size = _require_group_size(group_size, cols)
    n_groups = cols // group_size
    h = hessian.detach().to(w.device, torch.float32)
    blocks = torch.stack([h[g * group_size:(g + 1) * group_size,
                            g * group_size:(g + 1) * group_size] for g in range(n_groups)])

    def error(diff: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.einsum("ogk,gkl,ogl->og", d, blocks, d)
                          for d in diff.split(_ROW_CHUNK)])

    return _search_clip(w, error, group_size, grid, symmetric, steps, max_shrink)


def _search_clip(
    w: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor], group_size: int,
    grid: IntRange, symmetric: bool, steps: int, max_shrink: float,
) -> torch.Tensor:
    """The candidate loop both clip searches share; ``error`` maps (out, groups, group_size)
    differences to (out, groups) errors."""
    grid = _require_grid(grid, symmetric)
    steps = require_int("steps", steps, 1)
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)):
        raise TypeError(f"`max_shrink` must be a float, got {type(max_shrink).__name__} "
                        f"{max_shrink!r}")
    if not 0 <= max_shrink <= 1:
        raise ValueError(f"`max_shrink` must be in [0, 1], got {max_shrink}")

    out_features, n_groups = w.shape[0], w.shape[1] // group_size
    best_ratio = torch.ones(out_features, n_groups, device=w.device)
    best_err = torch.full_like(best_ratio, math.inf)
    with torch.no_grad():
        for k in range(int(max_shrink * steps)):
            ratio = 1 - k / steps
            wq = _fake_quant(w, _group_qparams(w, ratio, group_size, grid, symmetric))
            err = error((wq - w).reshape(out_features, n_groups, group_size))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


# ----------------------------------------------------------------- the registered algorithm


@WEIGHT_ALGORITHMS.register("awq")
class AWQ(WeightAlgorithm):
    """Lin et al. 2023: activation-aware input scales, searched per group of layers that
    share an input, then per-group clipping of each weight (§11)."""

    needs = frozenset({"mean_abs", "sample"})
    grid = 20

    def apply(self, group: Group) -> None:
        s, x = self.scale(group)
        if x is None:
            return
        for layer in group.layers:
            q = layer.weight_quant
            if q.group_size is None:
                continue  # clipping is searched per group (llm-awq); other grids keep min/max
            w = layer.weight.detach().float()
            ratios = awq_search_clip(w, x / s, q.group_size, q.grid, q.spec.symmetric)
            qp = clipped_qparams(w, ratios, q.group_size, q.grid, q.spec.symmetric)
            q.pin_qparams(qp.scale, qp.zero_point)

    def scale(self, group: Group) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Search and apply the group's input scales; returns them and the sampled (smoothed)
        input rows (``None``: the group was never reached)."""
        stats = group.stats[0]
        if stats.mean_abs is None:
            return torch.ones(()), None
        m = group.factor().float()
        x = stats.rows().to(group.layers[0].weight.device) * m
        mean_abs = stats.mean_abs.to(x.device) * m
        weights = torch.cat([layer.weight.detach().float() for layer in group.layers])
        q = group.layers[0].weight_quant
        s, _ = awq_search_scales(weights, x, mean_abs, lambda w: _rtn_fake_quant(q, w),
                                     grid=self.grid)
        if not bool((s == 1).all()):
            for layer in group.layers:
                layer.smooth_input(s)
        return s, x


def _rtn_fake_quant(q: Any, w: torch.Tensor) -> torch.Tensor:
    """Min/max fake quant of ``w`` on ``q``'s grid and granularity (ranges from ``w`` itself)."""
    rows = to_rows(w, q.axis, q.group_size)
    scale, zero_point = qparams_from_range(rows.amin(dim=-1), rows.amax(dim=-1), q.grid,
                                           symmetric=q.spec.symmetric)
    if q.group_size is not None:
        scale = scale.reshape(w.shape[0], -1)
        zero_point = zero_point.reshape(w.shape[0], -1)
    elif q.axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return fake_quantize(w, scale, zero_point, q.grid, q.axis, q.group_size)
