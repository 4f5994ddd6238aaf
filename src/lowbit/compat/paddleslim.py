"""PaddleSlim's dygraph quantization (``QAT``, ``PTQ``, ``quant_post_dynamic``) over lowbit.

Same names, config keys, defaults and errors as ``paddleslim.QAT`` / ``paddleslim.PTQ``
(docs/algorithms.md §3, §7), in PyTorch, each step a native lowbit call; ``docs/migrating.md``
maps each name. Paddle's ``abs_max`` grids are symmetric and signed,
±(2^(b-1) − 1), so every spec is ``QuantSpec(symmetric=True, signed=True, narrow_range=True)``.
User classes run through the adapter of :mod:`lowbit.compat._paddleslim_user`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

import lowbit
from lowbit.compat._paddleslim_io import (
    InputSpec,
    check_type,
    example_inputs,
    onnx_path,
    save_onnx,
    watch_inputs,
)
from lowbit.compat._paddleslim_user import (
    UserQuantizer,
    adapter,
    check_class,
    instantiate,
    warn_dropped_preprocess,
)
from lowbit.config import LayerRule, QuantConfig, QuantSpec
from lowbit.export.report import ExportReport
from lowbit.quantizers import Quantizer

__all__ = ["QAT", "PTQ", "InputSpec", "AbsmaxQuantizer", "HistQuantizer", "KLQuantizer",
           "PerChannelAbsmaxQuantizer", "quant_post_dynamic"]

# Paddle layer names → lowbit layer types (torch names are accepted as they are).
LAYER_TYPES = {"Conv2D": "Conv2d", "Conv1D": "Conv1d", "Linear": "Linear",
               "Conv2d": "Conv2d", "Conv1d": "Conv1d"}
QAT_DEFAULTS: dict[str, Any] = {
    "weight_preprocess_type": None,
    "activation_preprocess_type": None,
    "weight_quantize_type": "channel_wise_abs_max",
    "activation_quantize_type": "moving_average_abs_max",
    "weight_bits": 8,
    "activation_bits": 8,
    "dtype": "int8",
    "window_size": 10000,
    "moving_rate": 0.9,
    "quantizable_layer_type": ["Conv2D", "Linear"],
    "fuse_conv_bn": False,
}
PREPROCESS_TYPES = (None, "PACT")
WEIGHT_TYPES = ("abs_max", "channel_wise_abs_max")
ACT_TYPES = ("moving_average_abs_max", "abs_max")


def _check_bits(name: str, value: Any) -> int:
    check_type(name, value, int)
    if not 2 <= value <= 8:
        raise ValueError(f"`{name}` must be in 2..8 (lowbit's integer grids; PaddleSlim allows "
                         f"1..16), got {value}")
    return int(value)


def _abs_max_spec(bits: int, **fields: Any) -> QuantSpec:
    """Paddle's abs_max grid: symmetric, signed, ±(2^(bits-1) - 1) (int8: ±127)."""
    return QuantSpec(bits=bits, symmetric=True, signed=True, narrow_range=True, **fields)


# ------------------------------------------------------------------------------------ save


def _unready(model: nn.Module) -> list[str]:
    """Activation quantizers without a range (skipping user classes that cannot convert)."""
    return sorted({q.layer_name for q in model.modules() if isinstance(q, Quantizer)
                   and q.role != "weight" and not q.is_ready()
                   and not (isinstance(q, UserQuantizer) and not q.exportable)})


def _save(model: Any, path: Any, input_spec: Any) -> ExportReport:
    """``save_quantized_model``: freeze, ``lowbit.convert``, ``lowbit.export_onnx``."""
    check_type("model", model, nn.Module)
    if not any(isinstance(m, Quantizer) for m in model.modules()):
        raise ValueError("`model` has no lowbit quantizers; pass the model that "
                         "QAT.quantize / PTQ.quantize returned")
    inputs, dynamic, names = example_inputs(model, input_spec)
    out = onnx_path(path)
    if any(isinstance(q, Quantizer) and q.observing for q in model.modules()):
        lowbit.set_calibrating(model, False)  # PTQ: the ranges seen so far become scales
    unready = _unready(model)
    if unready:
        raise ValueError(f"layers {unready} have no activation range yet: run the quantized "
                         "model on data (PTQ: calibration batches, QAT: training) before "
                         "save_quantized_model")
    warn_dropped_preprocess(model)
    return save_onnx(lowbit.convert(model), out, inputs, dynamic, names)


# ------------------------------------------------------------------------------------- QAT


