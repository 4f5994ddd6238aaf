"""Properties of the quantization primitives, and parity with ONNX Runtime's
QuantizeLinear / DynamicQuantizeLinear (docs/algorithms.md §0, §9)."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from lowbit.numerics import (
    IntRange,
    dequantize,
    dynamic_qparams,
    fake_quantize,
    pack_bits,
    qparams_from_range,
    quantize,
    unpack_bits,
)

FLOATS = {"allow_nan": False, "allow_infinity": False, "allow_subnormal": False, "width": 32}


@st.composite
def grids(draw: st.DrawFn) -> tuple[IntRange, bool]:
    """An integer grid and whether it is used symmetrically.

    Symmetric grids start at 2 bits: a 1-bit symmetric grid has no code above its midpoint.
    """
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 8))
    signed = draw(st.booleans())
    narrow = signed and bits >= 2 and draw(st.booleans())
    return IntRange(bits, signed, narrow), symmetric


@st.composite
def ranges(draw: st.DrawFn) -> tuple[float, float]:
    a = draw(st.floats(-1e3, 1e3, **FLOATS))
    b = draw(st.floats(-1e3, 1e3, **FLOATS))
    return min(a, b), max(a, b)


def _qparams(grid: IntRange, symmetric: bool, lo: float, hi: float):
    return qparams_from_range(torch.tensor(lo), torch.tensor(hi), grid, symmetric=symmetric)


# ------------------------------------------------------------------------------ IntRange


@pytest.mark.parametrize(
    ("bits", "signed", "narrow", "qmin", "qmax"),
    [
        (8, True, False, -128, 127),
        (8, True, True, -127, 127),
        (8, False, False, 0, 255),
        (4, True, False, -8, 7),
        (4, False, False, 0, 15),
        (2, True, False, -2, 1),
        (1, False, False, 0, 1),
    ],
    ids=["int8", "int8-narrow", "uint8", "int4", "uint4", "int2", "uint1"],
)
def test_int_range_bounds(bits: int, signed: bool, narrow: bool, qmin: int, qmax: int) -> None:
    grid = IntRange(bits, signed, narrow)
    assert (grid.qmin, grid.qmax) == (qmin, qmax)
    assert grid.storage_dtype == (torch.int8 if signed else torch.uint8)


# ------------------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None)
@given(grid_sym=grids(), rng=ranges(),
       xs=st.lists(st.floats(-1e4, 1e4, **FLOATS), min_size=1, max_size=32))
def test_codes_lie_in_grid(grid_sym, rng, xs) -> None:
    grid, symmetric = grid_sym
    scale, zero_point = _qparams(grid, symmetric, *rng)
    q = quantize(torch.tensor(xs), scale, zero_point, grid)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    assert torch.equal(q, q.round())
    assert grid.qmin <= int(zero_point) <= grid.qmax


@settings(max_examples=200, deadline=None)
@given(grid_sym=grids(), rng=ranges(),
       fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=32))
def test_round_trip_error_is_at_most_half_a_step(grid_sym, rng, fractions) -> None:
    grid, symmetric = grid_sym
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)  # the range the qparams are widened to
    x = torch.tensor([lo + f * (hi - lo) for f in fractions], dtype=torch.float32)
    x = x.clamp(lo, hi)
    scale, zero_point = _qparams(grid, symmetric, *rng)
    err = (x - dequantize(quantize(x, scale, zero_point, grid), scale, zero_point)).abs()
    # float32 rounding of x / scale: a few ulps of at most 255 steps, plus |x| ulps.
    bound = scale / 2 * (1 + 1e-4) + 1e-6 * x.abs()
    assert bool((err <= bound).all()), (err - bound).max()


@settings(max_examples=200, deadline=None)
@given(grid_sym=grids(), rng=ranges())
def test_zero_is_exact(grid_sym, rng) -> None:
    grid, symmetric = grid_sym
    scale, zero_point = _qparams(grid, symmetric, *rng)
    zero = torch.zeros(3)
    assert torch.equal(dequantize(quantize(zero, scale, zero_point, grid), scale, zero_point),
                       zero)
    assert float(scale) > 0 and np.isfinite(float(scale))


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"b{b}")
def test_degenerate_range_gives_positive_finite_scale(bits, signed, symmetric) -> None:
    grid = IntRange(bits, signed)
    scale, zero_point = _qparams(grid, symmetric, 0.0, 0.0)
    assert float(scale) > 0 and np.isfinite(float(scale))
    assert grid.qmin <= int(zero_point) <= grid.qmax
    q = quantize(torch.zeros(4), scale, zero_point, grid)
    assert torch.equal(dequantize(q, scale, zero_point), torch.zeros(4))


def test_range_is_widened_to_contain_zero() -> None:
    grid = IntRange(8, signed=False)
    # [2, 4] widens to [0, 4]: zero point 0, step 4 / 255.
    scale, zero_point = _qparams(grid, False, 2.0, 4.0)
    assert int(zero_point) == 0
    assert float(scale) == pytest.approx(4.0 / 255)
    # [-4, -2] widens to [-4, 0]: zero point at the top of the grid.
    scale, zero_point = _qparams(grid, False, -4.0, -2.0)
    assert int(zero_point) == 255


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(2, 8), rng=ranges())
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_symmetric_zero_point_is_the_grid_middle(signed, bits, rng) -> None:
    scale, zero_point = _qparams(IntRange(bits, signed), True, *rng)
    assert int(zero_point) == (0 if signed else 2 ** (bits - 1))


def test_per_channel_qparams_and_axis() -> None:
    grid = IntRange(8, signed=True)
    lo, hi = torch.tensor([-1.0, -2.0, 0.0]), torch.tensor([1.0, 0.5, 4.0])
    scale, zero_point = qparams_from_range(lo, hi, grid, symmetric=True)
    assert torch.allclose(scale, torch.tensor([1.0, 2.0, 4.0]) / 127)
    assert torch.equal(zero_point, torch.zeros(3, dtype=torch.int32))
    x = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -2.0, 4.0]])  # (N, C), channels on axis 1
    q = quantize(x, scale, zero_point, grid, axis=1)
    assert torch.equal(q, torch.tensor([[127.0, 64.0, 32.0], [-127.0, -127.0, 127.0]]))


def test_fake_quantize_gradient_is_one_inside_and_zero_where_saturated() -> None:
    grid = IntRange(8, signed=True)
    scale, zero_point = torch.tensor(0.1), torch.tensor(0)
    # inside: |x| <= 12.7; saturated: beyond -12.8 and 12.7
    x = torch.tensor([-12.0, -0.33, 0.0, 0.26, 12.5, -30.0, 13.5, 100.0], requires_grad=True)
    y = fake_quantize(x, scale, zero_point, grid)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0]))
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), scale, zero_point, grid),
                                              scale, zero_point))


# ------------------------------------------------------------------------------ ORT parity

ONNX_DTYPES = {"uint8": (TensorProto.UINT8, np.uint8, IntRange(8, False)),
               "int8": (TensorProto.INT8, np.int8, IntRange(8, True))}


@functools.cache
def _quantize_linear_session(dtype: str, per_axis: bool) -> ort.InferenceSession:
    """One QuantizeLinear node; scale and zero point are graph inputs so one session serves
    every example."""
    onnx_type = ONNX_DTYPES[dtype][0]
    shape = ["C"] if per_axis else []
    attrs = {"axis": 1} if per_axis else {}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], **attrs)],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "L"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("zp", onnx_type, shape)],
        [helper.make_tensor_value_info("y", onnx_type, ["N", "C", "L"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: str,
               per_axis: bool) -> np.ndarray:
    np_dtype = ONNX_DTYPES[dtype][1]
    feeds = {"x": x.numpy(), "scale": scale.numpy().astype(np.float32),
             "zp": zp.numpy().astype(np_dtype)}
    return _quantize_linear_session(dtype, per_axis).run(None, feeds)[0]


def _lowbit_codes(x, scale, zp, dtype, per_axis) -> np.ndarray:
    grid = ONNX_DTYPES[dtype][2]
    q = quantize(x, scale, zp, grid, axis=1 if per_axis else None)
    return q.numpy().astype(ONNX_DTYPES[dtype][1])


PARITY_CASES = [("uint8", False), ("uint8", True), ("int8", False), ("int8", True)]
PARITY_IDS = ["uint8-per_tensor", "uint8-per_axis", "int8-per_tensor", "int8-per_axis"]


@pytest.mark.parametrize(("dtype", "per_axis"), PARITY_CASES, ids=PARITY_IDS)
def test_ties_round_half_to_even_like_onnx(dtype: str, per_axis: bool) -> None:
    # Power-of-two scales make x / scale an exact .5 tie.
    scale = torch.tensor([0.5, 0.25, 2.0]) if per_axis else torch.tensor(0.5)
    zp = torch.tensor([0, 3, 10]) if per_axis else torch.tensor(7)
    if dtype == "uint8":
        zp = zp + 100
    halves = torch.arange(-300, 300, dtype=torch.float32) + 0.5  # (600,)
    x = halves.reshape(1, 1, -1).repeat(2, 3, 1)  # (N, C, L)
    x = x * (scale.reshape(1, -1, 1) if per_axis else scale)
    ours = _lowbit_codes(x, scale, zp, dtype, per_axis)
    np.testing.assert_array_equal(ours, _ort_codes(x, scale, zp, dtype, per_axis))
    # Spot check: 0.5 and 1.5 steps from the zero point go to 0 and 2, -0.5 to -0.
    grid = ONNX_DTYPES[dtype][2]
    q = quantize(torch.tensor([0.25, 0.75, -0.25]), torch.tensor(0.5), torch.tensor(0), grid)
    assert q.tolist() == ([0.0, 2.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize(("dtype", "per_axis"), PARITY_CASES, ids=PARITY_IDS)
def test_quantize_matches_onnx_quantize_linear(dtype: str, per_axis: bool, data) -> None:
    grid = ONNX_DTYPES[dtype][2]
    channels = data.draw(st.integers(1, 4), label="channels") if per_axis else 1
    n_scales = channels if per_axis else 1
    scales = data.draw(st.lists(st.floats(2.0**-13, 10.0, **FLOATS), min_size=n_scales,
                                max_size=n_scales), label="scales")
    zps = data.draw(st.lists(st.integers(grid.qmin, grid.qmax), min_size=n_scales,
                             max_size=n_scales), label="zero_points")
    values = data.draw(st.lists(st.floats(-3e3, 3e3, **FLOATS), min_size=channels * 5,
                                max_size=channels * 5), label="x")
    x = torch.tensor(values, dtype=torch.float32).reshape(1, channels, 5)
    scale = torch.tensor(scales, dtype=torch.float32)
    zp = torch.tensor(zps)
    if not per_axis:
        scale, zp = scale[0], zp[0]
    ours = _lowbit_codes(x, scale, zp, dtype, per_axis)
    np.testing.assert_array_equal(ours, _ort_codes(x, scale, zp, dtype, per_axis))


@functools.cache
def _dynamic_session() -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])],
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", "K"]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("zp", TensorProto.UINT8, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("offset", "spread"),
    [(0.0, 1.0), (3.0, 1.0), (-3.0, 1.0), (0.0, 1e-3), (100.0, 50.0)],
    ids=["centred", "all-positive", "all-negative", "tiny", "wide-shifted"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_qparams_match_onnx_dynamic_quantize_linear(offset, spread, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 33, generator=gen) * spread + offset
    y, ort_scale, ort_zp = _dynamic_session().run(None, {"x": x.numpy()})
    scale, zero_point = dynamic_qparams(x)
    assert scale.dtype == torch.float32
    assert float(scale) == float(ort_scale)
    assert int(zero_point) == int(ort_zp)
    codes = quantize(x, scale, zero_point, IntRange(8, signed=False))
    np.testing.assert_array_equal(codes.numpy().astype(np.uint8), y)


def test_dynamic_qparams_of_all_zeros() -> None:
    scale, zero_point = dynamic_qparams(torch.zeros(4, 4))
    assert float(scale) > 0 and np.isfinite(float(scale))
    assert int(zero_point) == 0


# ------------------------------------------------------------------------------ bit packing


@settings(max_examples=100, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"b{b}")
def test_pack_unpack_round_trip(bits: int, data) -> None:
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=50), label="codes")
    packed = pack_bits(torch.tensor(codes, dtype=torch.int64), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-len(codes) * bits // 8)  # whole bytes, no more
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


def test_pack_bits_layout_is_low_bits_first() -> None:
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 0, 3]), 2).tolist() == [0b110001]


@pytest.mark.parametrize("fn", ["pack", "unpack"])
@pytest.mark.parametrize("bits", [0, 3, 16], ids=lambda b: f"b{b}")
def test_packing_rejects_other_widths(fn: str, bits: int) -> None:
    with pytest.raises(ValueError, match=r"`bits` must be one of 1, 2, 4, 8 for packing"):
        if fn == "pack":
            pack_bits(torch.tensor([0, 1]), bits)
        else:
            unpack_bits(torch.tensor([0], dtype=torch.uint8), bits, 1)


@pytest.mark.parametrize(("codes", "bits"), [([0, 4], 2), ([-1, 0], 4), ([256], 8), ([2], 1)],
                         ids=["too-big-2bit", "negative", "too-big-8bit", "too-big-1bit"])
def test_pack_bits_rejects_codes_outside_the_width(codes, bits) -> None:
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, {2**bits - 1}\]"):
        pack_bits(torch.tensor(codes), bits)
