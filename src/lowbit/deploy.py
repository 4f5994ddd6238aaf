"""Deploy modules: integer weights and frozen scales, computed with ONNX-exact ops.

``lowbit.convert`` builds these from the Quant wrappers. Their forward runs ``lowbit.ops``
(QuantizeLinear / DequantizeLinear / DynamicQuantizeLinear+MatMulInteger semantics), so the
torch model and its ONNX export agree on every integer code.

They are drop-in for the float layers they replace: each carries the float module's public
attributes (``in_features``, ``kernel_size``, ``stride``, ``padding_idx``...), ``bias`` is a
tensor or None, and ``weight`` answers ``shape``, ``dtype`` (the float dtype it dequantizes
to), ``device``, ``ndim``, ``dim()`` and ``size()`` like the float weight (calling it,
``layer.weight()``, gives the dequantized tensor) — so model code that reads them (same-padding
helpers, ``x.to(layer.weight.dtype)``) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import check_input_count, fold_scale
from lowbit.numerics import broadcast_param, quantize
from lowbit.ops import binarize, dequantize_linear, dynamic_linear, integer_linear, quantize_linear
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
        return self.from_codes(self.codes(x))

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The values of given codes (another runtime's, when checking parity)."""
        return dequantize_linear(codes, self.scale, self.zero_point, self.axis, 0)

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


