"""Concatenations between quantized layers (Inception branches, DenseNet blocks, U-Net skips)
are quantized by the presets like residual adds: each input gets the layers' input spec, so
ONNX Runtime runs the concatenation as ``QLinearConcat`` and the convs feeding it on integer
kernels."""

from __future__ import annotations

import collections
import json
import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.export.deploy import CAT_FIX, deploy_graph
from lowbit.export.ort_graph import optimized_model
from lowbit.nn import Cat, QuantCat


class Branches(nn.Module):
    """An Inception-style block: two branches concatenated along channels, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.c(y).mean((2, 3))


class Dense(nn.Module):
    """DenseNet-style: each layer reads the concatenation of everything before it, so the
    block's input is read by a conv *and* a cat; a three-way cat with ``dim`` by position."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.l1, self.l2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y1 = torch.relu(self.l1(x))
        y2 = torch.relu(self.l2(torch.cat((x, y1), 1)))
        return self.head(torch.cat((x, y1, y2), dim=1))


def _batches(n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(4, 3, 8, 8) for _ in range(n)]


def _quantized(model: nn.Module, config: QuantConfig) -> nn.Module:
    qm = lowbit.quantize(model, config)
    lowbit.calibrate(qm, _batches(), progress=False)
    return qm


def _export(qm: nn.Module, path) -> lowbit.ExportReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.export_onnx(lowbit.convert(qm), path, (torch.randn(2, 3, 8, 8),))


def _cats(plan):
    return {layer.name: layer for layer in plan.layers if layer.type == "cat"}


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w8a8-qat", "w4a8-lsq"])
def test_presets_quantize_each_input_of_a_cat_between_quantized_layers(preset):
    torch.manual_seed(0)
    cats = _cats(lowbit.plan(Branches().eval(), QuantConfig.preset(preset)))
    assert list(cats) == ["op_cat"] and cats["op_cat"].input is not None


def test_a_cat_between_quantized_convs_runs_as_qlinearconcat(tmp_path):
    torch.manual_seed(0)
    model = Branches().eval()
    qm = _quantized(model, QuantConfig.preset("w8a8"))
    assert isinstance(qm.op_cat, QuantCat)
    assert qm.op_cat.input_quant is not None and qm.op_cat.other_quant is not None
    x = torch.randn(2, 3, 8, 8)
    cos = nn.functional.cosine_similarity(model(x).flatten(), qm(x).flatten(), dim=0)
    assert cos > 0.99
    path = tmp_path / "branches.onnx"
    report = _export(qm, path)
    ops = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ops["QLinearConcat"] == 1 and ops["Concat"] == 0, ops
    assert ops["Conv"] + ops["FusedConv"] == 0 and ops["QLinearConv"] == 4, ops
    kernels = {k.name: k for k in report.deploy.layers}
    assert kernels["op_cat"].op == "QLinearConcat" and kernels["op_cat"].integer
    assert not any("Concat" in op for op in report.deploy.float_ops_between)


def test_a_float_cat_is_reported_with_its_fix(tmp_path):
    """Without the presets' placement rules the branch convs feed a float Concat: the report
    says so for each, with the rule that fixes it."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, symmetric=False)
    plain = QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=QuantSpec(bits=8), input=spec)])
    report = _export(_quantized(Branches().eval(), plain), tmp_path / "plain.onnx")
    kernels = {k.name: k for k in report.deploy.layers}
    for name in ("a", "b"):
        assert kernels[name].integer is False
        assert "Concat" in kernels[name].reason and kernels[name].fix == CAT_FIX
    assert any(op.startswith("Concat") for op in report.deploy.float_ops_between)


def test_dense_blocks_share_one_quantizer_per_tensor_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Dense().eval()
    config = QuantConfig.preset("w8a8")
    qm = _quantized(model, config)
    first, second = qm.op_cat, qm.op_cat_1
    assert isinstance(second, QuantCat) and second.input_slots() == (
        "input_quant", "other_quant", "input_quant_2")
    # x is read by l1 and by both cats; y1 by l2's cat and the head's cat: one quantizer each.
    assert first.input_quant is qm.l1.input_quant is second.input_quant
    assert first.other_quant is second.other_quant

    fresh = lowbit.quantize(model, config)
    fresh.load_state_dict(qm.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh.eval()(x), qm.eval()(x))

    path = tmp_path / "dense.onnx"
    report = _export(qm, path)
    assert report.parity.codes_identical == 1.0
    ops = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ops["QLinearConcat"] == 2 and ops["Concat"] == 0, ops
    params = json.loads(path.with_suffix(".quant_params.json").read_text())
    assert {"input", "other", "input_2"} <= set(params["layers"]["op_cat_1"])
    from_params = deploy_graph(path, params=params)
    assert {k.name: k.op for k in from_params.layers}["op_cat_1"] == "QLinearConcat"


class Gated(nn.Module):
    """Does not trace with fx as a whole (data-dependent branch); its block does."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Branches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # noqa: PLR2004 - control flow fx cannot trace
            x = x * 0
        return self.block(x)


