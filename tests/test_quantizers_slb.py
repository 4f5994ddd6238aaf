"""SLB weights: value sets, soft/hard forwards, temperature, init, codes, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.quantizers.slb  # noqa: F401  (registers "slb")
from lowbit import LayerRule, QuantSpec
from lowbit.nn import LayerSpecs, QuantLinear, init_weight_quantizer
from lowbit.numerics import dequantize
from lowbit.quantizers import make_quantizer
from lowbit.quantizers.slb import SLBQuantizer

BITS = (1, 2, 4)


def build(bits: int = 2, weight: torch.Tensor | None = None) -> SLBQuantizer:
    q = make_quantizer(QuantSpec(bits=bits, method="slb"), role="weight", channel_axis=0)
    assert isinstance(q, SLBQuantizer)
    init_weight_quantizer(q, torch.randn(6, 5, 3) if weight is None else weight)
    return q


def reference(logits: torch.Tensor, t: float, bits: int) -> torch.Tensor:
    """Hand-written expectation of softmax(logits * t) over linspace(-1, 1, 2**bits)."""
    v = torch.linspace(-1, 1, 2**bits)
    p = torch.exp(logits * t - (logits * t).amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True) * v).sum(-1)


@pytest.mark.parametrize("bits", BITS)
def test_value_sets(bits):
    q = build(bits)
    n = 2**bits
    assert torch.allclose(q.values(), torch.linspace(-1, 1, n), atol=1e-7)
    assert q.values()[0] == -1 and q.values()[-1] == 1 and not (q.values() == 0).any()
    assert q.logits is not None and q.logits.shape == (6, 5, 3, n)
    assert (q.grid.qmin, q.grid.qmax, q.grid.odd) == (-(n - 1), n - 1, True)
    assert q.folds_bn is False and q.is_ready()


@pytest.mark.parametrize("bits", BITS)
def test_hard_mode_equals_eval_and_stops_the_gradient(bits):
    q = build(bits).train()
    w = torch.randn(6, 5, 3)
    q.set_temperature(3.0, hard=True)
    out = q(w)
    assert torch.equal(out, q.eval()(w)) and out.dtype == torch.float32 and out.shape == w.shape
    assert not out.requires_grad


@pytest.mark.parametrize("bits", BITS)
def test_soft_gradient_matches_the_reference_expectation(bits):
    q = build(bits).train()
    q.set_temperature(2.5, hard=False)
    w, g = torch.randn(6, 5, 3), torch.randn(6, 5, 3)
    (q(w) * g).sum().backward()
    logits = q.logits.detach().clone().requires_grad_(True)
    ref = reference(logits, 2.5, bits)
    (ref * g).sum().backward()
    assert torch.allclose(q(w), ref, atol=1e-6)
    assert torch.allclose(q.logits.grad, logits.grad, atol=1e-6)


def test_temperature_multiplies_the_logits():
    q = build(2).train()
    w = torch.randn(6, 5, 3)
    target = q.eval()(w)
    q.train()
    gaps = []
    for t in (0.1, 1.0, 10.0, 100.0, 1e4):
        q.set_temperature(t, hard=False)
        out = q(w)
        assert torch.allclose(out, reference(q.logits.detach(), t, 2), atol=1e-6)
        gaps.append((out - target).abs().mean().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-3 and gaps[0] > 0.1


@pytest.mark.parametrize("bits", BITS)
def test_init_from_the_weight_picks_the_nearest_value(bits):
    w = torch.randn(8, 4, 3, 3)
    q = build(bits, w)
    w_n = w / w.abs().amax(dim=(1, 2, 3), keepdim=True)
    chosen = q.eval()(w)
    nearest = (w_n.unsqueeze(-1) - q.values()).abs().amin(-1)
    assert ((w_n - chosen).abs() <= nearest + 1e-6).all()
    p = torch.softmax(q.logits.detach(), -1).amax(-1)
    assert (p < 0.999).all(), "peaked, not one-hot"
    on_grid = w_n.abs() == 1  # each row's max: exactly a value of V
    assert (p[on_grid] > 0.6).all()


def test_init_random_is_golden_sticks_he_normal():
    q = build(2)
    gen = torch.Generator().manual_seed(3)
    q.init_random_(gen)
    first = q.logits.detach().clone()
    q.init_random_(torch.Generator().manual_seed(3))
    assert torch.equal(first, q.logits.detach())
    fan_out = 6 * 3 * 4  # torch's fan_out of a (6, 5, 3, 4) tensor
    assert abs(first.std().item() - (2 / fan_out) ** 0.5) < 0.03
    assert torch.softmax(first, -1).amax() < 0.7, "probabilities start near uniform"


@pytest.mark.parametrize("bits", BITS)
def test_codes_are_odd_and_dequantize_to_eval_exactly(bits):
    q = build(bits)
    q.init_random_()
    w = torch.randn(6, 5, 3)
    codes, qp = q.quantize_weight(w)
    n = 2**bits
    assert codes.dtype == torch.float32 and ((codes % 2).abs() == 1).all()
    assert codes.min() >= -(n - 1) and codes.max() <= n - 1
    assert qp.zero_point.dtype == torch.int32 and qp.axis is None and qp.grid.odd
    assert torch.equal(dequantize(codes, qp.scale, qp.zero_point), q.eval()(w))


def test_set_temperature_validates():
    q = build(2)
    for bad in ("1.0", True, None):
        with pytest.raises(TypeError, match="`t` must be a float"):
            q.set_temperature(bad, hard=False)  # type: ignore[arg-type]
    for bad in (0, 0.0, -1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`t` must be a finite float > 0"):
            q.set_temperature(bad, hard=False)
    with pytest.raises(TypeError, match="`hard` must be a bool"):
        q.set_temperature(1.0, hard=1)  # type: ignore[arg-type]
    q.set_temperature(4, hard=True)
    assert q.temperature.item() == 4.0 and bool(q.hard)


def test_spec_validation():
    for bits in (3, 8):
        with pytest.raises(ValueError, match=r"bits.*\[1, 2, 4\].*'slb'"):
            QuantSpec(bits=bits, method="slb")
    with pytest.raises(ValueError, match="'slb' quantizes weights only"):
        LayerRule(input=QuantSpec(bits=2, method="slb"))
    with pytest.raises(ValueError, match="weights only"):
        make_quantizer(QuantSpec(bits=2, method="slb"), role="input", channel_axis=1)


def test_state_dict_round_trip_with_temperature_and_hard():
    q = build(4)
    q.init_random_()
    q.set_temperature(7.5, hard=True)
    state = q.state_dict()
    assert set(state) == {"logits", "temperature", "hard", "initialized"}
    fresh = build(4)  # built through the layer path: already has logits of the right shape
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.state_dict()[k]) for k, a in state.items())
    w = torch.randn(6, 5, 3)
    assert torch.equal(fresh.train()(w), q.train()(w))
    bare = make_quantizer(QuantSpec(bits=4, method="slb"), role="weight", channel_axis=0)
    bare.load_state_dict(state)  # never told a shape: takes the saved one
    assert bare.is_ready() and torch.equal(bare.eval()(w), q.eval()(w))


def test_state_dict_shape_mismatch_is_a_clear_error():
    state = build(2).state_dict()
    with pytest.raises(ValueError, match=r"shape \(6, 5, 3, 4\).*needs \(6, 5, 2, 4\)"):
        build(2, torch.randn(6, 5, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="last dimension must be 16"):
        build(4).load_state_dict(state)


def test_a_tiny_search_moves_the_logits_toward_a_target():
    q = build(2, torch.randn(16, 8)).train()
    q.init_random_()
    target_idx = torch.randint(0, 4, (16, 8))
    target = q.values()[target_idx]
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    w = torch.zeros(16, 8)
    start = (q.logits.detach().argmax(-1) == target_idx).float().mean()
    for _ in range(100):
        opt.zero_grad()
        ((q(w) - target) ** 2).mean().backward()
        opt.step()
    assert start < 0.5
    assert (q.logits.detach().argmax(-1) == target_idx).all()
    assert torch.equal(q.eval()(w), target)


def test_through_a_linear_layer_only_the_logits_learn():
    layer = QuantLinear.from_float(nn.Linear(5, 3), LayerSpecs(weight=QuantSpec(bits=1, method="slb")))
    q = layer.weight_quant
    assert isinstance(q, SLBQuantizer) and q.is_ready()
    layer.train()(torch.randn(4, 5)).sum().backward()
    assert q.logits.grad is not None and q.logits.grad.abs().sum() > 0
    assert layer.weight.grad is None
    signs = torch.where(layer.weight >= 0, 1.0, -1.0)
    assert torch.equal(q.eval()(layer.weight), signs), "1 bit from the weight: its sign"
