"""NNI's quantizers (``nni.algorithms.compression.pytorch.quantization``) over lowbit.

Same class names, arguments, ``config_list`` keys and defaults as NNI's PyTorch quantizers; each
validates ``config_list`` as NNI's schema does (errors are ``TypeError``/``ValueError`` naming
``config_list[i]['key']``, the value and what is allowed), turns every entry into one
``LayerRule`` (later entries win, as in NNI's ``select_config``) and quantizes the model **in
place** through the native API:

- ``QAT_Quantizer`` → ``lowbit.prepare_qat``, method ``"ste"``: NNI's default scheme
  ``per_tensor_affine``/``uint`` for weights, inputs and outputs (``quant_scheme`` and
  ``quant_dtype`` change it), weights ranged by ``minmax`` each step, activations by ``ema`` with
  NNI's ``ema_decay`` 0.99; ``quant_start_step`` → ``QuantSpec.quant_delay`` (minus one: NNI
  counts steps from 1);
- ``DoReFaQuantizer`` → ``lowbit.prepare_qat``, method ``"dorefa"`` (weights);
- ``BNNQuantizer`` → ``lowbit.prepare_qat``, method ``"binary"`` (1-bit weights and outputs,
  e.g. of ``Hardtanh``);
- ``NaiveQuantizer`` → ``lowbit.quantize`` with 8-bit symmetric per-tensor weights;
- ``export_model`` → ``lowbit.convert`` + ``lowbit.export_onnx``.

``op_types: ["default"]`` stands for NNI's ``weighted_modules``, of which lowbit quantizes
``Conv1d``, ``Conv2d`` and ``Linear`` (the others are listed by lowbit's float-layer warning).
``dummy_input`` switches Conv→BN folding on, as in NNI (without it BatchNorms stay separate).
With ``optimizer``, ``optimizer.step`` is patched to also call ``step_with_optimizer``, which is
``lowbit.schedules.Schedule.step_batch``: it clips binary latent weights to [-1, 1]
(BinaryNet); without an optimizer call ``quantizer.step_with_optimizer()`` after each step.
"""

from __future__ import annotations

import json
import os
import re
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import lowbit
from lowbit.config import LayerRule, QuantConfig, QuantSpec, atomic_write_text
from lowbit.export.onnx import DEFAULT_OPSET
from lowbit.export.params import quant_params
from lowbit.nn import GRID_KEEPING_TYPES
from lowbit.quantizers import make_quantizer
from lowbit.quantizers.base import Role
from lowbit.registry import LAYERS

__all__ = ["BNNQuantizer", "DoReFaQuantizer", "NaiveQuantizer", "QAT_Quantizer", "Quantizer"]

QUANT_TYPES = ("weight", "input", "output")
# NNI's ``default_layers.weighted_modules``: what ``op_types: ["default"]`` expands to.
WEIGHTED_MODULES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                    "ConvTranspose3d", "Linear", "Bilinear", "PReLU", "Embedding", "EmbeddingBag")
QUANT_SCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                 "per_channel_symmetric")
QUANT_DTYPES = ("uint", "int")
COMMON_KEYS = ("quant_types", "quant_bits", "op_types", "op_names", "exclude")
EMA_DECAY = 0.99  # NNI's QAT_Quantizer ``ema_decay``


def module_types() -> list[str]:
    """Torch module types NNI configs may name: lowbit's registered layers named after their
    torch class, less the pools and upsamplings lowbit quantizes only as part of placement."""
    return [n for n in LAYERS if LAYERS.get(n).float_type.__name__ == n
            and n not in GRID_KEEPING_TYPES]