def test_cats_in_blocks_that_trace_are_placed_when_the_whole_model_does_not():
    torch.manual_seed(0)
    qm = lowbit.quantize(Gated().eval(), QuantConfig.preset("w8a8"),
                         example_inputs=(torch.randn(1, 3, 8, 8),))
    assert isinstance(qm.block.op_cat, QuantCat)
    assert type(qm).__name__ == "Gated", "the model keeps its class"


def test_cat_module_checks_its_arguments():
    with pytest.raises(TypeError, match="`dim` must be an int"):
        Cat(dim="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`inputs` must be a positive int"):
        Cat(dim=1, inputs=0)
    with pytest.raises(ValueError, match="built for 3 inputs and got 2"):
        Cat(dim=1, inputs=3)(torch.ones(1, 2), torch.ones(1, 2))
    assert Cat(dim=1)(torch.ones(1, 2), torch.ones(1, 3)).shape == (1, 5)


class PoolBranch(nn.Module):
    """A max-pool branch beside conv branches (Inception's pool projection), a max pool in a
    float region (before any quantized layer reads it) and one that returns indices."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.MaxPool2d(2, return_indices=True)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.pool, self.proj = nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.pre(x)
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.proj(self.pool(x)))], dim=1)
        return self.c(y).mean((2, 3))


def test_a_max_pool_between_quantized_layers_shares_its_inputs_quantizer(tmp_path):
    """The pool reads the tensor through the quantizer its sibling conv reads it with, and the
    conv after the pool shares it too (max pooling keeps values on the grid): ONNX Runtime
    drops the DQ/Q pair and pools uint8, and the stem conv runs on an integer kernel."""
    torch.manual_seed(0)
    model = PoolBranch().eval()
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    pools = {x.name: x for x in plan.layers if x.type.startswith("MaxPool")}
    assert list(pools) == ["pool"] and pools["pool"].input is not None  # not `pre`
    qm = _quantized(model, QuantConfig.preset("w8a8"))
    assert qm.pool.input_quant is qm.a.input_quant is qm.proj.input_quant
    assert isinstance(qm.pre, nn.MaxPool2d)
    x = torch.randn(2, 3, 8, 8)
    assert nn.functional.cosine_similarity(model(x).flatten(), qm(x).flatten(), dim=0) > 0.99
    path = tmp_path / "pool.onnx"
    report = _export(qm, path)
    ops = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ops["MaxPool"] == 1, ops  # `pre`, on the float input
    assert ops["NhwcMaxPool"] == 1 and ops["QLinearConcat"] == 1, ops
    assert report.deploy.float_kernels == 0 and not report.deploy.float_quantized
    assert report.parity.codes_identical == 1.0


class UNet(nn.Module):
    """Encoder, max-pool down, nearest upsample, skip concatenation, decoder; a bilinear
    upsample on the side (interpolation leaves the grid: never wrapped)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = nn.Upsample(scale_factor=1, mode="bilinear")
        self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        y = self.dec(torch.cat([self.up(e2), self.smooth(e1)], 1))
        return self.head(y).mean((2, 3))


