"""``export_onnx``: a deploy model to a QDQ ONNX file with integer initializers, verified in
ONNX Runtime.

The deploy modules compute with ``lowbit.ops``; the dynamo exporter maps those ops one-to-one
onto ``QuantizeLinear`` / ``DequantizeLinear`` / ``DynamicQuantizeLinear`` + ``MatMulInteger``,
so weight codes land in the file as int8 initializers (the file shrinks ~4x) and ONNX Runtime
fuses ``DQ → Conv/MatMul → Q`` into its integer kernels. Every file is written to a temp name
and renamed, so a failed export leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.deploy import IntWeight
from lowbit.export.checks import check_export_options
from lowbit.export.deploy import check_deploy_graph
from lowbit.export.encoding import (
    WeightDtype,
    cpu_has_vnni,
    resolve_weight_dtype,
    with_unsigned_weights,
)
from lowbit.export.exporters import (
    Exporter,
    check_exporter_args,
    quiet_exporter,
    restore_training_flags,
    run_exporter,
    training_flags,
)
from lowbit.export.files import export_step_error, side_paths, stamp_file_set
from lowbit.export.fold import fold_quantized_constants
from lowbit.export.int4 import Int4Format, resolve_int4_format, rewrite_int4_weights
from lowbit.export.pads import exclude_overhang_from_average_pools, fold_pads_into_convs
from lowbit.export.params import packed_weights_bytes, quant_params_json
from lowbit.export.report import ExportReport
from lowbit.export.verify import verify
from lowbit.guard import layer_errors
from lowbit.io import FileSet, sha256_bytes
from lowbit.nn import QuantLayer

__all__ = ["export_onnx", "quiet_exporter", "side_paths", "strip_metadata"]

DEFAULT_OPSET = 19
BLOCKED_OPSET = 21  # DequantizeLinear with block_size
# Fed the runtime's own input codes, layers still flip a tie now and then, by one step: fused
# integer kernels about 1 code in 10^5-10^6 (ResNet at 224 px: 37 of 9 million), a float
# softmax between two quantizers up to 1 in 10^3 on small tensors. A wrong kernel differs more
# often or by more.
LOCAL_AGREEMENT = 0.999


def _check_args(model: Any, path: Any, example_inputs: Any) -> Path:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("`model` still holds fake-quant layers; export the deploy model: "
                         "lowbit.export_onnx(lowbit.convert(qm), ...)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("`example_inputs` must be a tuple of the model's positional inputs, "
                        f"got {type(example_inputs).__name__}; write (x,)")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"`path` {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"`path` {str(path)!r}: folder {str(folder)!r} is not writable")
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Sequence[Any],
    *,
    opset: int | None = None,
    dynamic_shapes: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify_inputs: Sequence[Sequence[Any]] | None = None,
    float_layers: dict[str, str] | None = None,
    weight_dtype: WeightDtype = "auto",
    int4_format: Int4Format = "auto",
    threads: int | None = None,
    exporter: Exporter = "auto",
) -> ExportReport:
    """Export ``model`` (from ``lowbit.convert``) to ``path`` and check it in ONNX Runtime.

    Writes ``path``, ``<stem>.quant_params.json`` and ``<stem>.weights.safetensors``. The model
    is run in ONNX Runtime on ``example_inputs`` (and each tuple in ``verify_inputs``) and
    compared with ``model``: the report gives the share of identical integer codes over every
    quantized activation and the largest output difference in LSBs. ``dynamic_shapes`` is
    passed to ``torch.onnx.export`` (e.g. ``({0: torch.export.Dim("batch")},)``).
    ``weight_dtype`` stores 8-bit weight codes as int8 or as uint8 (+128): the same values,
    but a different ONNX Runtime kernel; ``"auto"`` avoids the u8s8 kernels on x86 CPUs
    without VNNI, where they saturate (see ``lowbit.export.encoding``). ``int4_format`` stores
    4-bit per-group Linear weights packed two codes a byte, as INT4 ``DequantizeLinear`` →
    ``MatMul`` (``"dequantize"``: standard ONNX, which ONNX Runtime fuses into ``MatMulNBits``
    running on int8 activations unless the session sets
    ``session.qdq_matmulnbits_accuracy_level`` to 0) or as ``com.microsoft.MatMulNBits``
    (``"matmulnbits"``: ONNX Runtime only, float activations, the deploy model's values to
    float rounding); ``"auto"`` is ``"matmulnbits"``, so the file computes what the deploy
    model computes (see ``lowbit.export.int4``). ``exporter`` picks torch's exporter:
    ``"dynamo"``, ``"torchscript"`` (the legacy tracer; it writes opset 20, and later opsets
    through onnx's version converter) or ``"auto"`` (dynamo, then TorchScript where dynamo
    fails, with a warning and a line in the report). When no exporter succeeds,
    ``lowbit.ExportError`` names the module and op where each failed, the exporter's first line
    and what to try. Every submodule's training flag
    is restored afterwards, and ``model`` itself is never changed.
    """
    path = _check_args(model, path, example_inputs)
    check_export_options(model, opset=opset, dynamic_shapes=dynamic_shapes, threads=threads,
                         verify_inputs=verify_inputs, input_names=input_names,
                         output_names=output_names)
    storage, storage_reason = resolve_weight_dtype(weight_dtype)
    int4_storage, int4_reason = resolve_int4_format(int4_format)
    source = model
    if storage == "uint8":
        model = with_unsigned_weights(model)
    example_inputs = tuple(example_inputs)
    blocked = any(isinstance(m, IntWeight) and m.block_size for m in model.modules())
    if opset is None:
        opset = BLOCKED_OPSET if blocked else DEFAULT_OPSET
    check_exporter_args(exporter, opset)
    if blocked and opset < BLOCKED_OPSET:
        raise ValueError(f"`opset` must be >= {BLOCKED_OPSET} for per-group weights, got {opset}")
    plan = getattr(source, "lowbit_plan", None)
    if float_layers is None:
        float_layers = plan.float_layers if plan is not None else {}

    params_path, weights_path = side_paths(path)
    flags = training_flags(source)
    # One file set: all three files appear together or not at all (lowbit.io.FileSet).
    try:
        files = FileSet([params_path, weights_path, path]).open()
    except OSError as err:
        wrapped = export_step_error("creating the staging folder", err)
        if wrapped is err:
            raise
        raise wrapped from err
    tmp = files.staged(path)
    step = "checking example_inputs"
    try:
        model.eval()
        with torch.no_grad(), layer_errors(model, "export with `example_inputs`"):
            model(*example_inputs)  # a bad input names its layer here, not deep in the exporter
        step = "torch.onnx.export"
        used = _torch_export(model, example_inputs, tmp, opset, dynamic_shapes, input_names,
                             output_names, exporter)
        import onnx

        step = "ONNX rewrite and check"
        proto = strip_metadata(onnx.load(str(tmp)))
        folded = fold_quantized_constants(proto)  # see lowbit.export.fold
        fold_pads_into_convs(proto)  # see lowbit.export.pads
        exclude_overhang_from_average_pools(proto)  # the same there
        packed = rewrite_int4_weights(proto, model, int4_storage)
        onnx.checker.check_model(proto)
        step = "writing the side files"
        sidecars = {params_path: quant_params_json(model, float_layers, path.name,
                                                   opset).encode(),
                    weights_path: packed_weights_bytes(model)}
        for side, data in sidecars.items():
            files.write_bytes(side, data)
        stamp_file_set(proto, {p.name: sha256_bytes(d) for p, d in sidecars.items()})
        onnx.save(proto, str(tmp))
        step = "ONNX Runtime verification"
        parity = verify(model, tmp, [example_inputs, *[tuple(b) for b in verify_inputs or ()]],
                        threads=threads)
        if parity.weights_differing:
            raise RuntimeError("the ONNX file's weight codes differ from the deploy model's: "
                               + ", ".join(parity.weights_differing))
        step = "committing the files"
        files.commit()
    except Exception as err:
        wrapped = export_step_error(step, err)
        if wrapped is err:
            raise
        raise wrapped from err
    finally:
        restore_training_flags(flags)
        files.close()

    deploy = check_deploy_graph(model, path, float_layers)  # what ORT runs; warns if float
    report = ExportReport.build(model, path, params_path, weights_path, opset, parity,
                                float_layers, f"{storage} ({storage_reason})", packed,
                                f"{int4_storage} ({int4_reason})", deploy, exporter=used,
                                folded=folded)
    # Fused integer kernels round a few codes one step away; more than that means the runtime
    # computes something else (e.g. u8s8 saturation on CPUs without VNNI, or int8 activations
    # in the MatMulNBits ORT fuses int4 DequantizeLinear → MatMul into).
    if parity.codes_max_diff > 2 or (parity.output_max_lsb or 0) > 4:
        hint = _disagreement_hint(parity, storage, bool(packed) and int4_storage == "dequantize")
        warnings.warn(f"ONNX Runtime disagrees with the torch deploy model: codes differ by up "
                      f"to {parity.codes_max_diff}, outputs by {parity.output_max_lsb:.1f} LSB; "
                      f"{hint}", stacklevel=2)
    return report


def _disagreement_hint(parity: Any, storage: str, int4_dequantize: bool) -> str:
    """The likeliest cause of a disagreement, from where it starts and what was stored."""
    local, overall = parity.local_identical, parity.codes_identical
    if (local is not None and overall is not None and local >= LOCAL_AGREEMENT
            and parity.local_max_diff <= 1):
        differing = round((1 - local) * parity.local_total)
        return (f"fed ONNX Runtime's own input codes, every layer agrees ({differing} of "
                f"{parity.local_total} codes differ, none by more than one step), so its "
                f"kernels compute what the model does; the {100 * (1 - overall):.2f}% that "
                "differ end to end are float rounding ties carried on layer to layer "
                "(expected in deep models): compare the two runtimes' accuracy rather than "
                "their codes")
    if int4_dequantize:
        return ("ONNX Runtime runs int4 weights stored as DequantizeLinear with int8 "
                "activations unless session.qdq_matmulnbits_accuracy_level is 0; try "
                "int4_format='matmulnbits'")
    if storage == "int8" and not cpu_has_vnni():
        return "int8 weights on an x86 CPU without VNNI saturate: try weight_dtype='uint8'"
    if parity.local_worst:
        name, share = parity.local_worst[0]
        return (f"even fed ONNX Runtime's own input codes, {name} differs in "
                f"{100 * share:.2f}% of its codes: its kernel computes something else")
    return "see the codes differing most in the report"


def strip_metadata(proto: Any) -> Any:
    """Drop the exporter's debug metadata: per-node stack traces and source names, and the
    graph's ``pkg.torch.export.*`` entries (the ExportedProgram's signature, one line per
    parameter and buffer: every quantizer's scale and zero point). On small models it is most
    of the file; RegNet's w8a8 file was 1.33x its FP32 file from this alone."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    del proto.graph.metadata_props[:]
    return proto


def _torch_export(model: nn.Module, inputs: tuple[Any, ...], out: Path, opset: int,
                  dynamic_shapes: Any, input_names: Any, output_names: Any,
                  exporter: Exporter) -> str:
    """Run the chosen torch exporter; the name of the one that wrote ``out`` (with the dynamo
    failure it stepped in for, when ``"auto"`` fell back), warning on a fallback."""
    used, fallback = run_exporter(model, inputs, out, exporter=exporter, opset=opset,
                                  dynamic_shapes=dynamic_shapes, input_names=input_names,
                                  output_names=output_names)
    if fallback is None:
        return used
    warnings.warn(f"{fallback.describe()}; exported with the TorchScript exporter instead "
                  "(exporter='auto')", stacklevel=3)
    return f"{used} (dynamo failed: {fallback.describe().split(' failed', 1)[1].lstrip()})"
