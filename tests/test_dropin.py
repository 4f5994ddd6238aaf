"""Quant wrappers and deploy modules are drop-in for the float layers they replace; transposed
Linears (transformers' ``Conv1D``) and weight-normed layers are quantized; every other module
holding a weight is listed in ``Plan.skipped`` and in the ``quantize`` warning."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowbit
from lowbit import LayerRule, Plan, QuantConfig, QuantSpec
from lowbit.deploy import DynamicLinear, IntWeight
from lowbit.float_modules import public_attributes
from lowbit.nn import Add, Cat, MatMul, Mul, QuantConv1d, QuantLayer, QuantLinear
from lowbit.registry import LAYERS

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")
DYNAMIC = QuantSpec(bits=8, symmetric=False, dynamic=True)


class Holder(nn.Module):
    """One layer under test, called with its inputs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None,
                c: torch.Tensor | None = None) -> torch.Tensor:
        if b is None:
            return self.layer(a)
        return self.layer(a, b) if c is None else self.layer(a, b, c)


def _randn(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


# One float module per registered layer type (and the transposed Linear), its inputs, its rule.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]],
                       LayerRule]] = {
    "Linear": (lambda: nn.Linear(6, 5), _randn(3, 6),
               LayerRule(types=["Linear"], weight=W8, input=A8)),
    "Conv1D": (lambda: Conv1D(5, 6), _randn(2, 3, 6),
               LayerRule(types=["Linear"], weight=W8, input=A8)),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), _randn(2, 4, 9),
               LayerRule(types=["Conv1d"], weight=W8, input=A8)),
    "Conv2d": (lambda: nn.Conv2d(4, 6, (3, 1), padding=(1, 0), padding_mode="reflect",
                                 bias=False), _randn(2, 4, 5, 5),
               LayerRule(types=["Conv2d"], weight=W8, input=A8)),
    "Embedding": (lambda: nn.Embedding(10, 4, padding_idx=0),
                  lambda: (torch.randint(0, 10, (2, 5)),),
                  LayerRule(types=["Embedding"], weight=W8)),
    "ReLU": (lambda: nn.ReLU(inplace=False), _randn(2, 6),
             LayerRule(types=["ReLU"], output=A8)),
    "ReLU6": (nn.ReLU6, _randn(2, 6), LayerRule(types=["ReLU6"], output=A8)),
    "Hardtanh": (lambda: nn.Hardtanh(-2.0, 1.5), _randn(2, 6),
                 LayerRule(types=["Hardtanh"], output=A8)),
    "Sigmoid": (nn.Sigmoid, _randn(2, 6), LayerRule(types=["Sigmoid"], output=A8)),
    "SiLU": (lambda: nn.SiLU(inplace=False), _randn(2, 6), LayerRule(types=["SiLU"], output=A8)),
    "add": (Add, lambda: (torch.randn(2, 6), torch.randn(2, 6)),
            LayerRule(types=["add"], input=A8)),
    "mul": (Mul, lambda: (torch.randn(2, 6, 3, 3), torch.rand(2, 6, 1, 1)),
            LayerRule(types=["mul"], input=A8)),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(2), _randn(2, 4, 9),
                          LayerRule(types=["AdaptiveAvgPool1d"], input=A8)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(1), _randn(2, 4, 5, 5),
                          LayerRule(types=["AdaptiveAvgPool2d"], input=A8, output=A8)),
    "AvgPool1d": (lambda: nn.AvgPool1d(3), _randn(2, 4, 9),
                  LayerRule(types=["AvgPool1d"], input=A8)),
    "AvgPool2d": (lambda: nn.AvgPool2d(4, ceil_mode=True), _randn(2, 4, 5, 5),
                  LayerRule(types=["AvgPool2d"], input=A8, output=A8)),
    "matmul": (MatMul, lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5)),
               LayerRule(types=["matmul"], input=A8)),
    "MaxPool1d": (lambda: nn.MaxPool1d(3, 2, 1), _randn(2, 4, 9),
                  LayerRule(types=["MaxPool1d"], input=A8)),
    "MaxPool2d": (lambda: nn.MaxPool2d((3, 2), ceil_mode=True), _randn(2, 4, 7, 7),
                  LayerRule(types=["MaxPool2d"], input=A8)),
    "Upsample": (lambda: nn.Upsample(scale_factor=2), _randn(2, 4, 3, 3),
                 LayerRule(types=["Upsample"], input=A8)),
    "cat": (lambda: Cat(dim=1, inputs=3),
            lambda: (torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 2)),
            LayerRule(types=["cat"], input=A8)),
}


