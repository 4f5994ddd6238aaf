"""Zero padding before a conv (Hugging Face's TF "same" padding in MobileNet and EfficientNet,
``F.pad`` or ``nn.ZeroPad2d``) keeps a tensor quantized: the presets look through it when they
place residual adds, and the export folds it into the conv, so ONNX Runtime runs the producer,
the add and the conv on integer kernels, as in its own files."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import Logits
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.export.ort_graph import optimized_model
from lowbit.export.pads import fold_pads_into_convs
from lowbit.nn import QuantAdd

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


class TFPadNet(nn.Module):
    """Residual blocks whose convs pad as TensorFlow's "same" does: more on the bottom/right,
    once with ``F.pad`` and once with an ``nn.ZeroPad2d`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.a = nn.Conv2d(8, 8, 3)
        self.pad = nn.ZeroPad2d((1, 1, 1, 1))
        self.b = nn.Conv2d(8, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(F.pad(x, (0, 1, 0, 1))))
        x = x + F.relu6(self.a(F.pad(x, (1, 1, 1, 1))))
        x = x + self.b(self.pad(x))
        return self.head(x).mean((2, 3))


def _export(qm: nn.Module, path, example: tuple[torch.Tensor, ...]) -> lowbit.ExportReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.export_onnx(lowbit.convert(qm), path, example)


def test_zero_pads_fold_into_the_convs_and_the_adds_run_on_integers(tmp_path):
    torch.manual_seed(0)
    model = TFPadNet().eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert isinstance(qm.op_add, QuantAdd) and isinstance(qm.op_add_1, QuantAdd)
    lowbit.calibrate(qm, [torch.randn(4, 3, 16, 16) for _ in range(3)], progress=False)
    path = tmp_path / "tfpad.onnx"
    report = _export(qm, path, (torch.randn(2, 3, 16, 16),))
    written = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert written["Pad"] == 0, written
    pads = [list(a.ints) for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads and pads.count([1, 1, 1, 1]) == 2, pads
    ran = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ran["QLinearAdd"] == 2 and ran["QLinearConv"] == 4, ran
    assert ran["Pad"] + ran["Add"] + ran["Conv"] + ran["FusedConv"] == 0, ran
    # Folding is exact: ONNX Runtime reproduces the deploy model's codes.
    assert report.parity.codes_identical == 1.0


def test_hugging_face_mobilenet_v2_adds_and_tf_padding_run_on_integer_kernels(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=10)
    assert config.tf_padding
    model = transformers.MobileNetV2ForImageClassification(config)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.ones_(bn.weight)  # HF draws gamma from N(0, 0.02): the output would vanish
    with torch.no_grad():  # BN statistics of the data, so folding them is not a no-op
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()

    wrapped = Logits(model).eval()
    example = (torch.randn(2, 3, 32, 32),)
    qm = lowbit.quantize(wrapped, QuantConfig.preset("w8a8"), example_inputs=example)
    residual = sum(block.use_residual for block in model.mobilenet_v2.layer)
    adds = [m for m in qm.modules() if isinstance(m, QuantAdd)]
    assert residual > 0 and len(adds) == residual
    lowbit.calibrate(qm, [torch.randn(4, 3, 32, 32) for _ in range(3)], progress=False)
    path = tmp_path / "mobilenet_v2.onnx"
    report = _export(qm, path, example)
    ran = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ran["QLinearAdd"] == residual, ran
    assert ran["Pad"] + ran["Add"] + ran["Conv"] + ran["FusedConv"] == 0, ran
    assert report.deploy.float_kernels == 0 and not report.deploy.float_quantized


# ------------------------------------------------------------------ the rewrite on its own


def _graph(pad_mode: str = "constant", value: float | None = 0.0,
           pads: tuple[int, ...] = (0, 0, 0, 1, 0, 0, 1, 2), conv_pads: list[int] | None = None,
           pad_readers: int = 1, value_by_cast: bool = False) -> onnx.ModelProto:
    """x → Pad → QuantizeLinear → DequantizeLinear → Conv (3x3, 2 → 2 channels)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w")]
    nodes = []
    pad_inputs = ["x", "pads"]
    if value is not None:
        if value_by_cast:
            nodes.append(helper.make_node("Constant", [], ["v64"], value=numpy_helper.from_array(
                np.array(value, np.float64))))
            nodes.append(helper.make_node("Cast", ["v64"], ["v"], to=TensorProto.FLOAT))
        else:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), "v"))
        pad_inputs.append("v")
    nodes.append(helper.make_node("Pad", pad_inputs, ["p"], mode=pad_mode))
    nodes += [helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
    conv_attrs = {"pads": conv_pads} if conv_pads else {}
    nodes.append(helper.make_node("Conv", ["dq", "w"], ["y"], name="conv", **conv_attrs))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]
    if pad_readers > 1:
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 6, 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("conv_pads", [None, [1, 0, 1, 0]])
@pytest.mark.parametrize("value_by_cast", [False, True])
def test_a_zero_pad_is_added_to_the_convs_pads_bit_for_bit(conv_pads, value_by_cast):
    proto = _graph(conv_pads=conv_pads, value_by_cast=value_by_cast)
    x = np.random.default_rng(1).standard_normal((1, 2, 6, 6)).astype(np.float32)
    before = _run(proto, x)
    assert fold_pads_into_convs(proto) == ["conv"]
    assert [n.op_type for n in proto.graph.node if n.op_type == "Pad"] == []
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    (pads,) = [list(a.ints) for a in conv.attribute if a.name == "pads"]
    old = conv_pads or [0, 0, 0, 0]
    assert pads == [old[0] + 0, old[1] + 1, old[2] + 1, old[3] + 2]
    onnx.checker.check_model(proto)
    np.testing.assert_array_equal(_run(proto, x), before)


@pytest.mark.parametrize("why, graph", [
    ("a non-zero pad value", dict(value=1.0)),
    ("reflect padding", dict(pad_mode="reflect", value=None)),
    ("padding the channels", dict(pads=(0, 1, 0, 0, 0, 0, 0, 0))),
    ("a negative pad (a crop)", dict(pads=(0, 0, -1, 0, 0, 0, 0, 0))),
    ("a padded tensor read twice", dict(pad_readers=2)),
])
def test_other_pads_are_left_as_they_are(why, graph):
    proto = _graph(**graph)
    before = proto.SerializeToString()
    assert fold_pads_into_convs(proto) == [], why
    assert proto.SerializeToString() == before, why
