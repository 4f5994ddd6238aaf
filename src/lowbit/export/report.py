"""What an export produced: files and sizes, ONNX Runtime parity, the kernels ONNX Runtime
runs (``deploy``), what stayed float."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.deploy import (
    BinarizeDequantize,
    DynamicLinear,
    IntBias,
    IntWeight,
    PackedIntWeight,
    QuantizeDequantize,
)
from lowbit.export.deploy import DeployGraph
from lowbit.export.verify import Parity


@dataclass
class ExportReport:
    onnx_path: Path
    params_path: Path
    weights_path: Path
    opset: int
    onnx_bytes: int  # bytes written: the .onnx file plus any external data files
    float_bytes: int  # exact serialized size of the same graph with float32 weights
    parity: Parity
    float_layers: dict[str, str] = field(default_factory=dict)
    weight_storage: str = "int8"
    int4_weights: list[str] = field(default_factory=list)  # weights stored two codes a byte
    int4_storage: str = ""
    deploy: DeployGraph | None = None  # what ORT runs after its graph optimizations
    exporter: str = "dynamo"  # the torch exporter that wrote the file (and why, after a fallback)
    # Quantizers applied to a constant whose subgraph was evaluated at export (export.fold).
    folded: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The float layers are what the module tree and the graph hold (with the plan's
        # reasons), not the plan's intention, whenever the deploy graph was read.
        if self.deploy is not None:
            self.float_layers = dict(self.deploy.float_layers)

    @property
    def size_ratio(self) -> float:
        return self.onnx_bytes / self.float_bytes if self.float_bytes else 1.0

    @classmethod
    def build(cls, model: nn.Module, path: Path, params: Path, weights: Path, opset: int,
              parity: Parity, float_layers: dict[str, str], weight_storage: str,
              int4_weights: list[str] | None = None, int4_storage: str = "",
              deploy: DeployGraph | None = None, exporter: str = "dynamo",
              folded: list[str] | None = None) -> ExportReport:
        import onnx

        size = written_bytes(path)
        proto = onnx.load(str(path))
        float_size = size + float32_delta(proto, model)
        return cls(path, params, weights, opset, size, float_size, parity,
                   dict(float_layers), weight_storage, sorted(int4_weights or ()), int4_storage,
                   deploy, exporter, list(folded or ()))

    def __str__(self) -> str:
        p = self.parity
        codes = ("n/a (no quantized activations)" if p.codes_identical is None else
                 f"{100 * p.codes_identical:.3f}% identical ({p.codes_total} codes, "
                 f"{p.tensors_compared} tensors, max diff {p.codes_max_diff})")
        weights = ("identical to the deploy model's" if not p.weights_differing else
                   "differ from the deploy model's: " + ", ".join(p.weights_differing))
        lines = [
            f"ONNX file      {self.onnx_path}  (opset {self.opset})",
            f"exporter       {self.exporter}",
            f"size           {self.onnx_bytes / 1024:.1f} KiB written vs {self.float_bytes / 1024:.1f}"
            f" KiB for this graph with float32 weights ({self.size_ratio:.2f}x)",
            f"8-bit weights  {self.weight_storage}",
            *([f"4-bit weights  {self.int4_storage}, {len(self.int4_weights)} packed"]
              if self.int4_weights else []),
            f"weight codes   {p.weights_compared} tensors read back from the file: {weights}",
            f"quant params   {self.params_path}",
            f"packed weights {self.weights_path}",
            f"ORT parity     codes {codes}",
            f"               output max |diff| {p.output_max_abs:.3g} = "
            f"{(p.output_max_lsb or 0):.2f} LSB ({p.lsb_unit})",
        ]
        if p.worst_layers:
            worst = ", ".join(f"{n} {100 * s:.2f}%" for n, s in p.worst_layers)
            lines.append(f"               codes differing most: {worst}")
        if p.local_identical is not None:
            lines.append(f"               each layer fed ORT's own input codes: "
                         f"{100 * p.local_identical:.4f}% identical ({p.local_total} codes)")
            if p.local_worst:
                worst = ", ".join(f"{n} {100 * s:.3f}%" for n, s in p.local_worst)
                lines.append(f"               there differing most: {worst}")
        if p.unmatched:
            lines.append(f"               not compared: {', '.join(p.unmatched)}")
        if self.folded:
            lines.append(f"folded         {len(self.folded)} quantizer(s) on constants, computed "
                         "once at export: " + ", ".join(self.folded))
        if self.deploy is not None:
            first, *rest = self.deploy.lines()
            lines.append(f"deploy graph   {first}")
            lines.extend(f"               {line}" for line in rest)
        if self.float_layers:
            lines.append("float layers   " + "; ".join(f"{n}: {why}" for n, why in
                                                        self.float_layers.items()))
        else:
            lines.append("float layers   none")
        return "\n".join(lines)


def written_bytes(path: Path) -> int:
    """Bytes of an ONNX file plus the external data files its initializers point to."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    extra = set()
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}.get("location")
            if where:
                extra.add(path.parent / where)
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


