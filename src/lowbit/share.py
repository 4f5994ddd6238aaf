"""One quantizer per tensor: consumers of the same tensor share their input quantizer, and
read a tensor that leaves a layer's output quantizer as it is.

When one tensor feeds two quantized layers (a ReLU output feeding a conv and a residual add;
the hidden state read by q, k and v; a tensor and the max pool or nearest upsampling of it),
each layer would otherwise quantize it with its own scale, the export would hold two different
QuantizeLinear nodes on that tensor, and ONNX Runtime could not fuse the producer into an
integer kernel. Who reads what comes from the float model's traced dataflow (``lowbit.trace``;
module names survive the swap, and functional sites are named as the modules ``quantize``
inserts for them); consumers whose input specs describe a different grid keep their own
quantizer. A tensor a layer's output quantizer already put on a grid (a sigmoid gate, a conv
whose output also feeds a float op) is not quantized again by a reader whose input spec
describes the same kind of grid: the second quantizer would only requantize it onto a slightly
different scale, and ONNX Runtime would see ``Q → DQ → Q → DQ`` there. Without a graph, every
consumer keeps its own.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lowbit.nn import QuantActivation, QuantLayer, keeps_grid
from lowbit.quantizers import Quantizer
from lowbit.trace import ModelGraph


def _grid_key(q: Quantizer) -> tuple[object, ...]:
    s = q.spec
    return (s.method, s.bits, q.grid.signed, q.grid.narrow, s.symmetric, s.granularity, q.axis,
            s.dynamic)


def _readers(graph: ModelGraph, value: int,
             modules: dict[str, nn.Module]) -> Iterator[tuple[str, QuantLayer, int]]:
    """``(name, quant layer, input position)`` for every Quant layer reading ``value``, looking
    through ``nn.Identity`` (what BN folding and identity shortcuts leave)."""
    for node, pos in graph.consumers(value):
        module = modules.get(node.name)
        if isinstance(module, nn.Identity):
            for out in node.outputs:
                yield from _readers(graph, out, modules)
        elif isinstance(module, QuantLayer):
            yield node.name, module, pos
            if _keeps_grid(module):  # its readers see values already on its input's grid
                for out in node.outputs:
                    yield from _readers(graph, out, modules)


def _keeps_grid(module: QuantLayer) -> bool:
    """A quantized max pool or nearest upsampling with no output quantizer: it only picks among
    values on its input quantizer's grid, so its readers share that quantizer (and ONNX Runtime
    runs it on uint8)."""
    return (isinstance(module, QuantActivation) and keeps_grid(module.module)
            and module.output_quant is None)


def share_input_quantizers(model: nn.Module, graph: ModelGraph | None) -> list[tuple[str, ...]]:
    """Make consumers of one tensor share an input quantizer; returns the shared groups.

    ``graph`` is the dataflow of the float model ``model`` was quantized from."""
    if graph is None:
        return []
    modules = dict(model.named_modules())
    groups: list[tuple[str, ...]] = []
    values = list(graph.graph_inputs) + [v for node in graph.nodes for v in node.outputs
                                         if not isinstance(modules.get(node.name), nn.Identity)]
    for value in values:
        by_grid: dict[tuple[object, ...], list[tuple[str, QuantLayer, str]]] = {}
        for name, layer, pos in _readers(graph, value, modules):
            slots = layer.input_slots()  # tensor argument i → attribute
            if pos >= len(slots):
                continue
            slot = slots[pos]
            quantizer = getattr(layer, slot, None)
            if quantizer is not None:
                by_grid.setdefault(_grid_key(quantizer), []).append((name, layer, slot))
        for members in by_grid.values():
            if len(members) < 2:
                continue
            first = getattr(members[0][1], members[0][2])
            for _, layer, slot in members[1:]:
                setattr(layer, slot, first)
            groups.append(tuple(f"{name}.{slot}" for name, _, slot in members))
    return groups


def reuse_output_quantizers(model: nn.Module, graph: ModelGraph | None) -> list[str]:
    """Drop the input quantizers (``"layer.slot"``, returned) of readers of a tensor that a
    layer's output quantizer already quantizes on a grid of the same kind: they read it as it
    is. ``graph`` is the dataflow of the float model ``model`` was quantized from."""
    if graph is None:
        return []
    modules = dict(model.named_modules())
    dropped: list[str] = []
    for node in graph.nodes:
        layer = modules.get(node.name)
        if (not isinstance(layer, QuantLayer) or not layer.quantizes_output
                or layer.output_quant is None):
            continue
        grid = _grid_key(layer.output_quant)
        for value in node.outputs:
            for name, reader, pos in _readers(graph, value, modules):
                slots = reader.input_slots()
                quantizer = getattr(reader, slots[pos], None) if pos < len(slots) else None
                if quantizer is not None and _grid_key(quantizer) == grid:
                    setattr(reader, slots[pos], None)
                    dropped.append(f"{name}.{slots[pos]}")
    return dropped
