"""The deploy graph: which kernel ONNX Runtime runs each quantized layer on after its graph
optimizations, why a layer stays float, and the float layers of the module tree and graph."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.cli import main
from lowbit.export.deploy import ADD_FIX, DeployGraphWarning, deploy_graph
from lowbit.export.float_layers import graph_float_layers, module_float_layers
from lowbit.export.ort_graph import OnnxGraph as Graph
from lowbit.export.ort_graph import optimized_model

A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")
S8 = QuantSpec(bits=8, symmetric=True, observer="minmax")
W8 = QuantSpec(bits=8, granularity="per_channel")
ADD_RULE = LayerRule(types=["add"], input=QuantSpec(bits=8, symmetric=False))


class Block(nn.Module):
    """A ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class ResNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = Block()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b1(torch.relu(self.stem(x))).mean((2, 3)))


def export(model: nn.Module, cfg: QuantConfig, x: torch.Tensor, path: Path, **kw):
    """Quantize, calibrate, convert and export; the report and the warnings of the export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model.eval(), cfg, example_inputs=(x,))
    lowbit.calibrate(qm, [x, torch.randn_like(x)], progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lowbit.export_onnx(lowbit.convert(qm), path, (x,), **kw)
    return report, [w for w in caught if issubclass(w.category, DeployGraphWarning)]


def kernels(report) -> dict[str, tuple[bool | None, str]]:
    return {k.name: (k.integer, k.op) for k in report.deploy.layers}


# ------------------------------------------------------------------ fully, partly, not fused


def test_a_conv_chain_with_quantized_inputs_runs_on_integer_kernels_only(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=W8, input=A8),
                             LayerRule(names=["4"], weight=W8, input=A8, output=A8)])
    report, caught = export(model, cfg, torch.randn(2, 3, 10, 10), tmp_path / "chain.onnx")
    deploy = report.deploy
    assert kernels(report) == {n: (True, "QLinearConv") for n in ("0", "2", "4")}
    assert (deploy.integer_kernels, deploy.float_kernels) == (3, 0)
    assert deploy.float_quantized == [] and deploy.float_layers == {}
    assert report.float_layers == {} and caught == []
    assert "integer kernels 3/3" in str(report) and "quantized layers on integer kernels 3/3" \
        in str(report)


def test_a_float_residual_add_keeps_exactly_its_producers_float(tmp_path):
    """w8a8's layer rule alone (without its placement rules) leaves the add float: ORT keeps
    the convs feeding it (the stem through the identity, b1.conv2 directly) as float FusedConv;
    the others fuse."""
    cfg = QuantConfig(rules=QuantConfig.preset("w8a8").rules[:1])
    report, caught = export(ResNetTiny(), cfg, torch.randn(2, 3, 8, 8), tmp_path / "res.onnx")
    deploy = report.deploy
    slow = {k.name: k for k in deploy.float_quantized}
    assert set(slow) == {"stem", "b1.conv2"}
    for k in slow.values():
        assert k.op in ("Conv", "FusedConv")
        assert "feeds a float Add" in k.reason and "no QuantizeLinear" in k.reason
        assert k.fix == ADD_FIX
    assert kernels(report)["b1.conv1"] == (True, "QLinearConv")
    assert kernels(report)["fc"] == (True, "QGemm")
    assert (deploy.integer_kernels, deploy.float_kernels) == (2, 2)
    assert len(caught) == 1, "one warning for all layers"
    message = str(caught[0].message)
    assert "stem" in message and "b1.conv2" in message and ADD_FIX in message
    text = str(report)
    assert "deploy graph" in text and "integer kernels 2/4" in text
    assert "b1.conv2: FusedConv kept float by ORT" in text or "b1.conv2: Conv kept" in text


def test_quantizing_the_add_lets_every_conv_fuse(tmp_path):
    cfg = QuantConfig(rules=[QuantConfig.preset("w8a8").rules[0], ADD_RULE])
    report, caught = export(ResNetTiny(), cfg, torch.randn(2, 3, 8, 8), tmp_path / "res.onnx")
    deploy = report.deploy
    assert deploy.float_quantized == [] and caught == []
    assert {n: v for n, v in kernels(report).items() if n != "b1.op_add"} == {
        "stem": (True, "QLinearConv"), "b1.conv1": (True, "QLinearConv"),
        "b1.conv2": (True, "QLinearConv"), "fc": (True, "QGemm")}
    add = next(k for k in deploy.layers if k.name == "b1.op_add")
    assert add.integer is False and add.op == "Add" and not add.compute  # inputs only: expected
    assert "Add" in " ".join(deploy.float_ops_between) or add.op == "Add"


def test_an_add_with_a_quantized_output_runs_as_qlinearadd(tmp_path):
    cfg = QuantConfig(rules=[QuantConfig.preset("w8a8").rules[0],
                             LayerRule(types=["add"], input=A8, output=A8)])
    report, _ = export(ResNetTiny(), cfg, torch.randn(2, 3, 8, 8), tmp_path / "res.onnx")
    assert kernels(report)["b1.op_add"] == (True, "QLinearAdd")


def test_the_output_spec_fix_fuses_a_conv_that_feeds_a_float_pool(tmp_path):
    """The demo's CNN: its last conv feeds AdaptiveAvgPool (a float ReduceMean), so ORT keeps
    it float; the fix the report gives (an output spec) makes it a QLinearConv. The uint8
    MaxPool between the other convs is not a float op."""
    from lowbit.demo import DigitsCNN

    x = torch.randn(8, 1, 8, 8)
    layers_only = QuantConfig(rules=QuantConfig.preset("w8a8").rules[:1])
    report, caught = export(DigitsCNN(), layers_only, x, tmp_path / "a.onnx")
    (slow,) = report.deploy.float_quantized
    assert slow.name == "7" and "feeds a float ReduceMean" in slow.reason
    assert "output spec" in slow.fix and len(caught) == 1
    between = " ".join(report.deploy.float_ops_between)
    assert "ReduceMean" in between and "MaxPool" not in between

    base = QuantConfig.preset("w8a8").rules[0]
    cfg = QuantConfig(rules=[base, LayerRule(names=["7"], weight=base.weight, input=base.input,
                                             output=A8)])
    report, caught = export(DigitsCNN(), cfg, x, tmp_path / "b.onnx")
    assert report.deploy.float_quantized == [] and caught == []
    assert kernels(report)["7"] == (True, "QLinearConv")


def test_weight_only_layers_run_in_float_because_their_inputs_are(tmp_path):
    report, caught = export(ResNetTiny(), QuantConfig.preset("w8"), torch.randn(2, 3, 8, 8),
                            tmp_path / "w8.onnx")
    deploy = report.deploy
    assert {k.name for k in deploy.float_quantized} == {"stem", "b1.conv1", "b1.conv2"}
    assert all("input is not quantized" in k.reason for k in deploy.float_quantized)
    assert kernels(report)["fc"] == (True, "DynamicQuantizeMatMul")
    assert len(caught) == 1 and "b1.conv1" in str(caught[0].message)


def test_per_group_weights_on_a_quantized_input_run_in_float(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    cfg = QuantConfig(rules=[LayerRule(
        types=["Linear"], input=A8,
        weight=QuantSpec(bits=8, granularity="per_group", group_size=32))])
    report, caught = export(model, cfg, torch.randn(4, 64), tmp_path / "g.onnx")
    slow = report.deploy.float_quantized
    assert [k.name for k in slow] == ["0", "2"]
    assert all("per-group (block_size 32)" in k.reason for k in slow)
    assert report.deploy.integer_kernels == 0 and len(caught) == 1


def test_a_linear_whose_relu_feeds_a_float_layer_runs_as_float_fusedgemm(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=W8, input=A8),
                             LayerRule(names=["2"])])
    report, caught = export(model, cfg, torch.randn(4, 16), tmp_path / "l.onnx")
    (slow,) = report.deploy.float_quantized
    assert slow.name == "0" and slow.op == "FusedGemm"
    assert "its output (after Relu) feeds a float Gemm" in slow.reason
    assert report.float_layers == {"2": "kept in float by the config"} and len(caught) == 1


def test_int4_weight_only_runs_on_matmulnbits(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    report, caught = export(model, QuantConfig.preset("w4-g32"), torch.randn(2, 5, 64),
                            tmp_path / "g4.onnx")
    assert kernels(report) == {"0": (True, "MatMulNBits"), "2": (True, "MatMulNBits")}
    assert caught == []


def test_a_relu_ort_cannot_drop_keeps_the_conv_float(tmp_path):
    """Symmetric int8 inputs after a ReLU: zero point 0 is not int8's minimum, so ORT keeps
    the Relu between the conv and its QuantizeLinear and the conv in float."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=W8, input=S8),
                             LayerRule(names=["2"], weight=W8, input=S8, output=S8)])
    report, _ = export(model, cfg, torch.randn(2, 3, 10, 10), tmp_path / "s8.onnx")
    slow = report.deploy.float_quantized
    assert [k.name for k in slow] == ["0"]
    assert "Relu sits between" in slow[0].reason and "(-128), here 0" in slow[0].reason
    assert kernels(report)["2"] == (True, "QLinearConv")


