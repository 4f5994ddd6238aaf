"""Layer-level rules: what each wrapper accepts, and flags kept consistent."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import Residual
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec

A8 = QuantSpec(bits=8, symmetric=False)
DYNAMIC = QuantSpec(bits=8, symmetric=False, dynamic=True)


def _residual_config() -> QuantConfig:
    return QuantConfig(rules=[LayerRule(types=["Conv2d"], weight=QuantSpec(), input=A8),
                              LayerRule(types=["add"], input=A8)])


def test_functional_add_follows_the_models_eval_mode_and_converts_exactly():
    x = torch.randn(2, 4, 6, 6)
    qm = lowbit.quantize(Residual().eval(), _residual_config(), example_inputs=(x,))
    assert not qm.op_add.training
    lowbit.calibrate(qm, [x], progress=False)
    frozen = qm.op_add.input_quant.scale.clone()
    with torch.no_grad():
        qm(x * 3)  # eval: ranges must not move
        assert torch.equal(qm.op_add.input_quant.scale, frozen)
        assert torch.equal(lowbit.convert(qm)(x), qm(x))


def test_functional_rules_rewrite_the_model_in_place_keeping_its_class():
    model = Residual().eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = model(x)
    qm = lowbit.quantize(model, _residual_config(), inplace=True)
    assert qm is model and type(qm) is Residual
    assert isinstance(qm.op_add, lowbit.nn.QuantAdd)
    lowbit.calibrate(qm, [x], progress=False)
    with torch.no_grad():
        assert torch.allclose(lowbit.convert(qm)(x), before, atol=0.1)


def test_adds_inside_blocks_become_modules_of_their_block_and_containers_stay():
    block = nn.Sequential(Residual(), Residual())
    qm = lowbit.quantize(block.eval(), _residual_config())
    assert isinstance(qm, nn.Sequential) and isinstance(qm[1].op_add, lowbit.nn.QuantAdd)
    assert [x.name for x in qm.lowbit_plan.layers if x.type == "add"] == ["0.op_add", "1.op_add"]
    copy = __import__("copy").deepcopy(qm)  # the rewritten forward follows the copy
    x = torch.randn(1, 4, 6, 6)
    lowbit.calibrate(qm, [x], progress=False)
    lowbit.calibrate(copy, [x], progress=False)
    with torch.no_grad():
        assert torch.equal(copy(x), qm(x))


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 3)], ids=["conv2d", "conv1d"])
def test_dynamic_inputs_are_for_linear_layers_only(layer):
    cfg = QuantConfig(rules=[LayerRule(weight=QuantSpec(granularity="per_channel"),
                                       input=DYNAMIC)])
    with pytest.raises(NotImplementedError, match="dynamic inputs are supported on Linear"):
        lowbit.quantize(nn.Sequential(layer), cfg)


def test_one_bit_is_not_a_uniform_grid():
    with pytest.raises(ValueError, match=r"bits.*for method 'ste', got 1"):
        QuantSpec(bits=1)


def test_folding_bn_of_a_training_model_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert any("training mode" in str(w.message) for w in caught)
    assert qm[1].training  # the Identity that replaced the BN keeps the BN's flag


def test_quant_params_name_the_float_layer_type(tmp_path):
    import json

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(2, 3, 6, 6)], progress=False)
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "m.onnx", (torch.randn(2, 3, 6, 6),))
    layers = json.loads(report.params_path.read_text())["layers"]
    assert layers["0"]["type"] == "Conv2d" and layers["2"]["type"] == "Linear"


class _ReadsAParameter(nn.Module):
    """A block whose forward reads a submodule's parameter (as PoolFormer's does)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, 4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.norm(x) * self.norm.weight.view(1, -1, 1, 1))


def test_a_rewritten_block_keeps_reading_its_submodules_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _ReadsAParameter(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    assert "1.op_add" in {layer.name for layer in qm.lowbit_plan.layers}
    lowbit.calibrate(qm, [x], progress=False)
    assert qm[1].norm.weight is not None and not hasattr(qm[1], "norm.weight")
    with torch.no_grad():
        assert torch.allclose(qm(x), model(x), atol=0.2)
