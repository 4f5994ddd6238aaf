"""AWQ (docs/algorithms.md §11): activation statistics, scale search, clip search."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.awq import (
    activation_mean_abs,
    awq_search_clip,
    awq_search_scales,
    clipped_qparams,
    group_fake_quant,
    hessian_search_clip,
)
from lowbit.numerics import IntRange, dequantize, qparams_from_range, quantize
from lowbit.quantizers.base import QParams

OUT, IN, GROUP = 64, 256, 64
UINT4 = IntRange(4, signed=False)
INT4 = IntRange(4, signed=True)
OUTLIERS = [3, 70, 140, 200]


def _layer(outlier_gain: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight, calibration inputs and held-out inputs; a few input channels ``outlier_gain``x."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=g)
    x = torch.randn(1024, IN, generator=g)
    x[:, OUTLIERS] *= outlier_gain
    return weight, x[:512], x[512:]


def _output_error(weight: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w_hat - weight) @ x.T).pow(2).mean())


def _apply(weight: torch.Tensor, qp: QParams) -> torch.Tensor:
    codes = quantize(weight, qp.scale, qp.zero_point, qp.grid, qp.axis, qp.group_size)
    return dequantize(codes, qp.scale, qp.zero_point, qp.axis, qp.group_size)


def _group_errors(weight: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each group's mean squared share of the output error, computed group by group: (out, G)."""
    cols = [slice(g, g + GROUP) for g in range(0, IN, GROUP)]
    return torch.stack([((w_hat[:, c] - weight[:, c]) @ x[:, c].T).pow(2).mean(1) for c in cols],
                       dim=1)


# ------------------------------------------------------------------------------ statistics


def test_activation_mean_abs_chunks_equal_one_shot() -> None:
    x = torch.randn(2, 15, 8)
    stat, n = activation_mean_abs(None, x[0], 0)
    stat, n = activation_mean_abs(stat, x[1, :4], n)
    stat, n = activation_mean_abs(stat, x[1, 4:], n)
    assert n == 30
    torch.testing.assert_close(stat, x.abs().reshape(-1, 8).mean(0))
    one_shot, m = activation_mean_abs(None, x, 0)
    assert m == 30
    torch.testing.assert_close(stat, one_shot)
    same, k = activation_mean_abs(stat, x[0, :0], n)
    assert k == 30 and torch.equal(same, stat)
    assert activation_mean_abs(None, x.double(), 0)[0].dtype == torch.float64


# ------------------------------------------------------------------------------ scale search


