"""What an export produced: files and sizes, ONNX Runtime parity, the kernels ONNX Runtime
runs (``deploy``), what stayed float."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.deploy import IntWeight
from lowbit.export.deploy import DeployGraph
from lowbit.export.verify import Parity


@dataclass
class ExportReport:
    onnx_path: Path
    params_path: Path
    weights_path: Path
    opset: int
    onnx_bytes: int
    float_bytes: int  # the same graph with float32 weights (estimated from the codes' count)
    parity: Parity
    float_layers: dict[str, str] = field(default_factory=dict)
    weight_storage: str = "int8"
    int4_weights: list[str] = field(default_factory=list)  # weights stored two codes a byte
    int4_storage: str = ""
    deploy: DeployGraph | None = None  # what ORT runs after its graph optimizations

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
              deploy: DeployGraph | None = None) -> ExportReport:
        size = path.stat().st_size
        int4 = set(int4_weights or ())
        # Bytes a float32 copy adds over the stored codes: 3 per int8 code, 3.5 per int4 code.
        extra = 0.0
        for name, m in model.named_modules():
            if isinstance(m, IntWeight):
                extra += m.codes.numel() * (3.5 if name in int4 else 3)
        extra += sum(3 * b.numel() for n, b in model.named_buffers() if n.endswith("weight_t"))
        return cls(path, params, weights, opset, size, size + int(extra), parity,
                   dict(float_layers), weight_storage, sorted(int4), int4_storage, deploy)

    def __str__(self) -> str:
        p = self.parity
        codes = ("n/a (no quantized activations)" if p.codes_identical is None else
                 f"{100 * p.codes_identical:.3f}% identical ({p.codes_total} codes, "
                 f"{p.tensors_compared} tensors, max diff {p.codes_max_diff})")
        weights = ("identical to the deploy model's" if not p.weights_differing else
                   "differ from the deploy model's: " + ", ".join(p.weights_differing))
        lines = [
            f"ONNX file      {self.onnx_path}  (opset {self.opset})",
            f"size           {self.onnx_bytes / 1024:.1f} KiB vs ~{self.float_bytes / 1024:.1f} "
            f"KiB float32 ({self.size_ratio:.2f}x)",
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