def test_every_registered_layer_type_has_a_drop_in_case():
    """A newly registered layer type must join the attribute check below."""
    assert set(LAYERS.names()) <= set(CASES), sorted(set(LAYERS.names()) - set(CASES))


def _quantized_and_deployed(case: str, rule: LayerRule) -> tuple[nn.Module, nn.Module, nn.Module,
                                                                  tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    build, inputs, _ = CASES[case]
    model = Holder(build()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing left in float here; warnings tested below
        qm = lowbit.quantize(model, QuantConfig(rules=[rule]))
    batches = [inputs() for _ in range(3)]
    lowbit.calibrate(qm, batches, progress=False)
    return model, qm, lowbit.convert(qm), batches[0]


def _check_like(float_layer: nn.Module, layer: nn.Module, transposed: bool) -> None:
    """``layer`` exposes what model code reads off ``float_layer``."""
    attributes = public_attributes(float_layer)
    for key, value in attributes.items():
        assert getattr(layer, key) == value, (type(layer).__name__, key)
    weight = getattr(float_layer, "weight", None)
    if weight is None:
        return
    w = layer.weight
    shape = weight.t().shape if transposed else weight.shape
    assert tuple(w.shape) == tuple(shape) and w.size() == shape and w.size(-1) == shape[-1]
    assert w.dtype == weight.dtype and w.device == weight.device
    assert w.ndim == weight.ndim and w.dim() == weight.dim() and w.numel() == weight.numel()
    values = w if isinstance(w, torch.Tensor) else w()
    assert values.dtype == w.dtype
    expected = weight.t() if transposed else weight
    step = expected.detach().abs().amax() / 127
    assert (values - expected).abs().max() <= step, "the weight's values are the float ones"
    if not hasattr(float_layer, "bias"):  # Embedding
        assert not hasattr(layer, "bias")
        return
    bias = float_layer.bias
    if bias is None:
        assert layer.bias is None
    else:
        assert isinstance(layer.bias, torch.Tensor) and layer.bias.shape == bias.shape
        assert torch.allclose(layer.bias, bias, atol=1e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrappers_and_deploy_modules_expose_the_float_attributes(case):
    model, qm, dm, x = _quantized_and_deployed(case, CASES[case][2])
    transposed = case == "Conv1D"
    assert isinstance(qm.layer, QuantLayer)
    for layer in (qm.layer, dm.layer):
        _check_like(model.layer, layer, transposed)
    with torch.no_grad():
        want, got = model(*x), dm(*x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 0.1 * want.abs().max() + 1e-6


@pytest.mark.parametrize("case", ["Linear", "Conv1D"])
def test_dynamic_deploy_linears_expose_the_float_attributes(case):
    model, qm, dm, x = _quantized_and_deployed(
        case, LayerRule(types=["Linear"], weight=W8, input=DYNAMIC))
    assert isinstance(dm.layer, DynamicLinear)
    _check_like(model.layer, dm.layer, transposed=case == "Conv1D")


def test_a_dynamic_linear_without_bias_has_bias_none():
    model = Holder(nn.Linear(6, 5, bias=False)).eval()
    qm = lowbit.quantize(model, QuantConfig(rules=[LayerRule(types=["Linear"], weight=W8,
                                                             input=DYNAMIC)]))
    dm = lowbit.convert(qm)
    x = torch.randn(3, 6)
    assert dm.layer.bias is None and "bias" not in dm.state_dict()
    with torch.no_grad():
        assert torch.allclose(dm(x), model(x), atol=0.05)


def test_a_layer_with_a_float_weight_keeps_it_as_weight():
    """Input-only rule: the deploy layer's ``weight`` is the float tensor itself."""
    model = Holder(nn.Linear(6, 5)).eval()
    qm = lowbit.quantize(model, QuantConfig(rules=[LayerRule(types=["Linear"], input=A8)]))
    lowbit.calibrate(qm, [torch.randn(4, 6)], progress=False)
    dm = lowbit.convert(qm)
    assert torch.equal(dm.layer.weight, model.layer.weight)
    assert torch.equal(dm.layer.bias, model.layer.bias)


class ReadsItsLayers(nn.Module):
    """Model code in the style of transformers: reads the conv's own attributes (same
    padding) and casts to the Linear's weight dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        pad = max(k - s, 0)
        x = nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        y = self.conv(x).mean(dim=(2, 3))
        return self.fc(y.to(self.fc.weight.dtype))


def test_model_code_reading_layer_attributes_exports(tmp_path):
    torch.manual_seed(0)
    model = ReadsItsLayers().eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(2, 3, 9, 9) for _ in range(3)], progress=False)
    dm = lowbit.convert(qm)
    report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(2, 3, 9, 9),))
    assert report.parity.output_max_abs < 1e-4


# ------------------------------------------------------------------ transposed Linear (Conv1D)


class TwoConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = Conv1D(12, 6), Conv1D(6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_conv1d_is_planned_as_a_linear_and_keeps_its_class_name(tmp_path):
    the_plan = lowbit.plan(TwoConv1D(), QuantConfig.preset("w8a8"))
    assert [(x.name, x.type, x.module_type) for x in the_plan.layers] == [
        ("up", "Linear", "Conv1D"), ("down", "Linear", "Conv1D")]
    assert "Linear(Conv1D)" in the_plan.summary()
    the_plan.to_file(tmp_path / "plan.yaml")
    again = Plan.from_file(tmp_path / "plan.yaml")
    assert again == the_plan
    qm = lowbit.quantize(TwoConv1D(), again)
    assert isinstance(qm.up, QuantLinear) and (qm.up.nf, qm.up.nx) == (12, 6)


def test_conv1d_checkpoints_keep_its_layout_and_round_trip_exactly():
    torch.manual_seed(0)
    model = TwoConv1D().eval()
    xs = [torch.randn(4, 3, 6) for _ in range(3)]
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, xs, progress=False)
    state = qm.state_dict()
    assert state["up.weight"].shape == model.up.weight.shape == (6, 12)  # Conv1D's (in, out)
    assert torch.equal(state["up.weight"], model.up.weight)

    fresh = lowbit.quantize(TwoConv1D().eval(), QuantConfig.preset("w8a8"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.up.weight, qm.up.weight)
    with torch.no_grad():
        assert torch.equal(fresh(xs[0]), qm(xs[0]))
        assert torch.equal(lowbit.convert(fresh)(xs[0]), lowbit.convert(qm)(xs[0]))

    # A float checkpoint loads into the quantized model too (then refresh the weight ranges).
    other = TwoConv1D()
    fresh.load_state_dict(other.state_dict(), strict=False)
    assert torch.equal(fresh.down.weight, other.down.weight.t())


def test_conv1d_trains_under_qat_and_takes_smoothquant():
    torch.manual_seed(0)
    model = TwoConv1D().train()
    qm = lowbit.prepare_qat(model, QuantConfig.preset("w8a8"))
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    before = qm.up.weight.detach().clone()
    qm(torch.randn(4, 3, 6)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, qm.up.weight)

    sq = lowbit.quantize(model.eval(), QuantConfig.preset("w8a8-transformer"))
    # smoothing_check=False: smoothed whether or not it pays off on these random inputs
    lowbit.calibrate(sq, [torch.randn(4, 3, 6) for _ in range(2)], progress=False,
                     smoothing_check=False)
    assert sq.up.input_smoothing is not None


def test_a_look_alike_conv1d_outside_transformers_is_not_a_linear():
    class Conv1D(nn.Module):  # same name, wrong package: lowbit cannot know its forward
        def __init__(self) -> None:
            super().__init__()
            self.nf, self.nx = 4, 3
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.bias = nn.Parameter(torch.zeros(4))

    the_plan = lowbit.plan(nn.Sequential(Conv1D(), nn.Linear(4, 4)), QuantConfig.preset("w8a8"))
    assert [x.name for x in the_plan.layers] == ["1"]
    assert the_plan.skipped == {"0": "Conv1D is not supported yet"}


# ------------------------------------------------------------------ weight norm


class WeightNormed(nn.Module):
    """A weight-normed conv (new parametrization API) and Linear (old hook-based API)."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 8, 5, padding=2, groups=2)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
            self.fc = nn.utils.weight_norm(nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=2))


def test_weight_normed_layers_are_quantized_with_their_materialised_weight(tmp_path):
    torch.manual_seed(0)
    model = WeightNormed().eval()
    with torch.no_grad():  # change g without a forward: the cached old-API weight is stale
        model.fc.weight_g.mul_(2.0)
    the_plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    assert [(x.name, x.type) for x in the_plan.layers] == [("conv", "Conv1d"), ("fc", "Linear")]
    assert the_plan.skipped == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in float, nothing to say
        qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert isinstance(qm.conv, QuantConv1d) and isinstance(qm.fc, QuantLinear)
    assert qm.conv.groups == 2 and qm.conv.padding == (2,)
    assert torch.allclose(qm.conv.weight, model.conv.weight)
    xs = [torch.randn(2, 4, 16) for _ in range(3)]
    with torch.no_grad():
        model(xs[0])  # the old API refreshes its weight in forward
    assert torch.allclose(qm.fc.weight, model.fc.weight)
    lowbit.calibrate(qm, xs, progress=False)
    dm = lowbit.convert(qm)
    assert isinstance(dm.conv.weight, IntWeight) and isinstance(dm.fc.weight, IntWeight)
    with torch.no_grad():
        ref = model(xs[1])
        assert (dm(xs[1]) - ref).norm() / ref.norm() < 0.05
    report = lowbit.export_onnx(dm, tmp_path / "wn.onnx", (xs[1],))
    assert report.parity.output_max_abs < 1e-4
    # The float model is untouched.
    assert nn.utils.parametrize.is_parametrized(model.conv) and hasattr(model.fc, "weight_g")


def test_qat_says_it_trains_the_materialised_weight():
    with pytest.warns(UserWarning, match=r"weight-normed.*\['conv', 'fc'\]"):
        qm = lowbit.prepare_qat(WeightNormed(), QuantConfig.preset("w8a8"))
    assert isinstance(qm.conv.weight, nn.Parameter) and qm.conv.weight.requires_grad


# ------------------------------------------------------------------ the weight-layer rule


class Mixed(nn.Module):
    """Quantizable layers next to every kind of weight holder lowbit keeps in float."""

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 4))
            self.gain = nn.Parameter(torch.ones(4))  # 1-D: not a weight layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x @ self.kernel) * self.gain

    class MyLinear(nn.Linear):  # a subclass may compute something else with its weight
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.up = nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(4, 4, 2, stride=2))
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.custom = Mixed.Custom()
        self.mine = Mixed.MyLinear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.up(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        x, _ = self.rnn(x)
        return self.fc(self.norm(self.mine(self.custom(x))))


MIXED_SKIPPED = {
    "emb": "Embedding is quantized only where a rule names the type",
    "up": "ConvTranspose1d is not supported yet",
    "rnn": "LSTM is not supported yet (float: weight_ih_l0, weight_hh_l0)",
    "custom": "Custom is not supported yet (float: kernel)",
    "mine": "MyLinear is not supported yet",
}


def test_every_module_holding_a_weight_is_quantized_or_listed():
    the_plan = lowbit.plan(Mixed(), QuantConfig.preset("w8a8"))
    assert [x.name for x in the_plan.layers] == ["fc"]
    assert the_plan.skipped == MIXED_SKIPPED  # no LayerNorm, no parametrization internals
    with pytest.warns(UserWarning, match="left 5 layer") as record:
        qm = lowbit.quantize(Mixed(), QuantConfig.preset("w8a8"))
    message = str(record[0].message)
    for name, why in MIXED_SKIPPED.items():
        assert f"{name}: {why}" in message
    idx = torch.randint(0, 10, (2, 3))
    lowbit.calibrate(qm, [idx], progress=False)
    assert lowbit.convert(qm)(idx).shape == (2, 6, 4)


def test_a_rule_naming_embedding_takes_it_out_of_the_list():
    config = QuantConfig(rules=[*QuantConfig.preset("w8a8").rules,
                                LayerRule(types=["Embedding"], weight=W8)])
    the_plan = lowbit.plan(Mixed(), config)
    assert [x.name for x in the_plan.layers] == ["emb", "fc"]
    assert "emb" not in the_plan.skipped


def test_plan_type_mismatch_names_the_models_class():
    the_plan = lowbit.plan(TwoConv1D(), QuantConfig.preset("w8a8"))
    model = TwoConv1D()
    model.up = nn.Conv1d(6, 12, 1)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="'up' is a Linear, but the model's is a Conv1d"):
        lowbit.quantize(model, the_plan)


