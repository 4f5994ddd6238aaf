"""Quant wrappers: drop-in layers that carry a weight quantizer and input/output quantizers.

``QuantLinear``, ``QuantConv1d`` and ``QuantConv2d`` subclass their torch layers, so parameter
names (``weight``, ``bias``), ``isinstance`` checks and optimizers keep working. ``Add`` and
``MatMul`` are float modules for functional ops; ``QuantAdd``/``QuantMatMul`` quantize their
two inputs. Each wrapper is registered under the name rules use (``"Conv2d"``, ``"add"``...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import QuantSpec
from lowbit.numerics import round_ste
from lowbit.quantizers import Quantizer, make_quantizer
from lowbit.registry import LAYERS


@dataclass(frozen=True)
class LayerSpecs:
    """The resolved specs of one layer (what a plan entry says)."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None


def _apply(q: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


class QuantLayer:
    """The one mixin of the wrappers: builds and names the quantizers, keeps an activation.

    ``activation`` is a fused ReLU (moved in from the float model) that runs before the output
    quantizer, so an output range never includes values the ReLU would drop.
    """

    float_type: type[nn.Module]
    input_axis: int = 1  # channel axis of the layer's activations
    dynamic_input: bool = False  # has a deploy form for run-time quantized inputs

    weight_quant: Quantizer | None
    input_quant: Quantizer | None
    output_quant: Quantizer | None
    activation: nn.Module | None

    def _init_quant(self, specs: LayerSpecs, name: str) -> None:
        module: Any = self
        if specs.input is not None and specs.input.dynamic and not self.dynamic_input:
            raise NotImplementedError(
                f"layer {name!r} ({type(self).float_type.__name__}): dynamic inputs are "
                "supported on Linear layers only (ONNX MatMulInteger)"
            )
        weight = getattr(module, "weight", None)
        module.weight_quant = make_quantizer(specs.weight, role="weight", channel_axis=0,
                                             layer_name=name)
        module.input_quant = make_quantizer(specs.input, role="input",
                                            channel_axis=self.input_axis, layer_name=name)
        module.output_quant = make_quantizer(specs.output, role="output",
                                             channel_axis=self.input_axis, layer_name=name)
        module.activation = None
        module.layer_name = name
        if module.weight_quant is not None and weight is not None:
            init_weight_quantizer(module.weight_quant, weight)

    def quantizers(self) -> list[Quantizer]:
        module: Any = self
        return [q for q in (module.weight_quant, module.input_quant, module.output_quant)
                if q is not None]

    def effective_bias(self) -> torch.Tensor | None:
        """The bias as integer kernels apply it: on the int32 grid of ``s_input · s_weight``.

        ONNX Runtime's QLinearConv/QGemm add ``round(b / (s_x·s_w))`` to the int32 accumulator;
        simulating that rounding here keeps the torch model and ONNX Runtime on the same codes
        (on the digits CNN it took identical codes from 99.8% to 99.999%). The bias stays float
        where there is no integer accumulator: float or dynamic inputs, per-channel inputs,
        per-group weights, or ranges not calibrated yet.
        """
        module: Any = self
        bias, x_q, w_q = module.bias, module.input_quant, module.weight_quant
        if bias is None or x_q is None or w_q is None or x_q.spec.dynamic:
            return bias
        if x_q.axis is not None or w_q.group_size is not None or not (x_q.is_ready() and
                                                                         w_q.is_ready()):
            return bias
        x_scale, w_scale = getattr(x_q, "scale", None), getattr(w_q, "scale", None)
        if x_scale is None or w_scale is None or x_q.observing:
            return bias
        step = (x_scale * w_scale).reshape(-1) if w_scale.dim() else x_scale * w_scale
        return round_ste(bias / step) * step


def init_weight_quantizer(quantizer: Quantizer, weight: torch.Tensor) -> None:
    """Weights are known up front: set the range from them right away (PTQ needs no data)."""
    quantizer.set_weight_shape(weight.shape)
    quantizer.observe(weight)
    quantizer.freeze()


@LAYERS.register("Linear")
class QuantLinear(nn.Linear, QuantLayer):
    float_type = nn.Linear
    input_axis = -1
    dynamic_input = True

    @classmethod
    def from_float(cls, module: nn.Linear, specs: LayerSpecs, name: str = "") -> QuantLinear:
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.weight, new.bias = module.weight, module.bias
        new._init_quant(specs, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _apply(self.input_quant, x)
        y = F.linear(x, _apply(self.weight_quant, self.weight), self.effective_bias())
        if self.activation is not None:
            y = self.activation(y)
        return _apply(self.output_quant, y)


class _QuantConvNd(QuantLayer):
    @classmethod
    def from_float(cls, module: Any, specs: LayerSpecs, name: str = "") -> Any:
        conv_cls: Any = cls  # a QuantConv1d/QuantConv2d: takes the torch conv's arguments
        new = conv_cls(module.in_channels, module.out_channels, module.kernel_size,
                       stride=module.stride, padding=module.padding, dilation=module.dilation,
                       groups=module.groups, bias=module.bias is not None,
                       padding_mode=module.padding_mode,
                       device=module.weight.device, dtype=module.weight.dtype)
        new.weight, new.bias = module.weight, module.bias
        new._init_quant(specs, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module: Any = self
        x = _apply(module.input_quant, x)
        y = module._conv_forward(x, _apply(module.weight_quant, module.weight),
                                 module.effective_bias())
        if module.activation is not None:
            y = module.activation(y)
        return _apply(module.output_quant, y)


@LAYERS.register("Conv1d")
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    float_type = nn.Conv1d


@LAYERS.register("Conv2d")
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    float_type = nn.Conv2d


class Add(nn.Module):
    """``a + b`` as a module, so that a rule can give its inputs quantizers."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that a rule can give its inputs quantizers."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class _QuantBinary(nn.Module, QuantLayer):
    """Two-input op: ``input`` spec for each input (one quantizer each), optional output."""

    float_type: type[nn.Module]
    input_axis = 1
    other_quant: Quantizer | None

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_float(cls, module: nn.Module, specs: LayerSpecs, name: str = "") -> Any:
        if specs.weight is not None:
            raise ValueError(f"layer {name!r} ({cls.float_type.__name__}) has no weight; "
                             "its rule's `weight` spec cannot apply")
        new = cls()
        new._init_quant(specs, name)
        new.other_quant = make_quantizer(specs.input, role="input", channel_axis=cls.input_axis,
                                         layer_name=name)
        return new

    def quantizers(self) -> list[Quantizer]:
        return [*super().quantizers(), *([self.other_quant] if self.other_quant else [])]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.op(_apply(self.input_quant, a), _apply(self.other_quant, b))
        return _apply(self.output_quant, y)

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@LAYERS.register("add")
class QuantAdd(_QuantBinary):
    float_type = Add
    op_name = "add"

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


@LAYERS.register("matmul")
class QuantMatMul(_QuantBinary):
    float_type = MatMul
    op_name = "matmul"
    input_axis = -1

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


def quant_type_for(module: nn.Module) -> str | None:
    """The registered layer-type name for a float module (exact type match), or None."""
    for name in LAYERS:
        if type(module) is LAYERS.get(name).float_type:
            return name
    return None
