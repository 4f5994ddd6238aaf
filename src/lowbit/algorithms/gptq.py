"""GPTQ weight-only post-training quantization (Frantar et al., 2022; docs/algorithms.md §10).

Tensor functions, independent of modules: accumulate the layer Hessian ``H = 2/n · Σ xᵀx``
over calibration inputs with :func:`hessian_update`, then :func:`gptq_quantize` turns a
``(out, in)`` weight into integer codes on a *fixed* grid (the given ``QParams``), choosing each
column's rounding so that the error it leaves is compensated by the columns not yet quantized.
The codes have the layout of ``lowbit.numerics.quantize``, so ``dequantize`` reads them back.
``GPTQ`` (``QuantSpec(algorithm="gptq")``) and ``AWQThenGPTQ`` (``"awq-gptq"``) apply them to
quant layers during ``lowbit.calibrate``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowbit.algorithms import awq
from lowbit.algorithms.base import Group, WeightAlgorithm
from lowbit.checks import require_int, require_tensor
from lowbit.nn import replace_weight
from lowbit.numerics import IntRange, broadcast_param, dequantize, quantize
from lowbit.quantizers.base import QParams
from lowbit.registry import WEIGHT_ALGORITHMS

# Attempts at factorising H + λI: λ, 10λ, 100λ, 1000λ before giving up.
_DAMP_RETRIES = 3


def hessian_update(h: torch.Tensor | None, x: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running GPTQ Hessian ``H = 2/n · Σ xᵀx``.

    ``x`` is reshaped to ``(-1, in_features)`` rows; ``count`` is the number of rows already in
    ``h`` (0 with ``h=None``). Returns the new ``H`` (a new tensor; ``h`` is not modified) and
    row count. As in the GPTQ reference, ``H ← H·n/(n+m) + 2/(n+m)·xᵀx``; the reference counts
    samples rather than rows, which scales ``H`` by a constant that GPTQ is invariant to.
    Accumulates in float32, or float64 when ``h`` or ``x`` is float64.
    """
    x = require_tensor("x", x)
    count = require_int("count", count, 0)
    if x.dim() == 0:
        raise ValueError("`x` must have at least 1 dimension (..., in_features), got a scalar")
    cols = x.shape[-1]
    if h is None:
        if count != 0:
            raise ValueError(f"`count` must be 0 when `h` is None, got {count}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = torch.zeros(cols, cols, dtype=dtype, device=x.device)
    else:
        h = require_tensor("h", h)
        if h.shape != (cols, cols):
            raise ValueError(
                f"`h` must have shape ({cols}, {cols}) to match x's last dim {cols}, "
                f"got {tuple(h.shape)}"
            )
    dtype = torch.float64 if torch.float64 in (h.dtype, x.dtype) else torch.float32
    rows = x.reshape(-1, cols).to(dtype)
    m = rows.shape[0]
    if m == 0:
        return h.to(dtype), count
    total = count + m
    return torch.addmm(h.to(dtype), rows.T, rows, beta=count / total, alpha=2.0 / total), total


def _check_qparams(qparams: object, out_features: int, in_features: int) -> QParams:
    if not isinstance(qparams, QParams):
        raise TypeError(f"`qparams` must be a lowbit QParams, got {type(qparams).__name__}")
    if qparams.grid.odd:
        raise ValueError("`qparams.grid` must be an ordinary integer grid, got odd=True "
                         "(odd value sets are not a rounded scaled grid)")
    shape = tuple(qparams.scale.shape)
    if tuple(qparams.zero_point.shape) != shape:
        raise ValueError(f"`qparams.zero_point` must have the shape of `qparams.scale` {shape}, "
                         f"got {tuple(qparams.zero_point.shape)}")
    if not bool(torch.isfinite(qparams.scale).all()) or not bool((qparams.scale > 0).all()):
        raise ValueError("`qparams.scale` must be finite and > 0")
    gs = qparams.group_size
    if gs is not None:
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
            raise ValueError(f"`qparams.group_size` must be a positive int, got {gs!r}")
        if in_features % gs:
            raise ValueError(f"`qparams.group_size` {gs} must divide in_features {in_features}")
        if qparams.axis not in (1, -1):
            raise ValueError(f"`qparams.axis` must be 1 (the input dim) for per-group qparams, "
                             f"got {qparams.axis!r}")
        expected: tuple[int, ...] = (out_features, in_features // gs)
    elif len(shape) == 0:
        return qparams
    elif qparams.axis is None or not -2 <= qparams.axis <= 1:
        raise ValueError(f"`qparams.axis` must be 0 or 1 for per-channel qparams of a 2-D weight, "
                         f"got {qparams.axis!r}")
    else:
        expected = ((out_features, in_features)[qparams.axis],)
    if shape != expected:
        raise ValueError(f"`qparams.scale` must have shape {expected} for this weight and "
                         f"qparams ({qparams.granularity}, axis={qparams.axis}), got {shape}")
    return qparams


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = damp · mean(diag H)``, in float64.

    A factorisation that fails retries with 10x the damping, up to ``_DAMP_RETRIES`` times.
    """
    idx = torch.arange(h.shape[0], device=h.device)
    mean_diag = float(h.diagonal().mean())
    for attempt in range(_DAMP_RETRIES + 1):
        factor = damp * 10.0**attempt
        damped = h.clone()
        damped[idx, idx] += factor * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"GPTQ: the Hessian is not positive definite with damp={damp}; "
                                  f"succeeded with damp={factor:g}", RuntimeWarning, stacklevel=3)
                return upper
        if damp == 0:
            break
    raise RuntimeError(
        f"GPTQ: Cholesky factorisation of the damped Hessian failed (damp={damp}, retried up to "
        f"{damp * 10.0**_DAMP_RETRIES:g}); the Hessian is not positive semi-definite or too "
        "ill-conditioned. Use more calibration rows, a larger `damp`, or check the inputs"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qparams: QParams,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """Integer codes of ``weight`` (out, in) on the fixed grid of ``qparams``, chosen by GPTQ.

    ``hessian`` is ``H`` of :func:`hessian_update` (in, in). Columns are rounded one at a time
    (round to nearest on their own scale and zero point) and each one's error
    ``(w − ŵ) / [U]_jj`` is spread over the later columns through ``U``, the upper Cholesky
    factor of ``(H + λI)⁻¹`` (docs/algorithms.md §10), in blocks of ``block_size`` columns with
    lazy updates of the rest. ``act_order`` processes columns by decreasing ``diag(H)``; codes
    and per-group qparams always refer to the original column order. Returns a float32 tensor
    of integers in ``[grid.qmin, grid.qmax]`` shaped like ``weight``.
    """
    weight = require_tensor("weight", weight)
    hessian = require_tensor("hessian", hessian)
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be a 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"`hessian` must have shape ({in_features}, {in_features}) for a weight "
                         f"of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    qparams = _check_qparams(qparams, out_features, in_features)
    block_size = require_int("block_size", block_size, 1)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)):
        raise TypeError(f"`damp` must be a float, got {type(damp).__name__} {damp!r}")
    if not 0 <= damp < float("inf"):
        raise ValueError(f"`damp` must be a finite float >= 0, got {damp}")
    if not isinstance(act_order, bool):
        raise TypeError(f"`act_order` must be a bool, got {type(act_order).__name__}")

    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    if bool((h.diagonal() < 0).any()):
        raise ValueError("`hessian` must be positive semi-definite, but its diagonal has "
                         "negative entries")
    # Every column's own scale and zero point, so a permutation moves them with their column.
    grid: IntRange = qparams.grid
    scale = broadcast_param(qparams.scale.detach().to(device), w, qparams.axis,
                            qparams.group_size)
    zero = broadcast_param(qparams.zero_point.detach().to(device), w, qparams.axis,
                           qparams.group_size)
    scale = scale.to(torch.float32).expand_as(w)
    zero = zero.expand_as(w)

    # Inputs that never fire carry no information: pin them to zero with a unit curvature.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h, scale, zero = w[:, perm], h[perm][:, perm], scale[:, perm], zero[:, perm]
    hinv = _inverse_hessian_factor(h, float(damp)).to(torch.float32)

    codes = torch.empty_like(w)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s, z = w1[:, i], scale[:, i1 + i], zero[:, i1 + i]
            q = quantize(col, s, z, grid)
            codes[:, i1 + i] = q
            err = (col - dequantize(q, s, z)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


# ---------------------------------------------------------------- the registered algorithms


@WEIGHT_ALGORITHMS.register("gptq")
class GPTQ(WeightAlgorithm):
    """Frantar et al. 2022: error-compensating rounding with the input Hessian (§10).

    Each weight group's range is first shrunk where that lowers its output error under the
    Hessian (:func:`lowbit.algorithms.awq.hessian_search_clip`; per-channel weights: one group per row),
    then the columns are rounded in order of decreasing ``diag(H)`` (``act_order``: free here,
    as the qparams are fixed before rounding). The weight becomes its dequantized GPTQ codes (so
    every later fake-quant, convert and export reproduces them exactly) and its qparams are
    pinned. On MiniLM at 4 bits, g128, mean cosine: min/max grid in column order 0.979, with
    both (and padding tokens out of ``H``) 0.984 (docs/algorithms.md §10)."""

    needs = frozenset({"hessian"})
    block_size = 128
    damp = 0.01
    act_order = True
    clip_steps = 100  # candidate ratios 1, 0.99, ... 0.51; 0 keeps the observer's range

    def apply(self, group: Group) -> None:
        m = group.factor().float()
        for layer, stats in zip(group.layers, group.stats):
            if stats.hessian is None:
                continue
            h = (stats.hessian * m[:, None] * m[None, :]).to(layer.weight.device)  # of x·m
            q = layer.weight_quant
            w = layer.weight.detach().float()
            _, qp = q.quantize_weight(layer.weight)  # the current range (refreshed if stale)
            qp = self.clipped(q, w, h, qp)
            codes = gptq_quantize(w, h, qp, block_size=self.block_size, damp=self.damp,
                                       act_order=self.act_order)
            with torch.no_grad():
                replace_weight(layer, dequantize(codes, qp.scale, qp.zero_point, qp.axis,
                                                 qp.group_size))
            q.pin_qparams(qp.scale, qp.zero_point)

    def clipped(self, q: Any, w: torch.Tensor, h: torch.Tensor, qp: QParams) -> QParams:
        """``qp`` with each group's (or output channel's) range shrunk by the Hessian search;
        per-tensor grids and ``clip_steps=0`` keep ``qp``."""
        per_row = q.group_size is None and q.axis == 0
        if not self.clip_steps or (q.group_size is None and not per_row):
            return qp
        size = w.shape[1] if per_row else q.group_size
        ratios = awq.hessian_search_clip(w, h, size, q.grid, q.spec.symmetric,
                                         steps=self.clip_steps)
        found = awq.clipped_qparams(w, ratios, size, q.grid, q.spec.symmetric)
        if per_row:
            return QParams(found.scale.reshape(-1), found.zero_point.reshape(-1), q.grid, axis=0)
        return found


@WEIGHT_ALGORITHMS.register("awq-gptq")
class AWQThenGPTQ(WeightAlgorithm):
    """AWQ's input scales, then GPTQ's rounding of the scaled weight on its min/max grid
    (the Hessian follows the scaled input)."""

    needs = awq.AWQ.needs | GPTQ.needs

    def apply(self, group: Group) -> None:
        awq.AWQ().scale(group)
        GPTQ().apply(group)