class Quantizer:
    """NNI's ``Quantizer`` base: validate ``config_list``, quantize ``model`` in place, hook the
    optimizer. Subclasses set the accepted ``quant_types``, extra keys and ``spec``."""

    quant_types: tuple[str, ...] = QUANT_TYPES
    extra_keys: tuple[str, ...] = ()
    qat = True  # lowbit.prepare_qat (training) or lowbit.quantize (post-training)

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]],
                 optimizer: torch.optim.Optimizer | None = None,
                 dummy_input: torch.Tensor | tuple[Any, ...] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self._name}: `model` must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{self._name}: `optimizer` must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}")
        if dummy_input is not None and not isinstance(dummy_input, (torch.Tensor, tuple, list)):
            raise TypeError(f"{self._name}: `dummy_input` must be a Tensor, a tuple of the "
                            f"model's inputs or None, got {type(dummy_input).__name__}")
        self.config_list = self._checked(config_list, model)
        self.optimizer = optimizer
        self.dummy_input = dummy_input
        rules = [r for i, e in enumerate(self.config_list) if (r := self._rule(i, e)) is not None]
        self.config = QuantConfig(rules=rules, fuse_bn=dummy_input is not None)
        self.bound_model = self._quantize(model)
        self.schedule = lowbit.schedules.for_model(self.bound_model, epochs=1)
        self.export_report: lowbit.ExportReport | None = None
        if optimizer is not None:
            self.patch_optimizer(self.step_with_optimizer)

    @property
    def _name(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------------ NNI's public calls

    def compress(self) -> nn.Module:
        """The model, quantized in place (NNI returns ``bound_model``)."""
        return self.bound_model

    def step_with_optimizer(self) -> None:
        """After each optimizer step: ``Schedule.step_batch`` (clips binary latent weights)."""
        self.schedule.step_batch()

    def patch_optimizer(self, *tasks: Callable[[], None]) -> None:
        """Make ``optimizer.step`` run ``tasks`` after the original step (NNI's patch)."""
        if self.optimizer is None:
            return
        old_step = self.optimizer.step

        def new_step(_: Any, *args: Any, **kwargs: Any) -> Any:
            output = old_step(*args, **kwargs)
            for task in tasks:
                task()
            return output

        self.optimizer.step = types.MethodType(new_step, self.optimizer)  # type: ignore[method-assign]

    def update_epoch(self, epoch: int) -> None:
        """At the start of each (0-based) epoch: moves the schedule to ``epoch`` epochs done."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"{self._name}.update_epoch: `epoch` must be an int, got "
                            f"{type(epoch).__name__} {epoch!r}")
        if epoch < 0:
            raise ValueError(f"{self._name}.update_epoch: `epoch` must be >= 0, got {epoch}")
        self.schedule.state.epoch.fill_(epoch)
        self.schedule.apply()

    def export_model(self, model_path: str | os.PathLike, calibration_path: str | os.PathLike
                     | None = None, onnx_path: str | os.PathLike | None = None,
                     input_shape: list[int] | tuple[int, ...] | None = None,
                     device: torch.device | str | None = None) -> dict[str, Any]:
        """Save the state dict to ``model_path``; with ``onnx_path`` export the converted model
        (``lowbit.convert`` + ``lowbit.export_onnx`` on a ``randn(input_shape)`` input placed on
        ``device``, report in ``export_report``); write lowbit's ``quant_params`` JSON to
        ``calibration_path``. Returns the quant params (NNI: its calibration config)."""
        self._check_export(model_path, calibration_path, onnx_path, input_shape)
        deploy = lowbit.convert(self.bound_model)
        torch.save(self.bound_model.state_dict(), model_path)
        if onnx_path is not None:
            x = torch.randn(*(input_shape or ())).to(device or "cpu")  # shape checked above
            self.export_report = lowbit.export_onnx(deploy, onnx_path, (x,))
            params = json.loads(self.export_report.params_path.read_text())
        else:
            plan = getattr(self.bound_model, "lowbit_plan", None)
            params = quant_params(deploy, plan.float_layers if plan else {}, "", DEFAULT_OPSET)
        if calibration_path is not None:
            atomic_write_text(Path(calibration_path), json.dumps(params, indent=1) + "\n")
        return params

    # ------------------------------------------------------------------ translation

    def spec(self, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        """The lowbit spec of one quant type of one config entry."""
        raise NotImplementedError  # pragma: no cover - every subclass defines it

    def _quantize(self, model: nn.Module) -> nn.Module:
        inputs = self.dummy_input
        example = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        verb = lowbit.prepare_qat if self.qat else lowbit.quantize
        return verb(model, self.config, example_inputs=example, inplace=True)

    def _rule(self, index: int, entry: dict[str, Any]) -> LayerRule | None:
        supported = module_types()
        op_types = [t for t in _expand(entry.get("op_types", [])) if t in supported]
        if "op_types" in entry and not op_types:
            return None  # an exclusion of types lowbit never quantizes
        names = [f"re:{re.escape(n)}" for n in entry.get("op_names", [])]
        if entry.get("exclude", False):
            return LayerRule(types=op_types, names=names)  # all specs None: stays float
        bits = entry["quant_bits"]
        specs = {t: self._spec(index, t, bits if isinstance(bits, int) else bits[t], entry)
                 for t in entry["quant_types"]}
        return LayerRule(types=op_types, names=names, weight=specs.get("weight"),
                         input=specs.get("input"), output=specs.get("output"))

    def _spec(self, index: int, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        """``spec`` checked by the native quantizer itself, errors naming the entry."""
        try:
            spec = self.spec(target, bits, entry)
            make_quantizer(spec, role=cast(Role, target),
                           channel_axis=0 if target == "weight" else 1)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._name}: config_list[{index}] {target} with quant_bits={bits}:"
                            f" {err}") from None
        return spec

    # ------------------------------------------------------------------ validation

    def _checked(self, config_list: Any, model: nn.Module) -> list[dict[str, Any]]:
        if not isinstance(config_list, list) or not all(isinstance(e, dict) for e in config_list):
            raise TypeError(f"{self._name}: `config_list` must be a list of dicts, got "
                            f"{config_list!r}")
        entries = [dict(e) for e in config_list]
        for i, entry in enumerate(entries):
            if isinstance(entry.get("op_types"), str):  # the documented DoReFa example: 'default'
                entry["op_types"] = [entry["op_types"]]
            _Entry(self, i, entry, model).check()
        return entries

    def _check_export(self, model_path: Any, calibration_path: Any, onnx_path: Any,
                      input_shape: Any) -> None:
        if model_path is None:
            raise ValueError(f"{self._name}.export_model: `model_path` must be specified")
        for name, path in (("model_path", model_path), ("calibration_path", calibration_path),
                           ("onnx_path", onnx_path)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"{self._name}.export_model: `{name}` must be a str or "
                                f"os.PathLike, got {type(path).__name__}")
        if onnx_path is not None and input_shape is None:
            raise ValueError(f"{self._name}.export_model: `input_shape` must be specified to "
                             "export onnx model")
        if input_shape is not None and (
                not isinstance(input_shape, (list, tuple)) or not input_shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                           for d in input_shape)):
            raise ValueError(f"{self._name}.export_model: `input_shape` must be a list or tuple "
                             f"of positive ints, got {input_shape!r}")


def _expand(op_types: list[str]) -> list[str]:
    """``"default"`` → NNI's weighted modules, as NNI's ``select_config`` expands it."""
    return [t for op in op_types for t in (WEIGHTED_MODULES if op == "default" else (op,))]


class _Entry:
    """Checks of one ``config_list`` entry (NNI's ``QuantizerSchema``)."""

    def __init__(self, owner: Quantizer, index: int, entry: dict[str, Any],
                 model: nn.Module) -> None:
        self.owner, self.entry, self.model = owner, entry, model
        self.where = f"{owner._name}: config_list[{index}]"

    def fail(self, error: type[Exception], key: str, why: str) -> None:
        raise error(f"{self.where}[{key!r}] {why}, got {self.entry[key]!r}")

    def check(self) -> None:
        allowed = (*COMMON_KEYS, *self.owner.extra_keys)
        unknown = sorted(set(self.entry) - set(allowed))
        if unknown:
            raise ValueError(f"{self.where} has unknown key(s) {unknown}; allowed: {list(allowed)}")
        if "op_types" not in self.entry and "op_names" not in self.entry:
            raise ValueError(f"{self.where}: either op_types or op_names must be specified")
        if "exclude" in self.entry and not isinstance(self.entry["exclude"], bool):
            self.fail(TypeError, "exclude", "must be a bool")
        excluded = self.entry.get("exclude", False)
        if not excluded and not {"quant_types", "quant_bits"} <= set(self.entry):
            raise ValueError(f"{self.where}: either (quant_types and quant_bits) or exclude "
                             "must be specified")
        self.check_ops(excluded)
        if not excluded:
            self.check_quant_types()
            self.check_bits()
            self.check_extra()

    def check_ops(self, excluded: bool) -> None:
        for key in ("op_types", "op_names"):
            value = self.entry.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(TypeError, key, "must be a list of str")
        present = {n: type(m).__name__ for n, m in self.model.named_modules()}
        supported = module_types()
        if not excluded:
            for op in self.entry.get("op_types", []):
                if op != "default" and op not in supported:
                    self.fail(ValueError, "op_types", f"holds {op!r}, a type lowbit does not "
                              f"quantize; allowed: {[*supported, 'default']}")
            for name in self.entry.get("op_names", []):
                if name in present and present[name] not in supported:
                    self.fail(ValueError, "op_names", f"names {name!r}, a {present[name]} that "
                              f"lowbit does not quantize; allowed types: {supported}")
        missing_types = sorted(set(self.entry.get("op_types", [])) - {"default", *present.values()})
        missing_names = sorted(set(self.entry.get("op_names", [])) - set(present))
        for what, missing in (("op_types", missing_types), ("op_names", missing_names)):
            if missing:
                warnings.warn(f"{self.where}: {what} {missing} not found in model", stacklevel=5)

    def check_quant_types(self) -> None:
        value = self.entry["quant_types"]
        if not isinstance(value, list):
            self.fail(TypeError, "quant_types", "must be a list of str")
        allowed = list(self.owner.quant_types)
        if not value or any(t not in allowed for t in value):
            self.fail(ValueError, "quant_types", f"must be a non-empty list of {allowed}")

    def check_bits(self) -> None:
        bits = self.entry["quant_bits"]
        if isinstance(bits, dict):
            if any(isinstance(b, bool) or not isinstance(b, int) for b in bits.values()):
                self.fail(TypeError, "quant_bits", "values must be int")
            quant_types = self.entry["quant_types"]
            missing = [t for t in quant_types if t not in bits]
            extra = [t for t in bits if t not in quant_types]
            if missing:
                self.fail(ValueError, "quant_bits", f"must give the bits of {missing} "
                          "(bits length for each of quant_types must be specified)")
            if extra:
                self.fail(ValueError, "quant_bits", f"gives bits for {extra}, which are not in "
                          f"quant_types {quant_types}")
        elif isinstance(bits, bool) or not isinstance(bits, int):
            self.fail(TypeError, "quant_bits", "must be an int or a dict {quant_type: int}")

    def check_extra(self) -> None:
        if "quant_start_step" in self.entry:
            step = self.entry["quant_start_step"]
            if isinstance(step, bool) or not isinstance(step, int):
                self.fail(TypeError, "quant_start_step", "must be an int")
            if step < 0:
                self.fail(ValueError, "quant_start_step", "must be >= 0")
        for key, allowed in (("quant_scheme", QUANT_SCHEMES), ("quant_dtype", QUANT_DTYPES)):
            if key not in self.entry:
                continue
            value = self.entry[key]
            values = list(value.values()) if isinstance(value, dict) else [value]
            keys = list(value) if isinstance(value, dict) else []
            if any(k not in self.entry["quant_types"] for k in keys) or any(
                    v not in allowed for v in values):
                self.fail(ValueError, key, f"must be one of {list(allowed)} or a dict "
                          "{quant_type: value} over quant_types")


class QAT_Quantizer(Quantizer):  # noqa: N801 - NNI's name
    """Jacob et al.'s quantization-aware training: lowbit method ``"ste"`` (see module doc)."""

    extra_keys = ("quant_start_step", "quant_scheme", "quant_dtype")

    def spec(self, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        scheme = _per_type(entry, "quant_scheme", target, "per_tensor_affine")
        dtype = _per_type(entry, "quant_dtype", target, "uint")
        spec = QuantSpec(bits=bits, symmetric=scheme.endswith("symmetric"), signed=dtype == "int",
                         granularity="per_channel" if scheme.startswith("per_channel")
                         else "per_tensor", quant_delay=_delay(entry.get("quant_start_step", 0)))
        # Weights: range of the current weight each step; activations: NNI's EMA of min/max.
        return spec if target == "weight" else spec.replace(observer="ema", moving_rate=EMA_DECAY)


def _delay(quant_start_step: int) -> int:
    """NNI counts steps from 1 and quantizes from step ``quant_start_step`` on: the first
    ``quant_start_step − 1`` training steps run in float (``QuantSpec.quant_delay``)."""
    return max(quant_start_step - 1, 0)


def _per_type(entry: dict[str, Any], key: str, target: str, default: str) -> str:
    value = entry.get(key, default)
    return value.get(target, default) if isinstance(value, dict) else value


class DoReFaQuantizer(Quantizer):
    """DoReFa-Net weights (``tanh``-normalised, odd grid): lowbit method ``"dorefa"``."""

    quant_types = ("weight",)

    def spec(self, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        return QuantSpec(bits=bits, method="dorefa")


class BNNQuantizer(Quantizer):
    """Binarized networks (±1 weights and outputs, hardtanh STE): lowbit method ``"binary"``."""

    quant_types = ("weight", "output")

    def spec(self, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        return QuantSpec(bits=bits, method="binary")


class NaiveQuantizer(Quantizer):
    """8-bit weights, symmetric per tensor from max|W| (post-training: ``lowbit.quantize``).

    ``config_list`` defaults to 8-bit weights of every ``"default"`` layer (the docs call
    ``NaiveQuantizer(model).compress()``)."""

    quant_types = ("weight",)
    qat = False

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]] | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 dummy_input: torch.Tensor | tuple[Any, ...] | None = None) -> None:
        if config_list is None:
            config_list = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}]
        super().__init__(model, config_list, optimizer, dummy_input)

    def spec(self, target: str, bits: int, entry: dict[str, Any]) -> QuantSpec:
        if bits != 8:
            raise ValueError(f"NaiveQuantizer quantizes weights to 8 bits only: quant_bits must "
                             f"be 8 or {{'weight': 8}}, got {bits}")
        return QuantSpec(bits=8, symmetric=True, granularity="per_tensor", observer="minmax")
