"""``lowbit.plan`` and ``lowbit.quantize``: per-layer entries, BN fusions, skipped layers,
editable plans, functional ops, warnings and copying."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from models import Residual
from torch import nn

import lowbit
from lowbit import LayerRule, Plan, QuantConfig, QuantSpec
from lowbit.deploy import DeployBinary
from lowbit.nn import QuantAdd, QuantConv2d, QuantLinear
from lowbit.registry import LAYERS

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")
CFG = QuantConfig(rules=[LayerRule(types=["Conv2d", "Linear"], weight=W8, input=A8)])


def cnn() -> nn.Sequential:
    """Two Conv-BN-ReLU chains (one depthwise), then a Linear head."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding shows
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class Wired(nn.Module):
    """Not a Sequential, and the BN is declared before its conv: only torch.fx finds the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return self.head(y.mean(dim=(2, 3)))


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.fc = nn.Linear(4, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(idx))


def _quantize(model: nn.Module, config, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(model, config, **kwargs)


# ------------------------------------------------------------------------------ plan


def test_plan_has_one_entry_per_quantizable_layer() -> None:
    the_plan = lowbit.plan(cnn(), CFG)
    assert [(x.name, x.type) for x in the_plan.layers] == [
        ("0", "Conv2d"), ("3", "Conv2d"), ("8", "Linear")]
    entry = the_plan["8"]
    assert (entry.weight, entry.input, entry.output) == (W8, A8, None)
    assert the_plan.skipped == {} and the_plan.float_layers == {}
    with pytest.raises(KeyError, match=r"no layer 'fc' in the plan; layers: \['0', '3', '8'\]"):
        the_plan["fc"]


def test_sequential_fusions() -> None:
    assert lowbit.plan(cnn(), CFG).fusions == (("0", "1", "2"), ("3", "4", "5"))


def test_fusions_found_through_fx_in_a_non_sequential_model() -> None:
    assert lowbit.plan(Wired(), CFG).fusions == (("conv", "bn", "act"),)


def test_fuse_bn_false_finds_no_fusions() -> None:
    cfg = QuantConfig(rules=CFG.rules, fuse_bn=False)
    assert lowbit.plan(cnn(), cfg).fusions == ()


def test_unsupported_weighted_layers_are_listed_with_a_reason() -> None:
    the_plan = lowbit.plan(WithUnsupported(), CFG)
    assert [x.name for x in the_plan.layers] == ["fc"]
    assert the_plan.skipped == {"emb": "Embedding is quantized only where a rule names the type",
                                "up": "ConvTranspose2d is not supported yet"}
    assert "emb" in the_plan.summary() and "ConvTranspose2d is not supported" in the_plan.summary()


def test_batchnorm_without_a_preceding_layer_is_listed() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    the_plan = lowbit.plan(model, CFG)
    assert the_plan.skipped == {"0": "BatchNorm not directly after a Conv/Linear: left in float"}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("model", [cnn, WithUnsupported], ids=["cnn", "with-skipped"])
def test_plan_file_round_trip(model, suffix: str, tmp_path: Path) -> None:
    the_plan = lowbit.plan(model(), CFG)
    path = tmp_path / f"plan{suffix}"
    the_plan.to_file(path)
    assert Plan.from_file(path) == the_plan
    assert Plan.from_dict(the_plan.to_dict()) == the_plan


def test_plan_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        lowbit.plan("resnet18", CFG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`config` must be a QuantConfig, got str"):
        lowbit.plan(cnn(), "w8a8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`example_inputs` must be a tuple .*got Tensor; "
                                        r"write \(x,\)"):
        lowbit.plan(cnn(), CFG, torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], TypeError, r"a Plan must be a mapping, got list"),
        ({"version": 3}, ValueError, r"Plan file version 3 is not supported"),
        ({"layers": ["0"]}, TypeError, r"Plan `layers` must map layer names to entries"),
        ({"layers": {"0": {"weight": None}}}, ValueError,
         r"plan entry '0' must be a mapping with a `type`"),
        ({"layers": {"0": {"type": "Conv2d", "bias": None}}}, ValueError,
         r"plan entry '0' has unknown field\(s\) \['bias'\]"),
        ({"layers": {"0": {"type": "Conv3d"}}}, ValueError,
         rf"`type of layer '0'` must be one of {re.escape(str(LAYERS.names()))}, got 'Conv3d'"),
        ({"layers": {"0": {"type": "Conv2d", "weight": {"bits": 16}}}}, ValueError,
         r"QuantSpec.`bits` must be an integer in 1..8, got 16"),
    ],
    ids=["not-mapping", "version", "layers-list", "no-type", "unknown-field", "unknown-type",
         "bad-spec"],
)
def test_plan_from_dict_errors(data, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Plan.from_dict(data)


def test_plan_rejects_duplicate_layers() -> None:
    entry = lowbit.LayerPlan(name="0", type="Conv2d", weight=W8)
    with pytest.raises(ValueError, match=r"Plan lists these layers more than once: \['0'\]"):
        Plan(layers=[entry, entry])


# ------------------------------------------------------------------------------ edited plans


def test_edited_plan_keeps_a_layer_float_and_changes_bits(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    lowbit.plan(cnn(), CFG).to_file(path)
    data = Plan.from_file(path).to_dict()
    data["layers"]["3"].update(weight=None, input=None)  # keep the depthwise conv float
    data["layers"]["8"]["weight"]["bits"] = 4
    Plan.from_dict(data).to_file(path)

    qm = _quantize(cnn(), Plan.from_file(path))
    assert isinstance(qm[0], QuantConv2d)
    assert type(qm[3]) is nn.Conv2d
    assert isinstance(qm[5], nn.ReLU)  # a float layer keeps its own ReLU
    assert isinstance(qm[8], QuantLinear) and qm[8].weight_quant.grid.bits == 4
    assert qm.lowbit_plan.float_layers == {"3": "kept in float by the config"}
    assert qm(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_plan_naming_a_missing_layer() -> None:
    the_plan = Plan(layers=[lowbit.LayerPlan(name="features.0", type="Conv2d", weight=W8)])
    with pytest.raises(ValueError, match=r"the plan names layer 'features.0', which the model "
                                         r"lacks"):
        lowbit.quantize(cnn(), the_plan)


def test_plan_with_the_wrong_type() -> None:
    the_plan = Plan(layers=[lowbit.LayerPlan(name="8", type="Conv2d", weight=W8)])
    with pytest.raises(ValueError, match=r"the plan says layer '8' is a Conv2d, but the model's "
                                         r"is a Linear"):
        lowbit.quantize(cnn(), the_plan)


@pytest.mark.parametrize(
    ("fusion", "match"),
    [(("0", "nope"), r"fusion \['0', 'nope'\] names a module the model lacks"),
     (("2", "1"), r"fusion \['2', '1'\] must start with a Conv1d/Conv2d/Linear followed by a "
                  r"BatchNorm, got ReLU and BatchNorm2d")],
    ids=["missing", "wrong-order"],
)
def test_plan_with_a_bad_fusion(fusion, match: str) -> None:
    the_plan = Plan(layers=lowbit.plan(cnn(), CFG).layers, fusions=[fusion])
    with pytest.raises(ValueError, match=match):
        lowbit.quantize(cnn(), the_plan)


# ------------------------------------------------------------------------------ quantize


def test_quantize_folds_bn_and_moves_relu_into_the_wrapper() -> None:
    model = cnn()
    x = torch.randn(2, 3, 8, 8)
    qm = _quantize(model, CFG)
    assert isinstance(qm[1], nn.Identity) and isinstance(qm[2], nn.Identity)
    assert isinstance(qm[0].activation, nn.ReLU)
    # Before calibration activations pass through; folded, fake-quantized weights stay close.
    torch.testing.assert_close(qm(x), model(x), atol=0.05, rtol=0.05)


def test_functional_add_is_planned_quantized_calibrated_and_converted() -> None:
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=W8, input=A8),
                             LayerRule(types=["add"], input=A8)])
    x = torch.randn(4, 4, 6, 6)
    the_plan = lowbit.plan(Residual().eval(), cfg, (x,))
    assert [(e.name, e.type) for e in the_plan.layers] == [("conv", "Conv2d"), ("op_add", "add")]
    assert the_plan["op_add"].weight is None and the_plan["op_add"].input == A8

    model = Residual().eval()
    qm = lowbit.quantize(model, cfg, example_inputs=(x,))
    assert isinstance(qm.op_add, QuantAdd)
    assert qm.op_add.input_quant is not None and qm.op_add.other_quant is not None
    assert lowbit.calibrate(qm, [x], progress=False) == 1
    assert qm.op_add.input_quant.is_ready() and qm.op_add.other_quant.is_ready()
    dm = lowbit.convert(qm)
    assert isinstance(dm.op_add, DeployBinary)
    # uint8 steps of inputs in [-3, 3] are ~0.025; the sum carries three such roundings.
    torch.testing.assert_close(dm(x), model(x), atol=0.1, rtol=0)


def test_add_rule_with_a_weight_spec_is_rejected() -> None:
    the_plan = Plan(layers=[lowbit.LayerPlan(name="op_add", type="add", weight=W8)])
    with pytest.raises(ValueError, match=r"layer 'op_add' \(Add\) has no weight; its rule's "
                                         r"`weight` spec cannot apply"):
        lowbit.quantize(Residual(), the_plan)


@pytest.mark.parametrize(
    "config",
    [QuantConfig(rules=[]),
     QuantConfig(rules=[LayerRule(types=["Conv1d"], weight=W8)]),
     QuantConfig(rules=[LayerRule(types=["Linear"])])],
    ids=["no-rules", "no-matching-type", "float-rule"],
)
def test_nothing_to_quantize(config: QuantConfig) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"nothing to quantize: no layer of the model matches a "
                                         r"rule with a spec"):
        lowbit.quantize(model, config)


def test_quantize_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got NoneType"):
        lowbit.quantize(None, CFG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`config` must be a QuantConfig or a Plan, got dict"):
        lowbit.quantize(cnn(), CFG.to_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`model` is already quantized; pass the float model"):
        lowbit.quantize(_quantize(cnn(), CFG), CFG)


def test_quantize_warns_once_naming_every_float_layer() -> None:
    cfg = QuantConfig(rules=[*CFG.rules, LayerRule(names=["fc"])])  # fc float by the config
    model = nn.Sequential()
    model.add_module("body", WithUnsupported())
    model.add_module("fc", nn.Linear(4, 4))
    model.add_module("out", nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, cfg)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0] == ("lowbit left 3 layer(s) in float: fc: kept in float by the config; "
                           "body.emb: Embedding is quantized only where a rule names the type; "
                           "body.up: ConvTranspose2d is not supported yet")


def test_quantize_without_float_layers_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(cnn(), CFG)


def test_quantize_copies_the_model() -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = lowbit.quantize(model, CFG)
    assert qm is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in qm.parameters()}
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.BatchNorm2d)


def test_quantize_inplace_changes_the_model() -> None:
    model = cnn()
    weight = model[0].weight.detach().clone()
    qm = lowbit.quantize(model, CFG, inplace=True)
    assert qm is model
    assert isinstance(model[0], QuantConv2d) and isinstance(model[1], nn.Identity)
    assert not torch.equal(model[0].weight.detach(), weight)  # BN folded into it


def test_quantize_keeps_each_layers_training_flag() -> None:
    qm = _quantize(cnn().train(), CFG)
    assert all(m.training for m in qm.modules())
    qm = _quantize(cnn().eval(), CFG)
    assert not any(m.training for m in qm.modules() if not isinstance(m, nn.Identity))


@pytest.mark.parametrize("preset", QuantConfig.presets())
def test_every_preset_plan_round_trips(preset: str, tmp_path: Path) -> None:
    the_plan = lowbit.plan(cnn(), QuantConfig.preset(preset))
    if preset.startswith("w4-g"):  # groups wider than the CNN's 8-wide head: float, and told
        assert "does not divide its 8 input channels" in the_plan.float_layers["8"]
    else:
        assert the_plan.quantized, "every preset quantizes the CNN's layers"
    for suffix in (".yaml", ".json"):
        the_plan.to_file(tmp_path / f"plan{suffix}")
        assert Plan.from_file(tmp_path / f"plan{suffix}") == the_plan


def test_a_layer_whose_width_does_not_fit_the_group_size_stays_float_and_is_told():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    the_plan = lowbit.plan(model, QuantConfig.preset("w4-g128"))
    assert [layer.name for layer in the_plan.quantized] == ["0"]
    assert "group_size 128 does not divide its 64 input channels" in the_plan.float_layers["2"]


def test_a_float_add_is_no_float_layer():
    """The presets leave a residual add into a LayerNorm float (no quantized layer reads it):
    it stays in the plan, to edit, but quantize warns of no float layer and the report lists
    none."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.ln = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.fc2(torch.relu(self.fc1(x))) + x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = lowbit.quantize(Residual().eval(), QuantConfig.preset("w8a8"))
    assert qm.lowbit_plan["op_add"].is_float
    assert qm.lowbit_plan.float_layers == {}
