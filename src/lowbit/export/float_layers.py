"""The float layers of an export: what the deploy model and the ONNX file really hold in float.

A plan lists the layers it meant to keep float; this lists what *is* float — any module of the
deploy tree (other than lowbit's deploy modules) owning a weight of 2+ dims, deploy layers whose
weight was not quantized, and float Conv/MatMul/Gemm nodes of the exported graph whose weight is
a float initializer — with the plan's reason where the name matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from lowbit.deploy import DeployBinary, DeployCat, DeployEmbedding, DeployLayer, DynamicLinear
from lowbit.export.ort_graph import FLOAT_COMPUTE, LAYOUT, OnnxGraph


def module_float_layers(model: nn.Module, reasons: Mapping[str, str] | None = None
                        ) -> dict[str, str]:
    """Layers that hold a float weight in the deploy model: any module other than lowbit's
    deploy modules owning a weight parameter of 2+ dims (Conv*, ConvTranspose*, Linear,
    transformers' Conv1D, RNNs, custom layers), and deploy layers whose weight was not
    quantized. ``reasons`` (the plan's) name why; a name of the plan that is still a float
    module of the tree (an unfolded BatchNorm) is kept with its reason."""
    reasons = dict(reasons or {})
    prefix = _name_prefix(model)
    planned = {prefix + n: why for n, why in reasons.items()}
    out: dict[str, str] = {}
    lowbit_types = (DeployLayer, DynamicLinear, DeployBinary, DeployCat, DeployEmbedding)
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, lowbit_types):
            inside.append(name)
            if isinstance(m, DeployLayer) and m.weight is None:
                out[name] = planned.get(name, "its weight is not quantized (only activations)")
            continue
        own = [p for n, p in m.named_parameters(recurse=False) if "weight" in n and p.dim() >= 2]
        if own:
            out[name or "<model>"] = planned.get(
                name, f"{type(m).__name__} holds a float weight (no rule quantized it)")
        elif name in planned and name:
            out[name] = planned[name]
    return out


def _name_prefix(model: nn.Module) -> str:
    """``"m."`` when the deploy model is wrapped (``LastHidden(dm)``): module paths are then
    the plan's names behind a prefix."""
    for path, m in model.named_modules():
        name = getattr(m, "layer_name", None)
        if isinstance(name, str) and name and path.endswith(name):
            return path[: len(path) - len(name)]
    return ""


def graph_float_layers(graph: OnnxGraph, model: nn.Module | None = None) -> dict[str, str]:
    """Float Conv/MatMul/Gemm/RNN nodes of the exported graph whose weight is a float
    initializer (not behind DequantizeLinear), named after the initializer's module path, or
    found by value in ``model`` where the exporter renamed it (a transposed copy)."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type not in FLOAT_COMPUTE or len(node.input) < 2:
            continue
        src_name = node.input[1]
        while src_name not in graph.inits:
            src = graph.producer.get(src_name)
            if src is None or src.op_type not in LAYOUT or not src.input:
                break
            src_name = src.input[0]
        if src_name not in graph.inits:
            continue
        name = _owner(graph, node, src_name, model)
        out.setdefault(name, f"float {node.op_type} in the exported graph (weight "
                             f"{src_name!r} is a float initializer)")
    return out


def _owner(graph: OnnxGraph, node: Any, weight: str, model: nn.Module | None) -> str:
    if "." in weight:
        return weight.rsplit(".", 1)[0]
    for name in node.input[2:]:  # the bias, where it kept its name
        if "." in name and name in graph.inits:
            return name.rsplit(".", 1)[0]
    for user in graph.consumers.get(node.output[0], []):  # MatMul → Add(bias)
        for name in user.input:
            if user.op_type == "Add" and "." in name and name in graph.inits:
                return name.rsplit(".", 1)[0]
    array = graph.array(weight)
    if model is not None and array is not None:
        for path, m in model.named_modules():
            w = m._parameters.get("weight")
            if w is None or w.dim() != array.ndim:
                continue
            value = w.detach().cpu().numpy()
            if any(v.shape == array.shape and np.array_equal(v, array) for v in (value, value.T)):
                return path
    return f"{node.op_type} {node.name!r}"