def _parse_qat_config(config: Any) -> dict[str, Any]:
    """PaddleSlim's ``_parse_configs``: defaults merged with ``config``, every key checked."""
    if config is None:
        config = {}
    check_type("config", config, dict)
    unknown = sorted(set(config) - set(QAT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown QAT config key(s) {unknown}; allowed: {list(QAT_DEFAULTS)}")
    cfg = {**QAT_DEFAULTS, **config}
    if cfg["activation_quantize_type"] == "range_abs_max":
        raise NotImplementedError("activation_quantize_type='range_abs_max' (a window of "
                                  "`window_size` batches) is not implemented in lowbit; use "
                                  f"one of {list(ACT_TYPES)}")
    for key, allowed in (("weight_preprocess_type", PREPROCESS_TYPES),
                         ("activation_preprocess_type", PREPROCESS_TYPES),
                         ("weight_quantize_type", WEIGHT_TYPES),
                         ("activation_quantize_type", ACT_TYPES)):
        if cfg[key] not in allowed:
            raise ValueError(f"`{key}` must be one of {list(allowed)}, got {cfg[key]!r}")
    for key in ("weight_bits", "activation_bits"):
        _check_bits(key, cfg[key])
    check_type("dtype", cfg["dtype"], str)
    if cfg["dtype"] != "int8":
        raise ValueError(f"`dtype` must be 'int8', got {cfg['dtype']!r}")
    check_type("window_size", cfg["window_size"], int)
    if cfg["window_size"] != QAT_DEFAULTS["window_size"]:
        raise ValueError(f"`window_size` only applies to activation_quantize_type="
                         f"'range_abs_max', which lowbit does not implement; got "
                         f"window_size={cfg['window_size']}")
    check_type("moving_rate", cfg["moving_rate"], float)
    if cfg["moving_rate"] != QAT_DEFAULTS["moving_rate"] and \
            cfg["activation_quantize_type"] != "moving_average_abs_max":
        raise ValueError("`moving_rate` only applies to activation_quantize_type="
                         f"'moving_average_abs_max', got it with "
                         f"{cfg['activation_quantize_type']!r}")
    check_type("fuse_conv_bn", cfg["fuse_conv_bn"], bool)
    cfg["quantizable_layer_type"] = _layer_types(cfg["quantizable_layer_type"])
    return cfg


def _layer_types(types: Any) -> list[str]:
    if isinstance(types, str) or not isinstance(types, (list, tuple)):
        raise TypeError(f"`quantizable_layer_type` must be a list of layer names, got "
                        f"{type(types).__name__} {types!r}")
    if not types:
        raise ValueError("`quantizable_layer_type` must name at least one layer type, got []")
    for t in types:
        if t not in LAYER_TYPES:
            raise ValueError(f"`quantizable_layer_type` must hold names of {list(LAYER_TYPES)}, "
                             f"got {t!r}")
    return list(types)


class QAT:
    """Quantization-aware training (``paddleslim.QAT``): ``quantize`` inserts fake-quant
    layers in place, train as usual, ``save_quantized_model`` exports ONNX.

    ``config`` keys and defaults are ``QAT_DEFAULTS`` (PaddleSlim's); ``quant_config`` is the
    ``lowbit.QuantConfig`` they map to.
    """

    def __init__(self, config: dict[str, Any] | None = None,
                 weight_preprocess: type[nn.Module] | None = None,
                 act_preprocess: type[nn.Module] | None = None,
                 weight_quantize: type[nn.Module] | None = None,
                 act_quantize: type[nn.Module] | None = None) -> None:
        self.config = _parse_qat_config(config)
        for name, cls in (("weight_preprocess", weight_preprocess),
                          ("act_preprocess", act_preprocess), ("weight_quantize", weight_quantize),
                          ("act_quantize", act_quantize)):
            check_class(name, cls)
        self.weight_preprocess, self.act_preprocess = weight_preprocess, act_preprocess
        self.weight_quantize, self.act_quantize = weight_quantize, act_quantize
        self.quant_config = QuantConfig(
            rules=[LayerRule(types=sorted({LAYER_TYPES[t]
                                           for t in self.config["quantizable_layer_type"]}),
                             weight=self._weight_spec(), input=self._act_spec())],
            fuse_bn=self.config["fuse_conv_bn"])

    def _uses_pact(self, kind: str, quantize: Any, preprocess: Any, key: str) -> bool:
        pact = self.config[key] == "PACT" and preprocess is None
        if pact and quantize is not None:
            raise NotImplementedError(
                f"{key}='PACT' with a user {kind}_quantize class: lowbit's PACT is a quantizer "
                f"(clip and quantize in one), not a preprocess; drop one of them")
        return pact

    def _weight_spec(self) -> QuantSpec:
        per_channel = self.config["weight_quantize_type"] == "channel_wise_abs_max"
        spec = _abs_max_spec(self.config["weight_bits"], observer="minmax",
                             granularity="per_channel" if per_channel else "per_tensor")
        pre, quant = self.weight_preprocess, self.weight_quantize
        if self._uses_pact("weight", quant, pre, "weight_preprocess_type"):
            return spec.replace(method="pact", granularity="per_tensor")
        if pre is not None or quant is not None:
            return spec.replace(method=adapter("weight", pre, quant))
        return spec

    def _act_spec(self) -> QuantSpec:
        ema = self.config["activation_quantize_type"] == "moving_average_abs_max"
        spec = _abs_max_spec(self.config["activation_bits"], observer="ema" if ema else "minmax",
                             moving_rate=self.config["moving_rate"])
        pre, quant = self.act_preprocess, self.act_quantize
        if self._uses_pact("act", quant, pre, "activation_preprocess_type"):
            return spec.replace(method="pact")
        if pre is not None or quant is not None:
            return spec.replace(method=adapter("activation", pre, quant))
        return spec

    def quantize(self, model: nn.Module) -> nn.Module:
        """Insert fake-quant layers into ``model`` in place (``lowbit.prepare_qat(...,
        inplace=True)``; BatchNorm is folded while training with ``fuse_conv_bn``) and
        return it, in train mode."""
        for name in ("weight_preprocess", "act_preprocess", "weight_quantize", "act_quantize"):
            instantiate(name, getattr(self, name))  # fail before the model is touched
        qm = lowbit.prepare_qat(model, self.quant_config, inplace=True)
        watch_inputs(qm)
        return qm

    def save_quantized_model(self, model: nn.Module, path: str | os.PathLike,
                             input_spec: Sequence[Any] | None = None) -> ExportReport:
        """Export the trained model: ``lowbit.convert`` + ``lowbit.export_onnx`` to
        ``<path>.onnx`` and its side files; ``None`` dims of ``input_spec`` are dynamic.
        ``input_spec=None`` uses the shapes of the model's last forward inputs."""
        return _save(model, path, input_spec)


# ------------------------------------------------------------------------------------- PTQ


@dataclass(frozen=True)
class _PTQQuantizer:
    """Base of PaddleSlim's PTQ quantizers: parameters in, a lowbit ``QuantSpec`` out."""

    quant_bits: int = 8
    observer: ClassVar[str] = "minmax"
    granularity: ClassVar[str] = "per_tensor"

    def __post_init__(self) -> None:
        _check_bits(f"{type(self).__name__}.quant_bits", self.quant_bits)
        self.spec()  # lowbit validates bins, upsample_bins, hist_percent

    def spec(self) -> QuantSpec:
        extra = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "quant_bits"}
        return _abs_max_spec(self.quant_bits, observer=self.observer,
                             granularity=self.granularity, **extra)


@dataclass(frozen=True)
class AbsmaxQuantizer(_PTQQuantizer):
    """Per-tensor abs max over all calibration batches (observer ``"minmax"``)."""


@dataclass(frozen=True)
class PerChannelAbsmaxQuantizer(_PTQQuantizer):
    """Abs max per output channel (weights only; ``granularity="per_channel"``)."""

    granularity: ClassVar[str] = "per_channel"


@dataclass(frozen=True)
class KLQuantizer(_PTQQuantizer):
    """Histogram of |x| and the KL-optimal threshold (observer ``"kl"``)."""

    bins: int = 1024
    upsample_bins: int = 64
    observer: ClassVar[str] = "kl"


@dataclass(frozen=True)
class HistQuantizer(_PTQQuantizer):
    """Histogram of |x| and its ``hist_percent`` percentile (observer ``"percentile"``)."""

    bins: int = 1024
    upsample_bins: int = 64
    hist_percent: float = 0.99999
    observer: ClassVar[str] = "percentile"


ACT_QUANTIZERS: dict[str, type[_PTQQuantizer]] = {
    c.__name__: c for c in (KLQuantizer, HistQuantizer, AbsmaxQuantizer)}
WEIGHT_QUANTIZERS: dict[str, type[_PTQQuantizer]] = {
    c.__name__: c for c in (AbsmaxQuantizer, PerChannelAbsmaxQuantizer)}


def _ptq_quantizer(name: str, value: Any, allowed: dict[str, type[_PTQQuantizer]],
                   kwargs: dict[str, Any], used: set[str]) -> _PTQQuantizer:
    """A quantizer from its name (with the ``kwargs`` it takes) or an instance."""
    if isinstance(value, str):
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")
        cls = allowed[value]
        params = {f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs}
        used.update(params)
        return cls(**params)
    if not isinstance(value, _PTQQuantizer):
        raise TypeError(f"`{name}` must be a quantizer name or instance, got "
                        f"{type(value).__name__} {value!r}")
    if type(value) not in allowed.values():
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {type(value).__name__}")
    return value


class PTQ:
    """Static post-training quantization (``paddleslim.PTQ``).

    ``activation_quantizer`` / ``weight_quantizer`` are names (configured by ``kwargs``:
    ``quant_bits``, ``bins``, ``upsample_bins``, ``hist_percent``, each passed to every named
    quantizer that takes it) or instances. The documented signature spells the first
    ``cactivation_quantizer``; that spelling is accepted as a keyword too.
    """

    def __init__(self, activation_quantizer: str | _PTQQuantizer = "KLQuantizer",
                 weight_quantizer: str | _PTQQuantizer = "PerChannelAbsmaxQuantizer",
                 **kwargs: Any) -> None:
        if "cactivation_quantizer" in kwargs:
            if activation_quantizer != "KLQuantizer":
                raise TypeError("give `activation_quantizer` or `cactivation_quantizer`, "
                                "not both")
            activation_quantizer = kwargs.pop("cactivation_quantizer")
        used: set[str] = set()
        self.activation_quantizer = _ptq_quantizer("activation_quantizer", activation_quantizer,
                                                   ACT_QUANTIZERS, kwargs, used)
        self.weight_quantizer = _ptq_quantizer("weight_quantizer", weight_quantizer,
                                               WEIGHT_QUANTIZERS, kwargs, used)
        unused = sorted(set(kwargs) - used)
        if unused:
            raise TypeError(f"PTQ() got keyword argument(s) {unused} that neither "
                            f"{type(self.activation_quantizer).__name__} nor "
                            f"{type(self.weight_quantizer).__name__} (given by name) takes")
        self.quant_config = QuantConfig(rules=[LayerRule(
            types=["Conv1d", "Conv2d", "Linear"], weight=self.weight_quantizer.spec(),
            input=self.activation_quantizer.spec())], fuse_bn=False)

    def quantize(self, model: nn.Module, fuse: bool = False,
                 fuse_list: Sequence[Sequence[str]] | None = None) -> nn.Module:
        """A quantized copy of ``model`` (``lowbit.quantize``) in eval mode and calibrating
        (``lowbit.set_calibrating``): run it on calibration data, then save it. ``fuse=True``
        folds each ``[conv, bn]`` of ``fuse_list`` (module names) first."""
        check_type("fuse", fuse, bool)
        config: Any = self.quant_config
        if fuse:
            if fuse_list is None:
                raise TypeError("`fuse_list` must be a list of [conv, bn] module-name lists "
                                "when fuse=True, got None")
            config = dataclasses.replace(lowbit.plan(model, self.quant_config),
                                         fusions=_fuse_list(fuse_list))
        elif fuse_list is not None:
            raise ValueError("`fuse_list` is only used with fuse=True; pass fuse=True")
        qm = lowbit.quantize(model, config).eval()
        lowbit.set_calibrating(qm, True)
        watch_inputs(qm)
        return qm

    def save_quantized_model(self, model: nn.Module, path: str | os.PathLike,
                             input_spec: Sequence[Any] | None = None) -> ExportReport:
        """Freeze the calibrated ranges (``lowbit.set_calibrating(model, False)``), then
        ``lowbit.convert`` + ``lowbit.export_onnx`` as ``QAT.save_quantized_model``."""
        return _save(model, path, input_spec)


def _fuse_list(fuse_list: Any) -> list[tuple[str, ...]]:
    if isinstance(fuse_list, str) or not isinstance(fuse_list, (list, tuple)):
        raise TypeError(f"`fuse_list` must be a list of module-name lists, got "
                        f"{type(fuse_list).__name__} {fuse_list!r}")
    chains = []
    for i, item in enumerate(fuse_list):
        if isinstance(item, str) or not isinstance(item, (list, tuple)) or \
                not all(isinstance(n, str) for n in item):
            raise TypeError(f"`fuse_list[{i}]` must be a list of module names, got {item!r}")
        if len(item) not in (2, 3):
            raise ValueError(f"`fuse_list[{i}]` must name a conv, the BatchNorm after it and "
                             f"optionally a ReLU, got {list(item)}")
        chains.append(tuple(item))
    return chains


# --------------------------------------------------------------------- quant_post_dynamic

OP_TYPES = ("conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2")


def _op_type(module: nn.Module) -> tuple[str, ...]:
    """The Paddle op names a torch layer answers to."""
    if type(module) is nn.Conv2d:
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return ("depthwise_conv2d",) if depthwise else ("conv2d",)
    if type(module) is nn.Linear:
        return ("mul", "matmul", "matmul_v2")
    return ()


def quant_post_dynamic(model: nn.Module, save_model_dir: str | os.PathLike | None = None,
                       model_filename: str | None = None, params_filename: str | None = None,
                       save_model_filename: str | None = None,
                       save_params_filename: str | None = None,
                       quantizable_op_type: Sequence[str] = ("conv2d", "mul"),
                       weight_bits: int = 8, generate_test_model: bool = False, *,
                       input_spec: Sequence[Any] | None = None) -> nn.Module:
    """Dynamic post-training quantization: int8 weights, Linear inputs quantized at run time
    (the ``"w8"`` preset, restricted to the layers of ``quantizable_op_type``).

    Takes the model object instead of a model dir (``model_filename`` / ``params_filename``
    must stay None) and returns the deploy model (``lowbit.convert``). With ``save_model_dir``
    it is also exported (``input_spec`` required) to ``save_model_filename`` (default
    ``model.onnx``); ``save_params_filename`` renames the packed weights file.
    """
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"`model` must be the torch.nn.Module itself (lowbit takes the model "
                        f"object, not a model dir), got {model!r}")
    for name, value in (("model_filename", model_filename), ("params_filename", params_filename)):
        if value is not None:
            raise ValueError(f"`{name}` names a file of a Paddle model dir; lowbit takes the "
                             f"loaded model object, so it must be None, got {value!r}")
    if save_model_dir is not None and input_spec is None:
        raise ValueError("`input_spec` is required to save the model: a list of InputSpec, "
                         "Tensor or shape lists, e.g. [InputSpec([None, 3, 224, 224])]")
    check_type("weight_bits", weight_bits, int)
    if weight_bits == 16:
        raise NotImplementedError("weight_bits=16 is not supported: lowbit stores weights in at "
                                  "most 8 bits")
    if weight_bits != 8:
        raise ValueError(f"`weight_bits` must be 8 (or 16 in PaddleSlim), got {weight_bits}")
    check_type("generate_test_model", generate_test_model, bool)
    if generate_test_model:
        raise NotImplementedError("generate_test_model=True has no lowbit equivalent: the export "
                                  "already checks the integer model against the torch model in "
                                  "ONNX Runtime (report.parity)")
    if isinstance(quantizable_op_type, str) or not isinstance(quantizable_op_type, (list, tuple)):
        raise TypeError(f"`quantizable_op_type` must be a list of op names, got "
                        f"{type(quantizable_op_type).__name__} {quantizable_op_type!r}")
    bad = [t for t in quantizable_op_type if t not in OP_TYPES]
    if bad:
        raise ValueError(f"`quantizable_op_type` must hold names of {list(OP_TYPES)}, got {bad}")
    check_type("model", model, nn.Module)
    names = [n for n, m in model.named_modules() if set(_op_type(m)) & set(quantizable_op_type)]
    if not names:
        raise ValueError(f"no layer of the model is one of quantizable_op_type "
                         f"{list(quantizable_op_type)}")
    pattern = ["re:(?:" + "|".join(re.escape(n) for n in names) + ")"]
    rules = [LayerRule(types=r.types, names=pattern, weight=r.weight, input=r.input)
             for r in QuantConfig.preset("w8").rules]
    deploy = lowbit.convert(lowbit.quantize(model, QuantConfig(rules=rules)))
    if save_model_dir is not None:
        _save_dynamic(deploy, save_model_dir, save_model_filename, save_params_filename,
                      input_spec)
    return deploy


def _save_dynamic(deploy: nn.Module, folder: Any, model_file: str | None,
                  params_file: str | None, input_spec: Any) -> ExportReport:
    check_type("save_model_dir", folder, (str, os.PathLike))
    path = onnx_path(Path(folder) / (model_file or "model.onnx"))
    inputs, dynamic, names = example_inputs(deploy, input_spec)
    report = save_onnx(deploy, path, inputs, dynamic, names)
    if params_file is not None:
        target = Path(folder) / params_file
        os.replace(report.weights_path, target)
        report = dataclasses.replace(report, weights_path=target)
    return report
