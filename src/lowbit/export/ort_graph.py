"""The graph ONNX Runtime runs for a file, and the ONNX op families lowbit reasons about.

``optimized_model`` has ORT save the graph it optimized (``ORT_ENABLE_ALL``, CPU provider);
``OnnxGraph`` indexes any graph by producer and consumers, and gives a node's *signature*: the
initializers it reads directly or through ``DequantizeLinear`` and layout ops, which is how
``lowbit.export.deploy`` finds a layer after ORT renamed and fused its nodes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# ORT kernels that compute a Conv / MatMul / Gemm on integers (or on packed low-bit weights).
INTEGER_COMPUTE = frozenset({
    "QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention",
    "DynamicQuantizeLSTM",
})
# ... and the float ones (``FusedConv``: Conv + activation/sum; ``nchwc``-domain ``Conv``).
FLOAT_COMPUTE = frozenset({
    "Conv", "ConvTranspose", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
    "Einsum", "Attention", "LSTM", "GRU", "RNN",
})
# Integer element-wise kernels a functional op (``op_add``) may run on.
INTEGER_ELEMENTWISE = frozenset({
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QLinearReduceMean",
    "QLinearWhere",
})
# Ops that move or reshape a tensor without computing on it: looked through when following
# a weight or an input to its DequantizeLinear, and not counted as float compute.
LAYOUT = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                    "Cast", "ReorderInput", "ReorderOutput", "Shape", "Constant"})
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def optimized_model(path: str | os.PathLike) -> Any:
    """The graph ONNX Runtime runs for ``path``: a CPU session at ``ORT_ENABLE_ALL`` (the
    default users get) saved to a temp file, read back and the file removed. Layout choices
    (NCHWc, NHWC) follow this machine's CPU."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


class OnnxGraph:
    """Producers, consumers and initializers of one ONNX graph."""

    def __init__(self, proto: Any) -> None:
        graph = proto.graph
        self.nodes = list(graph.node)
        self.inits = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def source(self, name: str) -> tuple[Any | None, list[Any]]:
        """The node producing ``name`` looking through layout ops, and the layout ops passed."""
        passed = []
        node = self.producer.get(name)
        while node is not None and node.op_type in LAYOUT and node.input:
            passed.append(node)
            node = self.producer.get(node.input[0])
        return node, passed

    def signature(self, node: Any) -> set[str]:
        """Initializer names a node reads directly or through DequantizeLinear / layout ops."""
        names: set[str] = set()
        for name in node.input:
            if name in self.inits:
                names.add(name)
                continue
            src, _ = self.source(name)
            if src is not None and src.op_type == "DequantizeLinear":
                names.update(i for i in src.input if i in self.inits)
        return names


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def integer_tensors(graph: OnnxGraph) -> set[str]:
    """Tensors holding integer codes: outputs of QuantizeLinear and of integer kernels with a
    quantized output, carried through ops that keep their input's type (graph order)."""
    found: set[str] = set()
    for node in graph.nodes:
        op = node.op_type
        quantized_out = (op in ("QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv")
                         or op in INTEGER_ELEMENTWISE or (op == "QGemm" and len(node.input) >= 9)
                         or op == "QLinearMatMul")
        keeps_type = (node.input and node.input[0] in found and op != "DequantizeLinear"
                      and op not in INTEGER_COMPUTE)
        if (quantized_out or keeps_type) and node.output:
            found.add(node.output[0])
    return found