@pytest.mark.parametrize(
    ("grid", "symmetric"), [(UINT4, False), (INT4, True)], ids=["uint4-affine", "int4-sym"]
)
def test_scales_beat_round_to_nearest_with_outlier_channels(grid: IntRange,
                                                            symmetric: bool) -> None:
    weight, x_cal, x_test = _layer(outlier_gain=20.0)
    mean_abs, _ = activation_mean_abs(None, x_cal, 0)
    fake_quant = group_fake_quant(GROUP, grid, symmetric)
    scales, alpha = awq_search_scales(weight, x_cal, mean_abs, fake_quant)
    assert scales.shape == (IN,) and bool((scales > 0).all())
    torch.testing.assert_close(scales.max() * scales.min(), torch.tensor(1.0))
    assert 0 < alpha < 1
    assert scales[OUTLIERS].min() > scales.max() / 2  # the salient channels get the big scales
    rtn = fake_quant(weight)
    awq = fake_quant(weight * scales) / scales
    # Measured (seed 0): 0.33 (uint4) / 0.30 (int4) on x_cal, 0.35 / 0.31 held out.
    assert _output_error(weight, awq, x_cal) < 0.45 * _output_error(weight, rtn, x_cal)
    assert _output_error(weight, awq, x_test) < 0.45 * _output_error(weight, rtn, x_test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scales_never_worse_than_round_to_nearest_on_the_sample(seed: int) -> None:
    weight, x_cal, _ = _layer(outlier_gain=1.0, seed=seed)  # no outliers: little to gain
    mean_abs, _ = activation_mean_abs(None, x_cal, 0)
    fake_quant = group_fake_quant(GROUP, UINT4, False)
    scales, alpha = awq_search_scales(weight, x_cal, mean_abs, fake_quant)
    assert 0 <= alpha < 1
    awq = fake_quant(weight * scales) / scales
    assert _output_error(weight, awq, x_cal) <= _output_error(weight, fake_quant(weight), x_cal)


def test_ties_and_a_single_candidate_keep_alpha_zero() -> None:
    weight, x_cal, _ = _layer(outlier_gain=20.0)
    mean_abs, _ = activation_mean_abs(None, x_cal, 0)
    # Quantizing everything to 0 scores every candidate alike: the first (alpha = 0) is kept.
    scales, alpha = awq_search_scales(weight, x_cal, mean_abs, torch.zeros_like)
    assert alpha == 0.0 and torch.equal(scales, torch.ones(IN))
    fake_quant = group_fake_quant(GROUP, UINT4, False)
    scales, alpha = awq_search_scales(weight, x_cal, mean_abs, fake_quant, grid=1)
    assert alpha == 0.0 and torch.equal(scales, torch.ones(IN))


def test_silent_channels_get_the_minimum_scale_before_normalisation() -> None:
    weight, x_cal, _ = _layer(outlier_gain=20.0)
    mean_abs, _ = activation_mean_abs(None, x_cal, 0)
    mean_abs[0] = 0.0
    scales, alpha = awq_search_scales(weight, x_cal, mean_abs, group_fake_quant(GROUP, UINT4,
                                                                                  False))
    assert alpha > 0 and bool(torch.isfinite(scales).all())
    assert scales[0] == scales.min()
    torch.testing.assert_close(scales[0] * scales.max(), torch.tensor(1.0))


# ------------------------------------------------------------------------------ clip search


@pytest.mark.parametrize(
    ("grid", "symmetric", "bound"),
    # Measured (seed 0): 0.91 (uint4 affine), 0.77 (int4 symmetric), 0.80 (uint3 affine).
    [(UINT4, False, 0.95), (INT4, True, 0.85), (IntRange(3, False), False, 0.9)],
    ids=["uint4-affine", "int4-sym", "uint3-affine"],
)
def test_clip_search_lowers_every_group_error(grid: IntRange, symmetric: bool,
                                              bound: float) -> None:
    weight, x_cal, x_test = _layer(outlier_gain=1.0)
    ratios = awq_search_clip(weight, x_cal, GROUP, grid, symmetric)
    assert ratios.shape == (OUT, IN // GROUP)
    candidates = torch.tensor([1 - k / 20 for k in range(10)])  # 1, 0.95, ..., 0.55
    assert bool(torch.isin(ratios, candidates).all())
    assert bool((ratios < 1).any())
    clipped = _apply(weight, clipped_qparams(weight, ratios, GROUP, grid, symmetric))
    min_max = group_fake_quant(GROUP, grid, symmetric)(weight)
    assert bool((_group_errors(weight, clipped, x_cal)
                 <= _group_errors(weight, min_max, x_cal)).all())
    assert _output_error(weight, clipped, x_cal) < bound * _output_error(weight, min_max, x_cal)
    assert _output_error(weight, clipped, x_test) < bound * _output_error(weight, min_max, x_test)


def test_clip_after_scales_lowers_the_error_further() -> None:
    """The intended pipeline: scales first, then clip ``W·diag(s)`` against inputs ``x / s``."""
    weight, x_cal, _ = _layer(outlier_gain=20.0)
    mean_abs, _ = activation_mean_abs(None, x_cal, 0)
    fake_quant = group_fake_quant(GROUP, UINT4, False)
    scales, _ = awq_search_scales(weight, x_cal, mean_abs, fake_quant)
    scaled = weight * scales
    ratios = awq_search_clip(scaled, x_cal / scales, GROUP, UINT4, False)
    both = _apply(scaled, clipped_qparams(scaled, ratios, GROUP, UINT4, False)) / scales
    # Measured (seed 0): 0.79 of the scales-only error.
    assert _output_error(weight, both, x_cal) < 0.9 * _output_error(
        weight, fake_quant(scaled) / scales, x_cal)


def test_ties_and_no_shrink_keep_plain_min_max() -> None:
    weight, x_cal, _ = _layer(outlier_gain=1.0)
    x_silent = x_cal.clone()
    x_silent[:, :GROUP] = 0.0  # the first group adds nothing to the output: every ratio ties
    ratios = awq_search_clip(weight, x_silent, GROUP, UINT4, False)
    assert torch.equal(ratios[:, 0], torch.ones(OUT)) and bool((ratios[:, 1:] < 1).any())
    ratios = awq_search_clip(weight, x_cal, GROUP, UINT4, False, max_shrink=0.0)
    assert torch.equal(ratios, torch.ones(OUT, IN // GROUP))
    ratios = awq_search_clip(weight, x_cal, GROUP, UINT4, False, steps=2, max_shrink=0.5)
    assert torch.equal(ratios, torch.ones(OUT, IN // GROUP))  # one candidate: r = 1


def test_hessian_clip_search_is_the_sample_search_on_every_row() -> None:
    """``d H d`` with ``H = 2/n · xᵀx`` is twice the mean squared group output: same choice."""
    weight, x_cal, _ = _layer(outlier_gain=1.0)
    h = 2.0 / x_cal.shape[0] * x_cal.T @ x_cal
    by_rows = awq_search_clip(weight, x_cal, GROUP, UINT4, False)
    by_hessian = hessian_search_clip(weight, h, GROUP, UINT4, False, steps=20)
    assert (by_rows == by_hessian).float().mean() > 0.95  # float ties aside
    fine = hessian_search_clip(weight, h, GROUP, UINT4, False)  # steps of 0.01 down to 0.51
    assert bool(torch.isin(fine, torch.tensor([1 - k / 100 for k in range(50)])).all())
    clipped = _apply(weight, clipped_qparams(weight, fine, GROUP, UINT4, False))
    min_max = group_fake_quant(GROUP, UINT4, False)(weight)
    assert bool((_group_errors(weight, clipped, x_cal)
                 <= _group_errors(weight, min_max, x_cal) * (1 + 1e-5)).all())


@pytest.mark.parametrize(
    ("hessian", "match"),
    [(torch.eye(7), r"`hessian` must have shape \(8, 8\).*\(7, 7\)"),
     ("H", "`hessian` must be a torch.Tensor")],
)
def test_hessian_clip_search_validation(hessian: object, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        hessian_search_clip(_W, hessian, 4, UINT4, False)


def test_clipped_qparams_shrink_the_range() -> None:
    weight = torch.randn(8, 32)
    full = clipped_qparams(weight, torch.ones(8, 2), 16, INT4, True)
    half = clipped_qparams(weight, torch.full((8, 2), 0.5), 16, INT4, True)
    assert (half.axis, half.group_size, half.granularity) == (1, 16, "per_group")
    assert half.scale.shape == (8, 2)
    torch.testing.assert_close(half.scale, full.scale / 2, rtol=0, atol=0)
    groups = weight.reshape(8, 2, 16)
    scale, zp = qparams_from_range(groups.amin(-1), groups.amax(-1), UINT4, symmetric=False)
    affine = clipped_qparams(weight, torch.ones(8, 2), 16, UINT4, False)
    assert torch.equal(affine.scale, scale) and torch.equal(affine.zero_point, zp)
    assert torch.equal(group_fake_quant(16, UINT4, False)(weight), _apply(weight, affine))


# ------------------------------------------------------------------------------ validation


_W = torch.linspace(-1.0, 1.0, 32).reshape(4, 8)
_X = torch.linspace(-2.0, 2.0, 24).reshape(3, 8)
_FQ = group_fake_quant(4, UINT4, False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": _W.numpy()}, TypeError, "`weight` must be a torch.Tensor"),
        ({"weight": _W[0]}, ValueError, r"`weight` must be a 2-D.*\(8,\)"),
        ({"weight": _W.int()}, TypeError, "`weight`.*floating"),
        ({"x": _X[:, :5]}, ValueError, r"`x` must have shape \(\.\.\., 8\).*\(3, 5\)"),
        ({"x": _X[:0]}, ValueError, "`x` must hold at least one row"),
        ({"x": _X * float("nan")}, ValueError, "`x` contains NaN"),
        ({"mean_abs": torch.ones(7)}, ValueError, r"`mean_abs` must have shape \(8,\)"),
        ({"mean_abs": -torch.ones(8)}, ValueError, "`mean_abs` must be >= 0"),
        ({"fake_quant": 3}, TypeError, "`fake_quant` must be callable"),
        ({"fake_quant": lambda w: w[:2]}, ValueError, r"`fake_quant` must return.*\(4, 8\)"),
        ({"fake_quant": lambda w: w * float("inf")}, ValueError, "`fake_quant` gave a non-finite"),
        ({"grid": 0}, ValueError, "`grid` must be >= 1, got 0"),
        ({"grid": 2.0}, TypeError, "`grid` must be an int"),
    ],
)
def test_awq_search_scales_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"weight": _W, "x": _X, "mean_abs": torch.ones(8), "fake_quant": _FQ, **kwargs}
    grid = args.pop("grid", 20)
    with pytest.raises(error, match=match):
        awq_search_scales(args["weight"], args["x"], args["mean_abs"], args["fake_quant"],
                          grid=grid)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": torch.ones(2, 4, 8)}, ValueError, "`weight` must be a 2-D"),
        ({"x": torch.ones(3, 6)}, ValueError, r"`x` must have shape \(\.\.\., 8\)"),
        ({"group_size": 3}, ValueError, "`group_size` 3 must divide in_features 8"),
        ({"group_size": 0}, ValueError, "`group_size` must be >= 1, got 0"),
        ({"grid": 4}, TypeError, "`grid` must be a lowbit IntRange"),
        ({"grid": IntRange(2, True, odd=True)}, ValueError, "`grid`.*odd=True"),
        ({"grid": IntRange(1, True), "symmetric": True}, ValueError, "`grid` must have bits >= 2"),
        ({"symmetric": "yes"}, TypeError, "`symmetric` must be a bool"),
        ({"steps": 0}, ValueError, "`steps` must be >= 1, got 0"),
        ({"max_shrink": 1.5}, ValueError, r"`max_shrink` must be in \[0, 1\], got 1.5"),
        ({"max_shrink": None}, TypeError, "`max_shrink` must be a float"),
    ],
)
def test_awq_search_clip_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"weight": _W, "x": _X, "group_size": 4, "grid": UINT4, "symmetric": False, **kwargs}
    options = {k: args.pop(k) for k in ("steps", "max_shrink") if k in args}
    with pytest.raises(error, match=match):
        awq_search_clip(args["weight"], args["x"], args["group_size"], args["grid"],
                        args["symmetric"], **options)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratios": torch.ones(4, 3)}, ValueError, r"`ratios` must have shape \(4, 2\)"),
        ({"ratios": torch.zeros(4, 2)}, ValueError, r"`ratios` must lie in \(0, 1\]"),
        ({"ratios": torch.full((4, 2), 1.5)}, ValueError, r"`ratios` must lie in \(0, 1\]"),
        ({"ratios": torch.ones(4, 2, dtype=torch.int64)}, TypeError, "`ratios`.*floating"),
        ({"group_size": 5}, ValueError, "`group_size` 5 must divide in_features 8"),
        ({"grid": IntRange(2, True, odd=True)}, ValueError, "`grid`.*odd=True"),
    ],
)
def test_clipped_qparams_validation(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"weight": _W, "ratios": torch.ones(4, 2), "group_size": 4, "grid": UINT4,
            "symmetric": False, **kwargs}
    with pytest.raises(error, match=match):
        clipped_qparams(args["weight"], args["ratios"], args["group_size"], args["grid"],
                        args["symmetric"])