def test_attention_matmuls_are_found_through_their_input_quantizers(tmp_path):
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)), -1)
            return torch.matmul(a, self.v(x))

    cfg = QuantConfig(rules=[QuantConfig.preset("w8a8").rules[0],
                             LayerRule(types=["matmul"], input=A8)])
    report, caught = export(Attention(), cfg, torch.randn(2, 5, 16), tmp_path / "att.onnx")
    got = kernels(report)
    assert got["op_matmul"] == (True, "MatMulIntegerToFloat")
    assert got["op_matmul_1"] == (True, "MatMulIntegerToFloat")
    assert {got[n] for n in "qkv"} == {(True, "QGemm")}
    assert "Softmax" in " ".join(report.deploy.float_ops_between) and caught == []


# ------------------------------------------------------------------ hand-built graphs


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _qdq_conv_model(consumer: str) -> onnx.ModelProto:
    """x → Q/DQ → Conv(DQ(a.weight.codes)) → ``consumer``; a float Conv with weight b.weight.

    consumer "add": the conv output feeds a float Add; "twice": two QuantizeLinear with
    different scales read it."""
    rng = np.random.default_rng(0)
    inits = [
        _init("x.scale", np.array(0.02, np.float32)), _init("x.zp", np.array(128, np.uint8)),
        _init("a.weight.codes", rng.integers(-127, 127, (4, 4, 3, 3)).astype(np.int8)),
        _init("a.weight.scale", np.full(4, 0.01, np.float32)),
        _init("a.weight.zero_point", np.zeros(4, np.int8)),
        _init("b.weight", rng.standard_normal((4, 4, 1, 1)).astype(np.float32)),
        _init("s1", np.array(0.05, np.float32)), _init("s2", np.array(0.07, np.float32)),
        _init("zp", np.array(0, np.uint8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x.scale", "x.zp"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "x.scale", "x.zp"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["a.weight.codes", "a.weight.scale",
                                              "a.weight.zero_point"], ["wa"], name="dqw", axis=0),
        helper.make_node("Conv", ["xd", "wa"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "b.weight"], ["yb"], name="conv_b"),
    ]
    if consumer == "add":
        nodes.append(helper.make_node("Add", ["ya", "yb"], ["y"], name="residual"))
    else:
        nodes += [
            helper.make_node("QuantizeLinear", ["ya", "s1", "zp"], ["q1"], name="q1"),
            helper.make_node("DequantizeLinear", ["q1", "s1", "zp"], ["d1"], name="d1"),
            helper.make_node("QuantizeLinear", ["ya", "s2", "zp"], ["q2"], name="q2"),
            helper.make_node("DequantizeLinear", ["q2", "s2", "zp"], ["d2"], name="d2"),
            helper.make_node("Add", ["d1", "d2"], ["s"], name="sum"),
            helper.make_node("Add", ["s", "yb"], ["y"], name="residual"),
        ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


PARAMS = {"layers": {"a": {"type": "Conv2d"}}}


@pytest.mark.parametrize(("consumer", "reason"), [
    ("add", "feeds a float Add ('residual') with no QuantizeLinear"),
    ("twice", "quantized twice with different scales (s1, s2)"),
], ids=["float-add", "two-scales"])
def test_hand_built_graph_reasons(tmp_path, consumer, reason):
    path = tmp_path / "g.onnx"
    onnx.save(_qdq_conv_model(consumer), str(path))
    deploy = deploy_graph(path, params=PARAMS, float_layers={"b": "kept in float by the config"})
    (layer,) = deploy.layers
    assert layer.name == "a" and layer.integer is False and reason in layer.reason
    assert deploy.float_layers == {"b": "kept in float by the config"}
    assert deploy.float_kernels == 2 and deploy.integer_kernels == 0
    assert deploy.warning() is not None and "a (" in deploy.warning()


def test_the_optimized_graph_is_read_back_and_its_file_removed(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_qdq_conv_model("add"), str(path))
    proto = optimized_model(path)
    assert proto.graph.node and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_graph_float_layers_name_renamed_weights_by_their_bias_or_node():
    rng = np.random.default_rng(1)
    inits = [_init("val_3", rng.standard_normal((6, 6)).astype(np.float32)),
             _init("fc3.bias", np.zeros(6, np.float32)),
             _init("val_7", rng.standard_normal((6, 6)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "val_3"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "fc3.bias"], ["h"], name="bias_add"),
             helper.make_node("MatMul", ["h", "val_7"], ["y"], name="mm_nobias")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    found = graph_float_layers(Graph(helper.make_model(graph)))
    assert set(found) == {"fc3", "MatMul 'mm_nobias'"}
    assert "val_7" in found["MatMul 'mm_nobias'"]


# ------------------------------------------------------------------ the truthful float list


class WithTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))))


