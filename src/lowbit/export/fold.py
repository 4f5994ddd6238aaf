"""Fold the constant subgraphs that start at an activation quantizer applied to a constant.

Some models run a quantized layer on a buffer rather than on data: SwinV2's continuous
position bias MLP reads ``relative_coords_table`` (a constant) through ``Linear → ReLU →
Linear``. In the file that is ``QuantizeLinear(constant) → DequantizeLinear → MatMul``.
ONNX Runtime folds the ``QuantizeLinear`` into int8 codes, after which the activation looks like
a weight: its QDQ fusions skip the ``MatMul`` and its weight-only fusion turns it into
``MatMulNBits`` (8 bits, ``accuracy_level`` 4), which quantizes the float activation *again*,
to int8 per block, on every run. The table then differs from the torch deploy model's by up to
half an output LSB, and 0.9% of the next quantizer's codes by one (relative error 2e-3 in a
three-node reproduction, 7e-8 at ``ORT_ENABLE_BASIC``).

Such a subgraph depends on nothing the caller feeds, so ``fold_quantized_constants`` evaluates
it once, with every ONNX Runtime graph optimization off (plain ONNX semantics, which reproduce
the torch deploy model's codes exactly), and stores its results as initializers where it meets
the rest of the graph. Weights (``DequantizeLinear`` of integer codes, with no quantizer
upstream) are never folded: they stay integer.
"""

from __future__ import annotations

from typing import Any

# Activation quantizers: applied to a constant, they start a subgraph worth folding.
QUANTIZERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
# Folding only pays where the subgraph computes: a quantized constant that only feeds an Add
# (a position embedding) stays, since ORT fuses its DequantizeLinear into QLinearAdd.
COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger"})


def quantized_constants(proto: Any) -> tuple[dict[str, Any], list[str]]:
    """``(producers, frontier)``: the node computing each constant tensor downstream of a
    quantizer on a constant, and those tensors that a non-constant node (or the graph output)
    reads and that went through a Conv/MatMul/Gemm on the way."""
    graph = proto.graph
    const = {i.name for i in graph.initializer} | {""}
    tainted: dict[str, Any] = {}
    for node in graph.node:  # graph.node is topologically sorted
        if node.op_type == "Constant" or all(i in const for i in node.input):
            const.update(node.output)
            if node.op_type in QUANTIZERS or any(i in tainted for i in node.input):
                tainted.update((o, node) for o in node.output)
    readers = [n for n in graph.node
               if not (n.op_type == "Constant" or all(i in const for i in n.input))]
    wanted = [i for n in readers for i in n.input if i in tainted]
    wanted += [o.name for o in graph.output if o.name in tainted]
    frontier: list[str] = []
    producer = _producers(graph)
    for name in dict.fromkeys(wanted):
        if len(tainted[name].output) != 1:
            continue  # a multi-output node feeding the rest of the graph: left as it is
        upstream = _ancestors(graph, {name}, producer)
        if any(tainted[t].op_type in COMPUTE for t in upstream if t in tainted):
            frontier.append(name)
    return tainted, frontier


def fold_quantized_constants(proto: Any) -> list[str]:
    """Replace each quantized constant subgraph of ``proto`` (in place) by its values; the
    names of the quantizers folded (their scale initializers), in graph order."""
    from onnx import numpy_helper

    tainted, frontier = quantized_constants(proto)
    if not frontier:
        return []
    graph = proto.graph
    values = _evaluate(proto, frontier)
    keep = [n for n in graph.node if n.output[0] not in frontier]  # single-output producers
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in frontier)
    _keep_only(graph, {o.name for o in graph.output})
    live = {o for n in graph.node for o in n.output}
    quantizers = {n.output[0]: n for n in tainted.values() if n.op_type in QUANTIZERS}
    return [n.input[1] if n.op_type == "QuantizeLinear" else n.output[0]
            for out, n in quantizers.items() if out not in live]


def _evaluate(proto: Any, names: list[str]) -> dict[str, Any]:
    """The values of constant tensors ``names``, from ONNX Runtime with its optimizations off."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.input[:]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    _keep_only(model.graph, set(names))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {})))


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _ancestors(graph: Any, names: set[str], producer: dict[str, Any] | None = None) -> set[str]:
    """Every tensor ``names`` are computed from (and ``names``); ``producer``: the graph's
    ``_producers``, when the caller asks more than once."""
    producer = _producers(graph) if producer is None else producer
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            todo.extend(i for i in node.input if i)
    return seen


def _keep_only(graph: Any, names: set[str]) -> None:
    """Keep only the nodes and initializers that tensors ``names`` are computed from (in
    order); the rest of the graph is dead."""
    needed = _ancestors(graph, names)
    nodes = [n for n in graph.node if any(o in needed for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
