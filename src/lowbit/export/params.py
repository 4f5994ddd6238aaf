"""Side files of an export: ``<name>.quant_params.json`` and ``<name>.weights.safetensors``.

``quant_params.json`` lists, per layer, the bits, signedness, granularity, axis, scales and
zero points of its weight, inputs and output — what a runtime or a vendor converter needs.
The safetensors file holds the weight codes packed to their bit width (1/2/4-bit codes several
to a byte, stored as ``(code - qmin) / step``: step 2 for the odd grids of binary, DoReFa and
SLB weights), with each tensor's shape, bits, qmin and step in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lowbit.deploy import (
    BinarizeDequantize,
    DeployActivation,
    DeployBinary,
    DeployCat,
    DeployLayer,
    DynamicLinear,
    IntWeight,
    QuantizeDequantize,
)
from lowbit.numerics import pack_bits, unpack_bits
from lowbit.quantizers import QParams

PARAMS_FORMAT = "lowbit.quant_params"


def deploy_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (DeployLayer, DynamicLinear, DeployBinary, DeployCat, DeployActivation)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def layer_qparams(module: nn.Module) -> dict[str, QParams]:
    """``{"weight"|"input"|"other"|"output": QParams}`` of one deploy layer (a concatenation's
    third and later inputs: ``"input_2"``...)."""
    out: dict[str, QParams] = {}
    if isinstance(module, DynamicLinear):
        out["weight"] = module.weight_qparams()
    elif isinstance(getattr(module, "weight", None), IntWeight):
        out["weight"] = cast(IntWeight, module.weight).qparams()
    qdqs = {key: getattr(module, f"{key}_qdq", None) for key in ("input", "other", "output")}
    if isinstance(module, DeployCat):
        qdqs.update({cat_input_key(i): qdq for i, qdq in enumerate(module.input_qdqs)})
    for key, qdq in qdqs.items():
        if isinstance(qdq, (QuantizeDequantize, BinarizeDequantize)):
            out[key] = qdq.qparams()
    return out


def cat_input_key(i: int) -> str:
    """The quant-params key of a concatenation's ``i``-th input (as its quantizer's slot)."""
    return ("input", "other")[i] if i < 2 else f"input_{i}"


def quant_params(model: nn.Module, float_layers: dict[str, str], onnx_name: str,
                 opset: int) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for name, module in deploy_layers(model):
        entry: dict[str, Any] = {"type": getattr(module, "layer_type", type(module).__name__)}
        for key, qp in layer_qparams(module).items():
            entry[key] = qp.to_dict()
        if isinstance(module, DynamicLinear):
            entry["input"] = {"dynamic": True, "bits": 8, "signed": False,
                              "granularity": "per_tensor"}
        layers[name] = entry
    return {"format": PARAMS_FORMAT, "version": 1, "onnx": onnx_name, "opset": opset,
            "layers": layers, "float_layers": dict(float_layers)}


def quant_params_json(*args: Any) -> str:
    return json.dumps(quant_params(*args), indent=1) + "\n"


def packed_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata for the safetensors file of packed weight codes."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"format": "lowbit.packed_weights", "version": "1"}
    for name, module in deploy_layers(model):
        qp = layer_qparams(module).get("weight")
        if qp is None:
            continue
        # A weight entry means an IntWeight (layer_qparams) unless the layer is a DynamicLinear.
        codes = (module.weight_t.t() if isinstance(module, DynamicLinear)
                 else cast(IntWeight, module.weight).codes)
        bits = qp.grid.bits
        pack_width = next(w for w in (1, 2, 4, 8) if w >= bits)
        # Odd grids (binary, DoReFa, SLB) step by 2: (code - qmin) / 2 fits in `bits`.
        unsigned = torch.div(codes.to(torch.int64) - qp.grid.qmin, qp.grid.step,
                             rounding_mode="floor")
        tensors[f"{name}.weight"] = pack_bits(unsigned, pack_width)
        tensors[f"{name}.weight_scale"] = qp.scale.float().contiguous()
        tensors[f"{name}.weight_zero_point"] = qp.zero_point.to(torch.int32).contiguous()
        meta[f"{name}.weight"] = json.dumps({"bits": bits, "pack_bits": pack_width,
                                             "qmin": qp.grid.qmin, "step": qp.grid.step,
                                             "shape": list(codes.shape),
                                             "axis": qp.axis, "group_size": qp.group_size})
    return tensors, meta


def unpack_weight(tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  key: str) -> torch.Tensor:
    """Integer codes of ``key`` (e.g. ``"fc.weight"``) from a packed weights file."""
    info = json.loads(meta[key])
    numel = 1
    for d in info["shape"]:
        numel *= d
    codes = unpack_bits(tensors[key], info["pack_bits"], numel) * info.get("step", 1) + info["qmin"]
    return codes.reshape(info["shape"])


def packed_weights_bytes(model: nn.Module) -> bytes:
    """The safetensors file of packed weight codes, as bytes."""
    from safetensors.torch import save

    tensors, meta = packed_weights(model)
    return save(tensors, metadata=meta)


def save_packed_weights(model: nn.Module, path: Path) -> None:
    """Write the packed weights file alone, atomically (an export writes it in its file set)."""
    from lowbit.io import atomic_write_bytes

    atomic_write_bytes(path, packed_weights_bytes(model))
