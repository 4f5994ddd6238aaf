"""Sigmoid gates after quantized convs (EfficientNet's SiLU and squeeze-excite) are quantized by
the static presets: the sigmoid's output on a uint8 grid lets ONNX Runtime run it as
``QLinearSigmoid`` and the product after it as ``QLinearMul``, instead of dequantizing, running
both in float and quantizing again."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.export.ort_graph import optimized_model
from lowbit.nn import QuantSiLU

pytest.importorskip("onnxruntime")


class MBConv(nn.Module):
    """EfficientNet's block, small: expand conv + SiLU, depthwise conv + SiLU, squeeze-excite
    (mean → conv → SiLU → conv → Sigmoid → scale), project conv; a SiLU on the raw input too."""

    def __init__(self) -> None:
        super().__init__()
        self.act_in = nn.SiLU()
        self.expand = nn.Conv2d(3, 16, 1)
        self.act1 = nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.act2 = nn.SiLU()
        self.reduce = nn.Conv2d(16, 4, 1)
        self.act_se = nn.SiLU()
        self.grow = nn.Conv2d(4, 16, 1)
        self.gate = nn.Sigmoid()
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.expand(self.act_in(x)))
        x = self.act2(self.dw(x))
        scale = self.gate(self.grow(self.act_se(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.project(x * scale).mean((2, 3))


def _batches(n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(4, 3, 12, 12) for _ in range(n)]


def _calibrate_round_trip_and_run(model: nn.Module, qm: nn.Module, config: QuantConfig,
                                  path: Path) -> tuple[Any, collections.Counter]:
    """Calibrate ``qm``; check it against the float model (cosine > 0.99) and through a state
    dict (a fresh model computes the same, gates' codes included); export it with 100%
    identical codes. Returns the export report and the ops ONNX Runtime runs."""
    lowbit.calibrate(qm, _batches(), progress=False)
    x = torch.randn(2, 3, 12, 12)
    assert nn.functional.cosine_similarity(model(x).flatten(), qm(x).flatten(), dim=0) > 0.99
    fresh = lowbit.quantize(model, config)
    fresh.load_state_dict(qm.state_dict())
    assert torch.equal(fresh.eval()(x), qm.eval()(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(lowbit.convert(qm), path, (x,))
    assert report.parity.codes_identical == 1.0
    return report, collections.Counter(n.op_type for n in optimized_model(path).graph.node)


def test_the_presets_quantize_the_gates_that_read_a_quantized_output():
    plan = lowbit.plan(MBConv().eval(), QuantConfig.preset("w8a8"))
    gates = {x.name: x for x in plan.layers if x.type in ("SiLU", "Sigmoid")}
    # act_in reads the model's float input: nothing for ORT to fuse there, so no entry.
    assert set(gates) == {"act1", "act2", "act_se", "gate"}
    for entry in gates.values():
        assert entry.input is None and entry.output is not None
        assert entry.output.bits == 8 and not entry.output.symmetric


def test_a_rule_without_positions_quantizes_every_sigmoid_it_names():
    spec = QuantSpec(bits=8, symmetric=False, observer="minmax")
    config = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules,
                                LayerRule(types=["SiLU"], output=spec)])
    plan = lowbit.plan(MBConv().eval(), config)
    assert {x.name for x in plan.layers if x.type == "SiLU"} == {"act_in", "act1", "act2",
                                                                  "act_se"}


def test_gated_blocks_run_on_integer_sigmoid_and_mul_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MBConv().eval()
    config = QuantConfig.preset("w8a8")
    qm = lowbit.quantize(model, config)
    assert isinstance(qm.act1, QuantSiLU) and qm.act1.output_quant is not None
    _, ran = _calibrate_round_trip_and_run(model, qm, config, tmp_path / "mbconv.onnx")
    assert ran["QLinearSigmoid"] == 4 and ran["Sigmoid"] == 0, ran
    # act1's and act2's products feed a quantized conv: both run as QLinearMul.
    assert ran["QLinearMul"] >= 2, ran
    assert ran["Conv"] + ran["FusedConv"] == 0, ran


def test_transformers_silu_activation_is_a_silu():
    """``hidden_act="silu"`` gives transformers' own ``SiLUActivation`` class (MobileViT,
    Llama's MLP): it is planned as the ``SiLU`` it computes, its class named in the plan."""
    activations = pytest.importorskip("transformers.activations")
    torch.manual_seed(0)
    model = MBConv().eval()
    model.act1 = activations.ACT2FN["silu"]
    assert type(model.act1).__name__ == "SiLUActivation"
    entries = {x.name: x for x in lowbit.plan(model, QuantConfig.preset("w8a8")).layers}
    assert entries["act1"].type == "SiLU" and entries["act1"].module_type == "SiLUActivation"
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert isinstance(qm.act1, QuantSiLU)
    lowbit.calibrate(qm, _batches(), progress=False)
    x = torch.randn(2, 3, 12, 12)
    assert nn.functional.cosine_similarity(model(x).flatten(), qm(x).flatten(), dim=0) > 0.99


class SqueezeExcite(nn.Module):
    """Hugging Face EfficientNet's block tail: depthwise conv + SiLU, then squeeze-excite as
    modules (``AdaptiveAvgPool2d`` → conv → SiLU → conv → Sigmoid) and ``torch.mul``."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1)
        self.act1 = nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.act2 = nn.SiLU()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(16, 4, 1)
        self.act_se = nn.SiLU()
        self.grow = nn.Conv2d(4, 16, 1)
        self.gate = nn.Sigmoid()
        self.project = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.dw(self.act1(self.expand(x))))
        scale = self.gate(self.grow(self.act_se(self.reduce(self.squeeze(x)))))
        return self.project(torch.mul(x, scale)).mean((2, 3))


def test_squeeze_excite_products_and_squeezes_are_placed_between_quantized_layers():
    entries = {x.name: x for x in lowbit.plan(SqueezeExcite().eval(),
                                              QuantConfig.preset("w8a8")).layers}
    assert entries["op_mul"].type == "mul" and entries["op_mul"].input is not None
    assert entries["squeeze"].type == "AdaptiveAvgPool2d" and entries["squeeze"].input is not None


def test_a_pool_reading_an_output_already_quantized_gets_no_entry():
    """A classifier's pooler after a conv: the conv quantizes its output for the pool's float
    mean (``feeds_float``), so a pool quantizer would only read it as it is; the plan does not
    list one (no quantized layer without a quantizer)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    assert {x.type for x in plan.quantized} == {"Conv2d", "Linear"}
    assert plan.layers[0].output is not None  # the conv's output, read by the pool's mean


def test_a_product_with_a_float_factor_stays_float():
    """A transformer MLP's ``act(gate(x)) * up(x)``: the activation reads a Linear's float
    output, so it is no gate, and the product is not placed (it would add two quantizers on
    activations the preset leaves float)."""

    class GatedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(self.act(self.gate(x)) * self.up(x))

    quantized = {x.type for x in lowbit.plan(GatedMLP().eval(),
                                             QuantConfig.preset("w8a8")).quantized}
    assert quantized == {"Linear"}


def test_squeeze_excite_runs_on_integer_kernels_and_reads_the_gate_once(tmp_path):
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    # The gate leaves its sigmoid's output quantizer already on a uint8 grid: the product reads
    # it as it is; the depthwise SiLU's product is quantized once for both of its readers.
    assert qm.op_mul.other_quant is None
    assert qm.op_mul.input_quant is qm.squeeze.input_quant
    report, ran = _calibrate_round_trip_and_run(model, qm, QuantConfig.preset("w8a8"),
                                                tmp_path / "se.onnx")
    # Three SiLU products and the squeeze-excite product, all on uint8; no float Mul left.
    assert ran["QLinearMul"] == 4 and ran["Mul"] == 0, ran
    assert ran["Conv"] + ran["FusedConv"] + ran["Sigmoid"] == 0, ran
    assert not [k for k in report.deploy.layers if k.integer is False], report.deploy.layers


def test_a_reader_takes_a_quantized_output_as_it_is_unless_its_grid_differs():
    """One quantizer per tensor: a conv whose output is quantized (it also feeds a float op)
    and a conv reading it with an input spec of the same kind: the reader does not quantize
    the tensor again. A reader asking for another grid (signed, symmetric) keeps its own."""

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) + torch.tanh(y)

    u8 = QuantSpec(bits=8, symmetric=False)
    w8 = QuantSpec(bits=8, granularity="per_channel")
    same = QuantConfig(rules=[LayerRule(names=["a"], weight=w8, input=u8, output=u8),
                              LayerRule(names=["b"], weight=w8, input=u8)])
    qm = lowbit.quantize(Fork().eval(), same)
    assert qm.b.input_quant is None and qm.a.output_quant is not None
    other = QuantConfig(rules=[same.rules[0],
                               LayerRule(names=["b"], weight=w8, input=QuantSpec(bits=8))])
    assert lowbit.quantize(Fork().eval(), other).b.input_quant is not None