def test_deepcopy_and_pickle_of_a_quantized_conv1d(tmp_path: Path):
    qm = lowbit.quantize(TwoConv1D(), QuantConfig.preset("w8"))
    copied = copy.deepcopy(qm)
    torch.save(copied, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.state_dict()["up.weight"].shape == (6, 12)


def test_subclasses_that_compute_like_their_base_are_quantized_and_others_listed():
    class DepthwiseConv(nn.Conv2d):  # EfficientNet's: a constructor, the base's forward
        def __init__(self, c: int) -> None:
            super().__init__(c, c, 3, padding=1, groups=c)

    class OffsetEmbedding(nn.Embedding):  # BART's learned positions: a forward of its own
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids + 2)

    from lowbit.nn import quant_type_for

    assert quant_type_for(DepthwiseConv(4)) == "Conv2d"
    assert quant_type_for(OffsetEmbedding(10, 4)) is None
    model = nn.Sequential(DepthwiseConv(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    assert plan["0"].type == "Conv2d" and plan["0"].weight is not None


# ------------------------------------------------------------ weight-standardized convs (BiT)


def _ws_conv(**kwargs):  # noqa: ANN003, ANN202
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

    torch.manual_seed(0)
    return WeightStandardizedConv2d(4, 8, 3, **kwargs)


def test_a_weight_standardized_conv_is_a_conv2d_over_its_standardized_weight(tmp_path, quiet):
    model = nn.Sequential(_ws_conv(padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 4, 12, 12)
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    entry = next(x for x in qm.lowbit_plan.layers if x.name == "0")
    assert (entry.type, entry.module_type) == ("Conv2d", "WeightStandardizedConv2d")
    with torch.no_grad():  # the wrapper's float weight is the one the float conv convolves with
        standardized = nn.functional.conv2d(x, qm[0].weight, None, 1, 1)
        assert torch.allclose(standardized, model[0](x), atol=1e-5)
    lowbit.calibrate(qm, [torch.randn(2, 4, 12, 12) for _ in range(4)], progress=False)
    dm = lowbit.convert(qm)
    with torch.no_grad():
        got, want = dm(x).flatten(), model(x).flatten()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99
    report = lowbit.export_onnx(dm, tmp_path / "ws.onnx", (x,))
    assert report.parity.codes_identical == 1.0
    with pytest.warns(UserWarning, match=r"weight-standardized layer\(s\) directly: \['0'\]"):
        lowbit.prepare_qat(model, QuantConfig.preset("w8a8-qat"))  # trains the computed weight


def test_a_weight_standardized_conv_with_a_dynamic_pad_stays_float_and_takes_no_bn(quiet):
    padded = _ws_conv(stride=2)  # "SAME" at stride 2: a DynamicPad2d in front of the conv
    assert padded.pad is not None
    the_plan = lowbit.plan(nn.Sequential(padded, nn.ReLU()), QuantConfig.preset("w8a8"))
    assert "0" in the_plan.skipped and not the_plan.quantized
    # A BatchNorm after a standardized conv would not stay folded into a computed weight.
    with_bn = nn.Sequential(_ws_conv(padding=1), nn.BatchNorm2d(8)).eval()
    assert not lowbit.plan(with_bn, QuantConfig.preset("w8a8")).fusions
