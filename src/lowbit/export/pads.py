"""Zero padding in the exported graph: fold a ``Pad`` before a quantized convolution into the
convolution, and keep average pools from counting what lies past their input
(``exclude_overhang_from_average_pools``, at the end).

Hugging Face's MobileNet and EfficientNet convs pad "same" as TensorFlow does, with ``F.pad`` (or
``nn.ZeroPad2d``) before an unpadded conv. In the file that is ``Pad → QuantizeLinear →
DequantizeLinear → Conv``: the tensor ONNX Runtime would quantize at the producer's output
(``QLinearConv`` / ``QLinearAdd``) is separated from the quantizer by a float ``Pad``, so the
producer runs in float and every conv pays a float pad, a quantize and a dequantize. ORT's own
quantizer never sees that pattern, because the float exporter's optimizer already moved the
pad into the conv's ``pads``.

Quantizing commutes with zero padding (zero maps to the zero point, which dequantizes to zero
exactly), so ``Conv(DQ(Q(Pad(x))))`` equals ``Conv[pads + p](DQ(Q(x)))`` bit for bit: the
rewrite changes no code and no output, only which kernels ONNX Runtime can fuse.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fold_pads_into_convs(proto: Any) -> list[str]:
    """Rewrite every ``Pad(zeros) → QuantizeLinear → DequantizeLinear → Conv`` chain in place
    (each link read by the next alone; constant pads on the spatial axes only); returns the
    names of the convs that took over a pad."""
    graph = proto.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    constants = _constants(graph)

    def only_reader(tensor: str, op_types: frozenset[str]) -> Any | None:
        users = readers.get(tensor, [])
        if len(users) != 1 or tensor in outputs or users[0].op_type not in op_types:
            return None
        return users[0]

    folded, dropped = [], []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        quant = only_reader(pad.output[0], frozenset({"QuantizeLinear"}))
        dequant = quant and only_reader(quant.output[0], frozenset({"DequantizeLinear"}))
        conv = dequant and only_reader(dequant.output[0], frozenset({"Conv"}))
        if quant is None or dequant is None or conv is None or conv.input[0] != dequant.output[0]:
            continue
        spatial = _spatial_pads(pad, constants)
        if spatial is None or _attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        rank = len(spatial) // 2
        old = list(_attribute(conv, "pads", [0] * (2 * rank)))
        if len(old) != 2 * rank:
            continue
        _set_ints(conv, "pads", [a + b for a, b in zip(old, spatial)])
        quant.input[0] = pad.input[0]
        dropped.append(pad)
        folded.append(conv.name or conv.output[0])
    for pad in dropped:
        graph.node.remove(pad)
    return folded


def _constants(graph: Any) -> dict[str, np.ndarray]:
    """The values of initializers, ``Constant`` nodes and ``Cast``s of them, by tensor name."""
    from onnx import helper, numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                values[node.output[0]] = np.asarray(helper.get_attribute_value(attr))
        elif node.op_type == "Cast" and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]  # only compared with zero
    return values


def _spatial_pads(pad: Any, constants: dict[str, np.ndarray]) -> list[int] | None:
    """The pad's ``[begin..., end...]`` over the spatial axes (2 and up) when it is a constant,
    non-negative zero pad that leaves batch and channels alone; else None."""
    if _attribute(pad, "mode", b"constant") not in (b"constant", "constant"):
        return None
    inputs = list(pad.input) + [""] * (4 - len(pad.input))
    pads_name, value_name, axes_name = inputs[1], inputs[2], inputs[3]
    if pads_name not in constants or (value_name and value_name not in constants):
        return None
    if value_name and np.any(constants[value_name] != 0):
        return None
    pads = [int(p) for p in np.asarray(constants[pads_name]).ravel()]
    n = len(pads) // 2
    if axes_name:
        if axes_name not in constants:
            return None
        axes = [int(a) for a in np.asarray(constants[axes_name]).ravel()]
        if any(a < 0 for a in axes):  # the rank is not known here: leave it
            return None
        rank = max(axes) + 1
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            full[a], full[rank + a] = pads[i], pads[n + i]
        pads, n = full, rank
    if n < 3 or any(p < 0 for p in pads) or any(pads[i] or pads[n + i] for i in (0, 1)):
        return None
    return pads[2:n] + pads[n + 2:]


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_ints(node: Any, name: str, values: list[int]) -> None:
    from onnx import helper

    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, values))


def exclude_overhang_from_average_pools(proto: Any) -> list[str]:
    """Write ``count_include_pad=0`` on every ``AveragePool`` without padding (returns their
    names).

    torch exports ``nn.AvgPool2d``'s default ``count_include_pad=True``. With zero pads the
    setting only decides whether a window that ``ceil_mode`` lets run past the input counts
    the overhang in its divisor: torch and ONNX Runtime's float kernel do not, so 0 is the
    same function. ONNX Runtime's ``QLinearAveragePool`` (what it fuses a quantized pool into)
    does count it with 1: Hugging Face EfficientNet's pooler, ``AvgPool2d(2560,
    ceil_mode=True)`` on a 7x7 map, divided by 2560² and output the zero point everywhere.
    """
    changed = []
    for node in proto.graph.node:
        if node.op_type != "AveragePool":
            continue
        attrs = {a.name: a for a in node.attribute}
        pads = list(attrs["pads"].ints) if "pads" in attrs else []
        auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        include = attrs["count_include_pad"].i if "count_include_pad" in attrs else 0
        if include and not any(pads) and auto_pad in ("NOTSET", "VALID"):
            attrs["count_include_pad"].i = 0
            changed.append(node.name)
    return changed
