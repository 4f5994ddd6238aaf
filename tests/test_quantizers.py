"""The quantizer interface: modes, state dicts, errors, repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, QuantSpec
from lowbit.quantizers import make_quantizer
from lowbit.registry import QUANTIZERS


def test_modes_train_observe_eval():
    q = make_quantizer(QuantSpec(bits=8, symmetric=False), role="input", channel_axis=1)
    x = torch.randn(64) * 3
    q.eval()
    assert torch.equal(q(x), x), "an uncalibrated quantizer passes values through"
    q.observing = True
    assert torch.equal(q(x), x), "observing records ranges, changes nothing"
    q.observing = False
    q.freeze()
    y = q(x)
    assert not torch.equal(y, x) and (y - x).abs().max() <= q.scale / 2 + 1e-6
    q.train()
    wide = torch.randn(64) * 10
    q(wide)
    assert q.scale > 20 / 255, "training mode follows the ranges it sees"


def test_weight_range_follows_the_current_weight_in_training():
    layer = lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), QuantConfig.preset("w8a8"))[0]
    before = layer.weight_quant.scale.clone()
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.train()
    layer.weight_quant(layer.weight)
    assert torch.allclose(layer.weight_quant.scale, 2 * before)


def test_state_dict_round_trips_into_a_fresh_quantized_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    cfg = QuantConfig.preset("w8a8")
    qm = lowbit.quantize(model.eval(), cfg)
    lowbit.calibrate(qm, [torch.randn(4, 3, 8, 8) for _ in range(3)], progress=False)
    state = qm.state_dict()
    fresh = lowbit.quantize(model.eval(), cfg)
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), qm(x))
    assert all(torch.equal(a, fresh.state_dict()[k]) for k, a in state.items())


def test_nan_in_the_input_names_the_layer():
    qm = lowbit.quantize(nn.Sequential(nn.Linear(4, 2)), QuantConfig.preset("w8a8"))
    batch = torch.randn(2, 4)
    batch[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*NaN"):
        lowbit.calibrate(qm, [batch], progress=False)


def test_per_group_needs_a_group_size_that_divides_the_inputs():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=3)
    cfg = QuantConfig(rules=[lowbit.LayerRule(types=["Linear"], weight=spec)])
    with pytest.raises(ValueError, match="group_size.*3.*16"):
        lowbit.quantize(nn.Sequential(nn.Linear(16, 4)), cfg)


def test_per_group_is_for_weights_only():
    with pytest.raises(NotImplementedError, match="weights only"):
        make_quantizer(QuantSpec(granularity="per_group", group_size=8), role="input",
                       channel_axis=1)


def test_repr_says_bits_granularity_observer_and_method():
    q = make_quantizer(QuantSpec(bits=4, granularity="per_channel", observer="kl"),
                       role="weight", channel_axis=0)
    assert "int4, symmetric, per_channel, observer=kl, method=ste" in repr(q)


def test_unknown_method_lists_registered_ones():
    with pytest.raises(ValueError, match=r"QuantSpec.method.*'ste'"):
        QuantSpec(method="nope")
    assert "ste" in QUANTIZERS


def test_bias_lands_on_the_int32_grid_of_input_times_weight_scale():
    qm = lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), QuantConfig.preset("w8a8"))
    layer = qm[0]
    assert torch.equal(layer.effective_bias(), layer.bias), "uncalibrated: float bias"
    lowbit.calibrate(qm, [torch.randn(16, 8)], progress=False)
    step = layer.input_quant.scale * layer.weight_quant.scale  # (4,)
    ticks = layer.effective_bias() / step
    assert torch.allclose(ticks, ticks.round(), atol=1e-3)
    assert (layer.effective_bias() - layer.bias).abs().max() <= step.max() / 2 + 1e-7
    dm = lowbit.convert(qm)
    assert torch.equal(dm[0].bias, layer.effective_bias())
    assert dm[0].int_bias.codes.dtype == torch.int32
    assert torch.equal(dm[0].int_bias.codes.float(), ticks.round())


def test_set_qparams_fixes_a_range_from_outside():
    q = make_quantizer(QuantSpec(bits=8, symmetric=False), role="input", channel_axis=1)
    q.set_qparams(1 / 127.5, 128)
    assert q.is_ready() and q.qparams().zero_point.item() == 128
    x = torch.tensor([-0.5, 0.0, 2.0])
    assert torch.allclose(q.eval()(x), torch.tensor([-64 / 127.5, 0.0, 127 / 127.5]))
    with pytest.raises(ValueError, match="`scale` must be > 0"):
        q.set_qparams(0.0, 0)
    with pytest.raises(ValueError, match=r"`zero_point` must lie in \[0, 255\]"):
        q.set_qparams(0.1, 300)
    with pytest.raises(ValueError, match="`zero_point` must hold integers"):
        q.set_qparams(0.1, torch.tensor(1.5))
    lsq = make_quantizer(QuantSpec(bits=2, method="slb"), role="weight", channel_axis=0)
    with pytest.raises(NotImplementedError, match="'slb' does not take fixed qparams"):
        lsq.set_qparams(0.1, 0)


def test_refresh_weight_range_follows_a_replaced_weight():
    qm = lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), QuantConfig(rules=[
        lowbit.LayerRule(types=["Linear"], weight=QuantSpec(bits=8))]))
    with torch.no_grad():
        qm[0].weight.mul_(3)
    qm[0].refresh_weight_range()
    dm = lowbit.convert(qm)
    assert torch.allclose(dm[0].weight.scale, qm[0].weight.abs().max() / 127)