def test_float_layers_come_from_the_module_tree_and_the_graph(tmp_path):
    cfg = QuantConfig(rules=[QuantConfig.preset("w8a8").rules[0], LayerRule(names=["head"])])
    report, _ = export(WithTranspose(), cfg, torch.randn(2, 3, 8, 8), tmp_path / "t.onnx")
    assert report.float_layers == {"up": "ConvTranspose2d is not supported yet",
                                   "head": "kept in float by the config"}
    graph = Graph(onnx.load(str(tmp_path / "t.onnx")))
    assert set(graph_float_layers(graph)) == {"up", "head"}  # the graph alone agrees
    slow = report.deploy.float_quantized  # conv feeds the float ConvTranspose
    assert [k.name for k in slow] == ["conv"] and "ConvTranspose" in slow[0].reason
    assert "float layers   up: ConvTranspose2d" in str(report)


def test_module_float_layers_keep_the_plans_reasons_only_where_they_are_true():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(WithTranspose().eval(), QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(2, 3, 8, 8)], progress=False)
    dm = lowbit.convert(qm)
    dm.extra = nn.Linear(3, 3)  # added after planning: float, and the plan does not know it
    stale = {"conv": "kept in float by the config", "up": "ConvTranspose2d is not supported yet"}
    found = module_float_layers(dm, stale)
    assert set(found) == {"up", "extra"}  # conv and head are quantized: not float
    assert found["up"] == stale["up"]
    assert "Linear holds a float weight" in found["extra"]


