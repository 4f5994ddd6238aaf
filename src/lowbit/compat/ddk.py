"""A phone vendor DDK's PyTorch plug-in quantization (``dopt.dopt_torch.opt_main``) over lowbit.

The DDK's flow is "generate a per-layer JSON template, edit it, apply it, train or calibrate,
extract the final model". Each name maps onto lowbit's native API:

- ``generate_config_file`` → ``lowbit.plan`` finds the quantizable layers; the template is
  written atomically with ``lowbit.config.atomic_write_text``;
- ``optimize_model`` → ``lowbit.prepare_qat`` with one ``LayerRule`` per edited layer (the model
  both trains and calibrates afterwards, so it is the QAT form: BatchNorm folds while training);
- ``get_quant_loss`` → ``lowbit.quant_loss``;
- ``set_calibrate_state`` → ``lowbit.set_calibrating`` (and ``eval()``: calibration is inference);
- ``generate_final_model`` → ``optimize_model`` again + ``load_state_dict`` +
  ``lowbit.convert`` + ``lowbit.export_onnx`` (ONNX file, quant-params JSON, packed weights).

Strategies are ``Quant_INT<w>-<a>``: ``<w>``-bit weights and ``<a>``-bit activations. The DDK
documents only ``Quant_INT8-8`` (8-bit weights and activations); the other widths lowbit
supports follow the same pattern (``STRATEGIES``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit import config as _config
from lowbit.config import LayerRule, QuantConfig, QuantSpec
from lowbit.export.report import ExportReport
from lowbit.nn import QuantLayer
from lowbit.registry import LAYERS

__all__ = [
    "STRATEGIES",
    "generate_config_file",
    "generate_final_model",
    "get_quant_loss",
    "optimize_model",
    "set_calibrate_state",
]

FLOAT = "float"
# strategy -> (weight bits, activation bits)
STRATEGIES: dict[str, tuple[int, int]] = {
    "Quant_INT8-8": (8, 8),
    "Quant_INT4-8": (4, 8),
    "Quant_INT2-8": (2, 8),
    "Quant_INT1-8": (1, 8),
    "Quant_INT4-4": (4, 4),
}
# lowbit layer type -> the TensorFlow-style op name the DDK appends to a layer's key.
OP_NAMES = {"Conv1d": "Conv1D", "Conv2d": "Conv2D", "Linear": "MatMul"}
HINT = "quant_strategy_for op '{}'"
ENTRY_FIELDS = ("op_type", "quant_strategy")
ONNX_NAME = "quant_model.onnx"


def op_type(lowbit_type: str) -> str:
    """The DDK's ``op_type`` of a lowbit layer type: ``str`` of the torch class."""
    return str(LAYERS.get(lowbit_type).float_type)


def allowed_strategies() -> list[str]:
    """Strategies a layer accepts (every op type in ``OP_NAMES`` takes all of them)."""
    return [FLOAT, *STRATEGIES]


def _weight_spec(bits: int) -> QuantSpec:
    if bits == 1:  # one bit has no uniform grid: binary weights, XNOR per-filter scale
        return QuantSpec(bits=1, method="binary", xnor=True)
    return QuantSpec(bits=bits, symmetric=True, granularity="per_channel")


def _activation_spec(bits: int) -> QuantSpec:
    # EMA ranges: they follow the data while training and average it while calibrating.
    return QuantSpec(bits=bits, symmetric=False, observer="ema")


# ------------------------------------------------------------------------------ checks


