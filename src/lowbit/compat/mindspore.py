"""MindSpore r1.5 quantization-aware training (``mindspore.compression.quant`` and the quant
cells of ``mindspore.nn``) in PyTorch over lowbit (docs/algorithms.md §1). Same names, parameters,
defaults and errors; pairs are ``[weight, activation]`` and a single value serves both.
``docs/migrating.md`` maps each name to the lowbit call it makes.

MindSpore fake-quantizes a cell's *output*; lowbit quantizes the next layer's *input*: the same
tensor (max-pooling and flattening commute with the quantizer), and MindSpore's exporter moves it
there too. The last cell's output quantizer stays an output quantizer.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import nn

import lowbit
from lowbit import nn as lnn
from lowbit.checkpoint import KEY as CHECKPOINT_KEY
from lowbit.compat._mindspore_cells import (
    Conv2dBnAct,
    DenseBnAct,
    FusedCell,
    check_bool,
    check_int,
    check_number,
    conv2d,
    dense,
    make_activation,
)
from lowbit.config import LayerRule, QuantSpec
from lowbit.export.report import ExportReport
from lowbit.quantizers import Quantizer
from lowbit.registry import LAYERS
from lowbit.schedules import EPOCH_BUFFER, STEP_BUFFER

__all__ = ["ActQuant", "Conv2dBnAct", "Conv2dQuant", "DenseBnAct", "DenseQuant",
           "FakeQuantWithMinMaxObserver", "OptimizeOption", "QuantConfig", "QuantDtype",
           "QuantizationAwareTraining", "create_quant_config", "export",
           "load_nonquant_param_into_quant_net", "quant_config_default"]


class QuantDtype(Enum):
    """MindSpore's quantized data types; only the bit width reaches the grid (as in MindSpore's
    FakeQuant kernels); lowbit stores symmetric grids signed and affine ones unsigned."""

    INT2, INT3, INT4, INT5, INT6, INT7, INT8 = "INT2", "INT3", "INT4", "INT5", "INT6", "INT7", "INT8"
    UINT2, UINT3, UINT4, UINT5 = "UINT2", "UINT3", "UINT4", "UINT5"
    UINT6, UINT7, UINT8 = "UINT6", "UINT7", "UINT8"

    @property
    def num_bits(self) -> int:
        return int(self.value[-1])


class OptimizeOption(Enum):
    """``QAT``: straight-through fake quant (method ``ste``); ``LEARNED_SCALE``: LSQ (``lsq``)."""

    QAT = "QAT"
    LEARNED_SCALE = "LEARNED_SCALE"


class QuantConfig(NamedTuple):
    """MindSpore's ``QuantConfig(weight, activation)``, holding lowbit ``QuantSpec`` objects."""

    weight: QuantSpec
    activation: QuantSpec


# ------------------------------------------------------------------------------ validation

def _check_dtype(name: str, value: Any) -> QuantDtype:
    if not isinstance(value, QuantDtype):
        raise TypeError(f"`{name}` must be a QuantDtype, got {type(value).__name__} {value!r}")
    return value


def _check_decay(ema_decay: Any) -> float:
    if not 0.0 <= check_number("ema_decay", ema_decay) < 1.0:
        raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay}")
    return float(ema_decay)


_PAIR_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "quant_delay": check_int, "quant_dtype": _check_dtype, "per_channel": check_bool,
    "symmetric": check_bool, "narrow_range": check_bool}


