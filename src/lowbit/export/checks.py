"""Argument checks of ``export_onnx``: every bad option is a TypeError/ValueError naming it,
before the exporter runs (where it would surface as a long error from deep inside torch)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowbit.export.params import deploy_layers

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear with an axis


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_names(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of str or None, got {type(value).__name__} "
                        f"{value!r}" + (f"; write [{value!r}]" if isinstance(value, str) else ""))
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"`{name}` must hold str, got {bad[0]!r}")


def check_export_options(model: nn.Module, *, opset: Any, dynamic_shapes: Any, threads: Any,
                         verify_inputs: Any, input_names: Any, output_names: Any) -> None:
    """Raise for options ``export_onnx`` cannot honour (see its docstring for each)."""
    if not deploy_layers(model):
        raise ValueError("`model` has no quantized deploy layers: it was never quantized, "
                         "calibrated and converted; export lowbit.convert(qm) of a calibrated "
                         "(or trained) lowbit.quantize(model, config)")
    if opset is not None:
        import onnx

        highest = onnx.defs.onnx_opset_version()
        if not _is_int(opset):
            raise TypeError(f"`opset` must be an int or None, got {type(opset).__name__} "
                            f"{opset!r}")
        if not MIN_OPSET <= opset <= highest:
            raise ValueError(f"`opset` must be in {MIN_OPSET}..{highest} (the installed onnx "
                             f"knows opsets up to {highest}), got {opset}")
    if dynamic_shapes is not None and not isinstance(dynamic_shapes, (dict, tuple, list)):
        raise TypeError("`dynamic_shapes` must be a tuple (one entry per input) or dict of "
                        "{axis: torch.export.Dim}, e.g. ({0: torch.export.Dim('batch')},), got "
                        f"{type(dynamic_shapes).__name__} {dynamic_shapes!r}")
    if threads is not None:
        if not _is_int(threads):
            raise TypeError(f"`threads` must be an int or None, got {type(threads).__name__} "
                            f"{threads!r}")
        if threads < 1:
            raise ValueError(f"`threads` must be >= 1 (ONNX Runtime intra-op threads) or None "
                             f"for its default, got {threads}")
    if verify_inputs is not None:
        if not isinstance(verify_inputs, (list, tuple)):
            raise TypeError("`verify_inputs` must be a list of input tuples, got "
                            f"{type(verify_inputs).__name__}")
        for i, item in enumerate(verify_inputs):
            if not isinstance(item, (list, tuple)):
                raise TypeError(f"`verify_inputs`[{i}] must be a tuple of the model's inputs, "
                                f"got {type(item).__name__}; write (x,)")
    _check_names("input_names", input_names)
    _check_names("output_names", output_names)
