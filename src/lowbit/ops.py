"""Torch custom ops with the exact semantics of ONNX's quantization operators.

Deploy modules (``lowbit.convert``) compute with these ops, so eager PyTorch and ONNX Runtime run
the same arithmetic, and the exporter maps each op one-to-one onto ONNX nodes
(``translation_table`` for the dynamo exporter, ``register_torchscript_symbolics`` for the
TorchScript one): integer weights stay integer initializers feeding ``DequantizeLinear``.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.numerics import dequantize, dynamic_quantize

# ---------------------------------------------------------------------------- eager semantics


def _expand(p: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    if p.dim() == 0:
        return p
    axis = axis % x.dim()
    if block_size > 0:
        p = p.repeat_interleave(block_size, dim=axis)
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


@torch.library.custom_op("lowbit::quantize_linear", mutates_args=())
def quantize_linear(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int
) -> torch.Tensor:
    """ONNX QuantizeLinear (codes in ``zero_point``'s dtype), saturating to ``[qmin, qmax]``."""
    q = torch.round(x / _expand(scale, x, axis, 0)) + _expand(zero_point, x, axis, 0).float()
    return q.clamp(qmin, qmax).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):  # noqa: ANN001, ANN202
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("lowbit::dequantize_linear", mutates_args=())
def dequantize_linear(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int
) -> torch.Tensor:
    """ONNX DequantizeLinear; ``block_size > 0`` is opset 21's blocked form."""
    s = _expand(scale, q, axis, block_size)
    z = _expand(zero_point, q, axis, block_size)
    return (q.float() - z.float()) * s


@dequantize_linear.register_fake
def _(q, scale, zero_point, axis, block_size):  # noqa: ANN001, ANN202
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("lowbit::binarize", mutates_args=())
def binarize(x: torch.Tensor) -> torch.Tensor:
    """Binary activation codes: int8 +1 where ``x >= 0``, -1 elsewhere (sign with sign(0)=+1)."""
    return torch.where(x >= 0, 1, -1).to(torch.int8)