def _pairs(**values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validated ``[weight, activation]`` settings (a single value serves both, as in MindSpore)."""
    weight, act = {}, {}
    for name, value in values.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not 1 <= len(items) <= 2:
            raise ValueError(f"`{name}` must hold 1 or 2 values [weight, activation], got "
                             f"{len(items)}: {value!r}")
        one = len(items) == 1
        weight[name] = _PAIR_CHECKS[name](name if one else f"{name}[0]", items[0])
        act[name] = _PAIR_CHECKS[name](name if one else f"{name}[1]", items[-1])
    if act["per_channel"]:
        raise ValueError(f"`per_channel` for activations (its second element) must be False, got "
                         f"per_channel={values['per_channel']!r}; activations are per tensor")
    return weight, act


def _spec(role: str, *, quant_dtype: QuantDtype, per_channel: bool, symmetric: bool,
          narrow_range: bool, quant_delay: int, mode: str = "DEFAULT", ema: bool = False,
          ema_decay: float = 0.999, channel_axis: int | None = None) -> QuantSpec:
    """One FakeQuantWithMinMaxObserver's settings as a QuantSpec. Weights: min/max of the current
    weight; activations: ``ema`` with ``moving_rate=ema_decay`` (``ema=False``: rate 0, each
    batch's own range, as MindSpore). Narrow range drops the lowest code (signed grid in lowbit)."""
    observer: dict[str, Any] = {} if role == "weight" else {
        "observer": "ema", "moving_rate": ema_decay if ema else 0.0}
    return QuantSpec(bits=quant_dtype.num_bits, symmetric=symmetric,
                     signed=True if narrow_range else None, narrow_range=narrow_range,
                     granularity="per_channel" if per_channel else "per_tensor",
                     axis=channel_axis if per_channel else None, quant_delay=quant_delay,
                     method="lsq" if mode == "LEARNED_SCALE" else "ste", **observer)


# ------------------------------------------------------------------------------ the auto path

class QuantizationAwareTraining:
    """MindSpore's QAT quantizer: ``quantize(network)`` turns every ``Conv2dBnAct``/``DenseBnAct``
    into lowbit Quant layers (``lowbit.prepare_qat``), in place, and returns the network."""

    def __init__(self, bn_fold: bool = True, freeze_bn: int = 10000000, quant_delay: Any = (0, 0),
                 quant_dtype: Any = (QuantDtype.INT8, QuantDtype.INT8),
                 per_channel: Any = (False, False), symmetric: Any = (False, False),
                 narrow_range: Any = (False, False), optimize_option: Any = OptimizeOption.QAT,
                 one_conv_fold: bool = True) -> None:
        options = list(optimize_option) if isinstance(optimize_option, (list, tuple)) \
            else [optimize_option]
        for option in options:
            if not isinstance(option, OptimizeOption):
                raise TypeError(f"`optimize_option` must hold OptimizeOption members, got "
                                f"{type(option).__name__} {option!r}")
        self.optimize_option = options
        weight, act = _pairs(quant_delay=quant_delay, quant_dtype=quant_dtype,
                             per_channel=per_channel, symmetric=symmetric,
                             narrow_range=narrow_range)
        self.bn_fold = check_bool("bn_fold", bn_fold)
        self.freeze_bn = check_int("freeze_bn", freeze_bn)
        self.one_conv_fold = check_bool("one_conv_fold", one_conv_fold)
        self.mode = "LEARNED_SCALE" if OptimizeOption.LEARNED_SCALE in options else "DEFAULT"
        if self.mode == "LEARNED_SCALE":
            _check_learned_scale(weight, act, self.freeze_bn)
        self.quant_config = QuantConfig(_spec("weight", mode=self.mode, **weight),
                                        _spec("activation", mode=self.mode, **act))

    def quantize(self, network: nn.Module) -> nn.Module:
        """Quantize ``network``'s fused cells in place (``lowbit.prepare_qat``) and return it."""
        if not isinstance(network, nn.Module):
            raise TypeError(f"`network` must be a torch.nn.Module, got {type(network).__name__}")
        cells = [(n, m) for n, m in network.named_modules() if isinstance(m, FusedCell)]
        if not cells:
            raise ValueError("`network` holds no Conv2dBnAct or DenseBnAct cell: "
                             "QuantizationAwareTraining.quantize converts only these fused "
                             "cells; build the network with them or use Conv2dQuant/DenseQuant")
        rules = [self._rule(name, cell, last=i == len(cells) - 1)
                 for i, (name, cell) in enumerate(cells)]
        freeze = self.freeze_bn if self.bn_fold and not self.one_conv_fold else None
        qm = lowbit.prepare_qat(network, lowbit.QuantConfig(rules=rules, fuse_bn=self.bn_fold),
                                inplace=True, freeze_bn=freeze)
        for module in qm.modules():
            if isinstance(module, lnn.QuantLayer):
                _seed_ranges(module)
        return qm

    def _rule(self, name: str, cell: FusedCell, last: bool) -> LayerRule:
        """Weights and inputs of the cell's conv/dense; the last cell keeps its output quantizer
        (after an activation MindSpore's ActQuant, ``ema=False``; else an EMA fake quant)."""
        weight, act = self.quant_config
        output = None
        if last and (cell.has_act or cell.after_fake):
            output = act if cell.has_act else act.replace(moving_rate=0.999)
        inner = f"{name}.{cell.inner}" if name else cell.inner
        return LayerRule(names=[inner], weight=weight, input=act, output=output)


def _check_learned_scale(weight: dict[str, Any], act: dict[str, Any], freeze_bn: int) -> None:
    """MindSpore's four conditions of ``OptimizeOption.LEARNED_SCALE``, in its order."""
    pair = {name: (weight[name], act[name]) for name in ("symmetric", "narrow_range", "quant_delay")}
    for name, got, needed in (("symmetric", pair["symmetric"], (True, True)),
                              ("narrow_range", pair["narrow_range"], (True, True)),
                              ("freeze_bn", freeze_bn, 0),
                              ("quant_delay", pair["quant_delay"], (0, 0))):
        if got != needed:
            raise ValueError(f"OptimizeOption.LEARNED_SCALE needs {name}={needed}, got {got}")


def _seed_ranges(layer: lnn.QuantLayer, lo: float = -6.0, hi: float = 6.0,
                 channels: int = 1) -> None:
    """MindSpore's ``min_init``/``max_init``: activation ranges start at [lo, hi] (``ste`` only;
    learned scales start from data)."""
    for q in (layer.input_quant, layer.output_quant):
        if q is not None and q.spec.method == "ste":
            # (1, .., 1, C, 2) with C on the quantizer's axis: one [lo, hi] row per channel
            seed = torch.tensor([lo, hi]).repeat(channels, 1)
            q.observe(seed.reshape((1,) * (q.axis or 0) + seed.shape))
            q.freeze()


# ------------------------------------------------------------------------------ manual layers

class _FakeQuant(lnn.QuantActivation):
    """A standalone fake-quant node: lowbit's activation wrapper around ``nn.Identity``. Not
    registered as a layer type, so plans never pick up a model's Identity modules."""

    float_type = nn.Identity


def _fake_quant(spec: QuantSpec, lo: float = -6.0, hi: float = 6.0,
                channels: int = 1) -> _FakeQuant:
    node = _FakeQuant.from_float(nn.Identity(), lnn.LayerSpecs(output=spec))
    _seed_ranges(node, lo, hi, channels)
    return node


def FakeQuantWithMinMaxObserver(min_init: float = -6, max_init: float = 6,  # noqa: N802
                                ema: bool = False, ema_decay: float = 0.999,
                                per_channel: bool = False, channel_axis: int = 1,
                                num_channels: int = 1, quant_dtype: QuantDtype = QuantDtype.INT8,
                                symmetric: bool = False, narrow_range: bool = False,
                                quant_delay: int = 0, mode: str = "DEFAULT") -> nn.Module:
    """MindSpore's fake-quant node, to insert after any layer: lowbit's activation wrapper with
    an output quantizer whose range starts at ``[min_init, max_init]``."""
    lo, hi = check_number("min_init", min_init), check_number("max_init", max_init)
    if not lo < hi:
        raise ValueError(f"`min_init` must be < `max_init`, got {min_init} and {max_init}")
    if mode not in ("DEFAULT", "LEARNED_SCALE"):
        raise ValueError(f"`mode` must be 'DEFAULT' or 'LEARNED_SCALE', got {mode!r}")
    spec = _spec("activation", quant_dtype=_check_dtype("quant_dtype", quant_dtype),
                 per_channel=check_bool("per_channel", per_channel),
                 symmetric=check_bool("symmetric", symmetric),
                 narrow_range=check_bool("narrow_range", narrow_range),
                 quant_delay=check_int("quant_delay", quant_delay), mode=mode,
                 ema=check_bool("ema", ema), ema_decay=_check_decay(ema_decay),
                 channel_axis=check_int("channel_axis", channel_axis))
    channels = check_int("num_channels", num_channels, 1) if per_channel else 1
    return _fake_quant(spec, lo, hi, channels)


def create_quant_config(quant_observer: Any = (FakeQuantWithMinMaxObserver,
                                               FakeQuantWithMinMaxObserver),
                        quant_delay: Any = (0, 0),
                        quant_dtype: Any = (QuantDtype.INT8, QuantDtype.INT8),
                        per_channel: Any = (False, False), symmetric: Any = (False, False),
                        narrow_range: Any = (False, False), mode: str = "DEFAULT") -> QuantConfig:
    """MindSpore's ``create_quant_config``: the weight and activation QuantSpecs of the manual
    layers (``quant_observer``: ``FakeQuantWithMinMaxObserver``, the one lowbit maps)."""
    observers = quant_observer if isinstance(quant_observer, (list, tuple)) else [quant_observer]
    for observer in observers:
        if observer is not FakeQuantWithMinMaxObserver:
            raise NotImplementedError(f"`quant_observer` must be FakeQuantWithMinMaxObserver, the "
                                      f"observer lowbit maps, got {observer!r}")
    if mode not in ("DEFAULT", "LEARNED_SCALE"):
        raise ValueError(f"`mode` must be 'DEFAULT' or 'LEARNED_SCALE', got {mode!r}")
    weight, act = _pairs(quant_delay=quant_delay, quant_dtype=quant_dtype, per_channel=per_channel,
                         symmetric=symmetric, narrow_range=narrow_range)
    return QuantConfig(_spec("weight", mode=mode, **weight), _spec("activation", mode=mode, **act))


quant_config_default = create_quant_config()


def _layer_spec(quant_config: Any, role: str, quant_dtype: Any) -> QuantSpec:
    """The config's spec for ``role`` with the layer's own ``quant_dtype`` (MindSpore's layers
    pass theirs to the observer, overriding the config's)."""
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig (create_quant_config), got "
                        f"{type(quant_config).__name__}")
    spec: QuantSpec = getattr(quant_config, role)
    return spec.replace(bits=_check_dtype("quant_dtype", quant_dtype).num_bits)


def Conv2dQuant(in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,  # noqa: N802
                pad_mode: str = "same", padding: Any = 0, dilation: Any = 1, group: int = 1,
                has_bias: bool = False, weight_init: Any = "normal", bias_init: Any = "zeros",
                quant_config: QuantConfig = quant_config_default,
                quant_dtype: QuantDtype = QuantDtype.INT8) -> lnn.QuantConv2d:
    """MindSpore's ``nn.Conv2dQuant`` (fake-quantized weight): a ``lowbit.nn.QuantConv2d``."""
    spec = _layer_spec(quant_config, "weight", quant_dtype)
    conv = conv2d(in_channels, out_channels, kernel_size, stride, pad_mode, padding, dilation,
                  group, has_bias, weight_init, bias_init)
    return lnn.QuantConv2d.from_float(conv, lnn.LayerSpecs(weight=spec))


def DenseQuant(in_channels: int, out_channels: int, weight_init: Any = "normal",  # noqa: N802
               bias_init: Any = "zeros", has_bias: bool = True, activation: Any = None,
               quant_config: QuantConfig = quant_config_default,
               quant_dtype: QuantDtype = QuantDtype.INT8) -> lnn.QuantLinear:
    """MindSpore's ``nn.DenseQuant``: a ``lowbit.nn.QuantLinear``; ``activation`` runs after it
    in float (the wrapper's fused-activation slot)."""
    spec = _layer_spec(quant_config, "weight", quant_dtype)
    layer = lnn.QuantLinear.from_float(dense(in_channels, out_channels, weight_init, bias_init,
                                             has_bias), lnn.LayerSpecs(weight=spec))
    layer.activation = make_activation(activation)
    return layer


def ActQuant(activation: nn.Module, ema: bool = False, ema_decay: float = 0.999,  # noqa: N802
             fake_before: bool = False, quant_config: QuantConfig = quant_config_default,
             quant_dtype: QuantDtype = QuantDtype.INT8) -> nn.Module:
    """MindSpore's ``nn.ActQuant``: the activation, then a fake quant (and one before it with
    ``fake_before``). ReLU/ReLU6/Hardtanh become lowbit's ``QuantReLU``...; any other module a
    Sequential of it and ``FakeQuantWithMinMaxObserver`` nodes."""
    if not isinstance(activation, nn.Module):
        raise TypeError(f"`activation` must be a torch.nn.Module, got {type(activation).__name__}")
    spec = _layer_spec(quant_config, "activation", quant_dtype)
    spec = spec.replace(moving_rate=_check_decay(ema_decay) if check_bool("ema", ema) else 0.0)
    before = spec if check_bool("fake_before", fake_before) else None
    type_name = lnn.quant_type_for(activation)
    if type_name in lnn.ACTIVATION_TYPES:
        layer = LAYERS.get(type_name).from_float(activation, lnn.LayerSpecs(input=before,
                                                                            output=spec))
        _seed_ranges(layer)
        return layer
    parts = [_fake_quant(before)] if before else []
    return nn.Sequential(*parts, activation, _fake_quant(spec))


# ------------------------------------------------------------------------------ parameters

def load_nonquant_param_into_quant_net(quant_model: nn.Module,
                                       params_dict: Mapping[str, torch.Tensor],
                                       quant_new_params: list[str] | None = None) -> None:
    """Load a float model's ``state_dict`` into a quantized (or fused) model, by name.

    Names match as they are, with a BatchNorm moved into its layer (``conv1.conv.bn.*`` ←
    ``conv1.batchnorm.*``) or a fused cell's step dropped (``conv1.conv.weight`` ←
    ``conv1.weight``). lowbit's own state is skipped; every other entry must be found or be named
    in ``quant_new_params`` (full name or last part).
    """
    if not isinstance(quant_model, nn.Module):
        raise TypeError(f"`quant_model` must be a torch.nn.Module, got {type(quant_model).__name__}")
    if not isinstance(params_dict, Mapping):
        raise TypeError(f"`params_dict` must be a mapping of names to tensors (a state_dict), got "
                        f"{type(params_dict).__name__}")
    if quant_new_params is not None and not isinstance(quant_new_params, list):
        raise TypeError(f"`quant_new_params` must be a list or None, got "
                        f"{type(quant_new_params).__name__}")
    new = set(quant_new_params or ())
    renames = _renames(quant_model)
    loads: dict[str, torch.Tensor] = {}
    used: dict[str, str] = {}  # checkpoint name -> parameter name
    for name, current in quant_model.state_dict().items():
        if _lowbit_owned(quant_model, name):
            continue
        source = next((c for c in _candidates(name, renames) if c in params_dict), None)
        if source is None:
            if name in new or name.rsplit(".", 1)[-1] in new:
                continue
            raise ValueError(f"Can't find match parameter in ckpt, param name = {name} (float "
                             f"names tried: {_candidates(name, renames)}); list it in "
                             "`quant_new_params` if it is new in the quantized network")
        value = params_dict[source]
        if not isinstance(value, torch.Tensor) or value.shape != current.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"parameter {name!r} has shape {tuple(current.shape)}, its "
                             f"checkpoint entry {source!r} {got}")
        loads[name], used[source] = value, name
    quant_model.load_state_dict(loads, strict=False)
    for module in quant_model.modules():
        if isinstance(module, lnn.QuantLayer):
            module.refresh_weight_range()  # ranges follow the loaded weight (W·k with a BN)
    unused = sorted(set(params_dict) - set(used))
    if unused:
        warnings.warn(f"{len(unused)} checkpoint entries match no parameter of `quant_model`: "
                      f"{unused}", stacklevel=2)