def _check_model(model: Any) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"`model` must not be wrapped by {type(model).__name__} (or another "
                        "distributed API); pass the wrapped model: model.module")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` is already quantized; pass the float model (for "
                         "generate_final_model: a freshly built float model)")
    return model


def _check_path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a str or os.PathLike, got {type(value).__name__} "
                        f"{value!r}")
    return Path(value)


def _existing_file(name: str, value: Any) -> Path:
    path = _check_path(name, value)
    if not path.is_file():
        raise ValueError(f"`{name}` {str(path)!r} does not exist or is not a file")
    return path


def parse_input_shape(text: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``"x:1,3,224,224"`` (inputs separated by ``;``) → ``[("x", (1, 3, 224, 224))]``."""
    if not isinstance(text, str):
        raise TypeError(f"`input_shape` must be a str like 'x:1,3,224,224' (several inputs: "
                        f"'a:1,3;b:1,5'), got {type(text).__name__} {text!r}")
    shapes = []
    for part in text.split(";"):
        name, sep, dims = part.strip().partition(":")
        name = name.strip()
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name.isidentifier() or not shape or min(shape) < 1:
            raise ValueError(f"`input_shape` must be 'name:d1,d2,...' per input (positive int "
                             f"dims; inputs separated by ';'), got {text!r}")
        shapes.append((name, shape))
    names = [n for n, _ in shapes]
    if len(set(names)) != len(names):
        raise ValueError(f"`input_shape` names an input twice: {text!r}")
    return shapes


def _format_input_shape(shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    return ";".join(f"{name}:{','.join(map(str, shape))}" for name, shape in shapes)


def _example_inputs(model: nn.Module, shapes: list[tuple[str, tuple[int, ...]]]
                    ) -> tuple[torch.Tensor, ...]:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen).to(device) for _, shape in shapes)


def _check_runs(model: nn.Module, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """Run the model once on the deploy shapes (eval, no grad; training flags restored)."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*_example_inputs(model, shapes))
    except Exception as err:
        raise ValueError(f"`input_shape` {_format_input_shape(shapes)!r}: the model does not "
                         f"run on inputs of these shapes: {err}") from err
    finally:
        for m, flag in flags.items():
            m.training = flag


# --------------------------------------------------------------------------- template


def quantizable_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{"<name>/<Op>": (module name, lowbit type)}`` for every layer the DDK JSON lists."""
    found = lowbit.plan(model, QuantConfig(fuse_bn=False)).layers
    return {f"{layer.name}/{OP_NAMES[layer.type]}": (layer.name, layer.type)
            for layer in found if layer.type in OP_NAMES}


def generate_config_file(model: nn.Module, input_shape: str, dst_path: str | os.PathLike) -> None:
    """Write the editable per-layer JSON template (every layer ``"float"``) to ``dst_path``.

    ``input_shape`` is the deployed model's input shape, ``"x:1,3,224,224"`` (several inputs:
    ``"a:1,3;b:1,5"``); the model is run once on it to check it. Layers come from
    ``lowbit.plan``; the file is written through a temp file and a rename.
    """
    model = _check_model(model)
    shapes = parse_input_shape(input_shape)
    path = _check_path("dst_path", dst_path)
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"`model` has no quantizable layer; supported op types: "
                         f"{[op_type(t) for t in OP_NAMES]}")
    _check_runs(model, shapes)
    data: dict[str, Any] = {}
    for lowbit_type in dict.fromkeys(t for _, t in layers.values()):
        data[HINT.format(op_type(lowbit_type))] = list(STRATEGIES)
    data["input_shape"] = _format_input_shape(shapes)
    data["layer_strategy"] = {key: {"op_type": op_type(t), "quant_strategy": FLOAT}
                              for key, (_, t) in layers.items()}
    _config.atomic_write_text(path, json.dumps(data, indent=4) + "\n")


# ------------------------------------------------------------------------- read + apply


def read_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON file as a dict with ``input_shape`` and ``layer_strategy`` (the only keys the
    DDK parses; the ``quant_strategy_for op`` hints are ignored)."""
    path = _existing_file("config_path", config_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"`config_path` {str(path)!r} is not valid JSON: {err.msg} at line "
                         f"{err.lineno} column {err.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"`config_path` {str(path)!r} must hold a JSON object")
    for key in ("input_shape", "layer_strategy"):
        if key not in data:
            raise ValueError(f"`config_path` {str(path)!r} has no {key!r}; regenerate it with "
                             "generate_config_file")
    if not isinstance(data["layer_strategy"], dict):
        raise ValueError(f"`layer_strategy` in {str(path)!r} must map layer names to entries, "
                         f"got {type(data['layer_strategy']).__name__}")
    return data


def _entry_strategy(key: str, entry: Any, lowbit_type: str) -> str:
    """Check one ``layer_strategy`` entry against the model's layer; return its strategy."""
    if not isinstance(entry, dict):
        raise ValueError(f"layer {key!r}: entry must be an object with `op_type` and "
                         f"`quant_strategy`, got {type(entry).__name__}")
    unknown = sorted(k for k in entry if k not in ENTRY_FIELDS and not k.startswith("//"))
    if unknown:
        raise ValueError(f"layer {key!r}: unknown field(s) {unknown}; allowed: "
                         f"{list(ENTRY_FIELDS)} and '//' comments")
    expected = op_type(lowbit_type)
    if entry.get("op_type") != expected:
        raise ValueError(f"layer {key!r}: `op_type` {entry.get('op_type')!r} is not the "
                         f"model's op type {expected!r}; leave op_type as generated")
    strategy = entry.get("quant_strategy", FLOAT)
    allowed = allowed_strategies()
    if not isinstance(strategy, str):
        raise TypeError(f"layer {key!r}: `quant_strategy` must be a str, one of {allowed}, got "
                        f"{type(strategy).__name__} {strategy!r}")
    if strategy not in allowed:
        raise ValueError(f"layer {key!r}: quant_strategy {strategy!r} is not supported for "
                         f"op_type {expected!r}; allowed: {allowed}")
    return strategy


def layer_strategies(model: nn.Module, data: dict[str, Any]) -> dict[str, str]:
    """``{module name: strategy}`` from ``layer_strategy``; layers left out stay float."""
    layers = quantizable_layers(model)
    out: dict[str, str] = {}
    for key, entry in data["layer_strategy"].items():
        if key not in layers:
            raise ValueError(f"`layer_strategy` lists {key!r}, which is not a quantizable layer "
                             f"of the model (layers must not be added); layers: {list(layers)}")
        name, lowbit_type = layers[key]
        out[name] = _entry_strategy(key, entry, lowbit_type)
    return out


def config_from_strategies(strategies: dict[str, str]) -> QuantConfig:
    """One ``LayerRule`` per layer with a quantization strategy (float layers get none)."""
    rules = []
    for name, strategy in strategies.items():
        if strategy == FLOAT:
            continue
        w_bits, a_bits = STRATEGIES[strategy]
        rules.append(LayerRule(names=[f"re:{re.escape(name)}"], weight=_weight_spec(w_bits),
                               input=_activation_spec(a_bits)))
    return QuantConfig(rules=rules)


def optimize_model(model: nn.Module, config_path: str | os.PathLike) -> nn.Module:
    """The quantized model for the edited JSON: ``lowbit.prepare_qat`` (a copy; train it, or
    calibrate it after ``set_calibrate_state(quant_model, True)``)."""
    model = _check_model(model)
    data = read_config(config_path)
    parse_input_shape(data["input_shape"])
    cfg = config_from_strategies(layer_strategies(model, data))
    if not cfg.rules:
        raise ValueError(f"every layer of `config_path` {str(config_path)!r} is {FLOAT!r}; set "
                         f"the quant_strategy of the layers to quantize to one of "
                         f"{list(STRATEGIES)}")
    return lowbit.prepare_qat(model, cfg)


def get_quant_loss(quant_model: nn.Module) -> torch.Tensor:
    """The quantizers' regularisation terms (``lowbit.quant_loss``); add
    ``quant_weight * get_quant_loss(quant_model)`` to the task loss."""
    return lowbit.quant_loss(quant_model)


def set_calibrate_state(quant_model: nn.Module, calibration_mode: bool) -> None:
    """``True``: calibration (no-training quantization) on, ranges recorded from the following
    forwards, model in eval mode; ``False``: off, ranges frozen (``lowbit.set_calibrating``)."""
    if not isinstance(calibration_mode, bool):
        raise TypeError(f"`calibration_mode` must be a bool (True: calibration on, False: off), "
                        f"got {type(calibration_mode).__name__} {calibration_mode!r}")
    lowbit.set_calibrating(quant_model, calibration_mode)
    if calibration_mode:
        quant_model.eval()  # calibration is inference: BatchNorm keeps its running statistics


# ------------------------------------------------------------------------------ final


def _load_state(quant_model: nn.Module, pth_file: Path, config_file: Any) -> None:
    device = next((p.device for p in quant_model.parameters()), torch.device("cpu"))
    try:
        state = torch.load(pth_file, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"`pth_file` {str(pth_file)!r} could not be read with torch.load("
                         f"weights_only=True): {err}; save torch.save(quant_model.state_dict(), "
                         "path)") from None
    if not isinstance(state, dict):
        raise ValueError(f"`pth_file` {str(pth_file)!r} must hold a state dict "
                         f"(quant_model.state_dict()), got {type(state).__name__}")
    try:
        quant_model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:  # ValueError: lowbit's checkpoint metadata check
        raise ValueError(f"`pth_file` {str(pth_file)!r} does not match the model quantized with "
                         f"`config_file` {str(config_file)!r}; use the config_path given to "
                         f"optimize_model: {err}") from None


@torch.no_grad()
def generate_final_model(model: nn.Module, config_file: str | os.PathLike,
                         pth_file: str | os.PathLike,
                         output_dir: str | os.PathLike = "./") -> ExportReport:
    """Load the trained or calibrated ``pth_file`` into ``model`` (the rebuilt float model)
    quantized by ``config_file``, then ``lowbit.convert`` + ``lowbit.export_onnx``.

    Writes ``quant_model.onnx``, ``quant_model.quant_params.json`` and
    ``quant_model.weights.safetensors`` into the existing ``output_dir``, exported for the
    JSON's ``input_shape`` and checked in ONNX Runtime; returns lowbit's report.
    """
    folder = _check_path("output_dir", output_dir)
    if not folder.is_dir():
        raise ValueError(f"`output_dir` {str(folder)!r} does not exist or is not a folder; "
                         "create it first")
    pth = _existing_file("pth_file", pth_file)
    quant_model = optimize_model(model, config_file)
    _load_state(quant_model, pth, config_file)
    quant_model.eval()
    # A calibration saved before set_calibrate_state(..., False) still holds open ranges.
    lowbit.set_calibrating(quant_model, True, reset=False)
    lowbit.set_calibrating(quant_model, False)
    shapes = parse_input_shape(read_config(config_file)["input_shape"])
    deploy = lowbit.convert(quant_model)
    return lowbit.export_onnx(deploy, folder / ONNX_NAME, _example_inputs(deploy, shapes),
                              input_names=[name for name, _ in shapes])
