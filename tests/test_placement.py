"""The presets place quantizers where ONNX Runtime needs them: residual adds between quantized
layers get the layers' input spec, so every conv feeding one runs on an integer kernel."""

from __future__ import annotations

import collections
import warnings

import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig
from lowbit.export.verify import session


class ResBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``, as residual nets write it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + x)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1, self.b2 = ResBlock(8), ResBlock(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.stem(x)))).mean((2, 3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    return model.eval()


def _adds(plan):
    return {layer.name: layer for layer in plan.layers if layer.type == "add"}


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a8-qat", "w4a8-lsq"])
def test_presets_quantize_residual_adds_between_quantized_layers(preset):
    adds = _adds(lowbit.plan(_model(), QuantConfig.preset(preset)))
    assert len(adds) == 2 and all(a.input is not None for a in adds.values())


def test_binary_and_weight_only_presets_leave_adds_alone():
    for preset in ("w1a1-bnn", "w2-dorefa", "w8"):
        assert not any(a.input for a in _adds(lowbit.plan(_model(), QuantConfig.preset(preset))).values())


def test_convs_whose_output_only_float_ops_read_quantize_it():
    plan = lowbit.plan(_model(), QuantConfig.preset("w8a8"))
    assert [x.name for x in plan.layers if x.output is not None] == ["head"]  # → mean
    cfg = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules, LayerRule(types=["add"])])
    plan = lowbit.plan(_model(), cfg)  # adds float: the convs before them quantize outputs,
    # the stem too (its output is read by b1.conv1 and by the float add)
    assert [x.name for x in plan.layers if x.output is not None] == ["stem.0", "b1.conv2",
                                                                      "b2.conv2", "head"]


def test_an_add_that_no_quantized_layer_reads_stays_float():
    cfg = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules, LayerRule(names=["head"])])
    adds = _adds(lowbit.plan(_model(), cfg))  # the last add now feeds a float layer
    assert [a.input is not None for a in adds.values()] == [True, False]


def test_rules_still_override_the_placement():
    cfg = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules, LayerRule(types=["add"])])
    assert all(a.is_float for a in _adds(lowbit.plan(_model(), cfg)).values())


def test_the_residual_shares_the_quantizer_of_the_layer_reading_the_same_tensor():
    qm = lowbit.quantize(_model(), QuantConfig.preset("w8a8"))
    add = qm.b1.op_add
    assert add.other_quant is qm.b1.conv1.input_quant, "block input: one quantizer per tensor"
    assert add.input_quant is not add.other_quant