def test_a_unet_runs_every_conv_pool_upsample_and_concat_on_integers(tmp_path):
    torch.manual_seed(0)
    model = UNet().eval()
    qm = _quantized(model, QuantConfig.preset("w8a8"))
    assert type(qm.up).__name__ == "QuantUpsample" and isinstance(qm.smooth, nn.Upsample)
    assert qm.up.input_quant is qm.op_cat.input_quant, "nearest upsampling keeps the grid"
    assert qm.down.input_quant is qm.enc2[0].input_quant
    path = tmp_path / "unet.onnx"
    report = _export(qm, path)
    kernels = {k.name: k for k in report.deploy.layers}
    assert kernels["op_cat"].op == "QLinearConcat"
    assert all(k.integer for k in kernels.values()), kernels
    ops = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ops["NhwcMaxPool"] == 1 and ops["Resize"] == 2, ops
    # Only the bilinear branch runs in float (its input's ReLU and the interpolation).
    floats = report.deploy.float_ops_between
    assert sorted(op.split()[0] for op in floats) == ["Relu", "Resize"], floats
    assert any("bilinear" in op for op in floats), floats
    assert report.parity.codes_identical == 1.0


class FunctionalUNet(nn.Module):
    """The U-Net with its pool and upsamplings written as calls (``F.max_pool2d``,
    ``F.interpolate``, ``torch.max_pool2d``), as many segmentation models write them."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        up = nn.functional.interpolate(e2, scale_factor=2)  # mode="nearest" by default
        up = torch.max_pool2d(up, kernel_size=3, stride=1, padding=1)  # after the upsampling
        side = nn.functional.interpolate(e1, scale_factor=1.0, mode="bilinear")
        y = self.dec(torch.cat([up, side], 1))
        return self.head(y).mean((2, 3))


def test_functional_pools_and_upsamplings_become_modules_on_integers(tmp_path):
    torch.manual_seed(0)
    model = FunctionalUNet().eval()
    plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    placed = {x.name: x.type for x in plan.quantized if x.type in ("MaxPool2d", "Upsample")}
    assert placed == {"op_max_pool2d": "MaxPool2d", "op_interpolate": "Upsample",
                      "op_max_pool2d_1": "MaxPool2d"}, placed  # not the bilinear one
    qm = _quantized(model, QuantConfig.preset("w8a8"))
    assert isinstance(qm.op_max_pool2d.module, nn.MaxPool2d)
    assert qm.op_max_pool2d.module.kernel_size == 2 and qm.op_max_pool2d.module.stride == 2
    assert qm.op_max_pool2d_1.module.padding == 1 and qm.op_max_pool2d_1.module.stride == 1
    assert qm.op_interpolate.module.mode == "nearest"
    assert qm.op_max_pool2d.input_quant is qm.enc2[0].input_quant
    assert qm.op_interpolate.input_quant is qm.op_max_pool2d_1.input_quant \
        is qm.op_cat.input_quant, "the upsampling and the pool keep the grid"
    x = _batches(1)[0]
    assert nn.functional.cosine_similarity(model(x).flatten(), qm(x).flatten(), dim=0) > 0.99
    assert not hasattr(model, "op_max_pool2d"), "the caller's model is left as it was"
    path = tmp_path / "unet.onnx"
    report = _export(qm, path)
    ops = collections.Counter(n.op_type for n in optimized_model(path).graph.node)
    assert ops["NhwcMaxPool"] == 2 and ops["QLinearConcat"] == 1, ops
    floats = report.deploy.float_ops_between
    assert sorted(op.split()[0] for op in floats) == ["Relu", "Resize"], floats
    kernels = {k.name: k for k in report.deploy.layers}
    assert kernels["op_cat"].op == "QLinearConcat"
    assert all(k.integer for k in kernels.values()), kernels
    assert report.parity.codes_identical == 1.0


def test_functional_pools_that_cannot_be_modules_stay_calls():
    """Indices returned, a size computed at run time: the calls stay as they are."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = nn.functional.max_pool2d(self.a(x), 2, return_indices=True)
            y = nn.functional.interpolate(self.b(y), size=x.shape[-2:])
            return self.c(y)

    torch.manual_seed(0)
    qm = _quantized(Odd().eval(), QuantConfig.preset("w8a8"))
    assert not [n for n, _ in qm.named_modules() if "op_max_pool" in n or "op_interp" in n]
    x = _batches(1)[0]
    assert qm(x).shape == (4, 4, 8, 8)
