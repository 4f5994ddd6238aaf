"""PACT: clip gradients against the paper, init, eval exactness, loss, state, training, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.quantizers.pact  # noqa: F401  (registers "pact")
from lowbit import LayerRule, QuantSpec
from lowbit.numerics import dequantize, fake_quantize, quantize
from lowbit.quantizers.base import make_quantizer

GRIDS = {  # name: spec fields
    "unsigned": {"symmetric": False},
    "unsigned_symmetric": {"signed": False},
    "signed_narrow": {"narrow_range": True},
    "signed": {},
}


def pact(bits: int = 4, **fields):
    return make_quantizer(QuantSpec(bits=bits, method="pact", **fields), role="input",
                          channel_axis=1)


def reference_grads(x, alpha, dy, qmin, qmax):
    """The paper's gradients: dL/dx inside the clip range, dL/dalpha from the clipped ends."""
    lo = alpha * qmin / qmax  # 0 unsigned, -alpha signed narrow, -alpha·128/127 int8
    high, low = x >= alpha, (x <= lo) if qmin < 0 else (x < 0)
    dx = dy * ~(high | low)
    dalpha = (dy * high).sum() + (qmin / qmax) * (dy * low).sum()
    return dx, dalpha


@settings(max_examples=30, deadline=None)
@given(grid=st.sampled_from(sorted(GRIDS)), bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_gradients_are_the_papers(grid, bits, seed):
    torch.manual_seed(seed)
    q = pact(bits, alpha_init=1.5, **GRIDS[grid]).train()
    x = (torch.randn(8, 3, 5) * 2).requires_grad_(True)
    dy = torch.randn(8, 3, 5)
    q(x).backward(dy)
    dx, dalpha = reference_grads(x.detach(), 1.5, dy, q.grid.qmin, q.grid.qmax)
    assert torch.equal(x.grad, dx)
    torch.testing.assert_close(q.alpha.grad.reshape(()), dalpha)  # a 1-element parameter


def test_alpha_gradient_counts_the_values_at_or_above_alpha():
    q = pact(4, symmetric=False, alpha_init=2.0).train()
    x = torch.tensor([-1.0, 0.0, 0.5, 1.99, 2.0, 2.5, 7.0], requires_grad=True)
    q(x).sum().backward()
    assert q.alpha.grad == 3, "x == alpha counts in full (torch.minimum would give a half)"
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0, 0, 0]))


def test_signed_narrow_grid_clips_at_minus_alpha():
    q = pact(4, narrow_range=True, alpha_init=1.0).train()
    x = torch.tensor([-3.0, -1.0, -0.5, 0.5, 1.0, 3.0], requires_grad=True)
    y = q(x)
    y.sum().backward()
    y = y.detach()
    assert torch.equal(y[[0, 1]], -y[[4, 5]]) and y[0].item() == pytest.approx(-1.0)
    assert q.alpha.grad == 0, "two values at +alpha and two at -alpha cancel"
    assert torch.equal(x.grad, torch.tensor([0.0, 0, 1, 1, 0, 0]))


