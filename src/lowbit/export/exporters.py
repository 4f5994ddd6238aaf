"""The two torch exporters behind ``export_onnx``, and the choice between them.

``"dynamo"`` (torch.export, then ONNX translation through ``lowbit.ops.translation_table``) is
the default; ``"torchscript"`` (the legacy tracer, ``lowbit.ops``' symbolic functions) passes
graphs the dynamo exporter rejects, e.g. the window ``view`` of transformers' Swin models.
``"auto"`` tries dynamo and falls back to TorchScript. Both write the same
QuantizeLinear/DequantizeLinear nodes with integer initializers named after the model's buffers.
The legacy exporter stops at opset 20; for a later opset (21: per-group weights) it writes 20 and
onnx's version converter lifts the file, so every opset has the fallback.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lowbit.export.errors import ExporterError, ExportFailure, explain, hints
from lowbit.ops import (
    SUPPORTED_OPSETS,
    TORCHSCRIPT_OPSETS,
    register_torchscript_symbolics,
    translation_table,
)

Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS = ("auto", "dynamo", "torchscript")
# Loggers that print tracebacks of failures the exporter handles (or re-raises) itself.
_NOISY_LOGGERS = ("torch.onnx", "torch._subclasses.fake_tensor", "torch.export",
                  "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


def check_exporter_args(exporter: Any, opset: Any) -> None:
    """``ValueError`` for an exporter name or an opset torch's exporters cannot write (types
    and the generic checks are ``export.checks.check_export_options``'s)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"`exporter` must be one of {', '.join(map(repr, EXPORTERS))}, "
                         f"got {exporter!r}")
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"`opset` must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
                         f" (what torch's exporters write), got {opset}")


def training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's own training flag, for ``restore_training_flags``.

    ``model.train(flag)`` would set one flag down the whole tree: a model whose encoder was in
    eval and whose head was training would come back all training, with dropout on.
    """
    return [(m, m.training) for m in model.modules()]


def restore_training_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in flags:
        m.training = flag


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Keep the exporters' progress prints, warnings and log lines out of the user's console;
    errors are explained by ``ExportError`` instead."""
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    log = io.StringIO()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            yield log
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_exporter(model: nn.Module, inputs: tuple[Any, ...], out: Path, *, exporter: Exporter,
                 opset: int, dynamic_shapes: Any = None,
                 input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None) -> tuple[str, ExportFailure | None]:
    """Write ``model`` to ``out`` with the chosen exporter; ``(exporter used, dynamo's failure
    when "auto" fell back)``. Raises ``ExportError`` when every exporter tried fails."""
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"],
             "torchscript": ["torchscript"]}[exporter]
    failures: list[ExportFailure] = []
    for name in order:
        try:
            with quiet_exporter():
                EXPORT_FUNCTIONS[name](model, inputs, out, opset, dynamic_shapes, input_names,
                                       output_names)
        except Exception as err:  # noqa: BLE001 - explained and re-raised below
            failures.append(explain(err, name, model))
            cause = err
            continue
        return name, (failures[0] if failures else None)
    raise ExporterError(failures, hints(failures, order, opset, dynamic_shapes)) from cause


def _dynamo(model: nn.Module, inputs: tuple[Any, ...], out: Path, opset: int,
            dynamic_shapes: Any, input_names: Any, output_names: Any) -> None:
    program = torch.onnx.export(
        model, inputs, dynamo=True, opset_version=opset, verbose=False,
        custom_translation_table=translation_table(opset), dynamic_shapes=dynamic_shapes,
        input_names=list(input_names) if input_names else None,
        output_names=list(output_names) if output_names else None,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    program.save(str(out))


def _torchscript(model: nn.Module, inputs: tuple[Any, ...], out: Path, opset: int,
                 dynamic_shapes: Any, input_names: Any, output_names: Any) -> None:
    register_torchscript_symbolics()
    names = list(input_names) if input_names else forward_input_names(model, inputs)
    written = min(opset, TORCHSCRIPT_OPSETS.stop - 1)
    torch.onnx.export(
        model, inputs, str(out), dynamo=False, opset_version=written, verbose=False,
        input_names=names, output_names=list(output_names) if output_names else None,
        dynamic_axes=dynamic_axes(dynamic_shapes, names),
    )
    _undo_initializer_dedup(out)
    if written < opset:
        _lift_opset(out, opset)


def _lift_opset(path: Path, opset: int) -> None:
    """Convert the legacy exporter's opset-20 file to ``opset`` with onnx's version converter.

    lowbit's symbolic functions already write the blocked ``DequantizeLinear`` (``block_size``)
    that opset 21 defines; torch's own ops change between 20 and 21 only by the element types
    they accept, and the converter adapts any that change more.
    """
    import onnx
    from onnx import version_converter

    proto = version_converter.convert_version(onnx.load(str(path)), opset)
    onnx.save(proto, str(path))


def _undo_initializer_dedup(path: Path) -> None:
    """Give each buffer its own initializer again.

    The TorchScript exporter keeps one of several equal-valued initializers (every zero point
    of 0, say) and feeds the others through ``Identity`` nodes; the parity check finds each
    quantizer's tensors by their buffer names, as the dynamo exporter writes them.
    """
    import onnx

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
        else:
            keep.append(node)
    if len(keep) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
        onnx.save(proto, str(path))


EXPORT_FUNCTIONS = {"dynamo": _dynamo, "torchscript": _torchscript}


def forward_input_names(model: nn.Module, inputs: tuple[Any, ...]) -> list[str] | None:
    """The forward's positional parameter names (the dynamo exporter's input names), when
    every input is one tensor; ``None`` leaves the naming to the exporter."""
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[:len(inputs)] if len(params) >= len(inputs) else None


def dynamic_axes(dynamic_shapes: Any, names: list[str] | None) -> dict[str, dict[int, str]] | None:
    """torch.export-style ``dynamic_shapes`` → the TorchScript exporter's ``dynamic_axes``."""
    if dynamic_shapes is None:
        return None
    if names is None:
        raise ValueError("`dynamic_shapes` with exporter='torchscript' needs tensor inputs "
                         "(or `input_names`) to name the dynamic axes")
    if isinstance(dynamic_shapes, dict):
        specs = [dynamic_shapes.get(n) for n in names]
    else:
        specs = list(dynamic_shapes)
    if len(specs) != len(names):
        raise ValueError(f"`dynamic_shapes` has {len(specs)} entries for {len(names)} inputs")
    axes: dict[str, dict[int, str]] = {}
    for name, spec in zip(names, specs):
        if spec is None:
            continue
        items = spec.items() if isinstance(spec, dict) else enumerate(spec)
        dims = {int(axis): str(getattr(dim, "__name__", None) or f"{name}_dim{axis}")
                for axis, dim in items if dim is not None}
        if dims:
            axes[name] = dims
    return axes