def _optimized_ops(path, tmp_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _export(cfg, tmp_path):
    x = torch.randn(4, 3, 8, 8)
    qm = lowbit.quantize(_model(), cfg)
    lowbit.calibrate(qm, [torch.randn(8, 3, 8, 8) for _ in range(3)], progress=False)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(lowbit.convert(qm), path, (x,))
    return path, report


def test_onnx_runtime_runs_every_conv_of_the_preset_on_integer_kernels(tmp_path):
    path, report = _export(QuantConfig.preset("w8a8"), tmp_path)
    ops = _optimized_ops(path, tmp_path)
    # The head's output goes to a mean only: the preset quantizes it ("feeds_float").
    assert ops["QLinearConv"] == 6 and ops["Conv"] + ops["FusedConv"] == 0, ops
    assert ops["QLinearAdd"] >= 1
    assert report.parity.codes_max_diff <= 2
    session(path)  # the file loads in a plain session too


def test_without_the_add_rule_onnx_runtime_keeps_the_producing_convs_float(tmp_path):
    cfg = QuantConfig(rules=QuantConfig.preset("w8a8").rules[:1])
    path, _ = _export(cfg, tmp_path)
    ops = _optimized_ops(path, tmp_path)
    assert ops["Conv"] + ops["FusedConv"] >= 2, ops


class Untraceable(ResNet):
    """The same net behind data-dependent control flow: torch.fx cannot trace the whole model,
    though each block traces on its own (as in Hugging Face models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() < 0:
            return x
        return super().forward(x)


class UntraceableBlock(ResBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() < 0:
            return x
        return super().forward(x)


class UntraceableBlocks(ResNet):
    """Control flow inside the blocks that call the adds: no forward to rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = UntraceableBlock(8), UntraceableBlock(8)


def _plan_of(cls: type[nn.Module]):
    model = cls()
    model.load_state_dict(_model().state_dict())
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = lowbit.plan(model, QuantConfig.preset("w8a8"), (torch.randn(1, 3, 8, 8),))
    return plan, [str(w.message) for w in caught]


def test_adds_in_blocks_that_trace_are_placed_when_the_whole_model_does_not():
    plan, _ = _plan_of(Untraceable)
    reference = lowbit.plan(_model(), QuantConfig.preset("w8a8"))
    assert set(_adds(plan)) == set(_adds(reference)) == {"b1.op_add", "b2.op_add"}
    for name, layer in _adds(plan).items():
        assert layer.input == _adds(reference)[name].input


def test_adds_in_blocks_that_do_not_trace_get_module_level_placement():
    plan, messages = _plan_of(UntraceableBlocks)
    placed = [layer.name for layer in plan.layers if layer.output is not None]
    assert placed == ["stem.0", "b1.conv2", "b2.conv2", "head"]
    warned = [m for m in messages if "module-level placement" in m]
    assert len(warned) == 1 and "'b1.op_add'" in warned[0] and "'b2.op_add'" in warned[0]
    assert not _adds(plan), "no module to insert: the adds are not plan entries"


def test_hugging_face_resnet_residual_adds_run_on_integer_kernels(tmp_path):
    """HF's ResNetModel does not trace with fx as a whole; its blocks' ``hidden += residual``
    become quantized adds, and ONNX Runtime runs them and every conv on integers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1],
                                       layer_type="basic")
    torch.manual_seed(0)
    hf = transformers.ResNetModel(config).eval()

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hf(x).last_hidden_state

    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(Features().eval(), QuantConfig.preset("w8a8"), example_inputs=(x,))
    adds = _adds(qm.lowbit_plan)
    # The last one feeds HF's pooler (a global average pool): quantized before_pool.
    assert set(adds) == {"hf.encoder.stages.0.layers.0.op_add",
                         "hf.encoder.stages.0.layers.1.op_add",
                         "hf.encoder.stages.1.layers.0.op_add"}
    assert adds["hf.encoder.stages.1.layers.0.op_add"].output is not None
    assert type(qm.get_submodule("hf.encoder.stages.0.layers.0.op_add")).__name__ == "QuantAdd"
    assert type(qm.hf).__name__ == "ResNetModel", "the model keeps its class"
    lowbit.calibrate(qm, [torch.randn(4, 3, 32, 32) for _ in range(3)], progress=False)
    path = tmp_path / "hf.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.export_onnx(lowbit.convert(qm), path, (x,))
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearAdd"] == 3 and ops["Add"] == 0, ops
    assert ops["Conv"] + ops["FusedConv"] == 0, ops


class Classifier(nn.Module):
    """Blocks, then a global average pool and a Linear: the last add feeds the pool only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1, self.b2 = ResBlock(8), ResBlock(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.b2(self.b1(self.stem(x)))), 1))


def test_the_last_add_before_a_global_pool_quantizes_its_output_too(tmp_path):
    torch.manual_seed(0)
    model = Classifier().eval()
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    adds = _adds(plan)
    assert adds["b1.op_add"].output is None, "between two blocks: inputs only"
    assert adds["b2.op_add"].input is not None and adds["b2.op_add"].output is not None
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(8, 3, 8, 8) for _ in range(3)], progress=False)
    path = tmp_path / "c.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.export_onnx(lowbit.convert(qm), path, (torch.randn(2, 3, 8, 8),))
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0, ops
    assert ops["Conv"] + ops["FusedConv"] == 0, ops