class WeightInfo:
    """What model code reads off a float weight, for an integer one: ``shape``, ``dtype`` (the
    float dtype it dequantizes to), ``device``, ``ndim``, ``dim()``, ``size()``, ``numel()``.
    Subclasses give ``_codes`` (weight layout) and ``_scale``."""

    @property
    def _codes(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def _scale(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return self._codes.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._scale.dtype

    @property
    def device(self) -> torch.device:
        return self._codes.device

    @property
    def ndim(self) -> int:
        return self._codes.dim()

    def dim(self) -> int:
        return self._codes.dim()

    def size(self, dim: int | None = None) -> Any:
        return self._codes.size() if dim is None else self._codes.size(dim)

    def numel(self) -> int:
        return self._codes.numel()


class IntWeight(WeightInfo, nn.Module):
    """Integer weight codes with their scale and zero point (per tensor, channel or block).
    Calling it dequantizes; it describes itself like the float weight (``WeightInfo``)."""

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

    @property
    def _codes(self) -> torch.Tensor:
        return self.codes

    @property
    def _scale(self) -> torch.Tensor:
        return self.scale

    def extra_repr(self) -> str:
        kind = "int" if self.grid.signed else "uint"
        return f"{kind}{self.grid.bits}, shape={tuple(self.codes.shape)}"


class PackedIntWeight(IntWeight):
    """4-bit codes of a ``[rows, cols]`` table stored two a byte along each row: ``packed`` is
    uint8 ``[rows, cols / 2]``, code ``2j`` in the low nibble of byte ``j``, as ``codes - qmin``
    (0..15). ``codes`` unpacks the whole table; ``rows(ids)`` only the gathered rows, with
    float ops ONNX Runtime runs on any type (a uint8 ``>>`` exports as a signed shift).

    Example: codes ``[3, 12]`` of an unsigned grid are the byte ``3 + 16·12 = 195``."""

    packed: torch.Tensor

    def __init__(self, codes: torch.Tensor, qparams: QParams) -> None:
        nn.Module.__init__(self)
        self.grid = qparams.grid
        self.axis = 0 if qparams.axis is None else qparams.axis
        self.block_size = qparams.group_size or 0
        self.shape_ = tuple(codes.shape)
        unsigned = (codes.to(torch.int64) - self.grid.qmin).reshape(codes.shape[0], -1, 2)
        self.register_buffer("packed", (unsigned[..., 0] + 16 * unsigned[..., 1]).to(torch.uint8))
        self.register_buffer("scale", qparams.scale.float())
        self.register_buffer("zero_point", qparams.zero_point.to(self.grid.storage_dtype))

    @staticmethod
    def packs(codes: torch.Tensor, qparams: QParams) -> bool:
        """Whether these codes fit: a 2-D table of even width on a grid of at most 16 levels."""
        grid = qparams.grid
        return (codes.dim() == 2 and codes.shape[1] % 2 == 0 and grid.qmax - grid.qmin <= 15
                and not grid.odd)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The codes of rows ``ids`` as float, shape ``(*ids.shape, cols)``."""
        byte = self.packed[ids].float()
        high = torch.floor(byte / 16)
        codes = torch.stack([byte - 16 * high, high], dim=-1).reshape(*ids.shape, -1)
        return codes + self.grid.qmin if self.grid.qmin else codes

    @property
    def _codes(self) -> torch.Tensor:
        # what WeightInfo reads shape, size and device off: a zero-stride view, not the table
        return torch.empty((), dtype=self.grid.storage_dtype,
                           device=self.packed.device).expand(self.shape_)

    @property
    def codes(self) -> torch.Tensor:  # type: ignore[override]
        ids = torch.arange(self.packed.shape[0], device=self.packed.device)
        return self.rows(ids).to(self.grid.storage_dtype)

    def extra_repr(self) -> str:
        kind = "int" if self.grid.signed else "uint"
        return f"{kind}{self.grid.bits} packed two a byte, shape={self.shape_}"


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


def keep_float_attributes(deploy: nn.Module, wrapper: Any) -> None:
    """Give a deploy module the float layer's public attributes (``kernel_size``...)."""
    for key, value in wrapper.float_attributes().items():
        setattr(deploy, key, value)


class DeployLayer(nn.Module):
    """Common parts: optional input/output quantizers, a fused activation, the bias (int32
    codes where the layer has an integer accumulator, float otherwise).

    ``weight`` is an ``IntWeight`` (buffers ``weight.codes`` / ``.scale`` / ``.zero_point``,
    the names the exporter gives the initializers) or, for a layer whose weight stays float,
    a float buffer ``weight``. ``bias`` is the bias tensor the layer adds, or None."""

    input_smoothing: torch.Tensor | None
    weight: IntWeight | torch.Tensor
    float_bias: torch.Tensor | None
    int_bias: IntBias | None

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = type(wrapper).float_type.__name__
        keep_float_attributes(self, wrapper)
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
                self.register_buffer("weight", weight.detach().clone())
        if bias is not None and step is not None:
            self.int_bias = IntBias(bias, step, below_sign=wrapper.sign_reads_output())
            bias = None
        self.register_buffer("float_bias", None if bias is None else bias.detach().clone())

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        """The bias the layer adds (dequantized from int32 codes where it has them)."""
        return self.int_bias() if self.int_bias is not None else self.float_bias

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.weight
        return weight() if isinstance(weight, IntWeight) else weight

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
        return self.finish(F.linear(x, self.dequantized_weight(), self.bias))


class DeployConv(DeployLayer):
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    padding_mode: str

    def __init__(self, wrapper: Any) -> None:
        super().__init__(wrapper)  # stride, padding, kernel_size... come with the attributes
        self.dims = wrapper.weight.dim() - 2
        self._pad = wrapper._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.input_qdq, _smooth(x, self.input_smoothing, 1))
        conv = F.conv1d if self.dims == 1 else F.conv2d
        padding: Any = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        y = conv(x, self.dequantized_weight(), self.bias, self.stride, padding, self.dilation,
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
        keep_float_attributes(self, wrapper)  # num_embeddings, embedding_dim, padding_idx...
        with torch.no_grad():
            codes, qparams = wrapper.weight_quant.quantize_weight(wrapper.weight.detach())
        # 4-bit rows go two codes a byte: the table is most of a small encoder's file
        packed = PackedIntWeight.packs(codes, qparams)
        self.weight = (PackedIntWeight if packed else IntWeight)(codes, qparams)
        self.output_qdq = _qdq(wrapper.output_quant)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if isinstance(w, PackedIntWeight):
            rows = w.rows(ids)
        else:
            rows = w.codes[ids].float()
        if w.scale.dim() == 0:
            y = (rows - w.zero_point.float()) * w.scale
        elif w.block_size:  # groups of block_size along each row: (*ids, groups, block_size)
            rows = rows.reshape(*ids.shape, -1, w.block_size)
            zero_point = w.zero_point[ids].float().unsqueeze(-1)
            y = ((rows - zero_point) * w.scale[ids].unsqueeze(-1)).flatten(-2)
        else:
            zero_point = w.zero_point[ids].float().unsqueeze(-1)
            y = (rows - zero_point) * w.scale[ids].unsqueeze(-1)
        return _run(self.output_qdq, y)


class TransposedWeight(WeightInfo):
    """``DynamicLinear.weight``: its ``(in, out)`` codes seen as the ``(out, in)`` weight of the
    Linear it replaces; calling it dequantizes."""

    def __init__(self, layer: DynamicLinear) -> None:
        self.layer = layer

    @property
    def _codes(self) -> torch.Tensor:
        return self.layer.weight_t.t()

    @property
    def _scale(self) -> torch.Tensor:
        return self.layer.weight_scale

    def __call__(self) -> torch.Tensor:
        qp = self.layer.weight_qparams()
        return dequantize_linear(self._codes, qp.scale, qp.zero_point, 0, 0)


class DynamicLinear(nn.Module):
    """Linear with int8 weights whose input is quantized at run time (``dynamic=True``).

    The codes are stored ``(in, out)`` (``weight_t``, what MatMulInteger reads); ``weight``
    describes them as the Linear's ``(out, in)`` weight."""

    input_smoothing: torch.Tensor | None
    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    bias: torch.Tensor | None
    zero_bias: torch.Tensor

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = "Linear"
        keep_float_attributes(self, wrapper)  # in_features, out_features (nf, nx)
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
                             else None)
        # What MatMulInteger's float epilogue adds when the layer has no bias.
        self.register_buffer("zero_bias", torch.zeros((), device=codes.device),
                             persistent=False)
        self.activation = wrapper.activation
        self.output_qdq = _qdq(wrapper.output_quant)
        self.register_buffer("input_smoothing", _smoothing(wrapper))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.zero_bias if self.bias is None else self.bias
        y = dynamic_linear(self.smoothed(x), self.weight_t, self.weight_scale,
                           self.weight_zero_point, bias)
        return self._finish(y)

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """The input as ``DynamicQuantizeLinear`` sees it (after SmoothQuant's Mul, if any)."""
        return _smooth(x, self.input_smoothing, -1)

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor,
                   zero_point: torch.Tensor) -> torch.Tensor:
        """The output for given input codes (another runtime's, when checking parity)."""
        bias = self.zero_bias if self.bias is None else self.bias
        return self._finish(integer_linear(codes, scale, zero_point, self.weight_t,
                                           self.weight_scale, self.weight_zero_point, bias))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            y = self.activation(y)
        return _run(self.output_qdq, y)

    def weight_qparams(self) -> QParams:
        axis = None if self.weight_scale.dim() == 0 else 0
        return QParams(self.weight_scale, self.weight_zero_point, self.grid, axis)

    @property
    def weight(self) -> TransposedWeight:
        return TransposedWeight(self)


