"""QAT models convert to integer weights and export to ONNX that ONNX Runtime runs like torch."""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.deploy import IntWeight
from lowbit.export.params import unpack_weight
from lowbit.presets import QAT_PRESETS


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def train_a_little(qm: nn.Module, steps: int = 6) -> None:
    opt = torch.optim.SGD(qm.parameters(), lr=0.02, momentum=0.9)
    sched = lowbit.schedules.for_model(qm, epochs=2)
    for _ in range(steps):
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        loss = nn.functional.cross_entropy(qm(x), y) + 1e-4 * lowbit.quant_loss(qm)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step_batch()
    sched.step_epoch()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each QAT preset, trained a few steps, converted and exported once."""
    out = {}
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    folder = tmp_path_factory.mktemp("qat")
    for name in QAT_PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = lowbit.prepare_qat(net(), QuantConfig.preset(name))
            train_a_little(qm)
            dm = lowbit.convert(qm)
            report = lowbit.export_onnx(dm, folder / f"{name}.onnx", (x,))
        out[name] = (qm.eval(), dm, report, x)
    return out


@pytest.mark.parametrize("preset", sorted(QAT_PRESETS))
def test_converted_model_computes_what_the_trained_model_computes_in_eval(preset, exported):
    qm, dm, _, x = exported[preset]
    with torch.no_grad():
        expected, got = qm(x), dm(x)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, atol=1e-4 * scale, rtol=0), \
        (got - expected).abs().max() / scale


@pytest.mark.parametrize("preset", sorted(QAT_PRESETS))
def test_onnx_runtime_agrees_with_the_deploy_model(preset, exported):
    _, _, report, _ = exported[preset]
    parity = report.parity
    assert parity.output_max_lsb is None or parity.output_max_lsb <= 1.5, parity
    if parity.codes_identical is not None:
        assert parity.codes_identical >= 0.995 and parity.codes_max_diff <= 1, parity


@pytest.mark.parametrize("preset", sorted(QAT_PRESETS))
def test_weights_are_integer_initializers_and_packed_to_their_bits(preset, exported):
    _, dm, report, _ = exported[preset]
    proto = onnx.load(str(report.onnx_path))
    int_types = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    float_weights = [t.name for t in proto.graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert float_weights == [], "every weight is stored as integer codes"
    assert sum(t.data_type in int_types for t in proto.graph.initializer) >= 4

    params = json.loads(report.params_path.read_text())
    bits = {name: entry["weight"]["bits"] for name, entry in params["layers"].items()}
    spec_bits = QuantConfig.preset(preset).rules[0].weight.bits
    assert spec_bits in bits.values()
    with safe_open(str(report.weights_path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name, module in dm.named_modules():
        if isinstance(module, IntWeight):
            layer = name.rsplit(".", 1)[0]
            info = json.loads(meta[f"{layer}.weight"])
            assert info["pack_bits"] == next(w for w in (1, 2, 4, 8) if w >= info["bits"])
            codes = unpack_weight(tensors, meta, f"{layer}.weight")
            stored = module.codes.to(torch.int64)
            if module.grid.signed is False and info["qmin"] >= 0 and stored.min() >= 0 \
                    and not torch.equal(codes, stored):
                stored = stored - 128  # weights stored as uint8 for this CPU's kernels
            assert torch.equal(codes, stored), layer


@pytest.mark.parametrize("preset, values", [("w1a8-xnor", 2), ("w2a8-slb", 4),
                                            ("w1-slb", 2), ("w2-dorefa", 4)])
def test_low_bit_layers_hold_only_their_value_set(preset, values, exported):
    _, dm, _, _ = exported[preset]
    middle = dm[3].weight  # the first and last layers are 8-bit by the preset's rule
    for channel in middle.codes.to(torch.int64):
        assert channel.unique().numel() <= values


def test_activation_modules_quantize_their_output_where_a_rule_names_them(tmp_path):
    """NNI's BNN recipe: binary weights, binary outputs of every Hardtanh."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Hardtanh(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 3))
    cfg = QuantConfig(rules=[
        lowbit.LayerRule(types=["Conv2d", "Linear"],
                         weight=lowbit.QuantSpec(bits=1, method="binary")),
        lowbit.LayerRule(types=["Hardtanh"], output=lowbit.QuantSpec(bits=1, method="binary"))])
    assert [layer.type for layer in lowbit.plan(model, cfg).layers] == \
        ["Conv2d", "Hardtanh", "Conv2d", "Linear"], "ReLU has no rule: not a plan entry"
    qm = lowbit.prepare_qat(model, cfg)
    assert type(qm[2]).__name__ == "QuantHardtanh" and qm[0].activation is None
    assert isinstance(qm[3].activation, nn.ReLU), "a ReLU without a rule still fuses"
    x = torch.randn(4, 1, 8, 8)
    out = qm[2](torch.randn(5, 4, 6, 6))
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    qm(x)
    dm = lowbit.convert(qm.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(dm, tmp_path / "bnn.onnx", (x,))
    assert report.parity.output_max_lsb <= 1.0
    params = json.loads(report.params_path.read_text())
    assert params["layers"]["2"]["output"]["bits"] == 1
    assert len(lowbit.plan(model, QuantConfig.preset("w8a8")).layers) == 3, \
        "activations stay out of plans whose rules do not name them"
