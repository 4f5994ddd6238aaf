"""Quant wrappers: drop-in layers that carry a weight quantizer and input/output quantizers.

``QuantLinear``, ``QuantConv1d`` and ``QuantConv2d`` subclass their torch layers, so parameter
names (``weight``, ``bias``), ``isinstance`` checks and optimizers keep working. ``Add``,
``Mul``, ``MatMul`` and ``Cat`` are float modules for functional ops; ``QuantAdd``/
``QuantMul``/``QuantMatMul``/``QuantCat`` quantize each of their inputs. Each wrapper is
registered under the name rules use (``"Conv2d"``, ``"add"``...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import LayerSpecs
from lowbit.float_modules import (
    activation_lookalike,
    as_parameter,
    float_class,
    is_transposed_linear,
    is_weight_standardized,
    public_attributes,
    weight_of,
)
from lowbit.numerics import broadcast_param, round_ste
from lowbit.quantizers import Quantizer, make_quantizer, scope
from lowbit.registry import LAYERS


def _apply(q: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if q is None else q(x)


class QuantLayer:
    """The one mixin of the wrappers: builds and names the quantizers, keeps an activation.

    ``activation`` is a fused ReLU (moved in from the float model) that runs before the output
    quantizer, so an output range never includes values the ReLU would drop.
    """

    holds_weight = True  # False for adds, cats, activations and pools (plan.holds_weight)

    float_type: type[nn.Module]
    input_axis: int = 1  # channel axis of the layer's activations
    dynamic_input: bool = False  # has a deploy form for run-time quantized inputs
    # ``output_quant`` quantizes what the layer returns (False for a SiLU, whose output
    # quantizer is its gate's), so readers of the output may take it as it is (lowbit.share).
    quantizes_output: bool = True
    # Calibration left the smoothing its input spec asks for off (it lowered the model's
    # fidelity: lowbit.calibrate's smoothing check), so convert does not warn about it.
    smoothing_declined: bool = False

    weight_quant: Quantizer | None
    input_quant: Quantizer | None
    output_quant: Quantizer | None
    activation: nn.Module | None
    bn: nn.Module | None
    freeze_bn: int | None

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
        module.bn = None  # a BatchNorm folded while training (lowbit.prepare_qat)
        module.freeze_bn = None
        module.layer_name = name
        # Per-input-channel factor (1/s of SmoothQuant or AWQ) applied before the input
        # quantizer; None until lowbit.calibrate migrates scales into the weight.
        module.register_buffer("input_smoothing", None)
        module.register_load_state_dict_pre_hook(_make_room_for_smoothing)
        if module.weight_quant is not None and weight is not None:
            init_weight_quantizer(module.weight_quant, weight)

    def _init_weightless(self, module: nn.Module, specs: LayerSpecs, name: str) -> Any:
        """Set up an op that holds no weight (add, matmul, cat, an activation or pool): refuse a
        weight spec, carry the float module's attributes, and give every tensor input its
        quantizer (``input_slots``). Returns ``self``."""
        if specs.weight is not None:
            raise ValueError(f"layer {name!r} ({type(self).float_type.__name__}) has no weight; "
                             "its rule's `weight` spec cannot apply")
        self._keep_float_attributes(module)
        self._init_quant(specs, name)
        for slot in self.input_slots()[1:]:
            setattr(self, slot, make_quantizer(specs.input, role="input",
                                               channel_axis=self.input_axis, layer_name=name))
        return self

    def _keep_float_attributes(self, module: nn.Module) -> None:
        """Carry the float module's public attributes (``kernel_size``, ``padding_idx``,
        Conv1D's ``nf``/``nx``...): model code that reads them runs unchanged on the wrapper
        and, through ``float_attributes``, on its deploy form."""
        attributes = public_attributes(module)
        for key, value in attributes.items():
            setattr(self, key, value)
        self._float_attributes = tuple(attributes)

    def float_attributes(self) -> dict[str, Any]:
        """The float module's public attributes, as this wrapper holds them now."""
        return {k: getattr(self, k) for k in getattr(self, "_float_attributes", ())}

    def smooth_input(self, s: torch.Tensor) -> None:
        """Migrate per-input-channel scales ``s`` into the weight: ``W[:, j] *= s_j`` and the
        input is divided by ``s`` before it is quantized (the layer's function is unchanged).
        Successive calls compose."""
        module: Any = self
        with torch.no_grad():
            s = s.to(module.weight)
            replace_weight(module, module.weight * broadcast_param(s, module.weight, 1))
            old = module.input_smoothing
            module.input_smoothing = 1.0 / s if old is None else old / s
        self.refresh_weight_range()

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        module: Any = self
        s = module.input_smoothing
        if s is None:
            return x

        def smooth() -> torch.Tensor:
            return x * broadcast_param(s, x, self.input_axis)

        q = module.input_quant
        if q is None or not (q.observing or q.training):
            return smooth()
        # Readers of one tensor with one factor get one smoothed tensor (quantizers/scope.py),
        # so their shared input quantizer observes and counts it once per model call.
        return scope.smoothed(x, s, smooth)

    def refresh_weight_range(self) -> None:
        """Call after replacing the weight outside training (loading float parameters):
        observer-driven weight ranges follow the new weight at the next eval or convert."""
        module: Any = self
        if module.weight_quant is not None:
            module.weight_quant.weight_changed()

    def quantizers(self) -> list[Quantizer]:
        module: Any = self
        extra = [getattr(module, slot) for slot in self.input_slots()[1:]]
        return [q for q in (module.weight_quant, module.input_quant, *extra, module.output_quant)
                if q is not None]

    def input_slots(self) -> tuple[str, ...]:
        """The attribute holding the quantizer of each tensor input, by position."""
        return ("input_quant",)

    def effective_bias(self, bias: torch.Tensor | None = None,
                       weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The bias as integer kernels apply it: on the int32 grid of ``s_input · s_weight``.

        ONNX Runtime's QLinearConv/QGemm add ``round(b / (s_x·s_w))`` to the int32 accumulator,
        and its QDQ transforms quantize a float bias that way wherever they fuse a node unit
        (input and weight from DequantizeLinear, output into QuantizeLinear). The export
        therefore stores this bias as int32 codes + DequantizeLinear, and the quant layers
        compute with the same values, so torch and ONNX Runtime agree whether or not a kernel
        is fused (on the digits CNN it took identical codes from 99.8% to 99.999%). ``bias`` /
        ``weight_scale`` default to the layer's own (BN folding passes the folded ones).
        """
        module: Any = self
        bias = module.bias if bias is None else bias
        step = self.bias_step(weight_scale) if bias is not None else None
        if step is None:
            return bias
        if self.sign_reads_output():
            v = bias / step
            return (v + (torch.floor(v) + 0.5 - v).detach()) * step  # straight-through
        return round_ste(bias / step) * step

    def sign_reads_output(self) -> bool:
        """A sign (``splits_at_zero``) quantizes the output. The bias on the int32 grid is then
        ``(⌊b/step⌋ + ½)·step``: for every integer sum ``j``, ``j + ⌊b/step⌋ + ½ >= 0`` exactly
        when ``j·step + b >= 0``, so the signs are those of the float bias, and no sum lands on
        0, where float accumulation order would pick the sign (with the bias rounded to the
        grid, torch and ONNX Runtime disagreed on 2% of a binary layer's outputs)."""
        out_q = getattr(self, "output_quant", None)
        return out_q is not None and out_q.splits_at_zero

    def bias_step(self, weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The int32 grid ``s_x·s_w`` of the bias (per output channel or scalar), or ``None``
        where there is no integer accumulator: float, dynamic or per-channel inputs, per-group
        weights, ranges not calibrated yet (or, while training, a value set whose scale follows
        the weight)."""
        module: Any = self
        x_q, w_q = module.input_quant, module.weight_quant
        if x_q is None or w_q is None or x_q.spec.dynamic:
            return None
        if x_q.axis is not None or w_q.group_size is not None or x_q.observing or not (
                x_q.is_ready() and w_q.is_ready()):
            return None
        if weight_scale is None:
            if w_q.folds_bn:  # a scaled grid (ste, lsq): the scale is the quantizer's own
                weight_scale = w_q.qparams().scale
            elif module.training:
                return None
            else:
                weight_scale = w_q.quantize_weight(module.weight)[1].scale
        x_scale = x_q.qparams().scale.to(weight_scale.device)
        w_scale = weight_scale.detach()
        return (x_scale * w_scale).reshape(-1) if w_scale.dim() else x_scale * w_scale

    # ------------------------------------------------------------------ BatchNorm folding

    def _bn_factor(self) -> torch.Tensor:
        """``k = γ / sqrt(running_var + eps)`` per output channel, (C_out,)."""
        bn: Any = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        return bn.weight / std if bn.affine else 1.0 / std

    def _folded_bias(self, k: torch.Tensor) -> torch.Tensor:
        """``b' = β + (b − μ)·k``: the bias of the layer with its BatchNorm folded in."""
        module: Any = self
        bn: Any = self.bn
        bias = module.bias if module.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return beta + (bias - bn.running_mean) * k

    def bn_uses_batch_stats(self) -> bool:
        """Training with BatchNorm not yet frozen (``freeze_bn`` steps, or ``bn.eval()``)."""
        module: Any = self
        bn: Any = self.bn
        return module.training and bn.training and not module.bn_frozen()

    def bn_frozen(self) -> bool:
        module: Any = self
        after = module.freeze_bn
        return after is not None and self._bn_steps_seen() >= after

    def _bn_steps_seen(self) -> int:
        """``bn_steps`` as a Python int: read from the buffer once after construction or a
        load, then counted on the host (no device sync per training step)."""
        module: Any = self
        steps = module.__dict__.get("_bn_steps_host")
        if steps is None:
            steps = module._bn_steps_host = int(module.bn_steps)
        return steps

    def _forward_weighted(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        """Input quantizer → ``op(x, weight, bias)`` (with BN folding) → activation → output."""
        module: Any = self
        x = _apply(module.input_quant, self._smooth(x))
        if module.bn is None:
            y = op(x, _apply(module.weight_quant, module.weight), module.effective_bias())
        else:
            y = self._forward_bn(x, op)
        if module.activation is not None:
            y = module.activation(y)
        return _apply(module.output_quant, y)

    def _forward_bn(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        """Training-time BN folding (Jacob et al.; docs/algorithms.md §1).

        Scaled grids (``folds_bn``): the weight is quantized as ``W·k`` with the running-stat
        factor ``k``; while BN uses batch statistics the output is divided by ``k`` and
        normalised by the batch (torch.ao's ``conv_fused``), afterwards the layer is exactly the
        folded one. Fixed value sets (binary, DoReFa, SLB) carry no scale: the BN stays after
        the layer and folds into the per-channel dequantization scale at convert.
        """
        module: Any = self
        bn: Any = self.bn
        w_q = module.weight_quant
        if getattr(self, "_reestimating_bn", False):
            # BN statistics of the un-normalised layer output, whatever the freeze state:
            # scaled grids quantize W·k, which depends on these very statistics, so they are
            # measured on the float weight; value sets on their discrete (eval) weight.
            w = module.weight if w_q is None or w_q.folds_bn else w_q(module.weight)
            return bn(op(x, w, module.bias))
        batch_stats = self.bn_uses_batch_stats()
        if module.training and module.freeze_bn is not None:
            module._bn_steps_host = self._bn_steps_seen() + 1
            module.bn_steps += 1
        k = self._bn_factor()
        shape = (-1,) + (1,) * (module.weight.dim() - 1)  # broadcast over (C_out, ...)
        out_shape = (1, -1) + (1,) * (module.weight.dim() - 2)  # over (N, C_out, ...)
        if w_q is None or w_q.folds_bn:
            if not batch_stats:
                w = _apply(w_q, module.weight * k.reshape(shape))
                # After the quantizer ran: it may have refreshed its scale from this weight.
                return op(x, w, self.effective_bias(self._folded_bias(k)))
            y = op(x, _apply(w_q, module.weight * k.detach().reshape(shape)), None)
            y = y / k.detach().reshape(out_shape)
            if module.bias is not None:
                y = y + module.bias.reshape(out_shape)
        else:
            if not batch_stats:
                if module.training:
                    w = w_q(module.weight) * k.reshape(shape)
                    return op(x, w, self._folded_bias(k))
                # Eval: exactly what convert will build (codes · s·k, bias on its int32 grid).
                codes, qp = w_q.quantize_weight(module.weight)
                scale = fold_scale(qp.scale, k, codes.shape[0]).detach()
                w = codes * scale.reshape(shape)
                return op(x, w, self.effective_bias(self._folded_bias(k), scale))
            y = op(x, w_q(module.weight), module.bias)
        return bn(y)  # in training mode: batch statistics, running statistics updated

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None,
                                              torch.Tensor | None]:
        """``(weight to quantize, bias, k)`` for convert: with a BN, scaled grids get
        ``W·k`` and ``k = None``; fixed value sets get ``W`` and the factor ``k`` to fold into
        their dequantization scale."""
        module: Any = self
        if module.bn is None:
            return module.weight, module.bias, None
        k = self._bn_factor()
        bias = self._folded_bias(k)
        w_q = module.weight_quant
        if w_q is None or w_q.folds_bn:
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            return module.weight * k.reshape(shape), bias, None
        return module.weight, bias, k


def _make_room_for_smoothing(module: Any, state_dict: dict[str, Any], prefix: str,
                             *args: Any) -> None:
    """A checkpoint of a smoothed layer loads into a freshly quantized one."""
    module.__dict__["_bn_steps_host"] = None  # re-read the loaded step count
    saved = state_dict.get(prefix + "input_smoothing")
    if saved is not None and module.input_smoothing is None:
        module.input_smoothing = torch.empty_like(saved, device=module.weight.device)


def replace_weight(module: Any, value: torch.Tensor) -> None:
    """Give ``module`` a new weight Parameter holding ``value``, never writing into the old one:
    a weight may be shared with another module (GPT-2's ``lm_head`` and its tied token
    embedding), and calibration that changes one layer's weight must not change the other's."""
    old = module.weight
    module.weight = nn.Parameter(value.detach().to(old.dtype).clone(),
                                 requires_grad=old.requires_grad)


def fold_scale(scale: torch.Tensor, k: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel dequantization scale ``s·|k|`` (a scalar ``s`` is broadcast)."""
    return scale.float().expand(channels) * k.abs() if scale.dim() == 0 else scale * k.abs()


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
    def from_float(cls, module: nn.Module, specs: LayerSpecs, name: str = "") -> QuantLinear:
        """From an ``nn.Linear`` or a transposed Linear (transformers' ``Conv1D``, weight
        ``(in, out)``): the wrapper holds ``weight.t()`` as a Linear's ``(out, in)`` weight and
        keeps ``nf``/``nx``; its state dict keeps the ``(in, out)`` layout, so checkpoints of
        the float model and of the quantized one load into it unchanged."""
        transposed = is_transposed_linear(module)
        weight = weight_of(module, name, transpose=transposed)
        bias = as_parameter(module, "bias")
        new = cls(weight.shape[1], weight.shape[0], bias=bias is not None,
                  device=weight.device, dtype=weight.dtype)
        new.weight = weight
        if bias is not None:  # else the layer was built with bias=None
            new.bias = bias
        new._keep_float_attributes(module)
        if transposed:
            new.register_state_dict_post_hook(_save_transposed_weight)
            new.register_load_state_dict_pre_hook(_load_transposed_weight)
        new._init_quant(specs, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_weighted(x, F.linear)


@LAYERS.register("Embedding")
class QuantEmbedding(nn.Embedding, QuantLayer):
    """A lookup table with a quantized weight (weight-only: its input is indices). Per-row
    (``per_channel``) int8 keeps each token's vector on its own scale; the deploy form gathers
    integer rows and their scales, so the file holds one byte per value."""

    float_type = nn.Embedding
    input_axis = -1

    @classmethod
    def from_float(cls, module: nn.Embedding, specs: LayerSpecs,
                   name: str = "") -> QuantEmbedding:
        if specs.input is not None:
            raise ValueError(f"layer {name!r} (Embedding) reads integer indices: its rule cannot "
                             "have an `input` spec; quantize its `weight` (and `output`)")
        weight = specs.weight
        if weight is not None and weight.axis not in (None, 0):
            raise ValueError(f"layer {name!r} (Embedding): the weight must be per_tensor, "
                             f"per_channel along rows (axis 0) or per_group along each row, "
                             f"got {weight.granularity} axis={weight.axis}")
        table = weight_of(module, name)
        new = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                  max_norm=module.max_norm, norm_type=module.norm_type,
                  scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
                  device=table.device, dtype=table.dtype)
        new.weight = table
        new._keep_float_attributes(module)
        new._init_quant(specs, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.embedding(x, _apply(self.weight_quant, self.weight), self.padding_idx,
                        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return _apply(self.output_quant, y)


class _QuantConvNd(QuantLayer):
    @classmethod
    def from_float(cls, module: Any, specs: LayerSpecs, name: str = "") -> Any:
        conv_cls: Any = cls  # a QuantConv1d/QuantConv2d: takes the torch conv's arguments
        # A weight-normed conv (wav2vec2's positional conv) holds its materialised weight.
        weight, bias = weight_of(module, name), as_parameter(module, "bias")
        new = conv_cls(module.in_channels, module.out_channels, module.kernel_size,
                       stride=module.stride, padding=module.padding, dilation=module.dilation,
                       groups=module.groups, bias=bias is not None,
                       padding_mode=module.padding_mode,
                       device=weight.device, dtype=weight.dtype)
        new.weight, new.bias = weight, bias
        new._keep_float_attributes(module)
        new._init_quant(specs, name)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module: Any = self
        return self._forward_weighted(x, module._conv_forward)


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


class Mul(nn.Module):
    """``a * b`` of two tensors as a module (a squeeze-excite gate applied to its feature map),
    so that a rule can give its inputs quantizers."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so that a rule can give its inputs quantizers."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Cat(nn.Module):
    """``torch.cat(tensors, dim)`` as a module of ``inputs`` tensors, so that a rule can give
    each of them a quantizer (ONNX Runtime then runs the concatenation as ``QLinearConcat``
    and the layers that make its inputs on integer kernels)."""

    def __init__(self, dim: int = 0, inputs: int = 2) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"`dim` must be an int, got {dim!r}")
        if isinstance(inputs, bool) or not isinstance(inputs, int) or inputs < 1:
            raise ValueError(f"`inputs` must be a positive int (how many tensors are "
                             f"concatenated), got {inputs!r}")
        self.dim = dim
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(check_input_count(self, tensors), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, inputs={self.inputs}"


def check_input_count(module: Any, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``tensors``, after checking that ``module`` (a ``Cat`` or one of its forms, with
    ``inputs``) was built for that many."""
    if len(tensors) != module.inputs:
        raise ValueError(f"{type(module).__name__} was built for {module.inputs} inputs and "
                         f"got {len(tensors)}; build it with inputs={len(tensors)}")
    return tensors


class _QuantBinary(nn.Module, QuantLayer):
    """Two-input op: ``input`` spec for each input (one quantizer each), optional output."""

    holds_weight = False

    float_type: type[nn.Module]
    input_axis = 1
    other_quant: Quantizer | None

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def from_float(cls, module: nn.Module, specs: LayerSpecs, name: str = "") -> Any:
        return cls()._init_weightless(module, specs, name)

    def input_slots(self) -> tuple[str, ...]:
        return ("input_quant", "other_quant")

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


@LAYERS.register("mul")
class QuantMul(_QuantBinary):
    float_type = Mul
    op_name = "mul"

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


@LAYERS.register("matmul")
class QuantMatMul(_QuantBinary):
    float_type = MatMul
    op_name = "matmul"
    input_axis = -1

    def op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


@LAYERS.register("cat")
class QuantCat(nn.Module, QuantLayer):
    """``Cat`` with one quantizer per input (``input_quant``, ``other_quant``, then
    ``input_quant_2``...) and an optional output quantizer."""

    holds_weight = False

    float_type = Cat
    op_name = "cat"
    input_axis = 1

    def __init__(self, dim: int = 0, inputs: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.inputs = inputs

    @classmethod
    def from_float(cls, module: nn.Module, specs: LayerSpecs, name: str = "") -> Any:
        return cls()._init_weightless(module, specs, name)  # dim, inputs: float attributes

    def input_slots(self) -> tuple[str, ...]:
        return ("input_quant", "other_quant",
                *(f"input_quant_{i}" for i in range(2, self.inputs)))[:self.inputs]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        parts = [_apply(getattr(self, slot), x)
                 for slot, x in zip(self.input_slots(), check_input_count(self, tensors))]
        return _apply(self.output_quant, torch.cat(parts, dim=self.dim))


class QuantActivation(nn.Module, QuantLayer):
    """An activation module (``ReLU``, ``ReLU6``, ``Hardtanh``) with input/output quantizers:
    NNI's ``quant_types: ['output']`` on activations, e.g. binary outputs after ``Hardtanh``.
    Subclass it with another ``float_type`` (e.g. ``nn.Identity``) for a standalone fake-quant
    node (MindSpore's ``FakeQuantWithMinMaxObserver``)."""

    holds_weight = False

    float_type: type[nn.Module]
    input_axis = 1

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    @classmethod
    def from_float(cls, module: nn.Module, specs: LayerSpecs, name: str = "") -> Any:
        return cls(module)._init_weightless(module, specs, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.output_quant, self.module(_apply(self.input_quant, x)))


# Quantizable only where a rule names the type (they would crowd every plan otherwise).
ACTIVATION_TYPES = {"ReLU", "ReLU6", "Hardtanh"}
# Max pooling and nearest upsampling keep values on their grid (they only pick among them): with
# the input quantized by the same quantizer as the readers', ONNX Runtime drops the DQ/Q pair
# around them and runs them on uint8 (``keeps_grid`` says which instances do).
GRID_KEEPING_TYPES = {"MaxPool1d", "MaxPool2d", "Upsample"}


def keeps_grid(module: nn.Module | None) -> bool:
    """Whether a float module only picks among its input's values (a max pool that returns no
    indices, a nearest upsampling) or adds zeros, which every grid holds (``nn.ZeroPad2d``, as
    before EfficientNet's stride-2 depthwise convs), so its output stays on its input's
    quantization grid."""
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
        return not module.return_indices
    if isinstance(module, nn.modules.padding._ConstantPadNd):
        return module.value == 0
    return isinstance(module, nn.Upsample) and module.mode == "nearest"


# Sigmoid gates: a sigmoid (squeeze-excite) and SiLU's x * sigmoid(x). Quantizing the sigmoid's
# output lets ONNX Runtime run it as QLinearSigmoid and the product after it as QLinearMul.
GATE_TYPES = {"Sigmoid", "SiLU"}
# Average pools (a squeeze-excite squeeze, the pooler before a classifier): an input quantizer
# lets them read a tensor that other readers take quantized, so that ONNX Runtime can give its
# producer a quantized output (it runs ``DQ → ReduceMean → Q`` or ``QLinearAveragePool``, as
# in its own files). A fixed-kernel pool whose window runs past its input (EfficientNet's
# pooler: ``AvgPool2d(2560, ceil_mode=True)`` on a 7x7 map) needs the export's
# ``count_include_pad=0`` (``export/pads.py``): ORT's QLinearAveragePool would divide by the
# whole kernel.
AVERAGE_POOL_TYPES = {"AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d"}
OPT_IN_TYPES = (ACTIVATION_TYPES | GRID_KEEPING_TYPES | GATE_TYPES | AVERAGE_POOL_TYPES
                | {"Embedding"})
for _float in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.Upsample,
               nn.Sigmoid, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d,
               nn.AvgPool2d):
    LAYERS.register(_float.__name__)(
        type(f"Quant{_float.__name__}", (QuantActivation,), {"float_type": _float}))


@LAYERS.register("SiLU")
class QuantSiLU(QuantActivation):
    """``x * sigmoid(x)`` with the sigmoid quantized: its ``output_quant`` quantizes the gate
    ``sigmoid(x)``, not the product (the layer reading the product quantizes that). In ONNX it
    is ``Sigmoid → QuantizeLinear → DequantizeLinear → Mul``, which ONNX Runtime runs as
    ``QLinearSigmoid`` and ``QLinearMul`` when ``x`` arrives quantized."""

    float_type = nn.SiLU
    quantizes_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _apply(self.input_quant, x)
        return x * _apply(self.output_quant, torch.sigmoid(x))


def quant_type_for(module: nn.Module) -> str | None:
    """The registered layer-type name for a float module, or None.

    The class matches exactly, looking through parametrizations (a weight-normed ``Conv1d``
    is a ``"Conv1d"``), or is a subclass that computes what its registered base computes (it
    overrides neither ``forward`` nor ``_conv_forward``, as EfficientNet's depthwise conv);
    a subclass that does (BART's learned positional embedding adds an offset) is not one. A
    transposed Linear (transformers' ``Conv1D``) is a ``"Linear"``, and transformers'
    ``SiLUActivation`` a ``"SiLU"``, and a weight-standardized conv (BiT's) a ``"Conv2d"``."""
    cls = float_class(module)
    types = {LAYERS.get(name).float_type: name for name in LAYERS}
    if cls in types:
        return types[cls]
    if "Conv2d" in LAYERS and is_weight_standardized(module):  # before: it overrides forward
        return "Conv2d"
    for depth, base in enumerate(cls.__mro__):
        if base in types:
            overrides = any("forward" in c.__dict__ or "_conv_forward" in c.__dict__
                            for c in cls.__mro__[:depth])
            return None if overrides else types[base]
    if "Linear" in LAYERS and is_transposed_linear(module):
        return "Linear"
    lookalike = activation_lookalike(module)
    return lookalike if lookalike in LAYERS else None


def _save_transposed_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                            local_metadata: Any) -> None:
    """State dicts of a transposed Linear's wrapper hold its weight ``(in, out)``, as the
    float layer's do."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t().contiguous()


def _load_transposed_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                            *args: Any) -> None:
    """The counterpart of ``_save_transposed_weight``: every state dict of this layer (of the
    float model or of a quantized one) holds the ``(in, out)`` layout. Transposes are exact."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t()