_BINARY_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "mul": torch.mul, "matmul": torch.matmul}


class DeployBinary(nn.Module):
    """Deploy form of ``QuantAdd`` / ``QuantMul`` / ``QuantMatMul``."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = wrapper.op_name
        keep_float_attributes(self, wrapper)
        self.input_qdq = _qdq(wrapper.input_quant)
        self.other_qdq = _qdq(wrapper.other_quant)
        self.output_qdq = _qdq(wrapper.output_quant)
        self.op = wrapper.op_name

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _run(self.input_qdq, a), _run(self.other_qdq, b)
        y = _BINARY_OPS[self.op](a, b)
        return _run(self.output_qdq, y)

    def extra_repr(self) -> str:
        return f"op={self.op}"


class DeployCat(nn.Module):
    """Deploy form of ``QuantCat``: QDQ on each input, ``torch.cat``, QDQ on the output."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = wrapper.op_name
        keep_float_attributes(self, wrapper)  # dim, inputs
        self.dim = int(wrapper.dim)
        self.input_qdqs = nn.ModuleList(
            [_qdq(getattr(wrapper, slot)) or nn.Identity() for slot in wrapper.input_slots()])
        self.output_qdq = _qdq(wrapper.output_quant)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        parts = [qdq(x) for qdq, x in zip(self.input_qdqs, check_input_count(self, tensors))]
        return _run(self.output_qdq, torch.cat(parts, dim=self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class DeployActivation(nn.Module):
    """Deploy form of a quantized activation module (``QuantReLU``, ``QuantHardtanh``...)."""

    def __init__(self, wrapper: Any) -> None:
        super().__init__()
        self.layer_name = wrapper.layer_name
        self.layer_type = type(wrapper).float_type.__name__
        keep_float_attributes(self, wrapper)  # inplace, min_val, max_val...
        self.input_qdq = _qdq(wrapper.input_quant)
        self.output_qdq = _qdq(wrapper.output_quant)
        self.module = wrapper.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run(self.output_qdq, self.module(_run(self.input_qdq, x)))


class DeploySiLU(DeployActivation):
    """Deploy form of ``QuantSiLU``: ``x * QDQ(sigmoid(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run(self.input_qdq, x)
        return x * _run(self.output_qdq, torch.sigmoid(x))
