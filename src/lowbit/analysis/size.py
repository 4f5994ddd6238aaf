"""How many bytes a model's weights take once quantized as its config says: the size cap of
``autoquant(max_size=...)``.

The estimate counts what the ONNX file stores for each parameter (each tensor once, shared
weights included): a quantized weight's codes at the width the exporter writes them, plus one
float32 scale and one zero point per scale; every other parameter (biases, norms, layers left
float) as float32. Codes take half a byte where the export packs them two a byte — 4-bit
per-group Linear weights (``MatMulNBits`` / INT4 ``DequantizeLinear``) and 4-bit embedding
rows (``DeployEmbedding``) — and one byte otherwise (other 4-bit and 2-bit weights are stored
as int8 codes). Worked example, a 1536x384 Linear at uint4 in groups of 128: 589,824 codes
x 0.5 B + 4,608 scales x (4 + 1) B + 1,536 float32 bias values x 4 B = 324,096 B, against
2,365,440 B in float32 (0.137x). Graph structure (nodes, names, shapes) is not counted, and
weights the export drops (a layer the exported output does not read) are: on MiniLM
(``w4-g128-mixed``) the estimate was 16.75 MB for a 16.67 MB file.
"""

from __future__ import annotations

from torch import nn

from lowbit.config import QuantSpec

SCALE_BYTES = 4  # float32 scales
ZERO_POINT_BYTES = 1  # int8 / uint8 zero points (packed uint4 ones are counted as a byte)
FLOAT_BYTES = 4


def packed(layer_type: str, spec: QuantSpec) -> bool:
    """Whether the export stores this weight's codes two a byte."""
    if spec.bits != 4:
        return False
    return layer_type == "Embedding" or (layer_type == "Linear"
                                         and spec.granularity == "per_group")


def weight_bytes(layer_type: str, shape: tuple[int, ...], spec: QuantSpec | None) -> float:
    """Bytes of one weight of ``shape`` (output channels / rows first) stored as ``spec``
    quantizes it (``None``: float32)."""
    numel = 1
    for d in shape:
        numel *= d
    if spec is None:
        return float(numel * FLOAT_BYTES)
    if spec.granularity == "per_tensor":
        scales = 1
    elif spec.granularity == "per_channel":
        scales = shape[spec.axis or 0]
    else:
        assert spec.group_size is not None  # validated by QuantSpec
        scales = -(-numel // spec.group_size)
    code = 0.5 if packed(layer_type, spec) else 1.0
    return numel * code + scales * (SCALE_BYTES + ZERO_POINT_BYTES)


def float_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in float32 (each tensor once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values()) * FLOAT_BYTES


def quantized_bytes(qm: nn.Module) -> float:
    """Estimated bytes of a quantized model's weights as exported: each quant layer's weight
    at its spec, every other parameter (each tensor once) in float32."""
    from lowbit.nn import QuantLayer

    counted: dict[int, float] = {id(p): float(p.numel() * FLOAT_BYTES)
                                 for p in qm.parameters()}
    codes = 0.0
    for m in qm.modules():
        quantizer = getattr(m, "weight_quant", None)
        weight = getattr(m, "weight", None)
        if not isinstance(m, QuantLayer) or quantizer is None or weight is None:
            continue
        counted[id(weight)] = 0.0  # stored as codes, by each layer that reads it
        codes += weight_bytes(layer_type(m), tuple(weight.shape), quantizer.spec)
    return sum(counted.values()) + codes


def layer_type(module: nn.Module) -> str:
    """The layer type a quant wrapper stands for (``"Linear"``, ``"Embedding"``...)."""
    float_type = getattr(module, "float_type", None)
    return float_type.__name__ if float_type is not None else type(module).__name__