def _renames(model: nn.Module) -> list[tuple[str, str]]:
    """``(quantized prefix, float prefix)``: BatchNorms that ``prepare_qat`` moved into their
    layer, and fused cells' inner ``conv``/``dense`` (whose own parameters only)."""
    out = []
    the_plan = getattr(model, "lowbit_plan", None)
    for chain in the_plan.fusions if the_plan is not None else ():
        layer = model.get_submodule(chain[0])
        if not isinstance(layer, lnn.QuantLayer):
            continue  # a float layer keeps its BatchNorm where it was
        if layer.bn is None:
            raise ValueError(f"layer {chain[0]!r} has its BatchNorm {chain[1]!r} folded into "
                             "its weight (lowbit.quantize); load float parameters before "
                             "quantizing")
        out.append((f"{chain[0]}.bn.", f"{chain[1]}."))
    for name, cell in model.named_modules():
        if isinstance(cell, FusedCell):
            prefix = f"{name}." if name else ""
            out.append((f"{prefix}{cell.inner}.", prefix))
    return out


def _candidates(name: str, renames: list[tuple[str, str]]) -> list[str]:
    names = [name]
    for quant, flt in renames:
        for known in list(names):
            rest = known[len(quant):]
            if known.startswith(quant) and (quant.endswith(".bn.") or "." not in rest):
                names.append(flt + rest)
    return names