def test_group_fake_quant_validation() -> None:
    with pytest.raises(ValueError, match="`group_size` must be >= 1"):
        group_fake_quant(0, UINT4, False)
    with pytest.raises(TypeError, match="`symmetric` must be a bool"):
        group_fake_quant(4, UINT4, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`group_size` 3 must divide in_features 8"):
        group_fake_quant(3, UINT4, False)(_W)
    with pytest.raises(ValueError, match="`weight` must be a 2-D"):
        group_fake_quant(4, UINT4, False)(_W[0])


@pytest.mark.parametrize(
    ("stat", "x", "count", "error", "match"),
    [
        (None, torch.ones(3, 4), -1, ValueError, "`count` must be >= 0, got -1"),
        (None, torch.ones(3, 4), 3, ValueError, "`count` must be 0 when `stat` is None, got 3"),
        (None, torch.ones(3, 4), True, TypeError, "`count` must be an int"),
        (torch.ones(5), torch.ones(3, 4), 3, ValueError, r"`stat` must have shape \(4,\)"),
        (None, torch.tensor(2.0), 0, ValueError, "`x` must have at least 1 dimension"),
        (None, torch.ones(3, 4, dtype=torch.int64), 0, TypeError, "`x`.*floating"),
        ([1.0] * 4, torch.ones(3, 4), 3, TypeError, "`stat` must be a torch.Tensor"),
    ],
)
def test_activation_mean_abs_validation(stat, x: torch.Tensor, count, error: type[Exception],
                                        match: str) -> None:
    with pytest.raises(error, match=match):
        activation_mean_abs(stat, x, count)
