"""Deploy modules: integer weights and frozen scales, computed with ONNX-exact ops.

``lowbit.convert`` builds these from the Quant wrappers. Their forward runs ``lowbit.ops``
(QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear+MatMulInteger semantics), so the
torch model and its ONNX export agree on every integer code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import fold_scale
from lowbit.numerics import broadcast_param, quantize
from lowbit.ops import binarize, dequantize_linear, dynamic_linear, quantize_linear
from lowbit.quantizers import QParams, Quantizer


class QuantizeDequantize(nn.Module):
    """A frozen activation quantizer: ``DequantizeLinear(QuantizeLinear(x))``."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, qparams: QParams) -> None:
        super().__init__()
        grid = qparams.grid
        self.grid = grid
        self.axis = 1 if qparams.axis is None else qparams.axis
        self.register_buffer("scale", qparams.scale.float())
        self.register_buffer("zero_point", qparams.zero_point.to(grid.storage_dtype))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_linear(x, self.scale, self.zero_point, self.axis, self.grid.qmin,
                               self.grid.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_linear(self.codes(x), self.scale, self.zero_point, self.axis, 0)

    def qparams(self) -> QParams:
        axis = None if self.scale.dim() == 0 else self.axis
        return QParams(self.scale, self.zero_point, self.grid, axis)

    def extra_repr(self) -> str:
        kind = "int" if self.grid.signed else "uint"
        return f"{kind}{self.grid.bits}, scale shape={tuple(self.scale.shape)}"


class BinarizeDequantize(nn.Module):
    """A frozen binary activation: codes ±1 (``x >= 0`` → +1) times a scale."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, qparams: QParams) -> None:
        super().__init__()
        self.grid = qparams.grid
        self.register_buffer("scale", qparams.scale.float())
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantize_linear(binarize(x), self.scale, self.zero_point, 1, 0)

    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.grid, None)

    def extra_repr(self) -> str:
        return "binary"


def _qdq(quantizer: Quantizer | None) -> nn.Module | None:
    """The frozen deploy form of an activation quantizer."""
    if quantizer is None:
        return None
    qparams = quantizer.qparams()
    if qparams.grid.odd:
        if qparams.grid.bits != 1:
            raise NotImplementedError(f"layer {quantizer.layer_name!r}: activations on a "
                                      f"{qparams.grid.bits}-bit odd grid have no deploy form")
        return BinarizeDequantize(qparams)
    return QuantizeDequantize(qparams)


def _smoothing(wrapper: Any) -> torch.Tensor | None:
    s = getattr(wrapper, "input_smoothing", None)
    return None if s is None else s.detach().clone()


def _smooth(x: torch.Tensor, factor: torch.Tensor | None, axis: int) -> torch.Tensor:
    """``x`` times its per-channel smoothing factor (one ONNX Mul), if the layer has one."""
    return x if factor is None else x * broadcast_param(factor, x, axis)


def _run(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


class IntWeight(nn.Module):
    """Integer weight codes with their scale and zero point (per tensor, channel or block)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, codes: torch.Tensor, qparams: QParams) -> None:
        super().__init__()
        weight = codes  # the shape is what matters below
        self.grid = qparams.grid
        self.axis = 0 if qparams.axis is None else qparams.axis
        self.block_size = qparams.group_size or 0
        scale, zero_point = qparams.scale.float(), qparams.zero_point
        if self.block_size:
            # ONNX blocked DequantizeLinear wants scale with the weight's rank.
            extra = (1,) * (weight.dim() - 2)
            shape = (*scale.shape, *weight.shape[2:])
            scale = scale.reshape(*scale.shape, *extra).expand(shape).contiguous()
            zero_point = zero_point.reshape(*zero_point.shape, *extra).expand(shape).contiguous()
        self.register_buffer("codes", codes.to(self.grid.storage_dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.to(self.grid.storage_dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, qparams: QParams) -> IntWeight:
        """Quantize a float weight with fixed qparams (round half to even, saturate)."""
        codes = quantize(weight.detach().float(), qparams.scale, qparams.zero_point, qparams.grid,
                         qparams.axis, qparams.group_size)
        return cls(codes, qparams)

    def forward(self) -> torch.Tensor:
        return dequantize_linear(self.codes, self.scale, self.zero_point, self.axis,
                                 self.block_size)

    def qparams(self) -> QParams:
        axis = None if self.scale.dim() == 0 else self.axis
        return QParams(self.scale, self.zero_point, self.grid, axis, self.block_size or None)

    def extra_repr(self) -> str:
        kind = "int" if self.grid.signed else "uint"
        return f"{kind}{self.grid.bits}, shape={tuple(self.codes.shape)}"


class IntBias(nn.Module):
    """A bias on the int32 grid of ``s_x·s_w``: int32 codes + ``DequantizeLinear``.

    Stored explicitly so that ONNX Runtime adds exactly this bias whether or not it fuses the
    layer into an integer kernel (its QDQ transforms round a float bias only inside fused node
    units)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, bias: torch.Tensor, step: torch.Tensor, *, below_sign: bool = False) -> None:
        super().__init__()
        step = step.detach().float().reshape(-1) if step.dim() else step.detach().float()
        if below_sign:  # (⌊b/step⌋ + ½)·step (QuantLayer.sign_reads_output): odd half steps
            codes, step = 2 * torch.floor(bias.detach().float() / step) + 1, step / 2
        else:
            codes = torch.round(bias.detach().float() / step)
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("scale", step)
        self.register_buffer("zero_point", torch.zeros(step.shape, dtype=torch.int32,
                                                       device=step.device))

    def forward(self) -> torch.Tensor:
        return dequantize_linear(self.codes, self.scale, self.zero_point, 0, 0)

    def extra_repr(self) -> str:
        return f"int32, shape={tuple(self.codes.shape)}"


class DeployLayer(nn.Module):
    """Common parts: optional input/output quantizers, a fused activation, the bias (int32
    codes where the layer has an integer accumulator, float otherwise)."""

    input_smoothing: torch.Tensor | None
    weight: IntWeight | None
    float_weight: torch.Tensor  # registered only when the weight is not quantized
    float_bias: torch.Tensor | None
    int_bias: IntBias | None

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = type(wrapper).float_type.__name__
        self.input_qdq = _qdq(wrapper.input_quant)
        self.output_qdq = _qdq(wrapper.output_quant)
        self.activation = wrapper.activation
        self.register_buffer("input_smoothing", _smoothing(wrapper))
        self.int_bias = None
        step = None
        with torch.no_grad():
            weight, bias, k = wrapper.folded_weight_and_bias()  # BatchNorm folded in, if any
            if wrapper.weight_quant is not None:
                codes, qparams = wrapper.weight_quant.quantize_weight(weight.detach())
                if k is not None:  # a fixed value set: the BN goes into the scale
                    codes, qparams = _fold_into_scale(codes, qparams, k)
                self.weight = IntWeight(codes, qparams)
                step = wrapper.bias_step(qparams.scale)  # the int32 grid of s_x·s_w, if any
            else:
                self.register_buffer("float_weight", weight.detach().clone())
                self.weight = None
        if bias is not None and step is not None:
            self.int_bias = IntBias(bias, step, below_sign=wrapper.sign_reads_output())
            bias = None
        self.register_buffer("float_bias", None if bias is None else bias.detach().clone())

    def bias(self) -> torch.Tensor | None:
        return self.int_bias() if self.int_bias is not None else self.float_bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.float_weight if self.weight is None else self.weight()

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            y = self.activation(y)
        return _run(self.output_qdq, y)


def _fold_into_scale(codes: torch.Tensor, qparams: QParams,
                     k: torch.Tensor) -> tuple[torch.Tensor, QParams]:
    """``codes · s · k`` with the per-channel BN factor ``k`` as the dequantization scale
    ``s·|k|``; channels with ``k < 0`` negate their codes (odd grids are symmetric)."""
    if not qparams.grid.odd or qparams.axis not in (None, 0):
        raise NotImplementedError("only odd value grids scaled per tensor or per output "
                                  "channel (axis 0) keep a BatchNorm in their scale")
    shape = (-1,) + (1,) * (codes.dim() - 1)
    codes = codes * torch.where(k < 0, -1.0, 1.0).reshape(shape)
    scale = fold_scale(qparams.scale, k, codes.shape[0])
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    return codes, QParams(scale, zero_point, qparams.grid, 0)


class DeployLinear(DeployLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.input_qdq, _smooth(x, self.input_smoothing, -1))
        return self.finish(F.linear(x, self.dequantized_weight(), self.bias()))


class DeployConv(DeployLayer):
    def __init__(self, wrapper: Any) -> None:
        super().__init__(wrapper)
        self.dims = wrapper.weight.dim() - 2
        self.stride, self.dilation, self.groups = wrapper.stride, wrapper.dilation, wrapper.groups
        self.padding, self.padding_mode = wrapper.padding, wrapper.padding_mode
        self._pad = wrapper._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.input_qdq, _smooth(x, self.input_smoothing, 1))
        conv = F.conv1d if self.dims == 1 else F.conv2d
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        y = conv(x, self.dequantized_weight(), self.bias(), self.stride, padding, self.dilation,
                 self.groups)
        return self.finish(y)


class DeployEmbedding(nn.Module):
    """Integer table rows gathered with their scales: ``(codes[i] − z[i]) · s[i]``. ONNX:
    Gather on the int8 initializer (and on the scales), then one Sub/Mul on the gathered rows
    only; a DequantizeLinear of the whole table would run on every call."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = "Embedding"
        with torch.no_grad():
            codes, qparams = wrapper.weight_quant.quantize_weight(wrapper.weight.detach())
        self.weight = IntWeight(codes, qparams)
        self.padding_idx = wrapper.padding_idx
        self.output_qdq = _qdq(wrapper.output_quant)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = w.codes[ids].float()
        if w.scale.dim() == 0:
            y = (rows - w.zero_point.float()) * w.scale
        else:
            zero_point = w.zero_point[ids].float().unsqueeze(-1)
            y = (rows - zero_point) * w.scale[ids].unsqueeze(-1)
        return _run(self.output_qdq, y)


class DynamicLinear(nn.Module):
    """Linear with int8 weights whose input is quantized at run time (``dynamic=True``)."""

    input_smoothing: torch.Tensor | None
    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    bias: torch.Tensor

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = "Linear"
        codes, qparams = wrapper.weight_quant.quantize_weight(wrapper.weight.detach())
        grid = qparams.grid
        if qparams.group_size is not None or grid.bits != 8 or not grid.signed or grid.odd:
            raise NotImplementedError(
                f"layer {wrapper.layer_name!r}: dynamic inputs need int8 signed weights per "
                "tensor or per channel (ONNX MatMulInteger)"
            )
        weight = IntWeight(codes, qparams)
        self.grid = qparams.grid
        self.register_buffer("weight_t", weight.codes.t().contiguous())  # (in, out) for MatMul
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero_point", weight.zero_point)
        self.register_buffer("bias", wrapper.bias.detach().clone() if wrapper.bias is not None
                             else torch.zeros(wrapper.out_features))
        self.activation = wrapper.activation
        self.output_qdq = _qdq(wrapper.output_quant)
        self.register_buffer("input_smoothing", _smoothing(wrapper))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _smooth(x, self.input_smoothing, -1)
        y = dynamic_linear(x, self.weight_t, self.weight_scale, self.weight_zero_point, self.bias)
        if self.activation is not None:
            y = self.activation(y)
        return _run(self.output_qdq, y)

    def weight_qparams(self) -> QParams:
        axis = None if self.weight_scale.dim() == 0 else 0
        return QParams(self.weight_scale, self.weight_zero_point, self.grid, axis)


class DeployBinary(nn.Module):
    """Deploy form of ``QuantAdd`` / ``QuantMatMul``."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = wrapper.op_name
        self.input_qdq = _qdq(wrapper.input_quant)
        self.other_qdq = _qdq(wrapper.other_quant)
        self.output_qdq = _qdq(wrapper.output_quant)
        self.op = wrapper.op_name

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _run(self.input_qdq, a), _run(self.other_qdq, b)
        y = a + b if self.op == "add" else torch.matmul(a, b)
        return _run(self.output_qdq, y)

    def extra_repr(self) -> str:
        return f"op={self.op}"


class DeployActivation(nn.Module):
    """Deploy form of a quantized activation module (``QuantReLU``, ``QuantHardtanh``...)."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = type(wrapper).float_type.__name__
        self.input_qdq = _qdq(wrapper.input_quant)
        self.output_qdq = _qdq(wrapper.output_quant)
        self.module = wrapper.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.output_qdq, self.module(_run(self.input_qdq, x)))
