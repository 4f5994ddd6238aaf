"""What an export produced: files and sizes, ONNX Runtime parity, what stayed float."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.deploy import BinarizeDequantize, DynamicLinear, IntBias, IntWeight, QuantizeDequantize
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
    exporter: str = "dynamo"  # the torch exporter that wrote the file (and why, after a fallback)

    @property
    def size_ratio(self) -> float:
        return self.onnx_bytes / self.float_bytes if self.float_bytes else 1.0

    @classmethod
    def build(cls, model: nn.Module, path: Path, params: Path, weights: Path, opset: int,
              parity: Parity, float_layers: dict[str, str], weight_storage: str,
              int4_weights: list[str] | None = None, int4_storage: str = "",
              exporter: str = "dynamo") -> ExportReport:
        import onnx

        size = written_bytes(path)
        proto = onnx.load(str(path))
        float_size = size + float32_delta(proto, model)
        return cls(path, params, weights, opset, size, float_size, parity,
                   dict(float_layers), weight_storage, sorted(int4_weights or ()), int4_storage,
                   exporter)

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
        if p.unmatched:
            lines.append(f"               not compared: {', '.join(p.unmatched)}")
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
    quantizers had no scale/zero-point initializers. Nodes are left as they are."""
    import onnx

    drop: set[str] = set()
    floats: list[tuple[str, str, list[int]]] = []  # (codes initializer, float name, shape)
    for name, m in model.named_modules():
        if isinstance(m, (IntWeight, IntBias)):
            drop |= {f"{name}.codes", f"{name}.scale", f"{name}.zero_point"}
            floats.append((f"{name}.codes", name, list(m.codes.shape)))
        elif isinstance(m, DynamicLinear):
            drop |= {f"{name}.weight_t", f"{name}.weight_scale", f"{name}.weight_zero_point"}
            floats.append((f"{name}.weight_t", f"{name}.weight", list(m.weight_t.shape)))
        elif isinstance(m, (QuantizeDequantize, BinarizeDequantize)):
            drop |= {f"{name}.scale", f"{name}.zero_point"}
    present = {i.name for i in proto.graph.initializer}
    delta = -sum(_field(i.ByteSize()) for i in proto.graph.initializer if i.name in drop)
    for codes, name, shape in floats:
        if codes not in present:
            continue  # not in the file: no float copy either
        count = 1
        for d in shape:
            count *= d
        tensor = onnx.TensorProto(name=name, dims=shape, data_type=onnx.TensorProto.FLOAT)
        delta += _field(tensor.ByteSize() + _field(4 * count))  # + raw_data (field 9)
    graph = proto.graph.ByteSize()
    return _field(graph + delta) - _field(graph)  # the graph field's length prefix too