class PooledHead(nn.Module):
    """Hugging Face EfficientNet's top: conv + SiLU, then ``AvgPool2d(kernel, ceil_mode=True)``
    with a kernel larger than the map (the pooler), then the classifier."""

    def __init__(self, kernel: int = 40) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.act = nn.SiLU()
        self.pool = nn.AvgPool2d(kernel, ceil_mode=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def test_a_pooler_whose_window_runs_past_the_map_runs_on_integers_and_right(tmp_path):
    """ORT's QLinearAveragePool divides by the whole kernel under count_include_pad=1; the
    export writes 0 (the same function with zero pads), and the output stays right."""
    torch.manual_seed(0)
    model = PooledHead().eval()
    config = QuantConfig.preset("w8a8")
    qm = lowbit.quantize(model, config)
    assert type(qm.pool).__name__ == "QuantAvgPool2d"
    report, ops = _calibrate_round_trip_and_run(model, qm, config, tmp_path / "pooled.onnx")
    assert ops["QLinearAveragePool"] == 1 and ops["QLinearMul"] == 1
    import onnxruntime as ort

    x = torch.randn(2, 3, 12, 12)
    session = ort.InferenceSession(str(tmp_path / "pooled.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert nn.functional.cosine_similarity(got.flatten(), model(x).flatten(), dim=0) > 0.99


def test_average_pools_without_padding_stop_counting_past_their_input():
    from onnx import helper

    from lowbit.export.pads import exclude_overhang_from_average_pools

    def pool(name: str, **attrs: Any) -> Any:
        return helper.make_node("AveragePool", ["x"], [name], name=name, kernel_shape=[3, 3],
                                **attrs)

    graph = helper.make_graph(
        [pool("plain", count_include_pad=1), pool("padded", count_include_pad=1,
                                                   pads=[1, 1, 1, 1]),
         pool("zero_pads", count_include_pad=1, pads=[0, 0, 0, 0]), pool("already_0")],
        "g", [], [])
    proto = helper.make_model(graph)
    assert exclude_overhang_from_average_pools(proto) == ["plain", "zero_pads"]
    include = {n.name: next((a.i for a in n.attribute if a.name == "count_include_pad"), 0)
               for n in proto.graph.node}
    assert include == {"plain": 0, "padded": 1, "zero_pads": 0, "already_0": 0}