def _lowbit_owned(model: nn.Module, key: str) -> bool:
    """State that lowbit adds: quantizers, BN-freeze and schedule counters, checkpoint
    metadata."""
    parts = key.split(".")
    if parts[-1] in (EPOCH_BUFFER, STEP_BUFFER, "bn_steps", CHECKPOINT_KEY):
        return True
    return any(isinstance(model.get_submodule(".".join(parts[:i])), Quantizer)
               for i in range(1, len(parts)))


# ------------------------------------------------------------------------------ export

FORMATS = ("ONNX",)
MINDSPORE_FORMATS = ("AIR", "MINDIR", "GEIR")


def export(net: nn.Module, *inputs: torch.Tensor, file_name: str | os.PathLike,
           file_format: str = "ONNX", quant_mode: str = "QUANT", mean: float = 127.5,
           std_dev: float = 127.5) -> ExportReport:
    """MindSpore's ``export`` of a QAT network: ``file_name + ".onnx"`` through ``lowbit.convert``
    and ``lowbit.export_onnx`` (returns its report). ``mean``/``std_dev`` fix the input
    quantization: ``scale = 1/std_dev``, ``zero_point = round(mean)`` on uint8."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"`net` must be a torch.nn.Module, got {type(net).__name__}")
    if not inputs:
        raise ValueError("`inputs`: pass at least one example input tensor, e.g. "
                         "export(net, torch.ones(1, 1, 32, 32), file_name='lenet_quant')")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`inputs[{i}]` must be a torch.Tensor, got {type(x).__name__}")
    path = _onnx_path(file_name, file_format)
    _check_quant_mode(quant_mode)
    mean, std_dev = check_number("mean", mean), check_number("std_dev", std_dev)
    if not std_dev > 0:
        raise ValueError(f"`std_dev` must be > 0, got {std_dev}")
    work = copy.deepcopy(net).eval()
    readers = _input_readers(work, inputs)
    if not readers:
        warnings.warn("`mean`/`std_dev` not applied: no quantizer reads the network input "
                      "directly (e.g. a Conv2dQuant first layer quantizes only its weight)",
                      stacklevel=2)
    for q in readers:
        _fix_input_qparams(q, mean, std_dev)
    return lowbit.export_onnx(lowbit.convert(work), path, inputs)


def _onnx_path(file_name: Any, file_format: Any) -> str:
    if not isinstance(file_name, (str, os.PathLike)):
        raise TypeError(f"`file_name` must be a str, got {type(file_name).__name__}")
    if not isinstance(file_format, str):
        raise TypeError(f"`file_format` must be a str, got {type(file_format).__name__}")
    if file_format in MINDSPORE_FORMATS:
        raise ValueError(f"`file_format` {file_format!r} is a MindSpore format; lowbit writes "
                         f"{list(FORMATS)} (integer QDQ, run by ONNX Runtime)")
    if file_format not in FORMATS:
        raise ValueError(f"Illegal file format {file_format!r}, it must be one of {list(FORMATS)}")
    name = os.fspath(file_name)
    return name if name.endswith(".onnx") else name + ".onnx"


def _check_quant_mode(quant_mode: Any) -> None:
    if not isinstance(quant_mode, str):
        raise TypeError(f"The type of quant_mode should be str, but got {type(quant_mode)}.")
    if quant_mode == "NONQUANT":
        raise NotImplementedError("quant_mode='NONQUANT' exports the fake-quant training graph; "
                                  "lowbit exports the integer model only (quant_mode='QUANT')")
    if quant_mode not in ("QUANT", "AUTO", "MANUAL"):  # AUTO/MANUAL: MindSpore's old names
        raise ValueError(f"`quant_mode` must be 'QUANT' or 'NONQUANT', got {quant_mode!r}")


def _input_readers(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[Quantizer]:
    """The quantizers that receive a network input as it is (one forward, with hooks)."""
    found: list[Quantizer] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and any(args[0] is x for x in inputs) and module not in found:
            found.append(module)  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, Quantizer) and m.role != "weight"]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _fix_input_qparams(q: Quantizer, mean: float, std_dev: float) -> None:
    """``scale = 1/std_dev``, ``zero_point = round(mean)`` on uint8 (shifted by 2^(b-1) on a
    signed grid), through ``Quantizer.set_qparams``."""
    grid = q.grid
    zero = round(mean) - (2 ** (grid.bits - 1) if grid.signed else 0)
    if q.axis is not None:
        raise NotImplementedError(f"the input quantizer of layer {q.layer_name!r} is per channel "
                                  f"(axis {q.axis}); `mean`/`std_dev` need one scale and zero "
                                  "point")
    if not grid.qmin <= zero <= grid.qmax:
        raise ValueError(f"`mean` {mean} puts the input zero point at {round(mean)}, outside the "
                         f"{grid.bits}-bit input grid [{grid.qmin}, {grid.qmax}] of layer "
                         f"{q.layer_name!r}")
    try:
        q.set_qparams(1.0 / std_dev, zero)
    except NotImplementedError:  # a learned step (LEARNED_SCALE: lsq) takes no fixed qparams
        warnings.warn(f"`mean`/`std_dev` not applied to layer {q.layer_name!r}: its "
                      f"{q.spec.method!r} input quantizer keeps its learned scale", stacklevel=3)