@settings(max_examples=30, deadline=None)
@given(grid=st.sampled_from(sorted(GRIDS)), bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_eval_is_onnx_quantize_dequantize_and_equals_clip_then_quantize(grid, bits, seed):
    torch.manual_seed(seed)
    q = pact(bits, alpha_init=1.3, **GRIDS[grid])
    x = torch.randn(4, 3, 6) * 2
    qp = q.eval().qparams()
    assert qp.zero_point == 0 and qp.zero_point.dtype == torch.int32 and qp.axis is None
    assert qp.scale == pytest.approx(1.3 / q.grid.qmax)
    onnx = dequantize(quantize(x, qp.scale, qp.zero_point, qp.grid), qp.scale, qp.zero_point)
    assert torch.equal(q(x), onnx)
    lo = 1.3 * q.grid.qmin / q.grid.qmax
    clipped = torch.minimum(torch.maximum(x, torch.tensor(lo)), torch.tensor(1.3))
    assert torch.equal(fake_quantize(clipped, qp.scale, qp.zero_point, qp.grid), onnx)
    with torch.no_grad():
        torch.testing.assert_close(q.train()(x), onnx, rtol=0, atol=float(qp.scale) * 1.001)


def test_alpha_init_is_ready_at_construction():
    q = pact(alpha_init=10)
    assert q.is_ready() and q.alpha.item() == 10.0 and q.alpha.requires_grad
    assert not pact().is_ready()


@pytest.mark.parametrize("fields", [{"symmetric": False}, {}], ids=["unsigned", "signed"])
def test_first_training_batch_sets_the_least_error_alpha(fields):
    q = pact(**fields).train()
    x = torch.randn(4096).abs() * (1 if fields else 2) - (0 if fields else 1)
    x[0] = 40.0  # one outlier: the max would waste the grid on it
    q(x.reshape(64, 64))
    alpha = q.alpha.item()
    assert bool(q.initialized) and 0 < alpha < 20

    def error(a: float) -> float:
        s = a / q.grid.qmax
        lo = q.grid.qmin if q.grid.signed else 0
        return float(((x / s).round().clamp(lo, q.grid.qmax) * s - x).square().mean())

    assert error(alpha) <= min(error(40.0), error(alpha * 0.8), error(alpha * 1.25))


def test_first_batch_of_zeros_keeps_a_tiny_positive_alpha():
    q = pact(symmetric=False).train()
    q(torch.zeros(3, 3))
    assert q.alpha.item() > 0 and q.is_ready()


@pytest.mark.parametrize(("fields", "expected"), [({"symmetric": False}, 4.0), ({}, 6.0)])
def test_calibration_sets_alpha_from_the_observed_range(fields, expected):
    q = pact(alpha_init=10.0, **fields).eval()
    q.observing = True
    for x in (torch.tensor([-6.0, 1.0]), torch.tensor([0.5, 4.0])):
        assert torch.equal(q(x), x)
    q.observing = False
    q.freeze()
    assert q.alpha.item() == expected, "calibration replaces alpha_init"


def test_loss_is_alpha_squared_with_its_gradient():
    q = pact(alpha_init=3.0)
    loss = q.loss()
    loss.backward()
    assert loss.item() == 9.0 and q.alpha.grad == 6.0


def test_state_dict_loads_into_a_fresh_quantizer():
    q = pact(symmetric=False).train()
    q(torch.rand(8, 4) * 3)
    with torch.no_grad():
        q.alpha.mul_(0.7)
    fresh = pact(symmetric=False)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(8, 4) * 3
    assert fresh.is_ready() and torch.equal(fresh.eval()(x), q.eval()(x))
    assert "zero" not in q.state_dict(), "the constant zero point is not state"


def test_scale_property_matches_qparams():
    q = pact(8, symmetric=False, alpha_init=2.55)
    assert torch.equal(q.scale, q.qparams().scale) and not q.scale.requires_grad


def test_training_learns_alpha_and_lowers_the_error():
    x = torch.relu(torch.randn(512, 16))  # clipped hard at first: alpha must grow
    q = pact(2, symmetric=False, alpha_init=0.2).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    losses = []
    for _ in range(100):
        loss = (q(x) - x).square().mean() + 1e-4 * q.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert q.alpha.item() > 0.5 and losses[-1] < 0.5 * losses[0]


def test_alpha_pushed_below_zero_keeps_learning():
    q = pact(4, symmetric=False, alpha_init=1.0).train()
    with torch.no_grad():
        q.alpha.neg_()  # an overshooting optimizer step
    x = torch.tensor([0.5, 2.0, 3.0])
    q(x).sum().backward()
    assert q.alpha.grad == -2, "clips at |alpha|; the gradient follows the sign"
    assert q.qparams().scale == pytest.approx(1 / 15) and q(x).max().item() == pytest.approx(1)


def test_uncalibrated_eval_passes_through():
    x = torch.randn(4, 3)
    assert torch.equal(pact().eval()(x), x)


def test_weights_clip_symmetrically_at_alpha():
    """PaddleSlim's weight_preprocess_type='PACT': a signed grid clipped at ±alpha."""
    spec = QuantSpec(bits=4, method="pact", alpha_init=0.5, narrow_range=True)
    assert LayerRule(weight=spec).weight is spec
    q = make_quantizer(spec, role="weight", channel_axis=0).train()
    w = torch.linspace(-1, 1, 21).requires_grad_()
    out = q(w)
    assert out.min().item() == pytest.approx(-0.5) and out.max().item() == pytest.approx(0.5)
    out.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(float((w >= 0.5).sum() - (w <= -0.5).sum()))


def test_validation_errors_name_the_problem():
    with pytest.raises(NotImplementedError, match="per_channel"):
        pact(granularity="per_channel")
    with pytest.raises(ValueError, match="dynamic"):
        pact(8, symmetric=False, dynamic=True)
    with pytest.raises(ValueError, match=r"bits.*'pact', got 1"):
        QuantSpec(bits=1, method="pact")
    with pytest.raises(ValueError, match="alpha_init.*> 0"):
        QuantSpec(method="pact", alpha_init=0.0)
    with pytest.raises(ValueError, match="no clip level yet"):
        pact().qparams()
    with pytest.raises(ValueError, match="NaN or Inf"):
        pact().observe(torch.tensor([float("inf")]))