@binarize.register_fake
def _(x):  # noqa: ANN001, ANN202
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("lowbit::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: torch.Tensor, weight_t: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """``DynamicQuantizeLinear(x) → MatMulInteger(·, weight_t) → ·(x_scale·w_scale) + bias``.

    ``weight_t`` is ``(in, out)`` int8 codes. The integer product is exact (float64 holds every
    int32 sum), so the result equals ONNX Runtime's.
    """
    xq, x_scale, x_zero_point = dynamic_quantize(x)
    return integer_linear(xq, x_scale, x_zero_point, weight_t, w_scale, w_zero_point, bias)


def integer_linear(
    xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight_t: torch.Tensor,
    w_scale: torch.Tensor, w_zero_point: torch.Tensor, bias: torch.Tensor,
) -> torch.Tensor:
    """``MatMulInteger(xq, weight_t) → ·(x_scale·w_scale) + bias`` on given input codes: the
    second half of ``dynamic_linear``, exact in float64 as ONNX Runtime's int32 sums are."""
    acc = (xq.double() - x_zero_point.double()) @ dequantize(weight_t, torch.ones(()),
                                                             w_zero_point).double()
    return acc.float() * (x_scale * w_scale) + bias


@dynamic_linear.register_fake
def _(x, weight_t, w_scale, w_zero_point, bias):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


# ---------------------------------------------------------------------------- ONNX translation

SUPPORTED_OPSETS = range(13, 24)


def translation_table(opset: int) -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` at ``opset``."""
    import onnxscript

    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(f"`opset` must be an int in {SUPPORTED_OPSETS.start}.."
                         f"{SUPPORTED_OPSETS.stop - 1}, got {opset!r}")
    op = getattr(onnxscript, f"opset{opset}")

    def q_linear(x, scale, zero_point, axis: int, qmin: int, qmax: int):  # noqa: ANN001, ANN202
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        # Grids narrower than the storage type (4-bit codes in int8, narrow range) saturate
        # with an integer Clip; full 8-bit grids need none.
        return _clip(op, q, zero_point, qmin, qmax)

    def dq_linear(q, scale, zero_point, axis: int, block_size: int):  # noqa: ANN001, ANN202
        if block_size > 0:
            return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def dyn_linear(x, weight_t, w_scale, w_zero_point, bias):  # noqa: ANN001, ANN202
        xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, weight_t, x_zero_point, w_zero_point)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, w_scale))
        return op.Add(y, bias)

    def binarize_(x):  # noqa: ANN001, ANN202
        one = op.Constant(value=onnx_int8(1))
        return op.Where(op.GreaterOrEqual(x, op.CastLike(op.Constant(value_float=0.0), x)),
                        one, op.Neg(one))

    return {
        torch.ops.lowbit.binarize.default: binarize_,
        torch.ops.lowbit.quantize_linear.default: q_linear,
        torch.ops.lowbit.dequantize_linear.default: dq_linear,
        torch.ops.lowbit.dynamic_linear.default: dyn_linear,
    }


def onnx_int8(value: int) -> Any:
    """A scalar int8 ONNX tensor (for constants inside translations)."""
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.int8))


def _clip(op: Any, q: Any, zero_point: Any, qmin: int, qmax: int) -> Any:
    # onnxscript traces this Python: the branch is decided at export time, per node.
    if (qmin, qmax) in ((-128, 127), (0, 255)):
        return q
    lo = op.CastLike(op.Constant(value_int=qmin), zero_point)
    hi = op.CastLike(op.Constant(value_int=qmax), zero_point)
    return op.Clip(q, lo, hi)


# ---------------------------------------------------------------------------- TorchScript export

TORCHSCRIPT_OPSETS = range(13, 21)  # the legacy exporter stops at opset 20
_SYMBOLICS_REGISTERED = False


def register_torchscript_symbolics() -> None:
    """Teach ``torch.onnx.export(dynamo=False)`` the ``lowbit::`` ops (once per process).

    The same ONNX nodes as ``translation_table``: the TorchScript exporter keeps buffers as
    initializers, so weight codes stay int8/uint8 initializers feeding ``DequantizeLinear``.
    Registered at opset 13, they serve every later opset.
    """
    global _SYMBOLICS_REGISTERED
    if _SYMBOLICS_REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "v", "v", "i", "i", "i")
    def q_linear(g, x, scale, zero_point, axis, qmin, qmax):  # noqa: ANN001, ANN202
        q = g.op("QuantizeLinear", x, scale, zero_point, axis_i=axis)
        if (qmin, qmax) in ((-128, 127), (0, 255)):
            return q
        dtype = _jit_dtype(zero_point)
        lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
        hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
        return g.op("Clip", q, lo, hi)

    @sh.parse_args("v", "v", "v", "i", "i")
    def dq_linear(g, q, scale, zero_point, axis, block_size):  # noqa: ANN001, ANN202
        if block_size > 0:
            return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis,
                        block_size_i=block_size)
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)

    @sh.parse_args("v", "v", "v", "v", "v")
    def dyn_linear(g, x, weight_t, w_scale, w_zero_point, bias):  # noqa: ANN001, ANN202
        xq, x_scale, x_zero_point = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("MatMulInteger", xq, weight_t, x_zero_point, w_zero_point)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", x_scale, w_scale))
        return g.op("Add", y, bias)

    @sh.parse_args("v")
    def binarize_(g, x):  # noqa: ANN001, ANN202
        one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int8))
        zero = g.op("Constant", value_t=torch.tensor(0.0, dtype=_jit_dtype(x)))
        return g.op("Where", g.op("GreaterOrEqual", x, zero), one, g.op("Neg", one))

    for name, fn in (("quantize_linear", q_linear), ("dequantize_linear", dq_linear),
                     ("dynamic_linear", dyn_linear), ("binarize", binarize_)):
        register_custom_op_symbolic(f"lowbit::{name}", fn, TORCHSCRIPT_OPSETS.start)
    _SYMBOLICS_REGISTERED = True


def _jit_dtype(value: Any) -> torch.dtype:
    """The torch dtype of a TorchScript graph value (float32 where the tracer does not know)."""
    from torch.onnx._internal.torchscript_exporter import _type_utils

    try:
        return _type_utils.JitScalarType.from_value(value).dtype()
    except Exception:  # noqa: BLE001 - an untyped value: the deploy ops compute in float32
        return torch.float32