def test_transformers_conv1d_layers_count_as_quantized_and_a_float_one_is_listed():
    """GPT-2's Conv1D layers are quantized as the Linear they are; one kept float by a rule is
    listed from the module tree with the plan's reason."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    cfg = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules,
                             LayerRule(names=["transformer.h.0.mlp.c_fc"])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, cfg)
    lowbit.calibrate(qm, [torch.randint(0, 50, (2, 8))], progress=False)
    found = module_float_layers(lowbit.convert(qm), qm.lowbit_plan.float_layers)
    assert "transformer.h.0.mlp.c_fc" in found
    assert not {f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")} \
        & set(found)
    assert found["transformer.wte"] == "Embedding is quantized only where a rule names the type"
    assert "lm_head" not in found


# ------------------------------------------------------------------ command line


def test_lowbit_report_of_an_onnx_file_prints_the_deploy_graph(tmp_path, capsys):
    path = tmp_path / "res.onnx"
    layers_only = QuantConfig(rules=QuantConfig.preset("w8a8").rules[:1])
    export(ResNetTiny(), layers_only, torch.randn(2, 3, 8, 8), path)
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "b1.conv1" in out and "int8 per_channel" in out  # the quant_params table
    assert "deploy graph" in out and "integer kernels 2/4" in out
    assert "stem: " in out and "b1.conv2: " in out and "feeds a float Add" in out

    (tmp_path / "res.quant_params.json").unlink()  # alone, the file still names its layers
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no res.quant_params.json beside it" in out and "b1.conv2: " in out


def test_lowbit_report_of_a_missing_onnx_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