def _field(length: int) -> int:
    """Serialized bytes of a length-delimited protobuf field (1-byte tag) of ``length``."""
    varint, rest = 1, length
    while rest >= 128:
        rest >>= 7
        varint += 1
    return 1 + varint + length


def float32_delta(proto: Any, model: nn.Module) -> int:
    """How many bytes ``proto`` would grow (exactly, as serialized) if every weight were one
    float32 initializer instead of integer codes + scale + zero point, and activation
    quantizers had no scale/zero-point initializers. Nodes are left as they are.

    Initializers are found by the buffer's name, or where the exporter renamed a constant
    (the dynamo exporter folds an embedding table's codes into ``val_*``) by dtype, shape and
    bytes."""
    from onnx import numpy_helper

    inits = list(proto.graph.initializer)
    by_name = {i.name: i for i in inits}
    by_shape: dict[tuple[Any, ...], list[Any]] = {}
    for i in inits:
        by_shape.setdefault((i.data_type, tuple(i.dims)), []).append(i)

    def find(name: str, tensor: Any) -> Any:
        if name in by_name:
            return by_name[name]
        array = tensor.detach().cpu().numpy()
        for i in by_shape.get((_onnx_dtype(array.dtype), tuple(array.shape)), ()):
            if numpy_helper.to_array(i).tobytes() == array.tobytes():
                return i
        return None

    dropped: dict[int, Any] = {}  # id → initializer, each counted once
    floats: list[tuple[str, list[int]]] = []  # (name, shape) of the float32 weights
    for name, m in model.named_modules():
        if isinstance(m, PackedIntWeight):  # 4-bit embedding rows, two codes a byte
            parts = {"packed": m.packed, "scale": m.scale, "zero_point": m.zero_point}
        elif isinstance(m, (IntWeight, IntBias)):
            parts = {"codes": m.codes, "scale": m.scale, "zero_point": m.zero_point}
        elif isinstance(m, DynamicLinear):
            parts = {"weight_t": m.weight_t, "weight_scale": m.weight_scale,
                     "weight_zero_point": m.weight_zero_point}
        elif isinstance(m, (QuantizeDequantize, BinarizeDequantize)):
            parts = {"scale": m.scale, "zero_point": m.zero_point}
        else:
            continue
        found = {key: find(f"{name}.{key}", t) for key, t in parts.items()}
        codes_key = next(iter(parts))
        if codes_key in ("codes", "weight_t", "packed") and found[codes_key] is None:
            continue  # the weight is not in the file: no float copy of it either
        dropped.update({id(i): i for i in found.values() if i is not None})
        if codes_key in ("codes", "packed"):
            shape = m.shape if isinstance(m, PackedIntWeight) else m.codes.shape
            floats.append((name, list(shape)))  # IntWeight "x.weight" → "x.weight"
        elif codes_key == "weight_t":
            floats.append((f"{name}.weight", list(parts[codes_key].shape)))
    delta = -sum(_field(i.ByteSize()) for i in dropped.values())
    for name, shape in floats:
        count = 1
        for d in shape:
            count *= d
        tensor = onnx_float_tensor(name, shape)
        delta += _field(tensor.ByteSize() + _field(4 * count))  # + raw_data (field 9)
    graph = proto.graph.ByteSize()
    return _field(graph + delta) - _field(graph)  # the graph field's length prefix too


def onnx_float_tensor(name: str, shape: list[int]) -> Any:
    """An empty float32 ``TensorProto`` header (no data) named ``name``."""
    import onnx

    return onnx.TensorProto(name=name, dims=shape, data_type=onnx.TensorProto.FLOAT)


def _onnx_dtype(dtype: Any) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(dtype)
