"""Causes found behind two zoo rows, each pinned by a test that fails if it comes back.

RegNet ``w8a8``: the exporter's graph-level metadata (the ExportedProgram signature, a line per
quantizer buffer) made the file bigger than the FP32 one. SwinV2: ONNX Runtime turned the
position-bias MLP, a quantized layer run on a constant table, into ``MatMulNBits`` with int8
activations; ``lowbit.export.fold`` now evaluates such constant subgraphs at export.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from models import Logits
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit.export.fold import fold_quantized_constants
from lowbit.export.onnx import quiet_exporter, strip_metadata
from lowbit.export.ort_graph import optimized_model

transformers = pytest.importorskip("transformers")


def _w8a8(model: nn.Module, path, x: torch.Tensor):
    qm = lowbit.quantize(model, lowbit.QuantConfig.preset("w8a8"), example_inputs=(x,))
    lowbit.calibrate(qm, [torch.randn(4, *x.shape[1:]) for _ in range(3)], progress=False)
    return lowbit.export_onnx(lowbit.convert(qm), path, (x,))


# --------------------------------------------------------------------------------- RegNet


@pytest.fixture(scope="module")
def regnet_files(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       groups_width=16, num_labels=10)
    model = Logits(transformers.RegNetForImageClassification(config)).eval()
    x = torch.randn(2, 3, 32, 32)
    folder = tmp_path_factory.mktemp("regnet")
    with quiet_exporter():
        program = torch.onnx.export(model, (x,), dynamo=True)
    assert program is not None
    program.save(str(folder / "fp32.onnx"))
    onnx.save(strip_metadata(onnx.load(str(folder / "fp32.onnx"))), str(folder / "fp32.onnx"))
    with warnings.catch_warnings():  # float-layer notes are not what these tests look at
        warnings.simplefilter("ignore")
        _w8a8(model, folder / "w8a8.onnx", x)
    return folder / "fp32.onnx", folder / "w8a8.onnx"


def test_regnet_w8a8_file_is_smaller_than_fp32(regnet_files):
    fp32, w8a8 = regnet_files
    # With the exporter's graph signature kept, this file was 1.09x the FP32 one.
    assert w8a8.stat().st_size < fp32.stat().st_size


def test_exported_file_holds_no_exporter_metadata(regnet_files):
    proto = onnx.load(str(regnet_files[1]))
    assert not proto.graph.metadata_props  # pkg.torch.export.ExportedProgram.graph_signature
    assert [p.key for p in proto.metadata_props] == ["lowbit.files"]
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    assert not proto.graph.value_info


# --------------------------------------------------------------------------------- SwinV2


@pytest.fixture(scope="module")
def swinv2_export(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                       num_heads=[2, 4], window_size=4, num_labels=10)
    model = Logits(transformers.Swinv2ForImageClassification(config)).eval()
    path = tmp_path_factory.mktemp("swinv2") / "w8a8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = _w8a8(model, path, torch.randn(2, 3, 32, 32))
    return path, report


def test_swinv2_position_bias_mlp_is_computed_at_export(swinv2_export):
    path, report = swinv2_export
    cpb = [name for name in report.folded if "continuous_position_bias_mlp" in name]
    assert len(cpb) == 3  # block 0's two quantizers; block 1 shares the table's quantizer
    proto = onnx.load(str(path))
    constants = {i.name for i in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] in constants]
    assert not any("continuous_position_bias_mlp" in i.name and i.name.endswith(".codes")
                   for i in proto.graph.initializer)
    in_report = [k for k in report.deploy.layers if "continuous_position_bias_mlp" in k.name]
    assert len(in_report) == 4
    assert all(k.integer is None and "report.folded" in k.reason for k in in_report)


def test_swinv2_runs_no_int8_activation_fallback_in_ort(swinv2_export):
    path, report = swinv2_export
    ops = {n.op_type for n in optimized_model(path).graph.node}
    assert "MatMulNBits" not in ops  # the cause: int8 re-quantization of a float table
    assert report.parity.first_identical == 1.0


# ----------------------------------------------------------------- the cause, in three nodes


def _constant_matmul(codes: np.ndarray, weight: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    """``Q(table) → DQ → MatMul(DQ(int8 weight)) + DQ(int32 bias)``, the table a constant."""
    n = weight.shape[1]
    inits = [numpy_helper.from_array(codes, "table"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wzp"),
             numpy_helper.from_array(np.zeros(n, np.int32), "b"),
             numpy_helper.from_array((scale * 0.02).astype(np.float32), "bs")]
    nodes = [helper.make_node("QuantizeLinear", ["table", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["a"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wf"], axis=1),
             helper.make_node("MatMul", ["a", "wf"], ["mm"]),
             helper.make_node("DequantizeLinear", ["b", "bs"], ["bf"], axis=0),
             helper.make_node("Add", ["mm", "bf"], ["table_out"]),
             helper.make_node("Add", ["x", "table_out"], ["y"])]
    shape = [1, *codes.shape[1:-1], n]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_gives_ort_the_exact_table():
    rng = np.random.default_rng(0)
    table = rng.uniform(-2, 2, (1, 7, 7, 2)).astype(np.float32)
    weight = rng.integers(-127, 128, (2, 64), dtype=np.int8)
    scale = (rng.random(64) * 0.01 + 0.001).astype(np.float32)
    proto = _constant_matmul(table, weight, scale)
    codes = np.clip(np.round(table / 0.02) + 128, 0, 255)
    exact = ((codes - 128) * 0.02) @ (weight.astype(np.float64) * scale)
    x = np.zeros((1, 7, 7, 64), np.float32)
    tol = 1e-6 * np.abs(exact).max()
    assert np.abs(_run(proto, x) - exact).max() > 100 * tol  # ORT: MatMulNBits, int8 activations
    assert fold_quantized_constants(proto) == ["s"]
    assert [n.op_type for n in proto.graph.node] == ["Add"]
    assert np.abs(_run(proto, x) - exact).max() < tol


def test_fold_keeps_weights_and_quantized_constants_that_only_add():
    """A quantized position embedding added to data stays (ORT fuses it into QLinearAdd);
    weight codes never become float."""
    emb = numpy_helper.from_array(np.ones((1, 4), np.float32), "emb")
    inits = [emb, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.ones((4, 4), np.int8), "w"),
             numpy_helper.from_array(np.array(0.1, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["emb", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["e"]),
             helper.make_node("Add", ["x", "e"], ["h"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"]),
             helper.make_node("MatMul", ["h", "wf"], ["y"])]
    value = helper.make_tensor_value_info
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [1, 4])],
                          [value("y", TensorProto.FLOAT, [1, 4])], inits),
        opset_imports=[helper.make_opsetid("", 19)])
    before = proto.SerializeToString()
    assert fold_quantized_constants(proto) == []
    assert proto.SerializeToString() == before
